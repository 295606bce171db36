"""A palm model directory (what `palm train` writes to RUN/final): checked before use, then loaded.

The directory is a Transformers one: config.json (model_type "palm"), safetensors weights, the
tokenizer files, and generation_config.json. Every problem is one CheckpointError naming the path,
raised before any weight is read, and nothing here ever unpickles a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.atomic import atomic_directory
from ..core.errors import CheckpointError
from ..core.runtime import pick_device, pick_dtype
from ..model.config import ConfigError, PalmConfig
from ..text.tokenizer import PalmTokenizer

Placer = Callable[[torch.nn.Module, str, torch.Tensor], bool]

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: str | Path, tokenizer: bool = True) -> Path:
    """`path` as a Path once it is known to hold a palm config, readable safetensors weights and
    (if `tokenizer`) a tokenizer; a CheckpointError naming what is wrong otherwise."""
    path = Path(path)
    config_file, raw, kind = read_config_json(path)
    if kind != PalmConfig.model_type:
        raise CheckpointError(f"{path} holds a {kind!r} model, not a palm model")
    config = check_config(config_file, raw)
    _check_weights(path, config)
    if tokenizer and not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.json is missing)")
    return path


def read_config_json(path: Path) -> tuple[Path, dict, str | None]:
    """(config.json's path, its contents, its model_type) of any Transformers model directory at `path`;
    a CheckpointError naming what is missing or unreadable."""
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
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    return config_file, raw, raw.get("model_type")


def check_config(config_file: Path, raw: dict) -> PalmConfig:
    """The PalmConfig a config.json describes: each of palm's own fields of the right type, a consistent shape."""
    from ..core.settings import check_value, own_hints

    hints = own_hints(PalmConfig)
    try:
        for name, value in raw.items():
            if name in hints:
                check_value(name, value, hints[name])
        return PalmConfig.from_dict(raw)
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{config_file} does not describe a palm model: {e}") from None


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: the one file, or those its index names."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is corrupt: {e}") from None
        return [path / n for n in sorted(names)]
    if not (path / WEIGHTS).is_file():
        if any((path / p).exists() for p in PICKLED_WEIGHTS):
            raise CheckpointError(
                f"{path} holds pickled weights (pytorch_model.bin), which can run code when loaded; "
                "palm reads safetensors only"
            )
        raise CheckpointError(f"{path} has no weights ({WEIGHTS} is missing)")
    return [path / WEIGHTS]


