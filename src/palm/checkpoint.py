"""Writing and reading model directories without ever leaving a half-written one behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from .config import PalmConfig
from .errors import CheckpointError
from .model import PalmForCausalLM
from .tokenizer import PalmTokenizer


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it is renamed to `out`.

    If the body raises, `out` is untouched. An existing non-empty `out` is an error unless
    `overwrite`, and then it is swapped out only once the new contents are complete.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def init_model_dir(preset: str, tokenizer_dir: str | Path, out: str | Path, seed: int = 0, **overrides) -> int:
    """Write a randomly initialised `preset` model sized to the tokenizer into `out`; returns its parameter count."""
    tok = PalmTokenizer.load(tokenizer_dir)
    config = PalmConfig.from_preset(
        preset,
        vocab_size=len(tok),
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=[tok.eos_id, tok.eod_id],  # generation stops at end of sequence or of document
        **overrides,
    )
    with torch.device("meta"):
        n_params = PalmForCausalLM(config).num_parameters()
    if 4 * n_params > 0.8 * _physical_memory():
        raise CheckpointError(
            f"{preset} has {n_params / 1e9:.2f}B parameters: too large to initialise in this machine's memory"
        )
    torch.manual_seed(seed)
    model = PalmForCausalLM(config)
    model.save_pretrained(str(out))
    tok.save(out)
    return n_params


# Training checkpoints: RUN/checkpoints/step-NNNNNNN/ holds model.safetensors (fp32 master weights,
# tied embedding once), optimizer.safetensors (every state tensor) and state.json (the rest: step,
# data position, optimizer scalars and groups). No pickle anywhere, so a checkpoint can be opened safely.
CHECKPOINTS = "checkpoints"


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"state": scalars, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta["state"].items():
        state.setdefault(int(idx), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(run: Path, step: int, model, optimizer, state: dict, keep: int) -> Path:
    """Atomically write the checkpoint for `step`, then delete all but the newest `keep`."""
    out = Path(run) / CHECKPOINTS / f"step-{step:07d}"
    with atomic_directory(out, overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": meta}, indent=1))
    for old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old)
    return out


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save are skipped)."""
    folder = Path(run) / CHECKPOINTS
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file()) if folder.is_dir() else []


def load_training_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model and optimizer in place from a checkpoint folder; returns its state.json."""
    try:
        state = json.loads((path / "state.json").read_text())
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise CheckpointError(f"{path} does not match this model (missing {missing}, unexpected {unexpected})")
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer")))
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or does not match: {e}") from None
    return state
