"""Perplexity and bits per byte: the negative log-likelihood of a token stream, windowed.

Every token is predicted once, and once the window slides each sees at least `seq_len - stride`
tokens of context. The loss itself comes from `palm.core.heldout.summed_nll`, the same sum pretraining's
validation takes, so `palm eval --corpus` and a run's validation curve measure the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.heldout import summed_nll
from ..core.rundir import RunLayout
from ..data.corpora import parse_corpus_spec
from ..data.data import val_bytes_for
from ..data.shards import prepare_data
from ..model.loss import IGNORE_INDEX
from .errors import EvaluationError

if TYPE_CHECKING:
    from ..model.model import PalmForCausalLM
    from ..text.tokenizer import PalmTokenizer

DEFAULT_VAL_FRACTION = 0.05  # palm train's


@dataclass
class TextScore:
    """Negative log-likelihood of a stretch of text, and the usual ways to read it."""

    name: str
    tokens: int  # tokens predicted
    bytes: float  # UTF-8 bytes those tokens stand for
    nll: float  # summed, in nats

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "corpus": self.name,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nll": self.nll,
            "bits_per_byte": self.bits_per_byte,
            "perplexity": self.perplexity,
        }


def sliding_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first) for windows over a stream of n tokens that predict ids[1:] exactly once.

    A window feeds ids[start:end] and predicts ids[start+1:end+1]; it scores the targets with index
    in (first, end], those no earlier window scored. Windows start `stride` apart, so every scored
    target after the first window sees at least seq_len - stride tokens of context.
    """
    if seq_len < 1:
        raise EvaluationError(f"sequence length must be positive, not {seq_len}")
    if not 1 <= stride <= seq_len:
        raise EvaluationError(f"stride must be between 1 and the sequence length ({seq_len}), not {stride}")
    windows, done, start = [], 0, 0
    while done < n - 1:
        end = min(start + seq_len, n - 1)
        windows.append((start, end, done))
        done, start = end, start + stride
    return windows


def _window_batches(
    ids: np.ndarray, windows: Sequence[tuple[int, int, int]], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) for `summed_nll`: right-padded windows, each scoring only its new targets.

    Right padding needs no attention mask: attention is causal, so pads only follow the real tokens.
    """
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        inputs = torch.full((len(batch), max(e - s for s, e, _ in batch)), pad_id, dtype=torch.long)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        for row, (s, e, first) in enumerate(batch):
            inputs[row, : e - s] = torch.from_numpy(ids[s:e])
            # Position j predicts ids[s + j + 1]; the targets up to `first` an earlier window scored.
            targets[row, first - s : e - s] = torch.from_numpy(ids[first + 1 : e + 1])
        yield inputs, targets


def score_stream(
    model: PalmForCausalLM,
    ids: Sequence[int] | np.ndarray,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 4,
    pad_id: int = 0,
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, targets) of ids[1:] given what precedes each, windowed."""
    ids = np.asarray(ids, dtype=np.int64)
    windows = sliding_windows(len(ids), seq_len, seq_len if stride is None else stride)
    # The weights' own precision: fp32 weights stay exact instead of depending on this machine's bf16 support.
    dtype = torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float32
    return summed_nll(model, _window_batches(ids, windows, batch_size, pad_id), device=model.device, dtype=dtype)


def score_text(
    model: PalmForCausalLM,
    tokenizer: PalmTokenizer,
    text: str,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
) -> TextScore:
    """Bits per byte of one text: every token of it is predicted, the first from `<eod>` alone.

    `<eod>` rather than BOS, because in pretraining a document follows the previous one's `<eod>`.
    """
    if not text:
        raise EvaluationError("the text to score is empty")
    ids = [tokenizer.eod_id] + tokenizer.encode(text, bos=False)
    seq_len = model.config.max_position_embeddings if seq_len is None else seq_len
    nll, n = score_stream(model, ids, seq_len, stride, batch_size, tokenizer.pad_id)
    return TextScore("text", n, float(len(text.encode("utf-8"))), nll)


@dataclass
class CorpusEvalConfig:
    """Where the held-out text comes from and how it is windowed (None: from the run, else defaults)."""

    corpus: list[str]
    seq_len: int | None = None  # None: the run's training length, else the model's context
    stride: int | None = None  # None: seq_len (windows side by side)
    val_fraction: float | None = None  # None: the run's, else 0.05 (palm train's default)
    cache_dir: str | None = None  # None: the run's token cache, else beside the model
    max_tokens: int | None = None  # per corpus: score at most this many held-out tokens
    batch_size: int = 4


def _run_settings(model_dir: Path) -> dict[str, Any]:
    """seq_len, val_fraction and cache folder of the training run that wrote RUN/final, if it is one.

    Only top-level values of the right type count: a run.json that nests its settings (or a newer
    one this version cannot read) falls back to the defaults rather than failing the evaluation.
    """
    layout = RunLayout.of_model(model_dir)
    if layout is None:
        return {}
    try:
        raw = json.loads(layout.settings.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    seq_len, fraction, cache = raw.get("seq_len"), raw.get("val_fraction"), raw.get("cache_dir")
    return {
        "seq_len": seq_len if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0 else None,
        "val_fraction": fraction if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else None,
        "cache_dir": cache if isinstance(cache, str) and cache else str(layout.default_cache()),
    }


def evaluate_corpora(
    model: PalmForCausalLM,
    tokenizer: PalmTokenizer,
    cfg: CorpusEvalConfig,
    model_dir: str | Path | None = None,
    progress: bool = False,
) -> list[TextScore]:
    """Perplexity and bits per byte on the held-out split of every corpus of a mixture.

    The split is the one `palm train` holds out (documents chosen by a hash of their position), so a
    run's own model is scored on text it never trained on when the settings match the run's; they
    are read from RUN/run.json when `model_dir` is RUN/final.
    """
    run = _run_settings(Path(model_dir)) if model_dir is not None else {}
    context = model.config.max_position_embeddings
    seq_len = cfg.seq_len if cfg.seq_len is not None else min(run.get("seq_len") or context, context)
    if seq_len > context:
        raise EvaluationError(f"--seq-len {seq_len} is longer than the model's context ({context})")
    stride = seq_len if cfg.stride is None else cfg.stride
    sliding_windows(0, seq_len, stride)  # checks the settings before any tokenizing
    val_fraction = cfg.val_fraction if cfg.val_fraction is not None else run.get("val_fraction") or DEFAULT_VAL_FRACTION
    if not 0 < val_fraction < 1:
        raise EvaluationError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise EvaluationError(f"--max-tokens must be positive, not {cfg.max_tokens}")
    cache = Path(cfg.cache_dir or run.get("cache_dir") or Path(model_dir or ".").resolve().parent / ".palm-cache")
    data = prepare_data(parse_corpus_spec(cfg.corpus), tokenizer, cache, seq_len, val_fraction, progress=progress)
    scores = []
    for i, name in enumerate(data.names):
        val = data.val[i]
        if len(val) < 2:
            raise EvaluationError(f"corpus {name} has no held-out text to score")
        n = len(val) - 1 if cfg.max_tokens is None else min(len(val) - 1, cfg.max_tokens)
        nll, count = score_stream(model, val[: n + 1], seq_len, stride, cfg.batch_size, tokenizer.pad_id)
        scores.append(TextScore(name, count, val_bytes_for(data, i, count), nll))
    return scores
