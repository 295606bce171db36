"""Scores of generated text against references: exact match, ROUGE-L, chrF and BLEU."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from .errors import require

_CJK = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef\u3000-\u303f]")


class WordsAndCharacters:
    """ROUGE tokenizer: lowercase Latin words and digits, and one token per CJK character or symbol.

    rouge-score's default tokenizer keeps only [a-z0-9], so Chinese text would have no tokens at all.
    """

    _TOKEN = re.compile(r"[^\W_]+|[^\w\s]", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        out = []
        for word in self._TOKEN.findall(text.lower()):
            out.extend(word if _CJK.search(word) else [word])
        return out


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to the reference, leading and trailing whitespace aside."""
    return float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)]))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score), over words and CJK characters."""
    rouge_scorer = require("rouge_score.rouge_scorer", "metric rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=WordsAndCharacters())
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]))


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu), 0-100."""
    sacrebleu = require("sacrebleu", "metric chrf")
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu), 0-100; Chinese references are tokenized by character (sacrebleu's `zh`)."""
    sacrebleu = require("sacrebleu", "metric bleu")
    # 13a splits on spaces, which Chinese text has none of: a whole sentence would be one word.
    tokenize = "zh" if any(_CJK.search(r) for r in references) else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score)


GENERATION_METRICS = {"exact_match": exact_match, "rouge_l": rouge_l, "chrf": chrf, "bleu": bleu}
