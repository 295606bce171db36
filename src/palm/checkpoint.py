"""Writing and reading model directories without ever leaving a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

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
