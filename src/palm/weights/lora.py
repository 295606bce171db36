"""LoRA adapters through the `peft` library: added to a palm model for fine-tuning, saved in peft's
format (adapter_config.json + adapter_model.safetensors, with the tokenizer beside them), loaded onto
a base palm directory with `PeftModel.from_pretrained`, and merged into a plain palm directory.

QLoRA (bitsandbytes 4-bit base weights) is not offered: bitsandbytes' 4-bit kernels need a CUDA GPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..core.atomic import atomic_directory
from ..core.errors import CheckpointError
from ..text.tokenizer import PalmTokenizer
from .modeldir import load_model, quiet_transformers, save_model_dir

TARGETS = ("in_proj", "attn_out", "mlp_out")  # every matmul of a PaLM block
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def add_adapters(model, *, r: int, alpha: float, dropout: float, targets: list[str], seed: int):
    """`model` wrapped by peft with rank-`r` adapters on `targets`; only the adapters train.

    The adapters' random start is drawn from `seed` alone (the caller's random state is left as it was),
    so a run is a function of its settings.
    """
    from peft import LoraConfig, get_peft_model

    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA targets {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameters, a tied tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_adapter(peft_model, tokenizer: PalmTokenizer, out: Path) -> Path:
    """`out` as a peft adapter directory, with the tokenizer (and its chat template) beside it."""
    with atomic_directory(out, overwrite=True) as tmp, quiet_transformers():
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save(tmp)
    return out


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Put an adapter directory's weights into a model that already has the same adapters."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(adapter_dir / ADAPTER_WEIGHTS)))


def check_adapter_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no adapter directory at {path}")
    if not (path / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{path} is not a peft adapter ({ADAPTER_CONFIG} is missing)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise CheckpointError(
            f"{path} has {'pickled adapter weights (adapter_model.bin), which palm does not load' if pickled else 'no ' + ADAPTER_WEIGHTS}"
        )
    try:
        kind = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("peft_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG} is corrupt: {e}") from None
    if kind != "LORA":
        raise CheckpointError(f"{path} holds a {kind!r} adapter; palm loads LoRA adapters")
    return path


def check_adapter(path: Path, shapes: dict[str, tuple[int, int]], layers: int) -> dict:
    """The adapter's peft config, after checking it and its weights' safetensors header against the base
    (`shapes`: each target's (out, in) features; `layers`: the base's depth), before a byte of its tensors is
    read: r, lora_alpha, target_modules, layers_to_transform, every tensor's name, dtype and shape. A crafted
    adapter (a rank of a billion, a layer that is not there, a header that claims terabytes) is one line."""
    import math

    from safetensors import SafetensorError, safe_open

    raw = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    width = min(min(shape) for shape in shapes.values())
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= width:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: r is {r!r}; a LoRA rank on this model is 1 to {width}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: lora_alpha is {alpha!r}, not a finite number")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not targets or not set(targets) <= set(shapes):
        raise CheckpointError(
            f"{path / ADAPTER_CONFIG}: target_modules is {targets!r}; palm's are a list of {', '.join(shapes)}"
        )
    chosen = raw.get("layers_to_transform")
    chosen = [chosen] if isinstance(chosen, int) and not isinstance(chosen, bool) else chosen
    if chosen is not None and not (
        isinstance(chosen, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in chosen)
    ):
        raise CheckpointError(
            f"{path / ADAPTER_CONFIG}: layers_to_transform is {raw['layers_to_transform']!r}; the base has layers 0 to {layers - 1}"
        )
    weights = path / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e})") from None
    pattern = re.compile(r".*\.layers\.(\d+)\.(\w+)\.lora_(A|B)\.weight")
    for name, (dtype, shape) in header.items():
        match = pattern.fullmatch(name)
        if match is None or match.group(2) not in targets or int(match.group(1)) >= layers:
            raise CheckpointError(
                f"{weights} holds {name}, which is no LoRA weight of this model's {', '.join(targets)}"
            )
        out, inp = shapes[match.group(2)]
        want = (r, inp) if match.group(3) == "A" else (out, r)
        if shape != want or dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(
                f"{weights}: {name} is {dtype} {list(shape)}; this model and r={r} want a float {list(want)}"
            )
    return raw


def adapter_tokenizer(adapter_dir: Path, base: PalmTokenizer, base_dir: str | Path) -> PalmTokenizer | None:
    """The tokenizer saved with an adapter (None if it has none), checked to be its base model's vocabulary.

    peft checks only the shapes the adapters touch, which any base of the same width passes; the vocabulary
    saved with the adapter is what names the model it was trained on."""
    own = PalmTokenizer.load(adapter_dir) if (adapter_dir / "tokenizer.json").is_file() else None
    if own is not None and own.hf.get_vocab() != base.hf.get_vocab():
        raise CheckpointError(
            f"adapter {adapter_dir} was trained on a model with another vocabulary ({len(own)} "
            f"pieces) than the one in {base_dir} ({len(base)})"
        )
    return own


def target_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) features of each LoRA target of a palm model with this config (every block's are alike)."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    fused = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd + 2 * f
    return {"in_proj": (fused, d), "attn_out": (d, config.num_attention_heads * hd), "mlp_out": (d, f)}


def load_merged(base_dir: str | Path, adapter_dir: str | Path, device: str | None = None, dtype: str = "auto"):
    """(base + adapter, merged into plain weights; its tokenizer): the adapter's own tokenizer when it has
    one (a chat fine-tuning saves its chat template there), else the base's."""
    from peft import PeftModel

    adapter_dir = check_adapter_dir(adapter_dir)
    model, tokenizer = load_model(base_dir, device=device, dtype=dtype)  # checks base_dir first
    check_adapter(adapter_dir, target_shapes(model.config), model.config.num_hidden_layers)
    own = adapter_tokenizer(adapter_dir, tokenizer, base_dir)
    try:
        with quiet_transformers():
            merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"adapter {adapter_dir} does not fit the model in {base_dir}: {str(e).splitlines()[0]}"
        ) from None
    return merged.eval(), own or tokenizer


def merge(base_dir: str | Path, adapter_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A plain palm directory holding base + adapter (`palm merge`), in fp32."""
    merged, tokenizer = load_merged(base_dir, adapter_dir, device="cpu", dtype="fp32")
    return save_model_dir(merged, tokenizer, out, overwrite=overwrite)
