"""A palm model directory (what `palm train` writes to RUN/final): checked before use, then loaded.

The directory is a Transformers one: config.json (model_type "palm"), safetensors weights, the
tokenizer files, and generation_config.json. Every problem is one CheckpointError naming the path,
raised before any weight is read, and nothing here ever unpickles a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .config import PalmConfig
from .errors import CheckpointError
from .runtime import pick_device, pick_dtype

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: str | Path, tokenizer: bool = True) -> Path:
    """`path` as a Path once it is known to hold a palm config, readable safetensors weights and
    (if `tokenizer`) a tokenizer; a CheckpointError naming what is wrong otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no model directory at {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a model directory (config.json is missing)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{config_file} is not readable JSON: {e}") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind != PalmConfig.model_type:
        raise CheckpointError(f"{path} holds a {kind!r} model, not a palm model")
    _check_weights(path)
    if tokenizer and not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.json is missing)")
    return path


def _check_weights(path: Path) -> None:
    files = [path / WEIGHTS]
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is corrupt: {e}") from None
        files = [path / n for n in sorted(names)]
    elif not files[0].is_file():
        if any((path / p).exists() for p in PICKLED_WEIGHTS):
            raise CheckpointError(
                f"{path} holds pickled weights (pytorch_model.bin), which can run code when loaded; "
                "palm reads safetensors only"
            )
        raise CheckpointError(f"{path} has no weights ({WEIGHTS} is missing)")
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                f.keys()
        except (OSError, SafetensorError, ValueError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None


def load_model(path: str | Path, device: str | None = None, dtype: str = "auto"):
    """(PalmForCausalLM in eval mode on `device`, PalmTokenizer) from a checked model directory.

    Weights load in bf16 where bf16 is native (or asked for), else fp32.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .model import PalmForCausalLM
    from .tokenizer import PalmTokenizer

    path = check_model_dir(path)
    dev = pick_device(device)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar would garble streamed output
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=pick_dtype(dtype, dev)).to(dev)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"cannot load the model in {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if not isinstance(model, PalmForCausalLM):
        raise CheckpointError(f"{path} holds a {type(model).__name__}, not a palm model")
    return model.eval(), PalmTokenizer.load(path)
