"""The shared training loop's own pieces: its settings, the batch ramp and schedule, and a Run's state."""

import pytest
import torch

from palm.core.rundir import RunLayout
from palm.training.loop import LoopConfig, Run, TrainingError


def test_the_batch_ramp_of_palm_540b():
    loop = LoopConfig(batch_size=16, max_steps=100)
    assert [loop.batch_at(s) for s in (1, 20, 21, 45, 46, 100)] == [4, 4, 8, 8, 16, 16]
    assert LoopConfig(batch_size=16, batch_ramp=False).batch_at(1) == 16


def test_the_schedule_holds_then_decays():
    loop = LoopConfig(max_steps=100, hold_steps=10)
    assert loop.lr_at(1) == loop.lr_at(10) == 1e-2
    assert loop.lr_at(40) == pytest.approx(1e-2 * (10 / 40) ** 0.5)


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_steps=0),
        dict(eval_every=0),
        dict(hold_steps=0),
        dict(lr=float("nan")),
        dict(seed=2**64),
        dict(dtype="fp16"),
        dict(parallel="tp"),
        dict(threads=0),
    ],
)
def test_bad_loop_settings(bad):
    with pytest.raises(TrainingError):
        LoopConfig(**bad).validate()


def test_a_run_saves_and_restores_its_own_state(tmp_path):
    model = torch.nn.Linear(2, 2)
    run = Run(
        LoopConfig(),
        RunLayout(tmp_path),
        model,
        torch.optim.SGD(model.parameters(), 0.1),
        torch.device("cpu"),
        torch.float32,
        batches=None,
        evaluate=None,
    )
    run.step, run.skipped, run.recent, run.rewinds, run.tokens = 7, 20, [1.5, 1.25], 1, 896
    run.extra, run.stop = {"best_val_loss": 0.5}, True
    state = run.state_dict()
    other = Run(run.loop, run.layout, model, run.optimizer, run.device, run.dtype, None, None)
    other.load_state_dict(state)
    assert other.state_dict() == state
    state["recent"].append(9.0)
    assert other.recent == [1.5, 1.25]  # a copy, not shared
