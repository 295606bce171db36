"""Supervised fine-tuning on prompt/completion pairs (paper section 6: dropout 0.1, loss on the targets only).

A row `{"prompt": str, "completion": str}` becomes `<s> template(prompt) completion </s>`; the prompt and the
completion are tokenized apart, as they will be at inference (the prompt alone, then generation), and
only the completion tokens and the closing `</s>` are scored: prompt targets are IGNORE_INDEX (-100).

Everything else is the shared training loop (palm.training.loop): the batch at step k is a pure function of
(seed, k), dropout masks too, checkpoints hold weights, optimizer and state in safetensors + JSON, and a
killed run resumes bitwise identically. Validation loss on held-out rows decides early stopping, and
RUN/final is a Transformers directory holding the weights with the lowest validation loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import settings
from ..core.atomic import atomic_directory, write_json
from ..core.heldout import summed_nll
from ..core.rundir import RunLayout
from ..core.runtime import pick_device, pick_dtype
from ..data.taskdata import TASKS, Schema, TaskDataError, TaskRow, parse_columns
from ..model.config import PalmConfig
from ..model.model import PalmForCausalLM
from ..text.tokenizer import PalmTokenizer
from ..weights.lora import TARGETS, add_adapters, load_adapter_weights, parameter_counts, save_adapter
from ..weights.modeldir import check_model_dir, quiet_transformers, save_model_dir
from . import distributed
from .compute import apply_activation_checkpointing
from .finetune_data import FORMATS, Examples, collate, load_examples, read_rows
from .loop import LoopConfig, Run, TrainingError, run_loop
from .optim import build_optimizer
from .runfolder import claim, read_settings
from .selection import DEFAULT_SELECT, SelectionError, generations, metric_name, reported, task_scores

logger = logging.getLogger(__name__)


def finetune_loop() -> LoopConfig:
    """The loop's defaults for fine-tuning: a fixed batch, a constant relative step size (Adafactor's, as T5
    fine-tuned with it), no spike rewinds (a batch of hard rows is not a divergence), and evaluations
    often enough for early stopping to matter."""
    return LoopConfig(max_steps=500, batch_size=32, batch_ramp=False, lr=1e-3, spike_factor=0.0, eval_every=50)


@dataclass
class FinetuneConfig:
    """A fine-tuning run: the base model and data, and the loop's settings."""

    base_model: str = ""  # the model directory to start from
    data: str = ""  # JSONL of {"prompt", "completion"}, or with format "chat" of {"messages": [...]}
    out: str = ""
    val: str | None = None  # same format; None holds out val_fraction of `data`
    format: str = "completion"  # or "chat": multi-turn conversations, loss on the assistant turns
    task: str | None = None  # summarize, qa or translate (rows in a data set's schema), or None: prompts as they are
    columns: str | None = None  # "FIELD=COLUMN,...": the task's fields under other column names
    source_lang: str | None = None  # translate: the language codes of WMT's translation{...} or language columns
    target_lang: str | None = None
    eval_task: str | None = None  # held-out rows (the task's schema): RUN/best is chosen by `select` on them
    select: str | None = None  # the metric RUN/best is chosen by (default: the task's headline metric)
    eval_max_new_tokens: int = 64  # generated per held-out row
    epochs: float | None = None  # if set, max_steps = ceil(epochs * train rows / batch_size)
    dropout: float = 0.1  # the paper's fine-tuning dropout, on residual branches and attention probabilities
    patience: int | None = 3  # evaluations without a better validation loss before stopping; None: never
    seq_len: int = 256  # longest row in tokens; longer prompts lose their beginning
    val_fraction: float = 0.05
    data_sha256: str = ""  # of data, val and eval_task, checked on resume
    lora_r: int = 0  # > 0: train rank-r LoRA adapters (peft) and leave the base weights as they are
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(TARGETS))
    loop: LoopConfig = field(default_factory=finetune_loop)

    CHANGEABLE_ON_RESUME = frozenset(
        {
            "max_steps",
            "checkpoint_every",
            "eval_every",
            "threads",
            "progress",
            "compile",
            "activation_checkpointing",
            "report_to",
        }
    )

    def validate(self) -> None:
        self.loop.validate()
        checks = [
            (bool(self.base_model), "--model is required"),
            (bool(self.data), "--data is required"),
            (bool(self.out), "--out is required"),
            (self.task is None or self.task in TASKS, f"--task must be one of {', '.join(TASKS)}"),
            (
                self.task is not None or not (self.columns or self.source_lang or self.target_lang),
                "--columns, --source-lang and --target-lang read a task's data: give --task",
            ),
            (
                self.eval_task is None or (self.task is not None and self.format != "chat"),
                "--eval-task scores generations of a task's rows: give --task (summarize, qa or translate)",
            ),
            (self.select is None or self.eval_task is not None, "--select chooses on --eval-task: give it too"),
            (1 <= self.eval_max_new_tokens <= 4096, "--eval-max-new-tokens must be between 1 and 4096"),
            (self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0), "--epochs must be positive"),
            (0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)"),
            (self.patience is None or self.patience >= 1, "--patience must be at least 1"),
            (self.seq_len >= 2, "--seq-len must be at least 2"),
            (0 < self.val_fraction < 1, "--val-fraction must be between 0 and 1"),
            (self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}"),
            (self.format == "completion" or self.task is None, "--task templates apply to completion rows, not chat"),
            (0 <= self.lora_r <= 4096, "--lora-r must be 0 (no LoRA) or a rank up to 4096"),
            (math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "--lora-alpha must be a positive number"),
            (0.0 <= self.lora_dropout < 1.0, "--lora-dropout must be in [0, 1)"),
            (
                bool(self.lora_targets) and set(self.lora_targets) <= set(TARGETS),
                f"--lora-targets must be some of {', '.join(TARGETS)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)
        self.schema()
        if self.select is not None:
            try:
                self.select = metric_name(self.select)
            except SelectionError as e:
                raise TrainingError(str(e)) from None

    def selected(self) -> str | None:
        """The metric RUN/best is chosen by, or None when it is chosen by validation loss."""
        return None if self.eval_task is None else self.select or DEFAULT_SELECT[self.task or ""]

    def schema(self) -> Schema | None:
        """How the task's rows are read; None for plain prompt/completion rows and chat."""
        if self.task is None or self.format == "chat":
            return None
        try:
            return Schema(self.task, parse_columns(self.columns), self.source_lang, self.target_lang)
        except TaskDataError as e:
            raise TrainingError(str(e)) from None

    @classmethod
    def from_settings(cls, flat: dict) -> FinetuneConfig:
        return settings.route(cls, flat, finetune_loop())

    def resumed(self, given: dict) -> FinetuneConfig:
        flags = {"base_model": "--model", "max_steps": "--steps"}
        cfg = settings.resumed(
            self, given, self.CHANGEABLE_ON_RESUME, flag=lambda n: flags.get(n, "--" + n.replace("_", "-"))
        )
        if "max_steps" in given:
            cfg.epochs = None  # an explicit step count replaces the epochs the run was started with
        return cfg


@dataclass
class FineTuning:
    """The recipe's side of a run: its rows, how a batch comes from them, and early stopping."""

    cfg: FinetuneConfig
    tokenizer: PalmTokenizer
    data: Examples
    eval_rows: list[TaskRow] = field(default_factory=list)  # --eval-task's rows, generated on at each evaluation

    def batches(self, index: int, batch_size: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` (from 1): rows of the endless sequence of per-epoch shuffles, so it depends on
        (seed, index) only."""
        n = len(self.data.train)
        picks = []
        for r in rows:
            position = (index - 1) * batch_size + r
            picks.append(self.data.train[self.data.order(self.cfg.loop.seed, position // n)[position % n]])
        return collate(picks, self.data.pad_id)

    def validation_loss(self, run: Run) -> float:
        """Mean cross-entropy over the completion tokens of the validation rows."""
        size, rows = self.cfg.loop.batch_size, self.data.val
        batches = (collate(rows[i : i + size], self.data.pad_id) for i in range(0, len(rows), size))
        nats, count = summed_nll(run.model, batches, device=run.device, dtype=run.dtype)
        return nats / count

    def evaluate(self, run: Run) -> dict:
        """Validation loss, and with an eval task its metrics; keep the best weights (or adapter) in RUN/best,
        best by the selected metric (higher is better) or else by the loss; stop after `patience`
        evaluations without gain."""
        loss = self.validation_loss(run)
        record: dict = {"val_loss": loss}
        select = self.cfg.selected()
        if select is None:
            score, best = -loss, run.extra.get("best_val_loss")
            best = None if best is None else -best
        else:
            predictions = generations(
                run.model,
                self.tokenizer,
                self.eval_rows,
                max_new_tokens=self.cfg.eval_max_new_tokens,
                context=run.model.config.max_position_embeddings,  # type: ignore[arg-type]
            )
            record.update(
                {
                    f"eval/{k}": v
                    for k, v in task_scores(predictions, self.eval_rows, reported(self.cfg.task or "", select)).items()
                }
            )
            score, best = record[f"eval/{select}"], run.extra.get("best_metric")
        if best is None or score > best:
            run.extra.update(best_step=run.step, evals_since_best=0)
            run.extra.update({"best_val_loss": loss} if select is None else {"best_metric": score})
            if self.cfg.lora_r:
                save_adapter(run.model, self.tokenizer, run.layout.best)
            else:
                save_model_dir(run.model, self.tokenizer, run.layout.best)
        else:
            run.extra["evals_since_best"] += 1
            if self.cfg.patience is not None and run.extra["evals_since_best"] >= self.cfg.patience:
                run.stop = True
        if select is None:
            return {**record, "best_val_loss": run.extra["best_val_loss"], "best_step": run.extra["best_step"]}
        return {**record, f"best/{select}": run.extra["best_metric"], "best_step": run.extra["best_step"]}


# ---- the run --------------------------------------------------------------------------------------


def _digest(cfg: FinetuneConfig) -> str:
    h = hashlib.sha256()
    for p in (cfg.data, cfg.val) + ((cfg.eval_task,) if cfg.eval_task else ()):
        if p is not None and Path(p).is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    raw = read_settings(RunLayout(Path(path)))
    if "base_model" not in raw:
        raise TrainingError(f"{path} is a pretraining run; resume it with palm train --resume")
    return FinetuneConfig.from_settings(raw)


def _load_base(cfg: FinetuneConfig) -> tuple[PalmTokenizer, PalmForCausalLM]:
    src = check_model_dir(cfg.base_model)
    tok = PalmTokenizer.load(src)
    try:
        with quiet_transformers():
            model = PalmForCausalLM.from_pretrained(
                str(src),
                dtype=torch.float32,
                dropout=cfg.dropout,
                attention_dropout=cfg.dropout,
                z_loss_coef=cfg.loop.z_loss,
                use_cache=False,
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise TrainingError(f"cannot load the model in {src}: {str(e).splitlines()[0]}") from None
    return tok, model


def open_finetune(cfg: FinetuneConfig, resume: bool, allow_data_change: bool = False) -> Run:
    """A Run for fine-tuning: the base model (or, resuming, the run's own copy of its config), data and hooks."""
    cfg.validate()
    if distributed.launched_processes() > 1:
        raise TrainingError(
            f"palm finetune runs in one process, not under torchrun ({distributed.launched_processes()} "
            "processes would each train the same run folder); palm train has --parallel ddp|fsdp"
        )
    layout = RunLayout(Path(cfg.out))
    if resume:
        cfg.data_sha256 = load_finetune_config(layout.root).data_sha256
    held = claim(layout, distributed.World(), resume)
    try:
        run = _open(cfg, layout, resume, allow_data_change)
    except BaseException:
        held.abandon()
        raise
    run.lock = held.lock
    return run


def _open(cfg: FinetuneConfig, layout: RunLayout, resume: bool, allow_data_change: bool) -> Run:
    if resume:
        if _digest(cfg) != cfg.data_sha256:
            if not allow_data_change:
                raise TrainingError(
                    f"{cfg.data} (or --val) changed since the run started, so resuming would not be "
                    "exact; pass --allow-data-change to continue on the new data anyway"
                )
            cfg.data_sha256 = _digest(cfg)
        tok = PalmTokenizer.load(layout.base)
        model = PalmForCausalLM(PalmConfig.from_pretrained(str(layout.base)))
    else:
        tok, model = _load_base(cfg)
    context = model.config.max_position_embeddings
    if cfg.seq_len > context:
        raise TrainingError(f"--seq-len {cfg.seq_len} is longer than the model's context ({context} positions)")
    data = load_examples(cfg.data, cfg.val, cfg.format, cfg.schema(), cfg.seq_len, cfg.val_fraction, cfg.loop.seed, tok)
    if data.cut:
        what = "the tail of its document" if cfg.schema() else "the start of its prompt or its earliest turns"
        logger.warning(
            "%d of %d rows are longer than --seq-len %d: each lost %s",
            data.cut,
            len(data.train) + len(data.val),
            cfg.seq_len,
            what,
        )
    if cfg.epochs is not None:
        cfg.loop.max_steps = max(1, math.ceil(cfg.epochs * len(data.train) / cfg.loop.batch_size))
    if cfg.loop.hold_steps is None:
        cfg.loop.hold_steps = cfg.loop.max_steps  # hold the lr for the whole run
    if not resume:
        cfg.data_sha256 = _digest(cfg)
        with atomic_directory(layout.base, overwrite=True, replace_all=True) as tmp:
            model.config.save_pretrained(str(tmp))
            tok.save(tmp)
        write_json(layout.settings, dataclasses.asdict(cfg))
    device = pick_device()
    model = model.to(device).train()  # type: ignore[arg-type]
    apply_activation_checkpointing(model, mode=cfg.loop.activation_checkpointing)
    if cfg.lora_r:
        if cfg.loop.optimizer == "palm":
            logger.warning(
                "LoRA with palm's Adafactor: its step is relative to each tensor's scale and peft starts "
                "the adapters' B at zero, so B barely moves; --optimizer adamw suits adapters"
            )
        model = add_adapters(
            model,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            targets=cfg.lora_targets,
            seed=cfg.loop.seed,
        )
    optimizer = build_optimizer(cfg.loop.optimizer, model.named_parameters(), lr=cfg.loop.peak_lr)
    recipe = FineTuning(cfg, tok, data, read_rows(cfg.eval_task, schema=cfg.schema()) if cfg.eval_task else [])  # type: ignore[arg-type]
    run = Run(
        cfg.loop,
        layout,
        model,
        optimizer,
        device,
        pick_dtype(cfg.loop.dtype, device),
        recipe.batches,
        recipe.evaluate,
        seq_len=cfg.seq_len,
    )
    run.start()
    run.extra.setdefault("trainable_params", parameter_counts(model)[0])
    return run


def finetune(cfg: FinetuneConfig, resume: bool = False, on_step=None, allow_data_change: bool = False) -> Run:
    """Fine-tune to max_steps or until validation stops improving; RUN/final holds the best weights."""
    run = open_finetune(cfg, resume, allow_data_change)
    try:
        run_loop(run, on_step)
        if cfg.lora_r:
            export_lora(run, PalmTokenizer.load(run.layout.best))
        else:
            with atomic_directory(run.layout.final, overwrite=True, replace_all=True) as tmp:
                shutil.copytree(run.layout.best, tmp, dirs_exist_ok=True)
    finally:
        run.close()
    return run


def export_lora(run: Run, tokenizer: PalmTokenizer) -> None:
    """RUN/adapter: the best adapter, in peft's format; RUN/final: the base with it merged in."""
    with atomic_directory(run.layout.adapter, overwrite=True, replace_all=True) as tmp:
        shutil.copytree(run.layout.best, tmp, dirs_exist_ok=True)
    load_adapter_weights(run.model, run.layout.best)
    save_model_dir(run.model.merge_and_unload(), tokenizer, run.layout.final)