def _check_weights(path: Path, config: PalmConfig) -> None:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), "pt") as f:
                shapes.update((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
        except (OSError, SafetensorError, ValueError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    _check_shapes(path, shapes, config)


def _check_shapes(path: Path, shapes: dict[str, tuple[int, ...]], config: PalmConfig) -> None:
    """The weights' shapes (from the safetensors headers) against the ones config.json implies, so that a
    mismatch is one line here rather than Transformers' load report and a re-initialised model."""
    from ..model.model import PalmForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = PalmForCausalLM(config)
    tied = set(model._tied_weights_keys) if config.tie_word_embeddings else set()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k} is {_dims(shapes[k])} there, {_dims(v)} by config.json"
        for k, v in expected.items()
        if k in shapes and shapes[k] != v
    ]
    missing = [k for k in expected if k not in shapes and k not in tied]
    # Weights the config has no place for (more layers than it says, say) would be dropped without a word.
    extra = sorted(k for k in shapes if k not in expected)
    if wrong:
        raise CheckpointError(f"the weights in {path} do not match its config.json: {wrong[0]}{_more(wrong)}")
    if missing:
        raise CheckpointError(
            f"the weights in {path} lack {missing[0]}{_more(missing)}, which its config.json calls for"
        )
    if extra:
        raise CheckpointError(
            f"the weights in {path} hold {extra[0]}{_more(extra)}, which its config.json has no place for"
        )


def _more(items: list[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _dims(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape)) or "a scalar"


def load_model(path: str | Path, device: str | None = None, dtype: str = "auto", place: Placer | None = None):
    """(PalmForCausalLM in eval mode on `device`, PalmTokenizer) from a checked model directory.

    Weights load in bf16 where bf16 is native (or asked for), else fp32. `place(model, name, tensor)`, when
    given, sees each tensor as it is read (from the file, in its stored dtype) and returns True where it
    has put it in the model itself (palm.inference.quant.decoding_weights).
    """
    path = check_model_dir(path)
    dev = pick_device(device)
    try:
        model = _read_model(path, dev, pick_dtype(dtype, dev), place)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, SafetensorError) as e:
        raise CheckpointError(
            f"cannot load the model in {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return model.eval(), PalmTokenizer.load(path)


def _read_model(path: Path, device: torch.device, dtype: torch.dtype, place: Placer | None = None):
    """The model of a checked directory, built empty in `dtype` on `device` and filled one tensor at a time.

    Transformers' from_pretrained keeps the whole file mapped while it fills the model, and every page it
    has read stays resident: loading an fp32 file into bf16 peaked at 3x the model's size (6.0 GB for a
    1B model). Mapping the file anew for each tensor keeps the peak at the model plus its largest tensor.
    """
    from transformers import GenerationConfig

    from ..model.model import PalmForCausalLM

    config = PalmConfig.from_pretrained(str(path))
    with torch.device("meta"):  # no memory and no random initialisation: every weight is read below
        model = PalmForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)  # type: ignore[arg-type]
    model.tie_weights()  # to_empty gave the tied embedding and head a tensor each
    model.config.dtype = dtype
    model.config.name_or_path = str(path)
    if (path / "generation_config.json").is_file():
        with quiet_transformers():
            model.generation_config = GenerationConfig.from_pretrained(str(path))
    params = dict(model.named_parameters())  # a tied head is the embedding, named once
    with torch.no_grad():
        for file in _weight_files(path):
            with safe_open(str(file), "pt") as f:
                names = list(f.keys())
            for name in names:
                if name in params:  # the checked shapes leave only a tied head's own copy out
                    with safe_open(str(file), "pt") as f:  # the file's dtype (fp32) goes as soon as it is read
                        tensor = f.get_tensor(name).to(params[name].dtype)
                    if place is None or not place(model, name, tensor):
                        params[name].copy_(tensor)
                    del params[name], tensor  # a placed weight's empty tensor goes with its module
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Transformers' progress bars off for the body, and back as they were afterwards; likewise the
    deprecation warning peft sets off by asking for `is_gradient_checkpointing` (theirs to fix, not the
    user's)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def model_config(tokenizer: PalmTokenizer, preset: str, **overrides) -> PalmConfig:
    """A preset's shape sized to `tokenizer`, with its special ids; generation stops at the end of a
    sequence or of a document."""
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=[tokenizer.eos_id, tokenizer.eod_id],
    )
    return PalmConfig.from_preset(preset, **{**ids, **overrides})


def generation_defaults(config: PalmConfig):
    """What `generate()` does when the caller says nothing: sample, as a small PaLM needs to, with a
    repetition penalty (greedy decoding of a small model loops); `do_sample=False` stays available."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_k=40,
        top_p=0.95,
        repetition_penalty=1.2,
        max_new_tokens=64,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def save_model_dir(model, tokenizer: PalmTokenizer, out: str | Path, overwrite: bool = True) -> Path:
    """`out` as a complete Transformers directory (weights, config with auto_map, code, tokenizer,
    generation defaults), written atomically; the model keeps its own config flags."""
    use_cache = model.config.use_cache
    model.config.use_cache = True  # what inference wants by default
    model.generation_config = generation_defaults(model.config)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp, quiet_transformers():
            model.save_pretrained(str(tmp))
            tokenizer.save(tmp)
    finally:
        model.config.use_cache = use_cache
    return Path(out)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def init_model_dir(
    preset: str, tokenizer_dir: str | Path, out: str | Path, seed: int = 0, overwrite: bool = False, **overrides
) -> int:
    """Write a randomly initialised `preset` model sized to the tokenizer into `out`; returns its parameter count."""
    from ..model.model import PalmForCausalLM

    tokenizer = PalmTokenizer.load(tokenizer_dir)
    config = model_config(tokenizer, preset, **overrides)
    with torch.device("meta"):
        n_params = PalmForCausalLM(config).num_parameters()
    if 4 * n_params > 0.8 * _physical_memory():
        raise CheckpointError(
            f"{preset} has {n_params / 1e9:.2f}B parameters: too large to initialise in this machine's memory"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PalmForCausalLM(config)
    save_model_dir(model, tokenizer, out, overwrite=overwrite)
    return n_params
