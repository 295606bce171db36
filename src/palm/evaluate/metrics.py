"""Scores of generated text against one or several references, as the field reports them.

- `exact_match` and `f1`: the SQuAD v1.1 evaluation script's definitions (lower case, no punctuation, no
  English articles, whitespace collapsed; F1 over the bag of tokens), the best over an example's
  references. Text with Chinese characters is compared character by character, as CMRC 2018's script does.
- `exact_string`: equal after stripping leading and trailing whitespace (code, numbers with a sign).
- `rouge1`, `rouge2`, `rouge_l`, `rouge_lsum`: rouge-score's F-measures, best over the references, with a
  tokenizer that keeps Chinese (rouge-score's default keeps only [a-z0-9]).
- `bleu`, `chrf`, `chrf++`: sacreBLEU corpus scores, 0-100; `signature(name, predictions, references)` is the string
  sacreBLEU prints so that a score can be reproduced (Chinese is tokenized by character, `tok:zh`).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from .errors import require

_CJK_RANGES = "\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef\u3000-\u303f"
_CJK = re.compile(f"[{_CJK_RANGES}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")

References = Sequence[str | Sequence[str]]  # one reference per prediction, or several


class WordsAndCharacters:
    """ROUGE tokenizer: rouge-score's own on Latin text (lower case, runs of letters and digits, punctuation
    dropped), and one token per Chinese, Japanese or Korean character, which rouge-score's drops."""

    _TOKEN = re.compile(f"[{_CJK_RANGES}]|[^\\W_{_CJK_RANGES}]+")

    def tokenize(self, text: str) -> list[str]:
        return [t for t in self._TOKEN.findall(text.lower()) if not _is_punctuation(t[0])]


def as_lists(references: References) -> list[list[str]]:
    """Every example's references as a list (a bare string is one reference)."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _pairs(predictions: Sequence[str], references: References) -> list[tuple[str, list[str]]]:
    refs = as_lists(references)
    if len(refs) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(refs)} references")
    return list(zip(predictions, refs))


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def squad_tokens(text: str) -> list[str]:
    """SQuAD v1.1's `normalize_answer(...).split()`; Chinese text as its characters with punctuation and
    spaces dropped (CMRC 2018), Latin words inside it kept whole."""
    text = text.lower()
    if _CJK.search(text):
        out, word = [], ""
        for char in text:
            if _CJK.match(char) or _is_punctuation(char) or char.isspace():
                if word:
                    out.append(word)
                word = ""
                if _CJK.match(char) and not _is_punctuation(char):
                    out.append(char)
            else:
                word += char
        return out + ([word] if word else [])
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return _ARTICLES.sub(" ", text).split()


def _f1(prediction: list[str], reference: list[str]) -> float:
    common = Counter(prediction) & Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: References) -> float:
    """Share of predictions equal to one of their references after SQuAD's normalisation."""
    return float(
        np.mean([max(squad_tokens(p) == squad_tokens(r) for r in refs) for p, refs in _pairs(predictions, references)])
    )


def f1(predictions: Sequence[str], references: References) -> float:
    """Mean of the best token F1 against each example's references (SQuAD v1.1)."""
    return float(
        np.mean(
            [max(_f1(squad_tokens(p), squad_tokens(r)) for r in refs) for p, refs in _pairs(predictions, references)]
        )
    )


def exact_string(predictions: Sequence[str], references: References) -> float:
    """Share of predictions equal to a reference, leading and trailing whitespace aside."""
    return float(np.mean([any(p.strip() == r.strip() for r in refs) for p, refs in _pairs(predictions, references)]))


def _rouge(kind: str) -> Callable[[Sequence[str], References], float]:
    def score(predictions: Sequence[str], references: References) -> float:
        rouge_scorer = require("rouge_score.rouge_scorer", f"metric {kind}")
        scorer = rouge_scorer.RougeScorer([kind], tokenizer=WordsAndCharacters())
        return float(
            np.mean([scorer.score_multi(refs, p)[kind].fmeasure for p, refs in _pairs(predictions, references)])
        )

    score.__doc__ = f"Mean {kind} F-measure (rouge-score), best over each example's references."
    return score


rouge1, rouge2, rouge_l, rouge_lsum = (_rouge(k) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))


def _streams(references: References) -> list[list[str | None]]:
    """sacreBLEU's reference streams: the i-th reference of every example, None where one has fewer."""
    refs = as_lists(references)
    width = max(map(len, refs), default=1)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(width)]


def _sacrebleu(name: str, references: References):
    """The sacreBLEU metric object behind `name`; Chinese references are tokenized by character."""
    metrics = require("sacrebleu.metrics", f"metric {name}")
    if name == "bleu":
        # 13a splits on spaces, which Chinese text has none of: a whole sentence would be one word.
        chinese = any(_CJK.search(r) for refs in as_lists(references) for r in refs)
        return metrics.BLEU(tokenize="zh" if chinese else "13a")
    return metrics.CHRF(word_order=2 if name == "chrf++" else 0)


def _corpus(name: str) -> Callable[[Sequence[str], References], float]:
    def score(predictions: Sequence[str], references: References) -> float:
        _pairs(predictions, references)
        return float(_sacrebleu(name, references).corpus_score(list(predictions), _streams(references)).score)

    score.__doc__ = f"Corpus {name} (sacreBLEU), 0-100."
    return score


bleu, chrf, chrf_pp = (_corpus(n) for n in ("bleu", "chrf", "chrf++"))


def signature(name: str, predictions: Sequence[str], references: References) -> str | None:
    """sacreBLEU's signature of metric `name` on these predictions (None for metrics that have none)."""
    if name not in ("bleu", "chrf", "chrf++"):
        return None
    metric = _sacrebleu(name, references)
    metric.corpus_score(list(predictions), _streams(references))  # the signature counts the references it saw
    return str(metric.get_signature())


GENERATION_METRICS: dict[str, Callable[[Sequence[str], References], float]] = {
    "exact_match": exact_match,
    "f1": f1,
    "exact_string": exact_string,
    "rouge1": rouge1,
    "rouge2": rouge2,
    "rouge_l": rouge_l,
    "rouge_lsum": rouge_lsum,
    "bleu": bleu,
    "chrf": chrf,
    "chrf++": chrf_pp,
}
# The names `palm finetune --select` takes, as the issue tracker and papers say them.
ALIASES = {
    "exact": "exact_match",
    "em": "exact_match",
    "rougeL": "rouge_l",
    "rougeLsum": "rouge_lsum",
    "chrfpp": "chrf++",
}
