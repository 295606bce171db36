import torch
from conftest import lively_model, tiny_config

from palm.core.heldout import summed_nll


def test_summed_nll_is_the_sum_over_scored_targets(tokenizer):
    model = lively_model(tiny_config(tokenizer))
    ids = torch.tensor([tokenizer.encode("held-out text, scored once 42")])
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :3] = -100  # not scored
    with torch.no_grad():
        logp = model(input_ids=x).logits.log_softmax(-1)[0]
    by_hand = -sum(float(logp[t, y[0, t]]) for t in range(3, y.shape[1]))
    nats, count = summed_nll(model.train(), [(x, y)], device=torch.device("cpu"), dtype=torch.float32)
    assert count == y.shape[1] - 3
    assert abs(nats - by_hand) < 1e-4 * abs(by_hand)
    assert model.training  # the caller's mode is put back
