"""The language-model loss: cross-entropy plus PaLM's z-loss, from logits or straight from hidden states.

This file is copied next to every saved checkpoint with the model (Transformers' `auto_map`
follows relative imports), so it imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, mean log(Z)^2) over targets != -100, in fp32; targets are already aligned with logits.

    One log-softmax serves both terms (log Z = logit[target] - logp[target]), as T5X shares one
    logsumexp; log_softmax's fused kernel is several times faster on CPU than logsumexp's backward.
    """
    logits = logits.float().flatten(0, -2)
    targets = targets.flatten()
    valid = targets != IGNORE_INDEX
    index = targets.clamp(min=0)[:, None]
    logp_t = F.log_softmax(logits, dim=-1).gather(-1, index).squeeze(-1)
    log_z = logits.gather(-1, index).squeeze(-1) - logp_t
    n = valid.sum().clamp(min=1) if num_items is None else num_items
    ce = -(logp_t * valid).sum() / n
    z = (log_z.square() * valid).sum() / n
    return ce, z


class _FusedHeadLoss(torch.autograd.Function):
    """ce + z_coef * z straight from hidden states and the head weight, a few rows of logits at a time.

    The gradient is taken chunk by chunk in the forward pass (the loss is the end of the graph), so
    the [tokens, vocab] logits, their softmax and their gradient are never whole in memory; backward
    only scales the stored gradients. Same maths as `lm_loss`, same matmul FLOPs.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, z_coef: float, n, chunk: int):
        ce_sum = h.new_zeros((), dtype=torch.float32)
        z_sum = h.new_zeros((), dtype=torch.float32)
        need_grad = any(ctx.needs_input_grad[:2])
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for i in range(0, h.shape[0], chunk):
            hc, t = h[i : i + chunk], targets[i : i + chunk]
            valid = (t != IGNORE_INDEX).float()
            index = t.clamp(min=0)[:, None]
            logits = (hc @ weight.t()).float()  # bf16 matmul under autocast, maths in fp32
            p = F.log_softmax(logits, dim=-1)
            logp_t = p.gather(-1, index).squeeze(-1)
            log_z = logits.gather(-1, index).squeeze(-1) - logp_t
            ce_sum -= (logp_t * valid).sum()
            z_sum += (log_z.square() * valid).sum()
            if not need_grad:
                continue
            # d/dlogits of (ce + c z) / n = (softmax * (1 + 2 c log Z) - onehot(target)) * valid / n
            p.exp_().mul_(((1 + 2 * z_coef * log_z) * valid / n)[:, None])
            p.scatter_add_(-1, index, -(valid / n)[:, None])
            g = p.to(hc.dtype)
            grad_h[i : i + chunk] = g @ weight
            grad_w += g.t() @ hc
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ce, z = ce_sum / n, z_sum / n
        ctx.mark_non_differentiable(ce, z)
        return ce + z_coef * z, ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None


def fused_lm_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    z_coef: float,
    num_items: int | torch.Tensor | None = None,
    chunk_tokens: int = 2**23,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce + z_coef * z, ce, z) of `lm_loss(h @ weight.T, targets)` without materialising the logits.

    `chunk_tokens` bounds the logits held at once (rows x vocab elements, 32 MB in fp32 by default, and
    never under 256 rows): small enough to reuse memory, large enough for efficient matmuls.
    """
    h = h.flatten(0, -2)
    targets = targets.flatten()
    n = (targets != IGNORE_INDEX).sum().clamp(min=1) if num_items is None else num_items
    chunk = max(256, chunk_tokens // weight.shape[0])
    return _FusedHeadLoss.apply(h, weight, targets, float(z_coef), n, chunk)
