"""Scoring a model on a task: log-likelihoods of continuations (multiple choice) and greedy
generations (scored by the task's metrics), the paper's few-shot protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..inference.generate import Generator, SamplingConfig
from ..text.chat import encode_prompt
from ..text.templates import reply_text
from .errors import EvaluationError
from .metrics import GENERATION_METRICS, signature
from .tasks import Task, build_prompt, fewshot_examples

if TYPE_CHECKING:
    from ..model.model import PalmForCausalLM
    from ..text.tokenizer import PalmTokenizer


def split_for_scoring(tokenizer: PalmTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context with BOS, continuation): the text context + continuation as the tokenizer
    splits it, cut where its tokens part from those of the context alone.

    Usually that is the end of the context. When the continuation completes the context's last word
    ("生产关" + "系的…" is "生产", "关系", ...), the merged token and all after it are scored, so a choice
    is always scored as the text it makes, in the model's own tokenization. (lm-eval scores the
    tokens after the context's length instead, which there leaves "系" out.) As in lm-eval, trailing
    whitespace of the context moves to the continuation: the vocabulary joins a space to the next word.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces and len(context) > spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    common = 0
    while common < min(len(ctx), len(whole)) and ctx[common] == whole[common]:
        common += 1
    return whole[:common], whole[common:]


def _batch_log_probs(model: PalmForCausalLM, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """log-softmax over the vocabulary for right-padded rows, [B, T, V] in fp32.

    Right padding needs no attention mask: attention is causal, so pads only follow the real tokens.
    """
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=model.device)
    return model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)


def loglikelihoods(
    model: PalmForCausalLM, tokenizer: PalmTokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding would produce it) for each request.

    A request longer than the context keeps its last tokens (the continuation always stays whole).
    """
    context = model.config.max_position_embeddings
    encoded = []
    for ctx_text, cont_text in requests:
        ctx, cont = split_for_scoring(tokenizer, ctx_text, cont_text)
        if not cont:
            raise EvaluationError("a continuation to score is empty")
        if len(cont) > context:
            raise EvaluationError(f"a continuation is {len(cont)} tokens; the model's context is {context}")
        encoded.append(((ctx + cont)[-(context + 1) :], len(cont)))
    # Longest first, so that a batch holds rows of similar length and little padding.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            logp = _batch_log_probs(model, [encoded[i][0][:-1] for i in batch], tokenizer.pad_id)
            for row, i in enumerate(batch):
                ids, n = encoded[i]
                end = len(ids) - 1
                scores = logp[row, end - n : end]
                targets = torch.tensor(ids[-n:], device=scores.device)
                total = float(scores.gather(-1, targets[:, None]).sum())
                out[i] = (total, bool((scores.argmax(-1) == targets).all()))
    return out


