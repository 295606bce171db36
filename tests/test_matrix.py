"""Every training option with every other: each combination that `palm train` and `palm finetune` accept of
dtype, activation checkpointing, compilation, micro-batches, optimizer, LoRA and parallel layout trains 2 steps
at a tiny size and gives the plain run's losses, gradient norms and weight updates (the plain run: the same
dtype, optimizer and LoRA, none of the rest), within that dtype's rounding.

`make test` runs a pairwise-covering subset (every value of every option meets every value of every other
at least once); `make test-matrix` runs every combination (the cases marked `matrix`).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import ROWS, write_rows

from palm.training.finetune import FinetuneConfig, finetune
from palm.training.train import TrainConfig, train

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16)
BATCH = 4
STEPS = 2

TRAIN = {
    "dtype": ("fp32", "bf16"),
    "activation_checkpointing": ("none", "full", "selective"),
    "compile": (False, True),
    "micro": (1, 2),
    "optimizer": ("palm", "adamw"),
}
FINETUNE = {**TRAIN, "lora": (0, 4)}
PARALLEL = {**TRAIN, "parallel": ("ddp", "fsdp")}
PLAIN = {"activation_checkpointing": "none", "compile": False, "micro": 1}  # what a case is compared with

# (rtol of the losses and of the gradient norms, relative error of the gradients, of the weight updates).
# fp32: summation order alone (micro-batches, two ranks, fused kernels). bf16: a bf16 number carries 3
# significant digits, and a case may round elsewhere than its plain run (compiled kernels, micro-batch sums,
# autocast on two ranks against compute copies on one), the most at the embedding, whose gradient comes back
# through every block. Both optimizers' first step is about lr * sign(gradient), so an entry whose gradient
# is near zero may step the other way: that, not the gradients, is most of bf16's update error.
TOLERANCE = {"fp32": (1e-5, 1e-4, 1e-4, 1e-3), "bf16": (1e-2, 5e-2, 8e-2, 3e-1)}


def covering(factors: dict[str, tuple], crossed: tuple[str, ...] = ()) -> list[dict]:
    """A small set of combinations in which every pair of values of every two factors occurs, and every
    combination of the `crossed` factors (greedy, so the same set every time)."""
    names = list(factors)
    groups = [pair for pair in itertools.combinations(names, 2)] + ([crossed] if crossed else [])

    def covers(case: dict) -> set:
        return {tuple((n, case[n]) for n in group) for group in groups}

    every = [dict(zip(names, values)) for values in itertools.product(*factors.values())]
    todo = set().union(*(covers(c) for c in every))
    chosen = []
    while todo:
        best = max(every, key=lambda c: len(covers(c) & todo))
        chosen.append(best)
        todo -= covers(best)
    return chosen


def case_id(case: dict) -> str:
    parts = [
        case["dtype"],
        f"ac-{case['activation_checkpointing']}",
        "compile" if case["compile"] else "eager",
        f"micro{case['micro']}",
        case["optimizer"],
    ]
    if "lora" in case:
        parts.append(f"lora{case['lora']}" if case["lora"] else "full-weights")
    if "parallel" in case:
        parts.append(case["parallel"])
    return "-".join(parts)


def params(factors: dict[str, tuple], every: list[dict] | None = None) -> list:
    """Each combination in `every` (all of them by default): the pairwise subset as they are, the rest
    marked `matrix`."""
    subset = covering(factors)
    every = every or [dict(zip(factors, v)) for v in itertools.product(*factors.values())]
    every = every + [c for c in subset if c not in every]
    return [pytest.param(c, id=case_id(c), marks=() if c in subset else pytest.mark.matrix) for c in every]


def is_plain(case: dict) -> bool:
    return all(case[k] == v for k, v in PLAIN.items()) and "parallel" not in case


def loop_settings(case: dict) -> dict:
    return dict(
        dtype=case["dtype"],
        activation_checkpointing=case["activation_checkpointing"],
        compile=case["compile"],
        micro_batch_size=BATCH // case["micro"],
        optimizer=case["optimizer"],
        batch_size=BATCH,
        max_steps=STEPS,
        batch_ramp=False,
        checkpoint_every=1,
        eval_every=1000,
        progress=False,
        threads=1,
    )


def weights(path) -> dict[str, torch.Tensor]:
    # The tied embedding is saved under either of its names (checkpoints keep the head's, model folders the embedding's).
    return {("lm_head.weight" if k == "model.embed_tokens.weight" else k): v for k, v in load_file(str(path)).items()}


def outcome(run_dir) -> dict:
    """What a run did: its losses and gradient norms by step, its weights at step 0 and at the end (from the
    checkpoints, which hold the LoRA adapters as they train, else, sharded, from the final model)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "event" not in r and "loss" in r]
    checkpoints = {
        step: run_dir / "checkpoints" / f"step-{step:07d}" / "model.safetensors" for step in range(STEPS + 1)
    }
    start, first = (weights(checkpoints[k]) if checkpoints[k].is_file() else None for k in (0, 1))
    final = weights(checkpoints[STEPS] if checkpoints[STEPS].is_file() else run_dir / "final" / "model.safetensors")
    return {
        "loss": [r["loss"] for r in rows],
        "grad_norm": [r["grad_norm"] for r in rows],
        "start": start,
        "first": first,
        "final": final,
    }


