"""How a model computes in training, apart from what it computes: bf16 compute copies of its weights,
activation checkpointing, and compilation one block at a time. Each is applied to a built model by
a function taking keyword-only settings (torchtitan's `parallelize_llama` is the pattern), so the
network, the loop and these choices change independently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..model.model import PalmBlock

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")

# Selective checkpointing keeps what is expensive to recompute (matmuls and attention) and recomputes
# the rest (norms, RoPE, SwiGLU, residual adds), whose outputs are most of a block's activations but a
# sliver of its FLOPs.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_matmuls)


def apply_activation_checkpointing(model: nn.Module, *, mode: str) -> None:
    """Recompute each block's activations in the backward pass: all of them ("full"), or all but the
    matmul and attention outputs ("selective"); "none" keeps everything."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, not {mode!r}")
    if mode == "none":
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_contexts
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def compile_blocks(model: nn.Module, *, dynamic: bool | None = None) -> None:
    """Compile each block in place (regional compilation): every block has the same code, so one
    compiled graph serves all of them and compiling takes one block's time, not the model's."""
    for block in blocks(model):
        block.compile(dynamic=dynamic)


def blocks(model: nn.Module) -> list[PalmBlock]:
    """The model's transformer blocks, however it is wrapped (a peft model, DDP)."""
    return [module for module in model.modules() if isinstance(module, PalmBlock)]


class ComputeCopies:
    """bf16 copies of a model's fp32 weights that the forward and backward passes run on, refreshed once
    per optimizer step.

    Autocast instead casts every fp32 weight to bf16 at each matmul of every micro-batch, and runs the
    norms and the residual stream in fp32 with casts around them; here the whole step computes in bf16.
    The fp32 weights stay the module's parameters outside `in_use`: the optimizer steps them, checkpoints
    and exports save them, and gradients are summed into them in fp32, so a resumed run rebuilds exactly
    the same copies.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.model = model
        self.masters = dict(model.named_parameters())  # a tied tensor once, under its first name
        self.copies = {name: p.detach().to(dtype).requires_grad_(p.requires_grad) for name, p in self.masters.items()}
        # Every place a weight sits (a tied one sits in two modules), so that a swap reaches them all.
        by_id = {id(p): name for name, p in self.masters.items()}
        self._slots = [
            (module, key, by_id[id(p)])
            for module in model.modules()
            for key, p in module._parameters.items()
            if p is not None and id(p) in by_id
        ]
        # fp32 gradient buffers kept from step to step: a fresh fp32 gradient per step is a fresh
        # allocation of the model's size, paid in page faults on a CPU (the optimizer's zero_grad
        # drops `.grad`, not these).
        self._grad_buffers: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def in_use(self) -> Iterator[nn.Module]:
        """The model with the copies in its weights' places for the body: run the forward *and* the
        backward inside, since activation checkpointing recomputes blocks in the backward from whatever
        weights the modules hold then (a forward-only swap such as `torch.func.functional_call` would
        recompute from the fp32 weights). The fp32 weights are back in place on leaving, error or not."""
        for module, key, name in self._slots:
            module._parameters[key] = self.copies[name]  # type: ignore[assignment]  # a plain tensor, on purpose
        try:
            yield self.model
        finally:
            for module, key, name in self._slots:
                module._parameters[key] = self.masters[name]

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add the copies' gradients (one micro-batch's) to the fp32 weights' gradients, and clear them."""
        for name, copy in self.copies.items():
            if copy.grad is None:
                continue
            master = self.masters[name]
            if master.grad is None:
                buffer = self._grad_buffers.get(name)
                if buffer is None:
                    buffer = self._grad_buffers[name] = torch.empty_like(master)
                master.grad = buffer.copy_(copy.grad)
            else:
                master.grad.add_(copy.grad)
            copy.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the fp32 weights into the bf16 copies: after every optimizer step, and after a restore."""
        torch._foreach_copy_(list(self.copies.values()), [self.masters[name] for name in self.copies])