def _fit_prompt(tokenizer: PalmTokenizer, task: Task, index: int, shots: int, seed: int, budget: int) -> str:
    """The k-shot prompt, with its earliest shots (and then its start) cut until it fits `budget` tokens."""
    for drop in range(shots + 1):
        prompt = build_prompt(task, index, shots, seed, drop)
        if len(tokenizer.encode(prompt)) <= budget:
            return prompt
    while len(tokenizer.encode(prompt)) > budget:
        prompt = prompt[max(1, len(prompt) // 10) :]
    return prompt


def _score_choices(
    model: PalmForCausalLM, tokenizer: PalmTokenizer, task: Task, indices: range, shots: int, seed: int, batch_size: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(acc and acc_norm, one record per example) of a multiple-choice task."""
    prompts = [build_prompt(task, i, shots, seed) for i in indices]
    requests = [(p, task.target_delimiter + c) for p, i in zip(prompts, indices) for c in task.examples[i].choices]
    scores = iter(loglikelihoods(model, tokenizer, requests, batch_size))
    hits, hits_norm, records = [], [], []
    for i in indices:
        ex = task.examples[i]
        lls = np.array([next(scores)[0] for _ in ex.choices])
        # acc_norm divides by the choice's length in characters, as lm-eval does.
        norm = lls / np.array([len(c) for c in ex.choices])
        hits.append(int(lls.argmax()) == ex.answer)
        hits_norm.append(int(norm.argmax()) == ex.answer)
        records.append(
            {
                "prompt": ex.prompt,
                "target": ex.answer,
                "loglikelihoods": lls.tolist(),
                "prediction": int(lls.argmax()),
                "prediction_norm": int(norm.argmax()),
            }
        )
    return {"acc": float(np.mean(hits)), "acc_norm": float(np.mean(hits_norm))}, records


def generation_metrics(task: Task, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    return {name: GENERATION_METRICS[name](predictions, references) for name in task.metrics}


def signatures(task: Task, records: list[dict[str, Any]]) -> dict[str, str]:
    """sacreBLEU's signature of each of the task's metrics that has one, from the scored records."""
    predictions = [r["prediction"] for r in records]
    references = [[r["target"]] if isinstance(r["target"], str) else r["target"] for r in records]
    found = {name: signature(name, predictions, references) for name in task.metrics}
    return {name: sig for name, sig in found.items() if sig}


def _score_generations(
    model: PalmForCausalLM, tokenizer: PalmTokenizer, task: Task, indices: range, shots: int, seed: int, batch_size: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(the task's metrics, one record per example) of greedy generations for a generation task."""
    budget = model.config.max_position_embeddings - task.max_new_tokens
    if budget < 2:
        raise EvaluationError(
            f"max_new_tokens {task.max_new_tokens} leaves no room for a prompt in the model's context"
        )
    generator = Generator(model, tokenizer)
    prompts = [_fit_prompt(tokenizer, task, i, shots, seed, budget) for i in indices]
    cfg = SamplingConfig(max_new_tokens=task.max_new_tokens, temperature=0.0, stop=list(task.stop))
    predictions: list[str] = []
    for b in range(0, len(prompts), batch_size):
        predictions += [c.text for c in generator.generate(prompts[b : b + batch_size], cfg)]
    references = [list(task.examples[i].references) for i in indices]
    metrics = generation_metrics(task, predictions, references)
    records = [
        {"prompt": task.examples[i].prompt, "target": r[0] if len(r) == 1 else r, "prediction": p}
        for i, r, p in zip(indices, references, predictions)
    ]
    return metrics, records


def _score_chats(
    model: PalmForCausalLM, tokenizer: PalmTokenizer, task: Task, indices: range, shots: int, seed: int, batch_size: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(the task's metrics, one record per example) of the greedy next assistant turn of each conversation,
    prompted by the chat template and ended by its end-of-turn token."""
    generator = Generator(model, tokenizer)
    prompts = [encode_prompt(tokenizer, list(task.examples[i].messages)) for i in indices]
    context = model.config.max_position_embeddings - task.max_new_tokens
    if any(len(p) > context for p in prompts):
        raise EvaluationError(
            f"a conversation of task {task.name} does not fit the model's context with "
            f"max_new_tokens {task.max_new_tokens}"
        )
    cfg = SamplingConfig(max_new_tokens=task.max_new_tokens, temperature=0.0)
    predictions: list[str] = []
    for b in range(0, len(prompts), batch_size):
        rows: list[list[int]] = [[] for _ in prompts[b : b + batch_size]]
        ended = [False] * len(rows)
        for token in generator.token_stream(prompts[b : b + batch_size], cfg):
            for r, t in enumerate(token.tolist()):
                ended[r] = ended[r] or t in generator.eos_ids
                if not ended[r]:
                    rows[r].append(t)
            if all(ended):
                break
        predictions += [reply_text(tokenizer.decode(ids)) for ids in rows]
    references = [list(task.examples[i].references) for i in indices]
    metrics = generation_metrics(task, predictions, references)
    records = [
        {"messages": list(task.examples[i].messages), "target": r[0] if len(r) == 1 else r, "prediction": p}
        for i, r, p in zip(indices, references, predictions)
    ]
    return metrics, records


def evaluate_task(
    model: PalmForCausalLM,
    tokenizer: PalmTokenizer,
    task: Task,
    shots: int = 0,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    samples: bool = True,
) -> dict[str, Any]:
    """Score a model on a task, k-shot: a dict with the task, settings, metrics and (optionally) samples."""
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be positive, not {limit}")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be positive, not {batch_size}")
    indices = range(min(len(task.examples), limit or len(task.examples)))
    fewshot_examples(task, 0, shots, seed)  # checks there are enough examples to draw from
    score = {"multiple_choice": _score_choices, "chat": _score_chats}.get(task.kind, _score_generations)
    metrics, records = score(model, tokenizer, task, indices, shots, seed, batch_size)
    result: dict[str, Any] = {
        "task": task.name,
        "kind": task.kind,
        "shots": shots,
        "seed": seed,
        "examples": len(indices),
        "metrics": metrics,
        "source": task.source,
    }
    if task.kind != "multiple_choice" and signatures(task, records):
        result["signatures"] = signatures(task, records)
    if samples:
        result["samples"] = records
    return result
