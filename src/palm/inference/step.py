"""The forward pass that every palm decoder runs: the decoding copy of the model (palm.inference.quant) and
its step, compiled whole where asked.

`Generator` (one static batch) and `Engine` (continuous batching) both decode through a `Stepper`,
so `palm generate`, the Python API and `palm serve` run the same compiled step. Prefill runs eagerly
(its shapes vary with every prompt, and it is bound by arithmetic, not by launch overhead).
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.model import PalmForCausalLM
from .kvcache import KVCache
from .quant import decoding_model

# Compiled graphs kept per step function: one per (rows, slots) window, which are powers of two.
MAX_GRAPHS = 64


def forward_step(
    model: PalmForCausalLM, cache: KVCache, ids, positions, slots, mask, first: int = 0, every: bool = False
) -> torch.Tensor:
    """Last-position logits [B, V] (`every`: every position's, [B, T, V]) for `ids` [B, T] written into cache
    rows first.. at `slots` [B, T].

    The mask [B, 1, T, S] says which of the first S slots each query sees, and so the window attended.
    """
    cache.bind(slots, first, mask.shape[-1])
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=0 if every else 1,
    )
    return out.logits if every else out.logits[:, -1]


def compile_step(device: torch.device):
    """`forward_step` compiled whole for fixed shapes; CUDA graphs on a GPU remove the launch overhead.

    Inductor keeps a fused kernel's bf16 intermediates in fp32; rounding them as eager does keeps the
    compiled step's tokens those of the eager model (and of Transformers' generate()) in bf16 too.
    """
    options: dict[str, Any] = {
        "emulate_precision_casts": True,
        "triton.cudagraphs": device.type == "cuda",
    }  # = "reduce-overhead"
    return torch.compile(forward_step, fullgraph=True, dynamic=False, options=options)


class Stepper:
    """A model's decoding copy (weights in `quantize`'s format) and its decode step."""

    def __init__(self, model: PalmForCausalLM, quantize: str = "none", compile: bool = False, in_place: bool = False):
        self.decoder = decoding_model(model, quantize, in_place=in_place)
        self.quantize = quantize
        self.compiled = compile
        self._compiled = compile_step(model.device) if compile else None

    def prefill(self, cache: KVCache, ids, positions, slots, mask, first: int = 0, every: bool = False) -> torch.Tensor:
        return forward_step(self.decoder, cache, ids, positions, slots, mask, first, every)  # type: ignore[arg-type]

    def decode(self, cache: KVCache, ids, positions, slots, mask) -> torch.Tensor:
        """One token per row [B, 1]; rows 0..B of the cache."""
        if self._compiled is None:
            return forward_step(self.decoder, cache, ids, positions, slots, mask)  # type: ignore[arg-type]
        # One graph per window shape; the default limit of 8 would fall back to eager past the 8th.
        with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS, accumulated_recompile_limit=4 * MAX_GRAPHS):
            return self._compiled(self.decoder, cache, ids, positions, slots, mask)
