"""Measuring a model: bits per byte on held-out text, zero- and few-shot tasks, and lm-evaluation-harness.

Three ways in, one module:

- `score_stream` / `score_text` / `evaluate_corpora`: negative log-likelihood of a token stream with a
  sliding window (every token predicted once, with at least `seq_len - stride` tokens of context
  once the window slides), reported as perplexity and bits per UTF-8 byte per corpus of a mixture;
- `load_task` / `evaluate_task`: the paper's few-shot protocol on local task files. Multiple choice
  is scored by the log-likelihood of each choice (accuracy and length-normalised accuracy), generation
  greedily, by exact match, ROUGE-L (`rouge-score`) or chrF/BLEU (`sacrebleu`);
- `run_harness`: lm-evaluation-harness's `hf` model on a palm directory, in this process, so palm's
  registration with the Auto classes is all it needs.

Task files. A `.jsonl` file holds one example per line: `{"prompt": str, "answer": str}` for generation
or `{"prompt": str, "choices": [str, ...], "answer": int}` for multiple choice (the kind follows from
the first row). A `.yaml` file names such a file and says how to use it:

    name: arithmetic            # default: the YAML file's name
    file: test.jsonl            # relative to the YAML file
    kind: generate              # or multiple_choice
    template: "Q: {prompt}\\nA:" # the prompt as the model sees it (Python format string)
    target_delimiter: " "       # between the templated prompt and its answer (default: nothing)
    metric: exact_match         # or [rouge_l, chrf, bleu]; multiple_choice: accuracy (acc and acc_norm)
    fewshot_file: train.jsonl   # k-shot examples come from this split (default: the other test examples)
    fewshot_delimiter: "\\n\\n"   # between examples of a k-shot prompt
    max_new_tokens: 16          # generation only
    stop: ["\\n"]                # generation stops at any of these (default: a newline)
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import PalmError

if TYPE_CHECKING:
    import torch

    from .model import PalmForCausalLM
    from .tokenizer import PalmTokenizer


class EvaluationError(PalmError):
    """An evaluation setting or model that cannot be evaluated as asked."""


class TaskError(EvaluationError):
    """A task file that is missing, empty or malformed."""


METRICS: dict[str, tuple[str, ...]] = {
    "generate": ("exact_match", "rouge_l", "chrf", "bleu"),
    "multiple_choice": ("accuracy",),
}
DEFAULT_METRIC = {"generate": "exact_match", "multiple_choice": "accuracy"}
_YAML_KEYS = {
    "name", "file", "kind", "template", "metric", "fewshot_file", "max_new_tokens", "stop",
    "target_delimiter", "fewshot_delimiter",
}
_EXTRAS_HINT = "pip install 'palm[eval]'"


# ---- loading models --------------------------------------------------------------------------------


def load_model(model_dir: str | Path, dtype: str = "auto") -> tuple[PalmForCausalLM, PalmTokenizer]:
    """A palm model directory's model (in eval mode, on the GPU if there is one) and tokenizer."""
    from .modeldir import load_model as load

    return load(model_dir, dtype=dtype)


# ---- perplexity and bits per byte ------------------------------------------------------------------


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
        return {"corpus": self.name, "tokens": self.tokens, "bytes": self.bytes, "nll": self.nll,
                "bits_per_byte": self.bits_per_byte, "perplexity": self.perplexity}


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


def _batch_logits(model: PalmForCausalLM, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """log-softmax over the vocabulary for right-padded rows, [B, T, V] in fp32.

    Right padding needs no attention mask: attention is causal, so pads only follow the real tokens.
    """
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=model.device)
    return model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)