def assert_matches(case: dict, got: dict, plain: dict) -> None:
    loss_tol, norm_tol, grad_tol, update_tol = TOLERANCE[case["dtype"]]
    assert len(got["loss"]) == len(plain["loss"]) == STEPS
    for a, b in zip(got["loss"], plain["loss"]):
        assert abs(a - b) <= loss_tol * abs(b), ("loss", got["loss"], plain["loss"])
    for a, b in zip(got["grad_norm"], plain["grad_norm"]):
        assert abs(a - b) <= norm_tol * abs(b), ("grad_norm", got["grad_norm"], plain["grad_norm"])
    for name, want in plain.get("grads", {}).items() if "grads" in got else ():
        if want.norm() == 0:  # LoRA's A at the first step: B starts at zero
            assert torch.equal(got["grads"][name], want), ("gradient", name)
            continue
        error = float((got["grads"][name] - want).norm() / want.norm())
        assert error <= grad_tol, ("gradient", name, error)
    # Each update against the plain run's (the weights themselves would hide a wrong step in their size): in
    # fp32 both steps'. In bf16 the first step's, where one exists (one process): after it, what a sign that
    # flipped at step 1 does to step 2 grows with the gradients it touches (LoRA's A moves first at step 2,
    # driven by B's first signs).
    start, end = plain["start"], "final"
    if case["dtype"] == "bf16" and got["first"] is not None:
        end = "first"
    assert got[end].keys() == plain[end].keys() == start.keys()
    for name, final in plain[end].items():
        if case["dtype"] == "bf16" and final.dim() < 2:
            continue  # a norm's 32 scales: one that steps the other way is a tenth of the update's norm
        want, have = final.float() - start[name].float(), got[end][name].float() - start[name].float()
        if want.norm() == 0:
            assert torch.equal(have, want), name
            continue
        error = float((have - want).norm() / want.norm())
        assert error <= update_tol, (name, error)


@pytest.fixture(scope="module")
def plain_runs():
    return {}


def _train_settings(corpus_dir, tokenizer_dir, out, cache, case: dict) -> dict:
    return dict(
        corpus=[str(corpus_dir)],
        out=str(out),
        tokenizer=tokenizer_dir,
        model=SHAPE,
        seq_len=16,
        eval_tokens=64,
        cache_dir=str(cache),
        **loop_settings(case),
    )


class FirstGradients:
    """An on_step hook that keeps step 1's fp32 gradients (the loop drops them at the next step)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def __call__(self, run, record) -> None:
        if record["step"] == 1:
            self.grads = {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None}


def run_train(corpus_dir, tokenizer_dir, folder, case: dict):
    torch._dynamo.reset()  # a case compiles its own graphs: no recompile limit reached over the cases before
    out, first = folder / case_id(case), FirstGradients()
    train(
        TrainConfig.from_settings(_train_settings(corpus_dir, tokenizer_dir, out, folder / "cache", case)),
        on_step=first,
    )
    assert first.grads and all(g.dtype == torch.float32 for g in first.grads.values())
    return {**outcome(out), "grads": first.grads}


def plain_train(plain_runs, corpus_dir, tokenizer_dir, folder, case: dict) -> dict:
    key = ("train", case["dtype"], case["optimizer"])
    if key not in plain_runs:
        plain_runs[key] = run_train(corpus_dir, tokenizer_dir, folder, {**case, **PLAIN})
    return plain_runs[key]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


@pytest.mark.parametrize("case", params(TRAIN))
def test_train(case, plain_runs, corpus_dir, tokenizer_dir, folder):
    plain = plain_train(plain_runs, corpus_dir, tokenizer_dir, folder, case)
    if is_plain(case):
        assert all(v == v for v in plain["loss"]) and plain["final"]
        return
    assert_matches(case, run_train(corpus_dir, tokenizer_dir, folder, case), plain)


def run_finetune(data, base, folder, case: dict) -> dict:
    torch._dynamo.reset()
    out = folder / f"ft-{case_id(case)}"
    loop = loop_settings(case)
    cfg = FinetuneConfig.from_settings(
        dict(
            base_model=base,
            data=str(data),
            out=str(out),
            seq_len=32,
            dropout=0.0,
            patience=None,
            lora_r=case["lora"],
            lora_dropout=0.0,
            **loop,
        )
    )
    first = FirstGradients()
    finetune(cfg, on_step=first)
    assert first.grads and all(g.dtype == torch.float32 for g in first.grads.values())
    return {**outcome(out), "grads": first.grads}


@pytest.fixture(scope="module")
def finetune_data(folder):
    return write_rows(folder / "rows.jsonl", ROWS * 4)


@pytest.mark.parametrize("case", params(FINETUNE))
def test_finetune(case, plain_runs, finetune_data, model_dir, folder):
    key = ("finetune", case["dtype"], case["optimizer"], case["lora"])
    if key not in plain_runs:
        plain_runs[key] = run_finetune(finetune_data, model_dir, folder, {**case, **PLAIN})
    if is_plain(case):
        return
    assert_matches(case, run_finetune(finetune_data, model_dir, folder, case), plain_runs[key])


def torchrun_train(settings: dict, parallel: str) -> None:
    conf = settings["out"] + ".yaml"
    with open(conf, "w") as f:
        json.dump(settings, f)  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "palm.cli",
        "train",
        "--config",
        conf,
        "--parallel",
        parallel,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


# Two processes each: in full, layout x dtype x checkpointing crossed and the rest in pairs with them.
@pytest.mark.parametrize(
    "case", params(PARALLEL, every=covering(PARALLEL, ("parallel", "dtype", "activation_checkpointing")))
)
def test_parallel(case, plain_runs, corpus_dir, tokenizer_dir, folder):
    plain = plain_train(plain_runs, corpus_dir, tokenizer_dir, folder, case)
    out = folder / case_id(case)
    torchrun_train(_train_settings(corpus_dir, tokenizer_dir, out, folder / "cache", case), case["parallel"])
    got = outcome(out)
    assert_matches(case, got, plain)
