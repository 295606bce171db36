"""Supervised fine-tuning on prompt/completion pairs (paper section 6: dropout 0.1, loss on the targets only).

A row `{"prompt": str, "completion": str}` becomes `<s> template(prompt) completion </s>`; the prompt and the
completion are tokenized apart, as they will be at inference (the prompt alone, then generation), and
only the completion tokens and the closing `</s>` are scored: prompt targets are IGNORE_INDEX (-100).

Everything else is pretraining's machinery (palm.train.run_loop): the batch at step k is a pure function of
(seed, k), dropout masks too, checkpoints hold weights, optimizer and state in safetensors + JSON, and a
killed run resumes bitwise identically. Validation loss on held-out rows decides early stopping, and
RUN/final is a Transformers directory holding the weights with the lowest validation loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from .checkpoint import atomic_directory, list_checkpoints
from .config import PalmConfig
from .data import jsonl_rows
from .errors import CheckpointError, PalmError
from .model import IGNORE_INDEX, PalmForCausalLM, lm_loss
from .optim import build_optimizer
from .tokenizer import PalmTokenizer
from .runtime import pick_device, pick_dtype
from .train import RUN_FILE, Run, TrainConfig, TrainingError, _save, restore, run_loop

# The prompt goes where {prompt} is; the completion follows the template directly.
TEMPLATES = {
    "summarize": "Summarize the text.\n\n{prompt}\n\nSummary: ",
    "qa": "Question: {prompt}\nAnswer: ",
    "translate": "Translate: {prompt}\nTranslation: ",
}
BASE = "base"  # RUN/base: the starting model's config and tokenizer, so a run resumes without its source
BEST = "best"  # RUN/best: the weights with the lowest validation loss so far
# Settings of pretraining that mean nothing here; left out of run.json.
_PRETRAINING_ONLY = ("corpus", "preset", "model", "tokenizer", "vocab_size", "eval_tokens", "cache_dir", "parallel")


class DataError(PalmError):
    """A fine-tuning data file that cannot be used."""


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning settings. The training-loop fields are TrainConfig's; defaults suit fine-tuning."""

    corpus: list[str] = field(default_factory=list)  # unused: data comes from `data`
    out: str = ""
    base_model: str = ""  # the model directory to start from
    data: str = ""  # JSONL of {"prompt", "completion"}
    val: str | None = None  # same format; None holds out val_fraction of `data`
    task: str | None = None  # a TEMPLATES key, or None for the prompt as it is
    epochs: float | None = None  # if set, max_steps = ceil(epochs * train rows / batch_size)
    dropout: float = 0.1  # the paper's fine-tuning dropout, on residual branches and attention probabilities
    patience: int | None = 3  # evaluations without a better validation loss before stopping; None: never
    data_sha256: str = ""  # of data and val, checked on resume
    # Loop defaults for fine-tuning: a fixed batch, no spike rewinds (a batch of hard rows is not a
    # divergence), evaluations often enough for early stopping to matter.
    max_steps: int = 500
    seq_len: int = 256  # longest row in tokens; longer prompts lose their beginning
    batch_size: int = 32
    batch_ramp: bool = False
    lr: float | None = 1e-3  # Adafactor's relative step; constant, as T5 fine-tuned with it
    hold_steps: int | None = None  # None: hold the lr for the whole run (set to max_steps when it starts)
    spike_factor: float = 0.0
    checkpoint_every: int = 100
    eval_every: int = 50
    val_fraction: float = 0.05

    def validate(self) -> None:
        super().validate()
        checks = [
            (bool(self.base_model), "--model is required"),
            (bool(self.data), "--data is required"),
            (bool(self.out), "--out is required"),
            (self.task is None or self.task in TEMPLATES, f"--task must be one of {', '.join(TEMPLATES)}"),
            (self.epochs is None or self.epochs > 0, "--epochs must be positive"),
            (0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)"),
            (self.patience is None or self.patience >= 1, "--patience must be at least 1"),
            (self.eval_every >= 1, "--eval-every must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _PRETRAINING_ONLY}


# ---- data -----------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict]:
    """`{"prompt": str, "completion": str}` rows of a JSONL file; DataError names the first bad line."""
    rows = []
    for where, row in jsonl_rows(Path(path), DataError, "data file"):
        if not isinstance(row, dict):
            raise DataError(f"{where} is not a JSON object with prompt and completion")
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(f"{where} has no {key!r} field")
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key!r} must be a string, not {type(row[key]).__name__}")
        if not row["completion"]:
            raise DataError(f"{where}: 'completion' is empty")
        rows.append(row)
    if not rows:
        raise DataError(f"data file {path} holds no examples")
    return rows


def format_prompt(prompt: str, task: str | None) -> str:
    return TEMPLATES[task].format(prompt=prompt) if task else prompt


def encode_row(tok: PalmTokenizer, row: dict, task: str | None, max_len: int) -> tuple[list[int], int]:
    """(ids, n_prompt): `<s> prompt completion </s>` in at most max_len + 1 ids; the first n_prompt are <s> + prompt.

    A prompt too long for the window loses its beginning; the completion is never cut.
    """
    prompt = tok.encode(format_prompt(row["prompt"], task), bos=False)
    completion = tok.encode(row["completion"], bos=False) + [tok.eos_id]
    room = max_len + 1 - 1 - len(completion)
    if room < 0:
        raise DataError(f"a completion is {len(completion)} tokens, more than --seq-len {max_len} allows")
    prompt = prompt[len(prompt) - room :] if len(prompt) > room else prompt
    return [tok.bos_id] + prompt + completion, 1 + len(prompt)


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, T], right-padded. Prompt and padding targets are IGNORE_INDEX.

    Padding sits after each row's last token, so causal attention never lets a real token see it.
    """
    width = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(examples):
        t = torch.tensor(ids)
        x[r, : len(ids) - 1] = t[:-1]
        # Target j is ids[j + 1]: the first n_prompt - 1 targets are prompt tokens.
        y[r, n_prompt - 1 : len(ids) - 1] = t[n_prompt:]
    return x, y


@dataclass
class Examples:
    """The encoded rows of a fine-tuning run (what Run.data holds for it)."""

    train: list[tuple[list[int], int]]
    val: list[tuple[list[int], int]]
    pad_id: int
    _orders: dict = field(default_factory=dict, repr=False)

    def order(self, seed: int, epoch: int) -> list[int]:
        """A shuffle of the training rows per epoch, keyed by (seed, epoch) alone."""
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.train), generator=gen).tolist()}
        return self._orders[epoch]


def load_examples(cfg: FinetuneConfig, tok: PalmTokenizer) -> Examples:
    rows = read_rows(cfg.data)
    if cfg.val is not None:
        val_rows = read_rows(cfg.val)
    else:
        if len(rows) < 2:
            raise DataError(f"{cfg.data} has one example: nothing to hold out for validation (pass --val FILE)")
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(rows), generator=gen).tolist()
        n_val = min(len(rows) - 1, max(1, round(len(rows) * cfg.val_fraction)))
        held = set(order[:n_val])
        val_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]

    def encode(rs):
        return [encode_row(tok, r, cfg.task, cfg.seq_len) for r in rs]

    return Examples(encode(rows), encode(val_rows), tok.pad_id)


def example_batch(run: Run, index: int, batch_size: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `index` (from 1): rows of the endless sequence of per-epoch shuffles, so it depends on (seed, index) only."""
    data: Examples = run.data
    n = len(data.train)
    picks = []
    for r in rows:
        position = (index - 1) * batch_size + r
        picks.append(data.train[data.order(run.cfg.seed, position // n)[position % n]])
    return collate(picks, data.pad_id)


def validation_loss(model: PalmForCausalLM, data: Examples, batch_size: int, device: torch.device) -> float:
    """Mean cross-entropy over the completion tokens of the validation rows."""
    nats, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data.val), batch_size):
            x, y = collate(data.val[i : i + batch_size], data.pad_id)
            n = int((y != IGNORE_INDEX).sum())
            ce, _ = lm_loss(model(input_ids=x.to(device), use_cache=False).logits, y.to(device), num_items=n)
            nats, count = nats + ce.item() * n, count + n
    model.train(was_training)
    return nats / count


def _save_model(run: Run, out: Path) -> None:
    hf_logging.disable_progress_bar()  # a bar per evaluation would bury the log
    run.model.config.use_cache = True
    try:
        with atomic_directory(out, overwrite=True) as tmp:
            run.model.save_pretrained(str(tmp))
            run.tokenizer.save(tmp)
    finally:
        run.model.config.use_cache = False


def early_stopping(run: Run) -> dict:
    """The eval hook: validation loss; keep the best weights in RUN/best; stop after `patience` evaluations without gain."""
    cfg: FinetuneConfig = run.cfg
    loss = validation_loss(run.model, run.data, cfg.batch_size, run.device)
    best = run.extra.get("best_val_loss")
    if best is None or loss < best:
        run.extra.update(best_val_loss=loss, best_step=run.step, evals_since_best=0)
        _save_model(run, run.path / BEST)
    else:
        run.extra["evals_since_best"] += 1
        if cfg.patience is not None and run.extra["evals_since_best"] >= cfg.patience:
            run.stop = True
    return {"val_loss": loss, "best_val_loss": run.extra["best_val_loss"], "best_step": run.extra["best_step"]}


# ---- the run --------------------------------------------------------------------------------------


def _digest(cfg: FinetuneConfig) -> str:
    h = hashlib.sha256()
    for p in (cfg.data, cfg.val):
        if p is not None and Path(p).is_file():
            h.update(Path(p).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    try:
        raw = json.loads((Path(path) / RUN_FILE).read_text())
        if "base_model" not in raw:
            raise CheckpointError(f"{path} is a pretraining run; resume it with palm train --resume")
        return FinetuneConfig(**raw)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a palm run (it has no {RUN_FILE})") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}/{RUN_FILE} is corrupt: {e}") from None


def _load_base(cfg: FinetuneConfig) -> tuple[PalmConfig, PalmTokenizer, PalmForCausalLM]:
    src = Path(cfg.base_model)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{src} is not a model directory (config.json is missing)")
    try:
        kind = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file} is not readable JSON: {e}") from None
    if kind != PalmConfig.model_type:
        raise CheckpointError(f"{src} holds a {kind!r} model, not a palm model")
    tok = PalmTokenizer.load(src)
    hf_logging.disable_progress_bar()
    try:
        model = PalmForCausalLM.from_pretrained(str(src), dtype=torch.float32, dropout=cfg.dropout,
                                                attention_dropout=cfg.dropout, z_loss_coef=cfg.z_loss,
                                                use_cache=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the model in {src}: {str(e).splitlines()[0]}") from None
    return model.config, tok, model


def open_finetune(cfg: FinetuneConfig, resume: bool) -> Run:
    """A Run for fine-tuning: the base model (or, resuming, the run's own copy of its config), data and hooks."""
    cfg.validate()
    path = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resume:
        cfg.data_sha256 = load_finetune_config(path).data_sha256
        if _digest(cfg) != cfg.data_sha256:
            raise TrainingError(f"{cfg.data} (or --val) changed since the run started; it cannot resume exactly")
        tok = PalmTokenizer.load(path / BASE)
        model = PalmForCausalLM(PalmConfig.from_pretrained(str(path / BASE)))
    else:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise TrainingError(f"{path} already exists and is not empty; resume it with --resume {path}")
        _, tok, model = _load_base(cfg)
    data = load_examples(cfg, tok)
    if cfg.epochs is not None:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(data.train) / cfg.batch_size))
    if cfg.hold_steps is None:
        cfg.hold_steps = cfg.max_steps
    if not resume:
        cfg.data_sha256 = _digest(cfg)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_directory(path / BASE, overwrite=True) as tmp:
            model.config.save_pretrained(str(tmp))
            tok.save(tmp)
        (path / RUN_FILE).write_text(json.dumps(cfg.to_json(), indent=1))
    device = pick_device()
    model = model.to(device).train()
    optimizer = build_optimizer(cfg.optimizer, model.named_parameters(), lr=cfg.peak_lr)
    run = Run(cfg, path, tok, data, model, optimizer, device, pick_dtype(cfg.dtype, device),
              batch_fn=example_batch, eval_fn=early_stopping)
    checkpoints = list_checkpoints(path)
    if checkpoints:
        restore(run, checkpoints[-1])
    else:
        _save(run, 0)
    return run


def finetune(cfg: FinetuneConfig, resume: bool = False, on_step=None) -> Run:
    """Fine-tune to cfg.max_steps or until validation stops improving; RUN/final holds the best weights."""
    run = run_loop(open_finetune(cfg, resume), on_step)
    with atomic_directory(run.path / "final", overwrite=True) as tmp:
        shutil.copytree(run.path / BEST, tmp, dirs_exist_ok=True)
    return run
