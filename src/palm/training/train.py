"""Pretraining with the PaLM recipe (paper section 5): corpora in, RUN/final out.

The recipe's part is what pretraining alone has: a tokenizer (trained on the corpus unless given),
token shards of a mixture of corpora, batches drawn from them as a pure function of (seed, step),
validation loss and bits per byte per corpus, and the export of the final model. The loop itself,
its checkpoints, exact resume and spike rewinds are palm.training.loop's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import settings
from ..core.atomic import atomic_directory, write_json
from ..core.errors import PalmError
from ..core.heldout import summed_nll
from ..core.rundir import RunLayout
from ..core.runtime import pick_device, pick_dtype
from ..data.corpora import parse_corpus_spec, part_fingerprint
from ..data.data import TokenData, get_batch, val_windows
from ..data.shards import prepare_data, token_byte_lengths, tokenize_corpora, tokenizer_sha256
from ..data.subsample import DEFAULT_SAMPLE_BYTES, sample_corpora
from ..data.workers import default_workers
from ..model.config import ConfigError, PalmConfig
from ..model.model import PalmForCausalLM
from ..text.tokenizer import PalmTokenizer, train_tokenizer
from ..weights.modeldir import model_config, save_model_dir
from . import distributed
from .compute import apply_activation_checkpointing
from .loop import LoopConfig, Run, TrainingError, run_loop, show_progress
from .optim import build_optimizer
from .runfolder import claim, read_settings

logger = logging.getLogger("palm")
data_log = logging.getLogger("palm.data")  # what preparing the data took, at INFO: the command line shows it


@dataclass
class TrainConfig:
    """A pretraining run: the data and the model, and the loop's settings."""

    corpus: list[str]
    out: str
    preset: str = "tiny"
    model: dict = field(
        default_factory=dict
    )  # PalmConfig overrides on top of the preset, e.g. {"num_hidden_layers": 2}
    tokenizer: str | None = None  # None: train one on the corpus into RUN/tokenizer
    vocab_size: int = 8192
    seq_len: int = 256
    eval_tokens: int = 32768  # validation tokens per corpus per evaluation
    val_fraction: float = 0.05
    cache_dir: str | None = None  # token shards; None: RUN/../.palm-cache
    text_column: str = "text"  # the field or column of JSONL, Parquet and Arrow rows that holds the text
    workers: int | None = None  # tokenizing processes (per rank under torchrun); None: the processors available
    sample_bytes: int = DEFAULT_SAMPLE_BYTES  # text the tokenizer trains on, chosen by a hash of position
    loop: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        self.loop.validate()
        checks = [
            (self.seq_len >= 8, "--seq-len must be at least 8"),
            (self.eval_tokens >= 1, "--eval-tokens must be at least 1"),
            (0 < self.val_fraction < 0.5, "--val-fraction must be between 0 and 0.5"),
            (self.vocab_size >= 1, "--vocab-size must be positive"),
            (bool(self.text_column), "--text-column must name a column"),
            (self.workers is None or self.workers >= 1, "--workers must be at least 1"),
            (self.sample_bytes >= 1, "--sample-bytes must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)
        self.model_config_check()

    def model_config_check(self) -> None:
        """The preset and [model] overrides describe a PaLM: known keys, right types, a consistent shape."""
        hints = settings.own_hints(PalmConfig)
        unknown = sorted(set(self.model) - set(hints))
        if unknown:
            raise TrainingError(
                f"unknown model setting {', '.join(map(repr, unknown))}; PalmConfig has {', '.join(sorted(hints))}"
            )
        try:
            values = {k: settings.check_value(f"model.{k}", v, hints[k]) for k, v in self.model.items()}
            PalmConfig.from_preset(self.preset, **values)
        except (ConfigError, TypeError, ValueError) as e:
            raise TrainingError(f"the model settings do not describe a PaLM: {e}") from None

    @classmethod
    def from_settings(cls, flat: dict) -> TrainConfig:
        """From flags, a config file or run.json: flat names, or the loop's settings nested under `loop`."""
        return settings.route(cls, flat, LoopConfig())

    def resumed(self, given: dict) -> TrainConfig:
        return settings.resumed(self, given, LoopConfig.CHANGEABLE_ON_RESUME | {"workers"}, flag=_flag)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_run_config(path: str | Path) -> TrainConfig:
    raw = read_settings(RunLayout(Path(path)))
    if "base_model" in raw:
        raise TrainingError(f"{path} is a fine-tuning run; resume it with palm finetune --resume")
    return TrainConfig.from_settings(raw)


@dataclass
class Pretraining:
    """The recipe's side of a run: its tokenizer and token streams, and how a batch and a score come from them."""

    cfg: TrainConfig
    tokenizer: PalmTokenizer
    data: TokenData

    def batches(self, index: int, batch_size: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index`: (inputs, targets) of rows `rows` of a global batch of `batch_size`."""
        batch = get_batch(self.data, index, self.cfg.loop.seed, batch_size, rows=rows)
        return batch[:, :-1], batch[:, 1:]

    def evaluate(self, run: Run) -> dict:
        """Validation loss and bits per byte on each corpus of the mixture."""
        table = torch.as_tensor(token_byte_lengths(self.tokenizer))
        metrics = {}
        for i, name in enumerate(self.data.names):
            windows = list(val_windows(self.data, i, self.cfg.eval_tokens))
            nats, tokens = summed_nll(
                run.model, ((w[:, :-1], w[:, 1:]) for w in windows), device=run.device, dtype=run.dtype
            )
            n_bytes = sum(int(table[w[0, 1:]].sum()) for w in windows)
            if tokens:
                metrics[f"val_loss/{name}"] = nats / tokens
                metrics[f"val_bpb/{name}"] = nats / math.log(2) / max(n_bytes, 1)
        return metrics


def _tokenizer_for(cfg: TrainConfig, layout: RunLayout, parts, progress: bool = False) -> PalmTokenizer:
    if (layout.tokenizer / "tokenizer.json").is_file():
        return PalmTokenizer.load(layout.tokenizer)
    if cfg.tokenizer:
        tok = PalmTokenizer.load(cfg.tokenizer)
    else:
        sample = sample_corpora(parts, cfg.sample_bytes, progress=progress)
        tok = train_tokenizer(lambda: sample.texts, cfg.vocab_size)
        data_log.info("tokenizer: %s", sample.line())
    with atomic_directory(layout.tokenizer, overwrite=True, replace_all=True) as tmp:
        tok.save(tmp)
    return tok


def data_identity(parts, tokenizer: PalmTokenizer) -> dict:
    """What the run's batches are a function of, besides the seed: each corpus's files and the vocabulary."""
    return {
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "corpora": {part.name: part_fingerprint(part) for part in parts},
    }


def _check_data(layout: RunLayout, identity: dict, allow_change: bool) -> None:
    """A resumed run reads the same batches only if the corpora and vocabulary are those it started with."""
    saved = json.loads(layout.data.read_text(encoding="utf-8")) if layout.data.is_file() else None
    if saved is None or saved == identity:
        return
    changed = sorted(
        name
        for name in {**saved.get("corpora", {}), **identity["corpora"]}
        if saved.get("corpora", {}).get(name) != identity["corpora"].get(name)
    )
    what = f"corpus {', '.join(changed)}" if changed else "the tokenizer"
    if not allow_change:
        raise TrainingError(
            f"{what} changed since the run started, so resuming would not be exact; "
            "pass --allow-data-change to continue on the new data anyway"
        )
    logger.warning("%s changed since the run started: the resumed run will not be exact", what)


def _workers(cfg: TrainConfig, world) -> int:
    """Tokenizing processes per rank: the processors shared among the ranks of this machine, unless given."""
    if cfg.workers:
        return cfg.workers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size)) if world.active else 1
    return max(1, default_workers() // max(local, 1))


def _cache(cfg: TrainConfig, layout: RunLayout) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else layout.default_cache()


def _prepare(
    cfg: TrainConfig, layout: RunLayout, resume: bool, show: bool, allow_change: bool = False, world=None
) -> tuple[PalmTokenizer, TokenData]:
    parts = parse_corpus_spec(cfg.corpus, cfg.text_column)
    tok = _tokenizer_for(cfg, layout, parts, progress=show)
    identity = data_identity(parts, tok)
    if resume:
        _check_data(layout, identity, allow_change)
    data = prepare_data(
        parts,
        tok,
        _cache(cfg, layout),
        cfg.seq_len,
        cfg.val_fraction,
        progress=show,
        workers=_workers(cfg, world or distributed.World()),
    )
    write_json(layout.data, identity)
    for report in data.reports:
        if report.built:
            data_log.info("%s", report.line())
    return tok, data


def _any_failure(world, error: Exception | None) -> Exception | None:
    """The first rank's error of any rank (or None), raised on every rank alike."""
    if not torch.distributed.is_initialized():
        return error
    boxes: list = [None] * world.size
    torch.distributed.all_gather_object(boxes, None if error is None else (type(error), str(error)))
    first = next((box for box in boxes if box is not None), None)
    if first is None:
        return None
    return error if error is not None else first[0](first[1])


def _prepare_on_rank0(
    cfg: TrainConfig, layout: RunLayout, resume: bool, world, allow_change: bool
) -> tuple[PalmTokenizer, TokenData]:
    """Rank 0 trains the tokenizer; every rank tokenizes its share of the corpora; rank 0 joins the shards
    and writes run.json; the others then read the same files."""
    failure: Exception | None = None
    result = None
    if world.active:
        if world.is_main:
            try:
                parts = parse_corpus_spec(cfg.corpus, cfg.text_column)
                tok = _tokenizer_for(cfg, layout, parts, progress=show_progress(cfg.loop))
                if resume:
                    _check_data(layout, data_identity(parts, tok), allow_change)
            except PalmError as e:
                failure = e
        failure = distributed.share_failure(failure)
        if failure is None:
            try:
                tokenize_corpora(
                    parse_corpus_spec(cfg.corpus, cfg.text_column),
                    PalmTokenizer.load(layout.tokenizer),
                    _cache(cfg, layout),
                    world.rank,
                    world.size,
                    cfg.val_fraction,
                    _workers(cfg, world),
                    progress=world.is_main and show_progress(cfg.loop),
                )
            except PalmError as e:
                failure = e
            failure = _any_failure(world, failure)
        if failure is not None:
            raise failure
    if world.is_main:
        try:
            result = _prepare(cfg, layout, resume, show_progress(cfg.loop), allow_change, world)
            if not resume:
                write_json(layout.settings, dataclasses.asdict(cfg))
        except PalmError as e:
            failure = e
    if world.active:
        failure = distributed.share_failure(failure)
    if failure is not None:
        raise failure
    return result if world.is_main else _prepare(cfg, layout, True, False, allow_change=True, world=world)


def open_run(cfg: TrainConfig, resume: bool, allow_data_change: bool = False) -> Run:
    """Build (or, with resume, restore) a run: tokenizer, data shards, model, optimizer, state."""
    cfg.validate()
    world = distributed.setup(cfg.loop.parallel)
    layout = RunLayout(Path(cfg.out))
    cfg.loop.check_world(world)
    held = claim(layout, world, resume)
    try:
        world.barrier()
        tok, data = _prepare_on_rank0(cfg, layout, resume, world, allow_data_change)
        device = world.device() if world.active else pick_device()
        config = model_config(
            tok,
            cfg.preset,
            max_position_embeddings=max(cfg.seq_len, 2048),
            z_loss_coef=cfg.loop.z_loss,
            use_cache=False,
            **cfg.model,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.loop.seed)
            model = PalmForCausalLM(config).to(device).train()  # type: ignore[arg-type]
        apply_activation_checkpointing(model, mode=cfg.loop.activation_checkpointing)
        dtype = pick_dtype(cfg.loop.dtype, device)
        model = distributed.shard(model, world, bf16=dtype == torch.bfloat16)  # before the optimizer sees the params
        optimizer = build_optimizer(cfg.loop.optimizer, model.named_parameters(), lr=cfg.loop.peak_lr)
        recipe = Pretraining(cfg, tok, data)
        run = Run(
            cfg.loop,
            layout,
            model,
            optimizer,
            device,
            dtype,
            recipe.batches,
            recipe.evaluate,
            world=world,
            seq_len=cfg.seq_len,
            lock=held.lock,
        )
        run.start()
    except BaseException:
        held.abandon()
        raise
    return run


def train(
    cfg: TrainConfig,
    resume: bool = False,
    on_step: Callable[[Run, dict], None] | None = None,
    allow_data_change: bool = False,
) -> Run:
    """Train to max_steps (continuing a run when `resume`) and export RUN/final."""
    run = open_run(cfg, resume, allow_data_change)
    try:
        run_loop(run, on_step)
        export_final(run, PalmTokenizer.load(run.layout.tokenizer))  # collective under FSDP; rank 0 writes
        run.world.barrier()
    finally:
        run.close()
    return run


def export_final(run: Run, tokenizer: PalmTokenizer) -> Path:
    """RUN/final, written by rank 0. Collective with FSDP: the shards are gathered into one full state
    dict on rank 0's CPU first."""
    model = run.model
    if run.world.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if run.world.is_main:
            with torch.device("meta"):
                model = PalmForCausalLM(run.model.config)  # type: ignore[arg-type]
            model.load_state_dict(full, assign=True)
            model.tie_weights()
    if run.world.is_main:
        save_model_dir(model, tokenizer, run.layout.final)
    return run.layout.final
