"""Choosing a fine-tuning checkpoint by what the task is judged on: greedy generations on a held-out set,
scored with the metrics the field reports (palm.evaluate.metrics), rather than by validation loss.

The held-out file is read like the training data (palm.data.taskdata, the run's schema). Generation runs on the
training model itself (a peft model too) through Transformers' `generate`, greedily, so it draws no random
numbers and a resumed run stays bitwise the run that was never stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.errors import PalmError
from ..data.taskdata import TaskRow
from ..evaluate.metrics import ALIASES, GENERATION_METRICS
from ..text.tokenizer import PalmTokenizer

# What each task reports, and the default metric to select on (PaLM's and the field's headline figures).
REPORTED = {
    "summarize": ("rouge1", "rouge2", "rouge_l", "rouge_lsum"),
    "qa": ("exact_match", "f1"),
    "translate": ("bleu", "chrf++"),
}
DEFAULT_SELECT = {"summarize": "rouge2", "qa": "f1", "translate": "bleu"}


class SelectionError(PalmError):
    """A metric to select on that palm does not compute."""


def metric_name(name: str) -> str:
    """A `--select` value as a metric's name (`exact` -> exact_match, `chrf` stays chrF)."""
    name = ALIASES.get(name, name)
    if name not in GENERATION_METRICS:
        raise SelectionError(
            f"--select {name!r} is no metric palm computes; choose one of {', '.join([*GENERATION_METRICS, *ALIASES])}"
        )
    return name


def reported(task: str, select: str) -> list[str]:
    return list(dict.fromkeys([*REPORTED[task], select]))


@torch.no_grad()
def generations(
    model, tokenizer: PalmTokenizer, rows: Sequence[TaskRow], *, max_new_tokens: int, context: int, batch_size: int = 8
) -> list[str]:
    """The model's greedy completion of each row's prompt (cut like training rows to leave room to generate)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            prompts = [_prompt_ids(tokenizer, r, context - max_new_tokens) for r in rows[start : start + batch_size]]
            width = max(map(len, prompts))
            ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            made = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                repetition_penalty=1.0,
                pad_token_id=tokenizer.pad_id,
                eos_token_id=[tokenizer.eos_id, tokenizer.eod_id],
            )
            out += [tokenizer.decode(row[width:].tolist()).strip() for row in made]
    finally:
        model.train(was_training)
    return out


def _prompt_ids(tokenizer: PalmTokenizer, row: TaskRow, room: int) -> list[int]:
    fitted = row.fitted(tokenizer, room, bos=True)  # the document's head kept, as training cuts it
    return fitted[0] if fitted is not None else tokenizer.encode(row.prompt(0))[-room:]


def task_scores(predictions: Sequence[str], rows: Sequence[TaskRow], names: Sequence[str]) -> dict[str, float]:
    references = [r.references for r in rows]
    return {name: GENERATION_METRICS[name](list(predictions), references) for name in names}
