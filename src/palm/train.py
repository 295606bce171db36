"""Pretraining with the PaLM recipe (paper section 5).

The batch at step k is a pure function of (seed, k + skipped batches), every piece of state lives
in a checkpoint (weights and optimizer in safetensors, or in DCP shards under FSDP; the rest in
JSON), and a loss spike rewinds to the last checkpoint and skips ahead in the data, as was done for
PaLM 540B. Resuming from any checkpoint therefore continues bitwise identically to a run that was
never stopped (on another number of processes: to float rounding).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import (
    atomic_directory,
    list_checkpoints,
    load_training_checkpoint,
    save_sharded_checkpoint,
    save_training_checkpoint,
)
from .config import PalmConfig
from .corpora import parse_corpus_spec, part_documents
from .data import TokenData, get_batch, prepare_data, token_byte_lengths, unigram_bits_per_byte, val_windows
from .errors import CheckpointError, PalmError
from .flops import datasheet_peak, flops_per_token, measure_matmul_peak, mfu
from .runtime import pick_device, pick_dtype
from .model import IGNORE_INDEX, PalmForCausalLM, lm_loss
from .optim import OPTIMIZERS, build_optimizer, lr_at
from .tokenizer import PalmTokenizer, train_tokenizer

RUN_FILE = "run.json"
METRICS = "metrics.jsonl"


class TrainingError(PalmError):
    """Training cannot go on (for example the loss keeps diverging after rewinds)."""


@dataclass
class TrainConfig:
    corpus: list[str]
    out: str
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # PalmConfig overrides on top of the preset, e.g. {"num_hidden_layers": 2}
    tokenizer: str | None = None  # None: train one on the corpus into RUN/tokenizer
    vocab_size: int = 8192
    max_steps: int = 1000
    seq_len: int = 256
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
    dtype: str = "auto"  # auto: bf16 autocast where bf16 matmuls are native, else fp32
    compile: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 100
    eval_tokens: int = 32768  # validation tokens per corpus per evaluation
    val_fraction: float = 0.05
    spike_factor: float = 2.0  # a loss above this x the median of the last spike_window losses is a spike
    spike_window: int = 20
    skip_batches: int = 20  # batches skipped after a rewind (PaLM skipped 200-500 at 540B)
    max_rewinds: int = 10
    poison_batches: list[int] = field(default_factory=list)  # fault injection: these data batches get 1000x loss
    cache_dir: str | None = None  # token shards; None: RUN/../.palm-cache
    threads: int | None = None
    progress: bool = True
    parallel: str = "none"  # ddp or fsdp under torchrun (fsdp also runs as a group of one without it)

    def validate(self) -> None:
        checks = [
            (self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.seq_len >= 8, "--seq-len must be at least 8"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.micro_batch_size is None or self.micro_batch_size >= 1, "--micro-batch-size must be at least 1"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.dtype in ("auto", "bf16", "fp32"), "--dtype must be auto, bf16 or fp32"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (0 < self.val_fraction < 0.5, "--val-fraction must be between 0 and 0.5"),
            (self.lr is None or self.lr > 0, "--lr must be positive"),
            (self.parallel in distributed.PARALLEL_MODES, "--parallel must be none, ddp or fsdp"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)

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


def _show_progress(cfg: TrainConfig) -> bool:
    # Bars are for people at a terminal; in logs and pipes they only bury the messages that matter.
    return cfg.progress and sys.stderr.isatty()


def lr_for(cfg: TrainConfig, step: int) -> float:
    hold = cfg.hold_steps if cfg.hold_steps is not None else max(1, cfg.max_steps // 10)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.max_steps // 20)
    return lr_at(step, cfg.optimizer, cfg.peak_lr, hold, warmup, cfg.max_steps)


@dataclass
class Run:
    """Everything a training run holds in memory."""

    cfg: TrainConfig
    path: Path
    tokenizer: PalmTokenizer
    data: TokenData
    model: PalmForCausalLM
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype
    step: int = 0
    skipped: int = 0  # data batches skipped by rewinds: step k reads batch k + skipped
    recent: list[float] = field(default_factory=list)  # the spike detector's window
    rewinds: int = 0
    tokens: int = 0
    world: distributed.World = field(default_factory=distributed.World)
    # What differs between pretraining and fine-tuning (palm.finetune): where batches come from and how a
    # run is judged. The loop, checkpoints, exact resume, spike rewinds and metrics are shared.
    batch_fn: Callable[[Run, int, int, range], tuple[torch.Tensor, torch.Tensor]] | None = None  # default: corpus_batch
    eval_fn: Callable[[Run], dict] | None = None  # default: evaluate
    extra: dict = field(default_factory=dict)  # the hooks' own state (e.g. early stopping); saved in checkpoints
    stop: bool = False  # set by eval_fn to end the run early (saved too, so a resumed run stays stopped)

    def __post_init__(self):
        self.batch_fn = self.batch_fn or corpus_batch
        self.eval_fn = self.eval_fn or evaluate

    def state(self) -> dict:
        return {"skipped": self.skipped, "recent": self.recent, "rewinds": self.rewinds, "tokens": self.tokens,
                "extra": self.extra, "stop": self.stop}


def load_run_config(path: Path) -> TrainConfig:
    try:
        raw = json.loads((Path(path) / RUN_FILE).read_text())
        return TrainConfig(**raw)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a palm run (it has no {RUN_FILE})") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}/{RUN_FILE} is corrupt: {e}") from None


def _tokenizer_for(cfg: TrainConfig, run_dir: Path, parts) -> PalmTokenizer:
    if (run_dir / "tokenizer" / "tokenizer.json").is_file():
        return PalmTokenizer.load(run_dir / "tokenizer")
    if cfg.tokenizer:
        tok = PalmTokenizer.load(cfg.tokenizer)
    else:
        tok = train_tokenizer(lambda: (doc for part in parts for doc in part_documents(part)), cfg.vocab_size)
    with atomic_directory(run_dir / "tokenizer", overwrite=True) as tmp:
        tok.save(tmp)
    return tok


def _prepare(cfg: TrainConfig, path: Path, resume: bool, show: bool) -> tuple[PalmTokenizer, TokenData]:
    parts = parse_corpus_spec(cfg.corpus)
    path.mkdir(parents=True, exist_ok=True)
    try:
        tok = _tokenizer_for(cfg, path, parts)
        cache = Path(cfg.cache_dir) if cfg.cache_dir else path.resolve().parent / ".palm-cache"
        data = prepare_data(parts, tok, cache, cfg.seq_len, cfg.val_fraction, progress=show)
    except BaseException:
        if not resume and not any(p for p in path.iterdir() if p.name != "tokenizer"):
            import shutil

            shutil.rmtree(path)  # a run that never started leaves nothing behind
        raise
    return tok, data


def open_run(cfg: TrainConfig, resume: bool) -> Run:
    """Build (or, with resume, restore) a run: tokenizer, data shards, model, optimizer, state.

    Under torchrun, rank 0 trains the tokenizer, builds the shards and writes the run's files;
    the other ranks wait for it and then read the same files.
    """
    cfg.validate()
    world = distributed.setup(cfg.parallel)
    path = Path(cfg.out)
    if not resume and path.exists() and any(path.iterdir()):
        raise TrainingError(f"{path} already exists and is not empty; resume it with --resume {path}")
    if any(cfg.batch_at(k) % world.size for k in (1, cfg.max_steps)) or cfg.batch_at(1) < world.size:
        raise TrainingError(f"--batch-size must split evenly over {world.size} processes at every ramp stage")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world.barrier()
    failure = None
    if world.is_main:
        try:
            tok, data = _prepare(cfg, path, resume, _show_progress(cfg))
            if not resume:
                (path / RUN_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        except PalmError as e:
            failure = e
    if world.active:
        failure = distributed.share_failure(failure)
    if failure is not None:
        raise failure
    if not world.is_main:
        tok, data = _prepare(cfg, path, True, False)
    device = world.device() if world.active else pick_device()
    config = PalmConfig.from_preset(
        cfg.preset,
        vocab_size=len(tok),
        max_position_embeddings=max(cfg.seq_len, 2048),
        z_loss_coef=cfg.z_loss,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=[tok.eos_id, tok.eod_id],
        use_cache=False,
        **cfg.model,
    )
    torch.manual_seed(cfg.seed)
    model = PalmForCausalLM(config).to(device).train()
    dtype = pick_dtype(cfg.dtype, device)
    model = distributed.shard(model, world, bf16=dtype == torch.bfloat16)  # before the optimizer sees the params
    optimizer = build_optimizer(cfg.optimizer, model.named_parameters(), lr=cfg.peak_lr)
    run = Run(cfg, path, tok, data, model, optimizer, device, dtype, world=world)
    checkpoints = list_checkpoints(path)
    world.barrier()  # every rank has looked before rank 0 may write the first checkpoint
    if resume and checkpoints:
        restore(run, checkpoints[-1])
    elif not checkpoints:
        _save(run, 0)
    return run


def _save(run: Run, step: int) -> None:
    """Checkpoint `step`: with FSDP every rank writes its shards; DDP replicas are identical, so rank 0 writes for all."""
    if run.world.mode == "fsdp":
        save_sharded_checkpoint(run.path, step, run.model, run.optimizer, run.state(), run.cfg.keep_checkpoints)
    elif run.world.is_main:
        save_training_checkpoint(run.path, step, run.model, run.optimizer, run.state(), run.cfg.keep_checkpoints)
    run.world.barrier()


def restore(run: Run, checkpoint: Path) -> None:
    state = load_training_checkpoint(checkpoint, run.model, run.optimizer)
    run.step, run.skipped, run.recent = state["step"], state["skipped"], list(state["recent"])
    run.rewinds, run.tokens = state["rewinds"], state["tokens"]
    run.extra, run.stop = state.get("extra", {}), state.get("stop", False)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past `step`: a killed run may have logged steps its last checkpoint does not hold."""
    log = path / METRICS
    if log.is_file():
        keep = [line for line in log.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(log)


def _is_spike(run: Run, loss: float) -> bool:
    if not math.isfinite(loss):
        return True
    window = run.recent[-run.cfg.spike_window :]
    return (
        run.cfg.spike_factor > 0  # 0 turns the ratio test off (fine-tuning losses legitimately vary that much)
        and len(window) >= run.cfg.spike_window
        and loss > run.cfg.spike_factor * statistics.median(window)
    )


def evaluate(run: Run) -> dict:
    """Validation loss and bits per byte on each corpus of the mixture."""
    table = torch.as_tensor(token_byte_lengths(run.tokenizer))
    metrics = {}
    run.model.eval()
    with torch.no_grad():
        for i, name in enumerate(run.data.names):
            nats, tokens, n_bytes = 0.0, 0, 0
            for window in val_windows(run.data, i, run.cfg.eval_tokens):
                window = window.to(run.device)
                with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.dtype == torch.bfloat16):
                    logits = run.model(input_ids=window[:, :-1], use_cache=False).logits
                ce, _ = lm_loss(logits, window[:, 1:])
                n = window.shape[1] - 1
                nats += ce.item() * n
                tokens += n
                n_bytes += int(table[window[0, 1:].cpu()].sum())
            if tokens:
                metrics[f"val_loss/{name}"] = nats / tokens
                metrics[f"val_bpb/{name}"] = nats / math.log(2) / max(n_bytes, 1)
    run.model.train()
    return metrics


