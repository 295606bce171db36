"""Several LoRA adapters on one decoding model, chosen per row: rows of different adapters decode in one
batch (`palm serve --adapter NAME=DIR ...`), as S-LoRA and vLLM's multi-LoRA serve them.

Every adapted matmul keeps its base weight once and adds, for each row, that row's low-rank update:
`y = base(x) + scale[a] * (x @ A[a].T) @ B[a].T`, with a = the row's adapter (0: the base model, whose
A and B are zero). The adapters' A and B are stacked and zero-padded to the largest rank, so the step
has one shape whatever the mix of adapters in a batch, and compiles once. Which adapter each row uses
is written into `AdapterRows.rows` before every step (by palm.inference.engine): a buffer the modules read, so a
compiled step sees new choices without recompiling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.errors import CheckpointError
from ..text.tokenizer import PalmTokenizer
from ..weights.lora import ADAPTER_WEIGHTS, TARGETS, adapter_tokenizer, check_adapter, check_adapter_dir, target_shapes


class AdapterRows(nn.Module):
    """Which adapter each row of the next step uses (0 for the base model): rows [0, B) of the batch."""

    def __init__(self, max_rows: int, names: list[str]):
        super().__init__()
        self.names = names  # index i + 1 is names[i]
        self.register_buffer("rows", torch.zeros(max_rows, dtype=torch.long), persistent=False)

    def index(self, name: str) -> int:
        return self.names.index(name) + 1


class LoraLinear(nn.Module):
    """A decoding matmul plus each row's own low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, rows: AdapterRows):
        super().__init__()
        self.base = base
        self.register_buffer("a", a, persistent=False)  # [adapters + 1, rank, in]
        self.register_buffer("b", b, persistent=False)  # [adapters + 1, out, rank]
        self.register_buffer("scale", scale, persistent=False)  # [adapters + 1]
        self.selected = [rows]  # in a list: the selector is shared, not a submodule of every matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        which = self.selected[0].rows[: x.shape[0]]
        low = torch.einsum("bti,bri->btr", x, self.a[which])
        update = torch.einsum("btr,bor->bto", low, self.b[which]) * self.scale[which][:, None, None]
        return self.base(x) + update.to(x.dtype)


def _read(name: str, path: Path, tokenizer: PalmTokenizer, config) -> tuple[dict, dict[str, torch.Tensor]]:
    """(peft config, weights) of one adapter directory, checked against the base model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_adapter_dir(path)
    try:  # before a byte of its tensors is read
        raw = check_adapter(path, target_shapes(config), config.num_hidden_layers)
    except CheckpointError as e:
        raise CheckpointError(f"adapter {name}: {e}") from None
    for field, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if raw.get(field) == bad:
            raise CheckpointError(
                f"adapter {name} ({path}) sets {field}, which palm's multi-adapter serving does not run"
            )
    adapter_tokenizer(path, tokenizer, "the served model")
    try:
        weights = load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"adapter {name}: {path / ADAPTER_WEIGHTS} is not readable ({e})") from None
    return raw, weights


def _scale(raw: dict) -> float:
    r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"adapter config has r={r!r}, lora_alpha={alpha!r}: not a LoRA adapter palm can run")
    return alpha / math.sqrt(r) if raw.get("use_rslora") else alpha / r


def attach(
    decoder: nn.Module, adapters: Mapping[str, str | Path], tokenizer: PalmTokenizer, max_rows: int = 256
) -> AdapterRows:
    """Put every adapter in `adapters` (name -> peft directory) on `decoder`'s matmuls; returns the selector."""
    config = decoder.config
    found = {name: _read(name, Path(path), tokenizer, config) for name, path in adapters.items()}
    selector = AdapterRows(max_rows, list(adapters))
    dtype, device = next(decoder.parameters()).dtype, next(decoder.parameters()).device
    rank = max(raw["r"] for raw, _ in found.values())
    scales = torch.tensor([0.0] + [_scale(raw) for raw, _ in found.values()], dtype=torch.float32, device=device)
    used: dict[str, set[str]] = {name: set() for name in adapters}
    for i, block in enumerate(decoder.model.layers):  # type: ignore[arg-type]
        for target in TARGETS:
            base = getattr(block, target)
            out_features, in_features = _shape(config, target)
            a = torch.zeros(len(adapters) + 1, rank, in_features, dtype=dtype, device=device)
            b = torch.zeros(len(adapters) + 1, out_features, rank, dtype=dtype, device=device)
            for k, (name, (raw, weights)) in enumerate(found.items(), 1):
                key = f"base_model.model.model.layers.{i}.{target}.lora_"
                if key + "A.weight" not in weights:
                    continue
                la, lb = weights[key + "A.weight"], weights[key + "B.weight"]
                if la.shape != (raw["r"], in_features) or lb.shape != (out_features, raw["r"]):
                    raise CheckpointError(
                        f"adapter {name}: layer {i}'s {target} is {tuple(la.shape)} x "
                        f"{tuple(lb.shape)}, not rank {raw['r']} over {in_features} -> {out_features}"
                    )
                a[k, : raw["r"]], b[k, :, : raw["r"]] = la, lb
                used[name] |= {key + "A.weight", key + "B.weight"}
            setattr(block, target, LoraLinear(base, a, b, scales.to(dtype), selector))
    for name, (_, weights) in found.items():
        extra = sorted(set(weights) - used[name])
        if extra:
            raise CheckpointError(f"adapter {name} holds {extra[0]}, which this model has no place for")
    return selector


def _shape(config, target: str) -> tuple[int, int]:
    """(out, in) of a block's matmul."""
    d, f, heads, kv, dh = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    return {"in_proj": ((heads + 2 * kv) * dh + 2 * f, d), "attn_out": (d, heads * dh), "mlp_out": (d, f)}[target]
