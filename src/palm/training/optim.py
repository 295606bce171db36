"""The PaLM training recipe: its optimizer and learning-rate schedules.

Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", section 5 (Training setup):

- Optimizer: Adafactor without factorization, which the paper notes is "effectively equivalent to Adam
  with parameter scaling": the step size is scaled by the root-mean-square of the parameter, so small
  and large tensors move by the same *relative* amount.
- beta1 = 0.9, beta2 = 1 - k^-0.8 (k the step), update clipping at 1.0, "dynamic weight decay" of lr^2.
- Learning rate 10^-2 for the first 10,000 steps, then decayed as 1/sqrt(k).

The update order follows T5X's Adafactor (t5x/adafactor.py) with factored=False,
multiply_by_parameter_scale=True and momentum on: second moment, normalised update, update clipping,
parameter scaling, momentum on the *scaled* update, then weight decay from the old parameter.

For comparison, `build_optimizer("adamw", ...)` and `cosine_lr` give the usual AdamW + warmup/cosine recipe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

from ..model.config import ConfigError

OPTIMIZERS = ("palm", "adamw")


# -----------------------------------------------------------------------------
# Schedules: pure functions of the step (counted from 1), so a resumed run gets the same values.


def palm_lr(step: int, peak_lr: float = 1e-2, hold_steps: int = 10_000) -> float:
    """Constant `peak_lr` for `hold_steps` steps, then `peak_lr * sqrt(hold_steps / step)`.

    With the defaults this is the paper's 1/sqrt(max(k, 10^4)); the two pieces meet at `hold_steps`.
    """
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if hold_steps < 1:
        raise ValueError(f"hold_steps must be >= 1, got {hold_steps}")
    return peak_lr * math.sqrt(hold_steps / max(step, hold_steps))


def cosine_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to `peak_lr`, cosine decay to `min_lr_ratio * peak_lr` at `total_steps`, flat after."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step <= warmup_steps:
        # Step 1 already gets a non-zero rate: a zero first step would waste a batch.
        return peak_lr * step / warmup_steps
    min_lr = min_lr_ratio * peak_lr
    # A run with no room for decay (total <= warmup) sits at the floor rather than dividing by zero.
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def palm_beta2(step: int, decay_rate: float = 0.8) -> float:
    """The paper's beta2 = 1 - k^-0.8: 0 at step 1 (v is just g^2), approaching 1 as estimates get reliable.

    This lets the second moment be estimated well early on, when rare embedding tokens would otherwise
    see a badly biased v (the reason PaLM gives for it); it also removes the need for Adam's bias correction.
    """
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    return 1.0 - step ** (-decay_rate)


# -----------------------------------------------------------------------------
# Optimizer


def _rms(x: torch.Tensor) -> torch.Tensor:
    # For an FSDP parameter (a DTensor shard) this is the RMS of the whole tensor: DTensor reduces over
    # all shards, uneven ones included, so a sharded step equals the unsharded one (tests/test_distributed.py).
    return x.square().mean().sqrt()


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    # bf16/fp16 cannot hold v (g^2 spans far more decades) nor accumulate small updates: keep at least fp32.
    return torch.promote_types(param.dtype, torch.float32)


class PalmAdafactor(torch.optim.Optimizer):
    """Adafactor without factorization, as PaLM trained with it (T5X update order).

    Per parameter p with gradient g at step t (from 1):

        beta2 = 1 - t^-decay_rate
        v = beta2 * v + (1 - beta2) * (g^2 + eps1)
        u = g / sqrt(v);  u /= max(1, rms(u) / clip_threshold)
        s = lr * max(eps2, rms(p)) * u
        m = beta1 * m + (1 - beta1) * s;  s = m
        p <- p - s - p * lr^weight_decay_lr_exponent

    `lr` is `group["lr"]`, which the training loop sets every step from `palm_lr`.
    `beta1=None` (or 0) drops momentum and its state; `weight_decay_lr_exponent=None` drops weight decay.
    State is kept in at least fp32 and holds only tensors and a python int step, so it saves as
    safetensors + JSON.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        beta1: float | None = 0.9,
        decay_rate: float = 0.8,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float = 1.0,
        weight_decay_lr_exponent: float | None = 2.0,
        foreach: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1) or None, got {beta1}")
        if decay_rate <= 0.0:
            raise ValueError(f"decay_rate must be > 0, got {decay_rate}")
        if clip_threshold <= 0.0:
            raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")
        defaults = dict(
            lr=lr,
            beta1=beta1,
            decay_rate=decay_rate,
            eps1=eps1,
            eps2=eps2,
            clip_threshold=clip_threshold,
            weight_decay_lr_exponent=weight_decay_lr_exponent,
        )
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in live):
                raise RuntimeError("PalmAdafactor does not support sparse gradients")
            for p in live:
                self._init_state(p, use_momentum=bool(group["beta1"]))
            # The multi-tensor path runs each operation over all tensors at once (one kernel launch per
            # operation on a GPU rather than one per tensor); sharded (DTensor) parameters take the
            # per-tensor path, where DTensor reduces each RMS over the shards itself.
            plain = [p for p in live if self.foreach and not hasattr(p, "full_tensor") and p.dtype == _state_dtype(p)]
            if plain:
                self._step_foreach(group, plain)
            stepped, scratch = {id(q) for q in plain}, {}
            for p in (p for p in live if id(p) not in stepped):
                if self._blockable(p):
                    key = (p.device, _state_dtype(p))
                    if key not in scratch:  # three blocks' worth, shared by every tensor of the step
                        scratch[key] = torch.empty(3, self.block, dtype=key[1], device=key[0])
                    self._step_blocked(group, p, scratch[key])
                else:
                    self._step_one(group, p)

        return loss

    # Elements per pass of the blocked update: a block's operands (4 MB each in fp32) stay in the
    # processor's cache from one operation to the next.
    block = 1 << 20

    def _blockable(self, p: torch.Tensor) -> bool:
        """A plain tensor on a CPU, laid out as its state: the blocked update applies."""
        state = self.state[p]
        return (
            p.device.type == "cpu"
            and not hasattr(p, "full_tensor")
            and p.is_contiguous()
            and p.grad.is_contiguous()
            and all(t.is_contiguous() for t in state.values() if torch.is_tensor(t))
        )

    def _init_state(self, p: torch.Tensor, use_momentum: bool) -> None:
        state = self.state[p]
        if len(state) == 0:
            dtype = _state_dtype(p)
            state["step"] = 0
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if use_momentum:
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["step"] = int(state["step"]) + 1

    def _step_one(self, group: dict, p: torch.Tensor) -> None:
        """The update of one tensor in whole-tensor operations: sharded (DTensor) parameters, whose RMS
        DTensor reduces over the shards, and tensors on a GPU."""
        lr, beta1, wd_exp = group["lr"], group["beta1"], group["weight_decay_lr_exponent"]
        state, dtype = self.state[p], _state_dtype(p)
        g, param = p.grad.to(dtype), p.to(dtype)
        # The schedule replaces Adam's bias correction: at t=1, beta2=0 so v is exactly g^2.
        beta2 = palm_beta2(state["step"], group["decay_rate"])
        v = state["exp_avg_sq"]
        v.mul_(beta2).add_(g.square().add_(group["eps1"]), alpha=1.0 - beta2)
        u = g / v.sqrt()
        # Update clipping bounds the step when v lags a sudden gradient spike (Adafactor section 6).
        u.div_(torch.clamp(_rms(u) / group["clip_threshold"], min=1.0))
        # Parameter scaling: the step is relative to the tensor's own scale, floored at eps2 so
        # zero-initialised tensors can still move.
        s = u.mul_(lr * torch.clamp(_rms(param), min=group["eps2"]))
        if beta1:
            # T5X averages the already scaled and clipped update, not the raw gradient.
            m = state["exp_avg"]
            m.mul_(beta1).add_(s, alpha=1.0 - beta1)
            s = m
        new_param = param - s
        if wd_exp is not None:
            # Decay tied to lr^2 so it fades with the schedule; taken from the parameter before this update.
            new_param.sub_(param, alpha=lr**wd_exp)
        p.copy_(new_param)

    def _step_blocked(self, group: dict, p: torch.Tensor, scratch: torch.Tensor) -> None:
        """`_step_one` a block of elements at a time, in two sweeps over the tensor: the first updates v and
        sums the squares of u and of the parameter (the two RMS), the second recomputes u from v and moves m
        and the parameter. Every operation then reads its operands from the cache, not from memory: on a
        CPU the whole-tensor operations took 17 passes over memory per tensor (2.3 s of a 15 s step at
        `1b` with 8 layers). The same update up to rounding: the RMS are summed block by block, and the
        clip and the parameter scale are one factor, the decay one multiplication."""
        lr, beta1, wd_exp = group["lr"], group["beta1"], group["weight_decay_lr_exponent"]
        state, dtype = self.state[p], _state_dtype(p)
        beta2 = palm_beta2(state["step"], group["decay_rate"])
        n = p.numel()
        flat_p, flat_g, v = p.view(-1), p.grad.view(-1), state["exp_avg_sq"].view(-1)
        m = state["exp_avg"].view(-1) if beta1 else None
        work, param_block, grad_block = scratch

        def blocks():
            for i in range(0, n, self.block):
                j = min(i + self.block, n)
                # bf16 parameters and gradients are widened block by block into the scratch
                g = flat_g[i:j] if flat_g.dtype == dtype else grad_block[: j - i].copy_(flat_g[i:j])
                param = flat_p[i:j] if flat_p.dtype == dtype else param_block[: j - i].copy_(flat_p[i:j])
                yield i, j, g, param, work[: j - i]

        sum_u2, sum_p2 = [], []
        for i, j, g, param, t in blocks():
            # The schedule replaces Adam's bias correction: at t=1, beta2=0 so v is exactly g^2.
            v[i:j].mul_(beta2).add_(torch.mul(g, g, out=t).add_(group["eps1"]), alpha=1.0 - beta2)
            u = torch.div(g, torch.sqrt(v[i:j], out=t), out=t)
            sum_u2.append(torch.dot(u, u))
            sum_p2.append(torch.dot(param, param))
        rms_u = (torch.stack(sum_u2).sum() / n).sqrt()
        rms_p = (torch.stack(sum_p2).sum() / n).sqrt()
        # Update clipping (Adafactor section 6) and parameter scaling, floored at eps2 so zero-initialised
        # tensors can still move: one factor.
        factor = lr * torch.clamp(rms_p, min=group["eps2"]) / torch.clamp(rms_u / group["clip_threshold"], min=1.0)
        for i, j, g, param, t in blocks():
            s = torch.div(g, torch.sqrt(v[i:j], out=t), out=t).mul_(factor)
            if beta1:
                # T5X averages the already scaled and clipped update, not the raw gradient.
                s = m[i:j].mul_(beta1).add_(s, alpha=1.0 - beta1)
            if wd_exp is not None:
                # Decay tied to lr^2 so it fades with the schedule, of the parameter before this update.
                param.mul_(1.0 - lr**wd_exp)
            param.sub_(s)
            if param.data_ptr() != flat_p[i:j].data_ptr():
                flat_p[i:j].copy_(param)

    def _step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        """`_step_one` for many fp32 tensors at once; tensors at different step counts go separately."""
        by_step: dict[int, list[torch.Tensor]] = {}
        for p in params:
            by_step.setdefault(self.state[p]["step"], []).append(p)
        lr, beta1, wd_exp = group["lr"], group["beta1"], group["weight_decay_lr_exponent"]
        for t, ps in by_step.items():
            beta2 = palm_beta2(t, group["decay_rate"])
            grads, vs = [p.grad for p in ps], [self.state[p]["exp_avg_sq"] for p in ps]
            g2 = torch._foreach_mul(grads, grads)
            torch._foreach_add_(g2, group["eps1"])
            torch._foreach_mul_(vs, beta2)
            torch._foreach_add_(vs, g2, alpha=1.0 - beta2)
            u = torch._foreach_div(grads, torch._foreach_sqrt(vs))
            roots = [p.numel() ** 0.5 for p in ps]
            torch._foreach_div_(
                u,
                [torch.clamp(n / r / group["clip_threshold"], min=1.0) for n, r in zip(torch._foreach_norm(u), roots)],
            )
            torch._foreach_mul_(
                u, [lr * torch.clamp(n / r, min=group["eps2"]) for n, r in zip(torch._foreach_norm(ps), roots)]
            )
            s = list(u)
            if beta1:
                s = [self.state[p]["exp_avg"] for p in ps]
                torch._foreach_mul_(s, beta1)
                torch._foreach_add_(s, u, alpha=1.0 - beta1)
            new = torch._foreach_sub(ps, s)
            if wd_exp is not None:
                torch._foreach_add_(new, ps, alpha=-(lr**wd_exp))
            torch._foreach_copy_(ps, new)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating state to each parameter's dtype on load, which would round the fp32
        # moments of bf16 parameters; put the saved precision back.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        own_params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, own_params))
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for pid, entry in saved_state.items():
            p = by_id[pid]
            for key, value in entry.items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=_state_dtype(p), copy=True)


