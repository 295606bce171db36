"""palm.inference.sampling: OpenAI's frequency and presence penalties and logit bias, as its API reference defines them,
against the formula written out per row; with palm's repetition penalty and per-row settings beside them."""

from __future__ import annotations

import pytest
import torch

from palm.inference.sampling import GenerationError, SamplingConfig, sample_rows


def openai_formula(logits, seen, start, cfg):
    """mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c[j] = times j was sampled
    before (the prompt not counted), then logit_bias added."""
    out = logits.clone()
    counts = {}
    for slot, t in enumerate(seen.tolist()):
        if t >= 0 and slot >= start:
            counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        out[t] -= c * cfg.frequency_penalty + (1.0 if c > 0 else 0.0) * cfg.presence_penalty
    for t, b in cfg.logit_bias.items():
        out[t] += b
    return out


def test_penalties_and_bias_are_the_formula_per_row():
    gen = torch.Generator().manual_seed(0)
    vocab, slots = 50, 12
    logits = torch.randn(4, vocab, generator=gen) * 3
    seen = torch.randint(0, vocab, (4, slots), generator=gen)
    seen[1, :3] = -1  # left padding
    starts = [5, 3, 0, 12]  # where each row's generated tokens begin
    cfgs = [
        SamplingConfig(frequency_penalty=1.5, presence_penalty=0.5),
        SamplingConfig(frequency_penalty=-2.0, logit_bias={7: 100.0, 8: -100.0}),
        SamplingConfig(presence_penalty=2.0, logit_bias={int(seen[2, 0]): 3.0}),
        SamplingConfig(frequency_penalty=2.0),
    ]  # nothing generated yet: no penalty
    got = sample_rows(logits, seen, cfgs, [None] * 4, starts)
    want = torch.stack([openai_formula(logits[r], seen[r], starts[r], cfgs[r]) for r in range(4)]).argmax(-1)
    assert got.tolist() == want.tolist()
    assert got[1] == 7 and got[3] == logits[3].argmax()
    # sampled rows draw from the same adjusted distribution: a seeded draw equals one from the formula's softmax
    hot = [SamplingConfig(temperature=0.7, seed=3, frequency_penalty=1.0, logit_bias={2: 4.0})] * 4
    drawn = sample_rows(logits, seen, hot, [hot[0].generator(torch.device("cpu")) for _ in range(4)], starts)
    for r in range(4):
        probs = (openai_formula(logits[r], seen[r], starts[r], hot[0]) / 0.7).softmax(-1)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))[0]
        assert drawn[r] == want


def test_each_row_keeps_its_own_settings_and_bad_values_are_refused():
    logits = torch.zeros(2, 10)
    logits[:, 4] = 1.0
    seen = torch.full((2, 4), 4)
    rows = sample_rows(logits, seen, [SamplingConfig(frequency_penalty=1.0), SamplingConfig()], [None, None], [0, 0])
    assert rows.tolist()[1] == 4 and rows.tolist()[0] != 4  # 4 generated 4 times: 1 - 4 < 0 for row 0 only
    with pytest.raises(ValueError, match="first generated slot"):
        sample_rows(logits, seen, [SamplingConfig(presence_penalty=1.0)] * 2, [None, None])
    for bad in (dict(frequency_penalty=2.5), dict(presence_penalty=-3), dict(logit_bias={1: 101.0})):
        with pytest.raises(GenerationError):
            SamplingConfig(**bad).validate()
