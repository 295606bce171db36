"""Held-out loss, the one way palm measures it: pretraining's validation, fine-tuning's early
stopping, `palm eval --corpus` and the quality benchmark all call `summed_nll`.

Batches are (inputs, targets) pairs of [B, T] ids, targets already aligned with the positions and
-100 where a position is not scored (padding, prompts, context a sliding window has scored before).
Any causal LM whose output has `.logits` can be scored (the quality benchmark scores its peers too).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..model.loss import IGNORE_INDEX, lm_loss
from .runtime import autocast


@torch.no_grad()
def summed_nll(
    model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device, dtype: torch.dtype
) -> tuple[float, int]:
    """(negative log-likelihood summed over the scored targets, in nats; how many were scored)."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    try:
        for inputs, targets in batches:
            scored = int((targets != IGNORE_INDEX).sum())
            if not scored:
                continue
            with autocast(device, dtype):
                logits = model(input_ids=inputs.to(device), use_cache=False).logits
            nats += float(lm_loss(logits, targets.to(device), num_items=1)[0])  # a sum: divided by 1
            count += scored
    finally:
        model.train(was_training)
    return nats, count