# -----------------------------------------------------------------------------
# Choosing a recipe


def build_optimizer(
    name: str,
    params: Iterable[tuple[str, torch.nn.Parameter]],
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.Optimizer:
    """An optimizer for `model.named_parameters()`: "palm" (PalmAdafactor) or "adamw".

    `weight_decay` and `betas` apply to AdamW only; PaLM's decay is lr^2 and its beta2 is scheduled.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose palm or adamw")

    # Tied weights (embedding / LM head) appear under two names: one tensor must be stepped once.
    seen: set[int] = set()
    unique: list[torch.nn.Parameter] = []
    for _, p in params:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        unique.append(p)

    if name == "palm":
        # One kernel per operation for all tensors pays on a GPU; on a CPU the per-tensor loop is as fast.
        return PalmAdafactor(unique, lr=lr, foreach=bool(unique) and unique[0].device.type == "cuda")

    # Decaying LayerNorm scales pulls them toward 0 rather than toward their natural value 1: only matrices decay.
    decay = [p for p in unique if p.dim() >= 2]
    no_decay = [p for p in unique if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def lr_at(
    step: int, optimizer_name: str, peak_lr: float, hold_steps: int, warmup_steps: int, total_steps: int
) -> float:
    """The learning rate for `step` under the schedule that goes with `optimizer_name`."""
    if optimizer_name == "palm":
        return palm_lr(step, peak_lr, hold_steps)
    if optimizer_name == "adamw":
        return cosine_lr(step, peak_lr, warmup_steps, total_steps)
    raise ConfigError(f"unknown optimizer {optimizer_name!r}; choose palm or adamw")
