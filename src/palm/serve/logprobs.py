"""Log-probabilities in the two shapes of OpenAI's API, from palm.inference.engine's Scores (a token's raw
log-softmax under the model, and the k most likely tokens with theirs):

- completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, the prompt's tokens first with
  `echo` (the first has no log-probability: null), as lm-evaluation-harness reads them;
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.

A token's text is its own decoding, or its vocabulary piece where that is part of a character (a byte piece).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..inference.engine import Score
from ..text.tokenizer import PalmTokenizer


def token_text(tokenizer: PalmTokenizer, token: int) -> str:
    text = tokenizer.decode([token])
    return text if "\ufffd" not in text else str(tokenizer.hf.convert_ids_to_tokens(token))


def completion_logprobs(
    tokenizer: PalmTokenizer, tokens: Sequence[int], scores: Sequence[Score | None], offset: int = 0
) -> dict:
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [None if s is None else s[0] for s in scores],
        "top_logprobs": [None if s is None else {token_text(tokenizer, t): lp for t, lp in s[1]} for s in scores],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: PalmTokenizer, tokens: Sequence[int], scores: Sequence[Score]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(t, s[0]), "top_logprobs": [entry(k, lp) for k, lp in s[1]]} for t, s in zip(tokens, scores)
        ]
    }
