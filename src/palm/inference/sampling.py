"""Choosing the next token: greedy, temperature, top-k, top-p, repetition penalty, OpenAI's frequency and
presence penalties and logit bias, per row.

Every row of a batch carries its own settings and its own seeded generator, so a row samples the
same tokens whichever rows share its batch (what continuous batching in `palm serve` relies on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..core.errors import GenerationInputError

# A request that cannot be served: empty or over-long prompt, bad sampling values.
GenerationError = GenerationInputError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
MAX_COUNT = 2**31 - 1  # token counts beyond any context; bigger numbers overflow tensor indices


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # OpenAI's, as its API reference defines them: logit[j] -= count[j] * frequency_penalty
    # + (count[j] > 0) * presence_penalty, count[j] = times j was generated so far; logit_bias adds to logits.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (1 <= self.max_new_tokens <= MAX_COUNT, f"max_new_tokens must be between 1 and {MAX_COUNT}"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be 0 (greedy) or positive"),
            (0 <= self.top_k <= MAX_COUNT, f"top_k must be 0 (off) or a count up to {MAX_COUNT}"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                "repetition_penalty must be a positive number",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (self.seed is None or 0 <= self.seed <= MAX_SEED, f"seed must be between 0 and {MAX_SEED}"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be between -2 and 2"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be between -2 and 2"),
            (
                all(isinstance(t, int) and t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias.items()),
                "logit_bias maps token ids to biases between -100 and 100",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded for this request (None: torch's global one, unseeded sampling)."""
        return torch.Generator(device=device).manual_seed(self.seed) if self.seed is not None else None


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Transformers' rule (CTRL paper): shrink the logits of every token in context by `penalty` [B, 1].

    `seen` [B, S] holds the context's ids, negative where a slot is empty or padding.
    """
    index = seen.clamp(min=0)
    prev = logits.gather(1, index)
    shrunk = torch.where(prev < 0, prev * penalty, prev / penalty)
    return logits.scatter(1, index, torch.where(seen >= 0, shrunk, prev))


def penalize_generated(
    logits: torch.Tensor, seen: torch.Tensor, starts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's frequency and presence penalties [B, 1] on the tokens generated so far: the ids in `seen`
    [B, S] at or after each row's first generated slot `starts` [B, 1] (the prompt is not counted)."""
    slots = torch.arange(seen.shape[1], device=seen.device)[None]
    generated = ((seen >= 0) & (slots >= starts)).to(logits.dtype)
    counts = torch.zeros_like(logits).scatter_add_(1, seen.clamp(min=0), generated)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def bias_logits(logits: torch.Tensor, cfgs: list[SamplingConfig]) -> torch.Tensor:
    """Each row's logit_bias added to its logits (ids past the vocabulary are the caller's to refuse)."""
    rows = [(r, t, b) for r, c in enumerate(cfgs) for t, b in c.logit_bias.items()]
    index = torch.tensor([[r, t] for r, t, _ in rows], device=logits.device)
    values = torch.tensor([b for *_, b in rows], dtype=logits.dtype, device=logits.device)
    return logits.index_put((index[:, 0], index[:, 1]), values, accumulate=True)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits with -inf outside each row's top-k (0: all) and smallest top-p nucleus; both [B, 1]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None]
    outside_k = rank >= torch.where(top_k > 0, top_k, logits.shape[-1])
    probs = sorted_logits.masked_fill(outside_k, float("-inf")).softmax(-1)  # top-p within the top k, as in HF
    drop = outside_k | (probs.cumsum(-1) - probs > top_p)  # keep the smallest prefix whose mass reaches top_p
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def sample_rows(
    logits: torch.Tensor,
    seen: torch.Tensor,
    cfgs: list[SamplingConfig],
    gens: list[torch.Generator | None],
    starts: list[int] | None = None,
) -> torch.Tensor:
    """The next token of each row from last-position logits [B, V], row r under cfgs[r] and gens[r];
    `starts[r]` is the slot of `seen` where row r's generated tokens begin (for OpenAI's penalties)."""
    logits = logits.float()
    col = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=logits.device)[:, None]  # noqa: E731
    if any(c.repetition_penalty != 1.0 for c in cfgs):
        logits = penalize_repeats(logits, seen, col([c.repetition_penalty for c in cfgs]))
    if any(c.frequency_penalty or c.presence_penalty for c in cfgs):
        if starts is None:
            raise ValueError("frequency and presence penalties need each row's first generated slot")
        logits = penalize_generated(
            logits,
            seen,
            col(starts, torch.long),
            col([c.frequency_penalty for c in cfgs]),
            col([c.presence_penalty for c in cfgs]),
        )
    if any(c.logit_bias for c in cfgs):
        logits = bias_logits(logits, cfgs)
    logits = logits.clamp(-3e38, 3e38)  # an extreme penalty overflows to inf; keep every logit finite
    greedy = logits.argmax(-1)
    sampled = [r for r, c in enumerate(cfgs) if c.temperature > 0]
    if not sampled:
        return greedy
    rows = logits[sampled]
    # Shifted so the best logit is 0: a tiny temperature then sends the others to -inf, never to inf - inf.
    # Temperatures below 1e-6 (which fp32 would round to 0) sample as 1e-6 does: the argmax, all but surely.
    rows = (rows - rows.max(-1, keepdim=True).values) / col([max(cfgs[r].temperature, 1e-6) for r in sampled])
    if any(cfgs[r].top_k or cfgs[r].top_p < 1.0 for r in sampled):
        rows = filter_top_k_top_p(
            rows, col([cfgs[r].top_k for r in sampled], torch.long), col([cfgs[r].top_p for r in sampled])
        )
    probs = rows.softmax(-1)
    for i, r in enumerate(sampled):
        greedy[r] = torch.multinomial(probs[i], 1, generator=gens[r])[0]
    return greedy


def saved_defaults(generation_config) -> dict:
    """The sampling settings a model was saved with (its generation_config.json) as SamplingConfig fields,
    for callers that leave them unsaid, as Transformers' `generate()` uses them; {} without one."""
    if generation_config is None:
        return {}
    gc = generation_config
    if gc.do_sample:
        out = {"temperature": gc.temperature, "top_k": gc.top_k, "top_p": gc.top_p}
    else:
        out = {"temperature": 0.0}
    out.update(repetition_penalty=gc.repetition_penalty, max_new_tokens=gc.max_new_tokens)
    return {k: v for k, v in out.items() if v is not None}
