"""The training loop that pretraining and fine-tuning share (paper section 5's recipe around it).

A recipe (palm.training.train, palm.training.finetune) builds a `Run` — model, optimizer, where its batches come
from and how it is judged — and `run_loop` steps it: the batch at step k is a pure function of
(seed, k + batches skipped by rewinds), dropout masks too; every piece of state lives in a checkpoint
(weights and optimizer in safetensors, or DCP shards under FSDP; the rest in JSON); a loss spike
rewinds to the last checkpoint and skips ahead in the data, as was done for PaLM 540B. Resuming from
any checkpoint therefore continues bitwise identically to a run that was never stopped (on another
number of processes: to float rounding).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..core.errors import CheckpointError, PalmError
from ..core.rundir import RunLayout
from ..core.runtime import DTYPES, autocast, torch_threads
from ..model.loss import IGNORE_INDEX
from . import distributed
from .checkpoint import list_checkpoints, load_training_checkpoint, save_sharded_checkpoint, save_training_checkpoint
from .compute import ACTIVATION_CHECKPOINTING, ComputeCopies, compile_blocks
from .flops import datasheet_peak, flops_per_token, measure_matmul_peak, mfu
from .optim import OPTIMIZERS, lr_at
from .runlock import RunLock
from .tracking import Records, check_trackers

logger = logging.getLogger("palm")


class TrainingError(PalmError):
    """Training cannot go on (a bad setting, or a loss that keeps diverging after rewinds)."""


@dataclass
class LoopConfig:
    """How the loop trains, whatever the recipe (litgpt's TrainArgs): steps, batches, optimizer, checkpoints."""

    max_steps: int = 1000
    batch_size: int = 16  # the global batch, in sequences
    micro_batch_size: int | None = None  # sequences per forward pass; the rest is gradient accumulation
    batch_ramp: bool = True  # PaLM 540B: 1/4 of the batch to 20% of training, 1/2 to 45%, then all
    seed: int = 0
    optimizer: str = "palm"
    lr: float | None = None  # None: 1e-2 for palm (the paper), 2e-3 for adamw
    hold_steps: int | None = None  # palm: constant lr this long, then 1/sqrt(k); None: 10% of max_steps
    warmup_steps: int | None = None  # adamw: linear warmup; None: 5% of max_steps
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    dtype: str = "auto"  # auto: bf16 where bf16 matmuls are native (compute copies on one process, autocast under DDP/FSDP), else fp32
    compile: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 100
    spike_factor: float = 2.0  # a loss above this x the median of the last spike_window losses is a spike; 0: off
    spike_window: int = 20
    skip_batches: int = 20  # batches skipped after a rewind (PaLM skipped 200-500 at 540B)
    max_rewinds: int = 10
    poison_batches: list[int] = field(default_factory=list)  # fault injection: these data batches get 1000x loss
    threads: int | None = None
    progress: bool = True
    parallel: str = "none"  # ddp or fsdp under torchrun (fsdp also runs as a group of one without it)
    activation_checkpointing: str = "none"  # full or selective: recompute a block's activations in backward
    report_to: list[str] = field(default_factory=list)  # trackers the records also go to: tensorboard, wandb, mlflow

    # What a resumed run may change: how long it runs, how often it reports, how it is laid out.
    CHANGEABLE_ON_RESUME = frozenset(
        {
            "max_steps",
            "checkpoint_every",
            "eval_every",
            "compile",
            "parallel",
            "threads",
            "progress",
            "activation_checkpointing",
            "report_to",
        }
    )

    def validate(self) -> None:
        checks = [
            (self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.micro_batch_size is None or self.micro_batch_size >= 1, "--micro-batch-size must be at least 1"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (self.eval_every >= 1, "--eval-every must be at least 1"),
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "--lr must be a positive number"),
            (self.hold_steps is None or self.hold_steps >= 1, "--hold-steps must be at least 1"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
            (math.isfinite(self.grad_clip) and self.grad_clip > 0, "--grad-clip must be a positive number"),
            (math.isfinite(self.z_loss) and self.z_loss >= 0, "--z-loss must be 0 or more"),
            (self.spike_factor >= 0 and self.spike_window >= 1, "the spike detector needs factor >= 0 and window >= 1"),
            (self.skip_batches >= 0 and self.max_rewinds >= 0, "skip_batches and max_rewinds must be 0 or more"),
            (0 <= self.seed < 2**63, "--seed must be between 0 and 2^63 - 1"),
            (self.threads is None or self.threads >= 1, "--threads must be at least 1"),
            (
                self.parallel in distributed.PARALLEL_MODES,
                f"--parallel must be one of {', '.join(distributed.PARALLEL_MODES)}",
            ),
            (
                self.activation_checkpointing in ACTIVATION_CHECKPOINTING,
                f"--activation-checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)
        check_trackers(self.report_to)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-2 if self.optimizer == "palm" else 2e-3)

    def batch_at(self, step: int) -> int:
        """Global batch size at `step` (1-based) under the ramp."""
        if not self.batch_ramp:
            return self.batch_size
        frac = (step - 1) / self.max_steps
        share = 4 if frac < 0.2 else 2 if frac < 0.45 else 1
        return max(1, self.batch_size // share)

    def lr_at(self, step: int) -> float:
        hold = self.hold_steps if self.hold_steps is not None else max(1, self.max_steps // 10)
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20)
        return lr_at(step, self.optimizer, self.peak_lr, hold, warmup, self.max_steps)

    def check_world(self, world: distributed.World) -> None:
        if any(self.batch_at(k) % world.size for k in (1, self.max_steps)) or self.batch_at(1) < world.size:
            raise TrainingError(f"--batch-size must split evenly over {world.size} processes at every ramp stage")


Batches = Callable[[int, int, range], tuple[torch.Tensor, torch.Tensor]]  # (index, global batch, rows) -> (x, y)


@dataclass
class Run:
    """A training run in memory: the model and optimizer, the recipe's hooks, and the loop's own state,
    which `state_dict` / `load_state_dict` save and restore (checkpoints hold it as JSON)."""

    loop: LoopConfig
    layout: RunLayout
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype
    batches: Batches  # where step k's batch comes from
    evaluate: Callable[[Run], dict]  # metrics every eval_every steps; may set `stop`
    world: distributed.World = field(default_factory=distributed.World)
    seq_len: int = 0  # tokens per training sequence, for the FLOPs behind MFU
    step: int = 0
    skipped: int = 0  # data batches skipped by rewinds: step k reads batch k + skipped
    recent: list[float] = field(default_factory=list)  # the spike detector's window
    rewinds: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)  # the recipe's own state (e.g. early stopping)
    stop: bool = False  # set by `evaluate` to end the run early (saved too, so a resumed run stays stopped)
    lock: RunLock | None = None  # rank 0 holds the run folder while it trains
    copies: ComputeCopies | None = None  # bf16 weights the steps compute with, when training in bf16 on one process

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "skipped": self.skipped,
            "recent": list(self.recent),
            "rewinds": self.rewinds,
            "tokens": self.tokens,
            "extra": self.extra,
            "stop": self.stop,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.step, self.skipped, self.recent = int(state["step"]), int(state["skipped"]), list(state["recent"])
            self.rewinds, self.tokens = int(state["rewinds"]), int(state["tokens"])
            self.extra, self.stop = dict(state.get("extra", {})), bool(state.get("stop", False))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"a checkpoint's state.json is incomplete or corrupt ({type(e).__name__}: {e})"
            ) from None

    def save(self, step: int) -> None:
        """Checkpoint `step`: with FSDP every rank writes its shards; DDP replicas are identical, so rank 0
        writes for all."""
        state, keep = {**self.state_dict(), "step": step}, self.loop.keep_checkpoints
        if self.world.mode == "fsdp":
            save_sharded_checkpoint(self.layout, step, self.model, self.optimizer, state, keep)
        elif self.world.is_main:
            save_training_checkpoint(self.layout, step, self.model, self.optimizer, state, keep)
        self.world.barrier()

    def restore(self) -> None:
        """Back to the newest intact checkpoint: a corrupt one is reported and passed over."""
        checkpoints = list_checkpoints(self.layout)
        for checkpoint in reversed(checkpoints):
            try:
                self.load_state_dict(load_training_checkpoint(checkpoint, self.model, self.optimizer))
                if self.copies is not None:
                    self.copies.refresh()
                return
            except CheckpointError as e:
                logger.warning("%s; falling back to the checkpoint before it", e)
        raise CheckpointError(f"{self.layout.checkpoints} holds no intact checkpoint to continue from")

    def start(self) -> None:
        """Continue from the newest intact checkpoint, or write step 0's so that a rewind always has one."""
        checkpoints = list_checkpoints(self.layout)
        self.world.barrier()  # every rank has looked before rank 0 may write the first checkpoint
        if checkpoints:
            self.restore()
        else:
            self.save(0)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def show_progress(loop: LoopConfig) -> bool:
    # Bars are for people at a terminal; in logs and pipes they only bury the messages that matter.
    return loop.progress and sys.stderr.isatty()


def run_loop(run: Run, on_step: Callable[[Run, dict], None] | None = None) -> Run:
    """Step `run` to max_steps (or until its `evaluate` sets run.stop), logging and checkpointing as it goes."""
    with torch_threads(run.loop.threads):
        return _steps(run, on_step)


def _steps(run: Run, on_step) -> Run:
    loop, main = run.loop, run.world.is_main
    if loop.compile:
        compile_blocks(run.model)
    if run.dtype == torch.bfloat16 and run.world.mode == "none":
        run.copies = ComputeCopies(run.model)  # DDP and FSDP cast through their own wrappers instead
    step_model = distributed.wrap(run.model, run.world)
    fpt = flops_per_token(run.model.config, run.seq_len)  # type: ignore[arg-type]
    peak = measure_matmul_peak(run.dtype, run.device) * run.world.size
    sheet = datasheet_peak(run.device, run.dtype)
    sheet = sheet * run.world.size if sheet else None
    log = Records(run.layout, loop.report_to, start_step=run.step) if main else None  # rank 0 alone logs
    bar = tqdm(
        total=loop.max_steps, initial=run.step, disable=not (main and show_progress(loop)), desc="train", unit="step"
    )
    try:
        while run.step < loop.max_steps and not run.stop:
            step = run.step + 1
            for group in run.optimizer.param_groups:
                group["lr"] = loop.lr_at(step)
            start = time.perf_counter()
            run.model.zero_grad(set_to_none=True)
            sums, n_tokens = forward_backward(run, step_model, step)
            # Clipped before the spike check (a spike's gradients are thrown away anyway), so that the
            # losses and the norm come back to the host together: one sync per step. With FSDP the grads
            # are DTensor shards and the norm is reduced over all of them.
            norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(run.model.parameters(), loop.grad_clip))
            *values, norm = torch.cat([sums, norm.reshape(1).to(sums)]).tolist()
            loss, ce, z = (run.world.mean(v) for v in values)
            if is_spike(run, loss):
                rewind(run, step, loss, log)
                bar.n = run.step
                continue
            run.optimizer.step()
            if run.copies is not None:
                run.copies.refresh()
            run.step, run.tokens = step, run.tokens + n_tokens
            run.recent = (run.recent + [loss])[-loop.spike_window :]
            rate = n_tokens / (time.perf_counter() - start)
            record = {
                "step": step,
                "loss": loss,
                "lm_loss": ce,
                "z_loss": z,
                "lr": run.optimizer.param_groups[0]["lr"],
                "grad_norm": norm,
                "batch_size": loop.batch_at(step),
                "tokens": run.tokens,
                "tokens_per_s": rate,
                "mfu": mfu(rate, fpt, peak),
                "mfu_datasheet": mfu(rate, fpt, sheet),
            }
            sharded = run.world.mode == "fsdp"  # a sharded forward needs every rank; rank 0 still logs alone
            if (main or sharded) and (step % loop.eval_every == 0 or step == loop.max_steps):
                record.update(run.evaluate(run))
            if log:
                log.write(record)
            if step % loop.checkpoint_every == 0 or step == loop.max_steps or run.stop:
                run.save(step)
            bar.update(1)
            bar.set_postfix(loss=f"{ce:.3f}", tok_s=f"{rate:.0f}", mfu=f"{record['mfu']:.1%}")
            if on_step:
                on_step(run, record)
    finally:
        bar.close()
        if log:
            log.close()
    return run


def forward_backward(run: Run, model, step: int) -> tuple[torch.Tensor, int]:
    """([loss, ce, z] of this rank's rows of the batch for `step`, a tensor not yet read back; the
    tokens of the whole batch), with gradients accumulated over micro-batches.

    Gradients are computed even for a spike (it is detected from the summed loss); the caller
    throws them away by rewinding.
    """
    loop = run.loop
    batch_index = step + run.skipped
    rows = run.world.rows(loop.batch_at(step))
    x, y = run.batches(batch_index, loop.batch_at(step), rows)
    # The loss is a mean over the targets that count: all of them in pretraining, the completions in fine-tuning.
    scored = (y != IGNORE_INDEX).any(0)
    n_items = max(1, int((y != IGNORE_INDEX).sum()))
    # Logits only from the first position with a target on: all of them in pretraining; in fine-tuning the
    # prompts' positions are skipped, and with them most of the vocabulary matmul.
    keep = y.shape[1] - int(scored.int().argmax()) if bool(scored.any()) else y.shape[1]
    y = y[:, -keep:]
    x, y = x.to(run.device), y.to(run.device)  # after the counting above, which stays on the host
    micro = loop.micro_batch_size or x.shape[0]
    scale = 1000.0 if batch_index in loop.poison_batches else 1.0
    sums = torch.zeros(3, device=run.device)  # loss, ce, z: read back once per step, not per micro-batch
    # Dropout masks, like the batch, are a pure function of (seed, batch, rank), so a resumed run draws the
    # same; the caller's random state is put back afterwards.
    with torch.random.fork_rng(devices=[run.device.index or 0] if run.device.type == "cuda" else []):
        torch.manual_seed((loop.seed * 1_000_003 + batch_index) * 1024 + run.world.rank)
        for i in range(0, x.shape[0], micro):
            # On the copies, the backward too: it recomputes checkpointed blocks from the weights in place then.
            with run.copies.in_use() if run.copies is not None else contextlib.nullcontext():
                with autocast(run.device, run.dtype if run.copies is None else torch.float32):
                    # skip_logits: the loss comes from hidden states chunk by chunk, never the whole logits tensor
                    out = model(
                        input_ids=x[i : i + micro],
                        shift_labels=y[i : i + micro],
                        skip_logits=True,
                        logits_to_keep=keep,
                        num_items_in_batch=n_items,
                        use_cache=False,
                    )
                loss = out.loss * scale
                loss.backward()
            if run.copies is not None:
                run.copies.accumulate_grads()
            sums += torch.stack([loss.detach(), out.lm_loss, out.z_loss]).float()
    # Each rank's loss is the mean over its own rows and DDP averages gradients over ranks, so with
    # equal rows per rank the mean over ranks equals the single-process values on the whole batch.
    return sums, x.numel() * run.world.size


def is_spike(run: Run, loss: float) -> bool:
    if not math.isfinite(loss):
        return True
    window = run.recent[-run.loop.spike_window :]
    return (
        run.loop.spike_factor > 0  # 0 turns the ratio test off (fine-tuning losses legitimately vary that much)
        and len(window) >= run.loop.spike_window
        and loss > run.loop.spike_factor * statistics.median(window)
    )


def rewind(run: Run, step: int, loss: float, log: Records | None) -> None:
    """PaLM's spike recovery: back to the last checkpoint, and skip the batches that led here."""
    run.rewinds += 1
    if run.rewinds > run.loop.max_rewinds:
        raise TrainingError(f"loss diverged: {run.rewinds - 1} rewinds did not help (loss {loss:.4g} at step {step})")
    rewinds = run.rewinds
    run.restore()
    run.rewinds = rewinds
    run.skipped += run.loop.skip_batches
    if log:
        log.write(
            {
                "step": run.step,
                "event": "loss_spike",
                "spike_step": step,
                "loss": loss,
                "rewound_to": run.step,
                "skipped_batches": run.loop.skip_batches,
            }
        )