def score_stream(
    model: PalmForCausalLM, ids: Sequence[int] | np.ndarray, seq_len: int, stride: int | None = None,
    batch_size: int = 4, pad_id: int = 0,
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, targets) of ids[1:] given what precedes each, windowed."""
    import torch

    ids = np.asarray(ids, dtype=np.int64)
    windows = sliding_windows(len(ids), seq_len, seq_len if stride is None else stride)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            rows = [ids[s:e].tolist() for s, e, _ in batch]
            logp = _batch_logits(model, rows, pad_id)
            for row, (s, e, first) in enumerate(batch):
                # position j predicts ids[s + j + 1]; score only targets past `first`
                j0 = first - s
                targets = torch.from_numpy(ids[first + 1 : e + 1]).to(logp.device)
                nll -= float(logp[row, j0 : e - s].gather(-1, targets[:, None]).sum())
                count += e - first
    return nll, count


def score_text(
    model: PalmForCausalLM, tokenizer: PalmTokenizer, text: str, seq_len: int | None = None, stride: int | None = None,
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


def _run_settings(model_dir: Path) -> dict:
    """seq_len, val_fraction and cache folder of the training run that wrote RUN/final, if it is one."""
    from .train import RUN_FILE

    run_file = model_dir.parent / RUN_FILE
    try:
        raw = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    cache = raw.get("cache_dir") or str(model_dir.parent.resolve().parent / ".palm-cache")
    return {"seq_len": raw.get("seq_len"), "val_fraction": raw.get("val_fraction"), "cache_dir": cache}


def evaluate_corpora(
    model: PalmForCausalLM, tokenizer: PalmTokenizer, cfg: CorpusEvalConfig, model_dir: str | Path | None = None,
    progress: bool = False,
) -> list[TextScore]:
    """Perplexity and bits per byte on the held-out split of every corpus of a mixture.

    The split is the one `palm train` holds out (documents chosen by a hash of their position), so a
    run's own model is scored on text it never trained on when the settings match the run's; they
    are read from RUN/run.json when `model_dir` is RUN/final.
    """
    from .corpora import parse_corpus_spec
    from .data import prepare_data, val_bytes_for

    run = _run_settings(Path(model_dir)) if model_dir is not None else {}
    context = model.config.max_position_embeddings
    seq_len = cfg.seq_len if cfg.seq_len is not None else min(run.get("seq_len") or context, context)
    if seq_len > context:
        raise EvaluationError(f"--seq-len {seq_len} is longer than the model's context ({context})")
    stride = seq_len if cfg.stride is None else cfg.stride
    sliding_windows(0, seq_len, stride)  # checks the settings before any tokenizing
    val_fraction = cfg.val_fraction if cfg.val_fraction is not None else run.get("val_fraction") or 0.05
    if not 0 < val_fraction < 1:
        raise EvaluationError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise EvaluationError(f"--max-tokens must be positive, not {cfg.max_tokens}")
    cache = Path(cfg.cache_dir or run.get("cache_dir") or Path(model_dir or ".").resolve().parent / ".palm-cache")
    parts = parse_corpus_spec(cfg.corpus)
    data = prepare_data(parts, tokenizer, cache, seq_len, val_fraction, progress=progress)
    scores = []
    for i, name in enumerate(data.names):
        val = data.val[i]
        if len(val) < 2:
            raise EvaluationError(f"corpus {name} has no held-out text to score")
        n = len(val) - 1 if cfg.max_tokens is None else min(len(val) - 1, cfg.max_tokens)
        nll, count = score_stream(model, val[: n + 1], seq_len, stride, cfg.batch_size, tokenizer.pad_id)
        scores.append(TextScore(name, count, val_bytes_for(data, i, count), nll))
    return scores


# ---- tasks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str | int  # the text to generate, or the index of the right choice
    choices: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return self.choices[self.answer] if self.choices else self.answer  # type: ignore[index,return-value]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "generate" or "multiple_choice"
    examples: tuple[Example, ...]
    metrics: tuple[str, ...]
    fewshot: tuple[Example, ...] | None = None  # None: shots come from the other examples
    template: str = "{prompt}"
    target_delimiter: str = ""
    fewshot_delimiter: str = "\n\n"
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    source: str = ""

    def format(self, example: Example) -> str:
        return self.template.format(prompt=example.prompt)


def _check_template(where: str, template: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        template.format(prompt="")
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise TaskError(f"{where}: template {template!r} is not a format string with {{prompt}} ({e})") from None
    if "prompt" not in fields:
        raise TaskError(f"{where}: template {template!r} does not use {{prompt}}")


def _example(where: str, row: Any, kind: str) -> Example:
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise TaskError(f'{where}: "prompt" must be a string' if "prompt" in row else f'{where}: missing field "prompt"')
    if "answer" not in row:
        raise TaskError(f'{where}: missing field "answer"')
    answer = row["answer"]
    if kind == "generate":
        if not isinstance(answer, str):
            raise TaskError(f'{where}: "answer" must be a string for a generation task, got {type(answer).__name__}')
        return Example(prompt, answer)
    choices = row.get("choices")
    if choices is None:
        raise TaskError(f'{where}: missing field "choices" (a multiple-choice task)')
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f'{where}: "choices" must be a list of at least two non-empty strings')
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise TaskError(f'{where}: "answer" must be the index of the right choice, got {type(answer).__name__}')
    if not 0 <= answer < len(choices):
        raise TaskError(f'{where}: "answer" {answer} is not an index into its {len(choices)} choices')
    return Example(prompt, answer, tuple(choices))


def read_examples(path: Path, kind: str | None = None) -> tuple[str, tuple[Example, ...]]:
    """(kind, examples) of a JSONL task file; the kind, unless given, follows from the first row."""
    from .data import jsonl_rows

    examples = []
    for where, row in jsonl_rows(path, TaskError, "task file"):
        if kind is None:
            kind = "multiple_choice" if isinstance(row, dict) and "choices" in row else "generate"
        examples.append(_example(where, row, kind))
    if not examples:
        raise TaskError(f"task file {path} is empty: it holds no examples")
    return kind or "generate", tuple(examples)


def _yaml_value(where: str, raw: dict, key: str, kind: type, default: Any) -> Any:
    """raw[key] checked to be a `kind` (an explicit null is as wrong as any other type), or `default`."""
    if key not in raw:
        return default
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TaskError(f"{where}: {key} must be a{'n' if kind is int else ''} {kind.__name__}, not {type(value).__name__}")
    return value


def load_task(path: str | Path) -> Task:
    """A task from a `.jsonl` file of examples or a `.yaml` file describing one (see the module docstring)."""
    import yaml

    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        kind, examples = read_examples(path)
        return Task(path.stem, kind, examples, (DEFAULT_METRIC[kind],), source=str(path))
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise TaskError(f"task file {path} is empty")
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: expected a mapping of task settings, got {type(raw).__name__}")
    where = str(path)
    unknown = sorted(set(map(str, raw)) - _YAML_KEYS)
    if unknown:
        raise TaskError(f"{where}: unknown setting {', '.join(unknown)} (known: {', '.join(sorted(_YAML_KEYS))})")
    if "file" not in raw:
        raise TaskError(f'{where}: missing setting "file" (the JSONL file of examples)')
    if "kind" not in raw:
        raise TaskError(f'{where}: missing setting "kind" ({" or ".join(METRICS)})')
    kind = _yaml_value(where, raw, "kind", str, None)
    if kind not in METRICS:
        raise TaskError(f"{where}: unknown kind {kind!r}; use {' or '.join(METRICS)}")
    metric = raw.get("metric", DEFAULT_METRIC[kind])
    metrics = [metric] if isinstance(metric, str) else metric
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise TaskError(f"{where}: metric must be a name or a list of names")
    for m in metrics:
        if m not in METRICS[kind]:
            raise TaskError(f"{where}: unknown metric {m!r} for a {kind} task; use {', '.join(METRICS[kind])}")
    template = _yaml_value(where, raw, "template", str, "{prompt}")
    _check_template(where, template)
    name = _yaml_value(where, raw, "name", str, path.stem)
    file = _yaml_value(where, raw, "file", str, None)
    _, examples = read_examples(path.parent / file, kind)
    fewshot = None
    if "fewshot_file" in raw:
        _, fewshot = read_examples(path.parent / _yaml_value(where, raw, "fewshot_file", str, None), kind)
    max_new_tokens = _yaml_value(where, raw, "max_new_tokens", int, 32)
    if max_new_tokens < 1:
        raise TaskError(f"{where}: max_new_tokens must be at least 1, not {max_new_tokens}")
    stop = raw.get("stop", ["\n"])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise TaskError(f"{where}: stop must be a string or a list of non-empty strings")
    return Task(
        name=name, kind=kind, examples=examples, metrics=tuple(metrics), fewshot=fewshot, template=template,
        target_delimiter=_yaml_value(where, raw, "target_delimiter", str, ""),
        fewshot_delimiter=_yaml_value(where, raw, "fewshot_delimiter", str, "\n\n"),
        max_new_tokens=max_new_tokens, stop=tuple(stop), source=str(path),
    )


def load_tasks(specs: Sequence[str]) -> list[Task]:
    """Tasks from paths given comma-separated, one per string, or both."""
    paths = [p.strip() for spec in specs for p in spec.split(",") if p.strip()]
    if not paths:
        raise TaskError("no task given")
    return [load_task(p) for p in paths]


# ---- few-shot prompts -------------------------------------------------------------------------------


def fewshot_examples(task: Task, index: int, shots: int, seed: int) -> list[Example]:
    """The k examples shown before example `index`: a fixed sample for (seed, index).

    Drawn from the task's few-shot split, or else from its other examples (never the one asked).
    Seeding per example keeps a prompt the same whatever `--limit` or order the run uses.
    """
    if shots < 0:
        raise EvaluationError(f"--shots must be 0 or more, not {shots}")
    if shots == 0:
        return []
    pool = task.fewshot if task.fewshot is not None else task.examples
    size = len(pool) if task.fewshot is not None else len(pool) - 1
    if shots > size:
        raise EvaluationError(f"task {task.name} has {size} examples to draw {shots} shots from")
    # A str seed is hashed with SHA-512 by `random`, so it is the same in every process.
    picks = random.Random(f"{seed}/{index}").sample(range(size), shots)
    if task.fewshot is None:
        picks = [j + (j >= index) for j in picks]  # skip the example itself
    return [pool[j] for j in picks]


def build_prompt(task: Task, index: int, shots: int, seed: int, drop: int = 0) -> str:
    """The k-shot prompt for example `index`, leaving out its first `drop` shots."""
    shown = fewshot_examples(task, index, shots, seed)[drop:]
    parts = [task.format(e) + task.target_delimiter + e.target for e in shown]
    return task.fewshot_delimiter.join(parts + [task.format(task.examples[index])])


# ---- metrics -----------------------------------------------------------------------------------------

_CJK = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef\u3000-\u303f]")


class _WordsAndCharacters:
    """ROUGE tokenizer: lowercase Latin words and digits, and one token per CJK character or symbol.

    rouge-score's default tokenizer keeps only [a-z0-9], so Chinese text would have no tokens at all.
    """

    _TOKEN = re.compile(r"[^\W_]+|[^\w\s]", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        out = []
        for word in self._TOKEN.findall(text.lower()):
            out.extend(word if _CJK.search(word) else [word])
        return out


def _need(module: str, metric: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EvaluationError(f"metric {metric} needs {module.split('.')[0]}: {_EXTRAS_HINT}") from None


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to the reference, leading and trailing whitespace aside."""
    return float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)]))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score), over words and CJK characters."""
    rouge_scorer = _need("rouge_score.rouge_scorer", "rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordsAndCharacters())
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]))


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu), 0-100."""
    sacrebleu = _need("sacrebleu", "chrf")
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu), 0-100; Chinese references are tokenized by character (sacrebleu's `zh`)."""
    sacrebleu = _need("sacrebleu", "bleu")
    tokenize = "zh" if any(_CJK.search(r) for r in references) else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score)