def unigram_baselines(run: Run) -> dict[str, float]:
    table = token_byte_lengths(run.tokenizer)
    return {name: unigram_bits_per_byte(run.data, i, table) for i, name in enumerate(run.data.names)}


def train(cfg: TrainConfig, resume: bool = False, on_step: Callable[[Run, dict], None] | None = None) -> Run:
    """Train to cfg.max_steps (continuing a run when `resume`) and export RUN/final."""
    run = run_loop(open_run(cfg, resume), on_step)
    export_final(run)  # collective under FSDP; rank 0 writes
    run.world.barrier()
    return run


def run_loop(run: Run, on_step: Callable[[Run, dict], None] | None = None) -> Run:
    """Step `run` to cfg.max_steps (or until eval_fn sets run.stop), logging and checkpointing as it goes."""
    cfg = run.cfg
    main = run.world.is_main
    if main:
        _truncate_metrics(run.path, run.step)
    step_model = distributed.wrap(run.model, run.world)
    step_model = torch.compile(step_model) if cfg.compile else step_model
    fpt = flops_per_token(run.model.config, cfg.seq_len)
    peak = measure_matmul_peak(run.dtype, run.device) * run.world.size
    sheet = datasheet_peak(run.device, run.dtype)
    sheet = sheet * run.world.size if sheet else None
    log = (run.path / METRICS).open("a") if main else None  # metrics and progress come from rank 0 only
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not (main and _show_progress(cfg)), desc="train", unit="step")
    try:
        while run.step < cfg.max_steps and not run.stop:
            step = run.step + 1
            for group in run.optimizer.param_groups:
                group["lr"] = lr_for(cfg, step)
            start = time.perf_counter()
            run.model.zero_grad(set_to_none=True)
            sums, n_tokens = _forward_backward(run, step_model, step)
            # Clipped before the spike check (a spike's gradients are thrown away anyway), so that the
            # losses and the norm come back to the host together: one sync per step. With FSDP the grads
            # are DTensor shards and the norm is reduced over all of them.
            norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip))
            *sums, norm = torch.cat([sums, norm.reshape(1).to(sums)]).tolist()
            loss, ce, z = (run.world.mean(v) for v in sums)
            if _is_spike(run, loss):
                _rewind(run, step, loss, log)
                bar.n = run.step
                continue
            run.optimizer.step()
            run.step = step
            run.tokens += n_tokens
            run.recent = (run.recent + [loss])[-cfg.spike_window :]
            elapsed = time.perf_counter() - start
            record = {
                "step": step,
                "loss": loss,
                "lm_loss": ce,
                "z_loss": z,
                "lr": run.optimizer.param_groups[0]["lr"],
                "grad_norm": norm,
                "batch_size": cfg.batch_at(step),
                "tokens": run.tokens,
                "tokens_per_s": n_tokens / elapsed,
                "mfu": mfu(n_tokens / elapsed, fpt, peak),
                "mfu_datasheet": mfu(n_tokens / elapsed, fpt, sheet),
            }
            sharded = run.world.mode == "fsdp"  # a sharded forward needs every rank; rank 0 still logs alone
            if (main or sharded) and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                record.update(run.eval_fn(run))
            if main:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or run.stop:
                _save(run, step)
            bar.update(1)
            bar.set_postfix(loss=f"{ce:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", mfu=f"{record['mfu']:.1%}")
            if on_step:
                on_step(run, record)
    finally:
        bar.close()
        if log:
            log.close()
    return run


