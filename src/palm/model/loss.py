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
    targets = targets.flatten()
    n = (targets != IGNORE_INDEX).sum().clamp(min=1) if num_items is None else num_items
    ce_rows, z_rows = _loss_rows(logits.flatten(0, -2), targets, 0.0, n, None)
    return -ce_rows.sum() / n, z_rows.sum() / n


def _loss_rows(logits, targets, z_coef: float, n, grad_out):
    """(logp[target], log(Z)^2) per row of a block of logits, 0 where the target is ignored, and, when
    `grad_out` is given, the rows' gradient of (ce + z_coef z) / n written into it in its dtype.

    Rows are independent, so the caller hands over blocks small enough (about a megabyte in fp32) that
    the fp32 logits, their log-softmax and the gradient stay in the processor's cache between passes.
    """
    logits = logits.float()  # bf16 matmul output under compute copies or autocast; the maths in fp32
    valid = (targets != IGNORE_INDEX).float()
    index = targets.clamp(min=0)[:, None]
    p = F.log_softmax(logits, dim=-1)
    logp_t = p.gather(-1, index).squeeze(-1)
    log_z = logits.gather(-1, index).squeeze(-1) - logp_t
    if grad_out is not None:
        # d/dlogits of (ce + c z) / n = (softmax * (1 + 2 c log Z) - onehot(target)) * valid / n
        p.exp_().mul_(((1 + 2 * z_coef * log_z) * valid / n)[:, None])
        p.scatter_add_(-1, index, -(valid / n)[:, None])
        grad_out.copy_(p)
    return logp_t * valid, log_z.square() * valid


class _FusedHeadLoss(torch.autograd.Function):
    """ce + z_coef * z straight from hidden states and the head weight, a few rows of logits at a time.

    The gradient is taken chunk by chunk in the forward pass (the loss is the end of the graph), so
    the [tokens, vocab] logits, their softmax and their gradient are never whole in memory; backward
    only scales the stored gradients. Same maths as `lm_loss`, same matmul FLOPs. The matmuls take
    `chunk` rows at a time; the elementwise work on their logits takes `rows` rows at a time.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, z_coef: float, n, chunk: int, rows: int):
        ce_sum = h.new_zeros((), dtype=torch.float32)
        z_sum = h.new_zeros((), dtype=torch.float32)
        need_grad = any(ctx.needs_input_grad[:2])
        grad_h = torch.empty_like(h) if need_grad else None
        several = h.shape[0] > chunk
        # The head's gradient over several chunks: where the logits' gradient for every token takes less
        # memory than an fp32 sum of the head's size (tokens x bytes per logit <= d_model x 4: 1,024 tokens
        # at `base` and `1b`), it is kept whole and the head's gradient is one matmul at the end, as
        # unchunked; else each chunk's product is summed in fp32. At `1b` the sum cost a 262 MB fp32
        # buffer faulted in and two mixed-dtype adds a step, about 1.5 s of a 17 s step.
        grad_w = whole = None
        if need_grad and several:
            autocast = torch.is_autocast_enabled(h.device.type)
            logit_dtype = (
                torch.get_autocast_dtype(h.device.type) if autocast else torch.promote_types(h.dtype, weight.dtype)
            )
            if h.shape[0] * logit_dtype.itemsize <= weight.shape[1] * 4:
                whole = h.new_empty((h.shape[0], weight.shape[0]), dtype=logit_dtype)
            else:
                grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            hc, t = h[i : i + chunk], targets[i : i + chunk]
            logits = hc @ weight.t()
            g = (whole[i : i + chunk] if whole is not None else torch.empty_like(logits)) if need_grad else None
            ce_rows = logits.new_empty(len(t), dtype=torch.float32)
            z_rows = torch.empty_like(ce_rows)
            for j in range(0, len(t), rows):
                ce_rows[j : j + rows], z_rows[j : j + rows] = _loss_rows(
                    logits[j : j + rows], t[j : j + rows], z_coef, n, None if g is None else g[j : j + rows]
                )
            ce_sum -= ce_rows.sum()
            z_sum += z_rows.sum()
            if need_grad:
                grad_h[i : i + chunk] = g @ weight
                if whole is None and several:
                    grad_w += g.t() @ hc
                elif whole is None:
                    grad_w = g.t() @ hc
        if whole is not None:
            grad_w = whole.t() @ h
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ce, z = ce_sum / n, z_sum / n
        ctx.mark_non_differentiable(ce, z)
        return ce + z_coef * z, ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None, None


def fused_lm_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    z_coef: float,
    num_items: int | torch.Tensor | None = None,
    chunk_bytes: int = 2**25,
    row_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce + z_coef * z, ce, z) of `lm_loss(h @ weight.T, targets)` without materialising the logits.

    `chunk_bytes` bounds the logits held at once (32 MB by default: 8M of them in fp32, 16M in bf16,
    and never under 256 rows): small enough to reuse memory, large enough for efficient matmuls.
    `row_elements` bounds the logits of one pass of the elementwise work. On a CPU it defaults to 2**18
    (1 MB in fp32, at least one row), so that they stay in cache from one pass to the next (2-core Xeon
    with AMX, bf16, 1,024 tokens over 16,384 words: forward and backward 129 -> 76 ms, with one 32 MB
    chunk of bf16 logits where there were two of fp32); on a GPU to the whole chunk, where each pass
    is one kernel launch and launches are what costs.
    """
    h = h.flatten(0, -2)
    targets = targets.flatten()
    n = (targets != IGNORE_INDEX).sum().clamp(min=1) if num_items is None else num_items
    low_precision = h.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(h.device.type)
    chunk = max(256, chunk_bytes // ((2 if low_precision else 4) * weight.shape[0]))
    if row_elements is None:
        row_elements = 2**18 if h.device.type == "cpu" else chunk * weight.shape[0]
    rows = max(1, row_elements // weight.shape[0])
    return _FusedHeadLoss.apply(h, weight, targets, float(z_coef), n, chunk, rows)