GENERATION_METRICS = {"exact_match": exact_match, "rouge_l": rouge_l, "chrf": chrf, "bleu": bleu}


# ---- scoring -----------------------------------------------------------------------------------------


def _split_for_scoring(tokenizer: PalmTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
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


def loglikelihoods(
    model: PalmForCausalLM, tokenizer: PalmTokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding would produce it) for each request.

    A request longer than the context keeps its last tokens (the continuation always stays whole).
    """
    import torch

    context = model.config.max_position_embeddings
    encoded = []
    for ctx_text, cont_text in requests:
        ctx, cont = _split_for_scoring(tokenizer, ctx_text, cont_text)
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
            logp = _batch_logits(model, [encoded[i][0][:-1] for i in batch], tokenizer.pad_id)
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


def evaluate_task(
    model: PalmForCausalLM, tokenizer: PalmTokenizer, task: Task, shots: int = 0, seed: int = 0,
    limit: int | None = None, batch_size: int = 8, samples: bool = True,
) -> dict[str, Any]:
    """Score a model on a task, k-shot: a dict with the task, settings, metrics and (optionally) samples."""
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be positive, not {limit}")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be positive, not {batch_size}")
    indices = range(min(len(task.examples), limit or len(task.examples)))
    fewshot_examples(task, 0, shots, seed)  # checks there are enough examples to draw from
    metrics: dict[str, float] = {}
    records: list[dict[str, Any]] = []
    if task.kind == "multiple_choice":
        prompts = [build_prompt(task, i, shots, seed) for i in indices]
        requests = [(p, task.target_delimiter + c) for p, i in zip(prompts, indices) for c in task.examples[i].choices]
        scores = iter(loglikelihoods(model, tokenizer, requests, batch_size))
        hits, hits_norm = [], []
        for i in indices:
            ex = task.examples[i]
            lls = np.array([next(scores)[0] for _ in ex.choices])
            # acc_norm divides by the choice's length in characters, as lm-eval does.
            norm = lls / np.array([len(c) for c in ex.choices])
            hits.append(int(lls.argmax()) == ex.answer)
            hits_norm.append(int(norm.argmax()) == ex.answer)
            records.append({"prompt": ex.prompt, "target": ex.answer, "loglikelihoods": lls.tolist(),
                            "prediction": int(lls.argmax()), "prediction_norm": int(norm.argmax())})
        metrics = {"acc": float(np.mean(hits)), "acc_norm": float(np.mean(hits_norm))}
    else:
        from .generate import Generator, SamplingConfig

        generator = Generator(model, tokenizer)
        budget = model.config.max_position_embeddings - task.max_new_tokens
        if budget < 2:
            raise EvaluationError(f"max_new_tokens {task.max_new_tokens} leaves no room for a prompt in the model's context")
        prompts = [_fit_prompt(tokenizer, task, i, shots, seed, budget) for i in indices]
        cfg = SamplingConfig(max_new_tokens=task.max_new_tokens, temperature=0.0, stop=list(task.stop))
        predictions: list[str] = []
        for b in range(0, len(prompts), batch_size):
            predictions += [c.text for c in generator.generate(prompts[b : b + batch_size], cfg)]
        references = [task.examples[i].answer for i in indices]
        for name in task.metrics:
            metrics[name] = GENERATION_METRICS[name](predictions, references)  # type: ignore[arg-type]
        records = [{"prompt": task.examples[i].prompt, "target": r, "prediction": p}
                   for i, r, p in zip(indices, references, predictions)]
    result: dict[str, Any] = {"task": task.name, "kind": task.kind, "shots": shots, "seed": seed,
                              "examples": len(indices), "metrics": metrics, "source": task.source}
    if samples:
        result["samples"] = records
    return result


# ---- lm-evaluation-harness ---------------------------------------------------------------------------


@dataclass
class HarnessConfig:
    tasks: list[str]
    include_path: list[str] = field(default_factory=list)
    shots: int | None = None  # None: each task's own num_fewshot
    limit: int | None = None
    batch_size: int = 8
    seed: int = 0
    device: str | None = None  # None: cuda if there is one, else cpu
    dtype: str = "auto"  # palm's choice (bf16 where native, else fp32), or "bf16" / "fp32"
    bootstrap_iters: int = 1000  # lm-eval's default, 100000, takes minutes for chrF/BLEU stderr on a CPU
    log_samples: bool = False  # keep every request's inputs and outputs in results["samples"]


def run_harness(model_dir: str | Path, cfg: HarnessConfig) -> dict[str, Any]:
    """lm-evaluation-harness's `hf` model on a palm directory, in this process; lm-eval's results dict.

    Importing this module imported palm, so the Auto classes know the model type without `trust_remote_code`.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvaluationError(f"--harness needs lm-eval: {_EXTRAS_HINT}") from None
    from .modeldir import check_model_dir

    model_dir = check_model_dir(model_dir)
    for folder in cfg.include_path:
        if not Path(folder).is_dir():
            raise TaskError(f"--include-path {folder} is not a folder")
    names = [t.strip() for spec in cfg.tasks for t in spec.split(",") if t.strip()]
    if not names:
        raise TaskError("no harness task given")
    manager = None
    if cfg.include_path:
        # Indexing lm-eval's own ~15,000 task files takes about 20 s; the local folders alone take none.
        manager = TaskManager(include_path=list(cfg.include_path), include_defaults=False)
    if manager is None or any(not manager.match_tasks([n]) for n in names):
        manager = TaskManager(include_path=list(cfg.include_path) or None)
    missing = [n for n in names if not manager.match_tasks([n])]
    if missing:
        raise TaskError(f"lm-eval knows no task {', '.join(missing)} (add its YAML folder with --include-path)")
    from .runtime import pick_device, pick_dtype

    device = pick_device(cfg.device)
    dtype = str(pick_dtype(cfg.dtype, device)).removeprefix("torch.")
    try:
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": dtype, "backend": "causal"},
            tasks=names, num_fewshot=cfg.shots, limit=cfg.limit, batch_size=cfg.batch_size, device=str(device),
            task_manager=manager, bootstrap_iters=cfg.bootstrap_iters, log_samples=cfg.log_samples,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
        )
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise TaskError(f"lm-eval could not run {', '.join(names)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if results is None:
        raise EvaluationError("lm-eval returned no results")
    return results


# ---- output -------------------------------------------------------------------------------------------


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, ensure_ascii=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (floats to 4 places)."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [[h.ljust(w) for h, w in zip(header, widths)], ["-" * w for w in widths]]
    lines += [[c.ljust(w) for c, w in zip(r, widths)] for r in cells]
    return "\n".join("  ".join(line).rstrip() for line in lines)


def corpus_table(scores: Sequence[TextScore]) -> str:
    return format_table(["corpus", "tokens", "bytes", "perplexity", "bits/byte"],
                        [(s.name, s.tokens, int(s.bytes), s.perplexity, s.bits_per_byte) for s in scores])


def task_table(results: Sequence[dict[str, Any]]) -> str:
    rows = [(r["task"], r["kind"], r["shots"], r["examples"], metric, value)
            for r in results for metric, value in r["metrics"].items()]
    return format_table(["task", "kind", "shots", "n", "metric", "value"], rows)