def corpus_batch(run: Run, index: int, batch_size: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretraining's batch number `index`: (inputs, targets) of rows `rows` of a global batch of `batch_size`."""
    batch = get_batch(run.data, index, run.cfg.seed, batch_size, rows=rows)
    return batch[:, :-1], batch[:, 1:]


def _forward_backward(run: Run, model, step: int) -> tuple[torch.Tensor, int]:
    """([loss, ce, z] of this rank's rows of the batch for `step`, a tensor not yet read back; the
    tokens of the whole batch), with gradients accumulated over micro-batches.

    Gradients are computed even for a spike (it is detected from the summed loss); the caller
    throws them away by rewinding.
    """
    cfg = run.cfg
    batch_index = step + run.skipped
    rows = run.world.rows(cfg.batch_at(step))
    x, y = run.batch_fn(run, batch_index, cfg.batch_at(step), rows)
    # Dropout masks, like the batch, are a pure function of (seed, batch, rank), so a resumed run draws the same.
    torch.manual_seed((cfg.seed * 1_000_003 + batch_index) * 1024 + run.world.rank)
    # The loss is a mean over the targets that count: all of them in pretraining, the completions in fine-tuning.
    scored = (y != IGNORE_INDEX).any(0)
    n_items = max(1, int((y != IGNORE_INDEX).sum()))
    # Logits only from the first position with a target on: all of them in pretraining; in fine-tuning the
    # prompts' positions are skipped, and with them most of the vocabulary matmul.
    keep = y.shape[1] - int(scored.int().argmax()) if bool(scored.any()) else y.shape[1]
    y = y[:, -keep:]
    x, y = x.to(run.device), y.to(run.device)  # after the counting above, which stays on the host
    micro = cfg.micro_batch_size or x.shape[0]
    scale = 1000.0 if batch_index in cfg.poison_batches else 1.0
    sums = torch.zeros(3, device=run.device)  # loss, ce, z: read back once per step, not per micro-batch
    for i in range(0, x.shape[0], micro):
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.dtype == torch.bfloat16):
            # skip_logits: the loss comes from hidden states chunk by chunk, never the whole logits tensor
            out = model(input_ids=x[i : i + micro], shift_labels=y[i : i + micro], skip_logits=True,
                        logits_to_keep=keep, num_items_in_batch=n_items, use_cache=False)
        loss = out.loss * scale
        loss.backward()
        sums += torch.stack([loss.detach(), out.lm_loss, out.z_loss])
    # Each rank's loss is the mean over its own rows and DDP averages gradients over ranks, so with
    # equal rows per rank the mean over ranks equals the single-process values on the whole batch.
    return sums, x.numel() * run.world.size


def _rewind(run: Run, step: int, loss: float, log) -> None:
    """PaLM's spike recovery: back to the last checkpoint, and skip the batches that led here."""
    run.rewinds += 1
    if run.rewinds > run.cfg.max_rewinds:
        raise TrainingError(f"loss diverged: {run.rewinds - 1} rewinds did not help (loss {loss:.4g} at step {step})")
    checkpoint = list_checkpoints(run.path)[-1]
    rewinds = run.rewinds
    restore(run, checkpoint)
    run.rewinds = rewinds
    run.skipped += run.cfg.skip_batches
    event = {"step": run.step, "event": "loss_spike", "spike_step": step, "loss": loss,
             "rewound_to": run.step, "skipped_batches": run.cfg.skip_batches}
    if log:
        log.write(json.dumps(event) + "\n")
        log.flush()


def export_final(run: Run) -> Path:
    """RUN/final: a Transformers directory (weights, config with auto_map, code, tokenizer), written by rank 0.

    Collective with FSDP: the shards are gathered into one full state dict on rank 0's CPU first.
    """
    out = run.path / "final"
    model = run.model
    if run.world.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if run.world.is_main:
            with torch.device("meta"):
                model = PalmForCausalLM(run.model.config)
            model.load_state_dict(full, assign=True)
            model.tie_weights()
    if run.world.is_main:
        model.config.use_cache = True
        with atomic_directory(out, overwrite=True) as tmp:
            model.save_pretrained(str(tmp))
            run.tokenizer.save(tmp)
        model.config.use_cache = False
    return out
