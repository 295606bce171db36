"""`palm plan`: the paper's own numbers (Table 1, Table 21, Table 3, Appendix B) come back out."""

import json
import math

import pytest
from conftest import assert_one_line_error
from conftest import run_cli as palm

from palm.model.config import ConfigError
from palm.training.plan import format_sci, format_tflops, make_plan, render

PAPER = dict(seq_len=2048, tokens=780e9)
PAPER_540B_RUN = dict(device="tpu-v4", devices=6144, dp=2, fsdp=256, tp=12, tokens_per_s=238.3e3)


@pytest.mark.parametrize(
    "preset, billions, tflops, train_flops",
    [
        ("palm-8b", "8.63", "0.0550", "4.29e22"),
        ("palm-62b", "62.50", "0.388", None),
        ("palm-540b", "540.35", "3.28", "2.56e24"),
    ],
)
def test_table1_and_table21_numbers(capsys, preset, billions, tflops, train_flops):
    plan = make_plan(preset, **PAPER)
    assert f"{plan.params / 1e9:.2f}" == billions
    assert format_tflops(plan.flops_per_token) == tflops
    if train_flops:
        assert format_sci(plan.total_flops) == train_flops
    assert plan.total_flops == plan.flops_per_token * 780e9

    code, out, _ = palm(capsys, "plan", "--preset", preset, "--seq-len", "2048", "--tokens", "780e9")
    assert code == 0
    assert f"{billions}B" in out and f"{tflops} TFLOPs" in out
    if train_flops:
        assert train_flops in out


def test_62b_trained_on_795b_tokens():
    # Table 21: the 62B model saw 795B tokens, 3.08e23 FLOPs
    assert format_sci(make_plan("palm-62b", 2048, 795e9).total_flops) == "3.08e23"


def test_remat_flops_match_table_21():
    # Table 21's "+remat" column for 540B (full rematerialisation)
    assert format_tflops(make_plan("palm-540b", **PAPER).flops_per_token_remat) == "4.10"


def test_mfu_from_the_papers_throughput(capsys):
    plan = make_plan("palm-540b", **PAPER, **PAPER_540B_RUN)
    assert f"{100 * plan.mfu_observed_no_attention:.1f}" == "45.7"  # Appendix B's worked example
    assert abs(100 * plan.mfu_observed - 46.2) < 0.2  # Table 3
    assert f"{100 * plan.hfu_observed:.1f}" == "57.8"  # the paper's HFU
    code, out, _ = palm(
        capsys,
        "plan",
        "--preset",
        "palm-540b",
        "--seq-len",
        "2048",
        "--tokens",
        "780e9",
        "--device",
        "tpu-v4",
        "--devices",
        "6144",
        "--fsdp",
        "256",
        "--tp",
        "12",
        "--dp",
        "2",
        "--tokens-per-s",
        "238.3e3",
    )
    assert code == 0 and "45.7%" in out and "46.2%" in out


def test_time_at_mfu():
    plan = make_plan("palm-540b", **PAPER, **PAPER_540B_RUN, mfu=0.5)
    assert plan.time_s == pytest.approx(plan.total_flops / (6144 * 275e12 * 0.5))
    assert make_plan("palm-8b", **PAPER, device="cpu").time_s is None
    assert make_plan("palm-8b", **PAPER, device="mychip", peak_tflops=100).peak_flops_per_device == 100e12


def test_memory_sharding_rule():
    plan = make_plan("palm-540b", **PAPER, **PAPER_540B_RUN, batch_tokens=4e6)
    n, shards, m = plan.params_total, 256 * 12, plan.memory
    assert plan.params_total - plan.params == (118 + 1) * 18432  # LayerNorm scales
    assert m["weights"] == math.ceil(n * 2 / shards)
    assert m["gradients"] == math.ceil(n * 2 / shards)
    assert m["master_weights"] == math.ceil(n * 4 / shards)
    assert m["optimizer"] == math.ceil(n * 8 / shards)
    assert plan.tokens_per_device == pytest.approx(4e6 / 6144)
    assert m["activations_remat"] < m["activations_no_remat"]
    assert m["total_remat"] < m["total_no_remat"]
    fp32 = make_plan("palm-540b", **PAPER, **PAPER_540B_RUN, param_bytes=4).memory
    assert fp32["master_weights"] == 0 and fp32["weights"] == math.ceil(n * 4 / shards)


def test_layout_defaults():
    plan = make_plan("palm-8b", **PAPER, devices=64, fsdp=8, tp=2)
    assert (plan.dp, plan.fsdp, plan.tp) == (4, 8, 2)
    plan = make_plan("palm-8b", **PAPER, devices=64, dp=4)
    assert (plan.dp, plan.fsdp, plan.tp) == (4, 16, 1)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--devices", "6144", "--fsdp", "256", "--tp", "12", "--dp", "3"], ["9216", "6144"]),
        (["--devices", "8", "--fsdp", "3"], ["does not divide"]),
        (["--device", "abacus"], ["unknown device"]),
        (["--tokens", "-1"], ["--tokens"]),
        (["--mfu", "1.5"], ["--mfu"]),
    ],
)
def test_bad_settings_are_one_line(capsys, args, words):
    code, _, err = palm(capsys, "plan", "--preset", "palm-540b", *args)
    assert_one_line_error(code, err, *words)


def test_unknown_preset_is_one_line(capsys):
    code, _, err = palm(capsys, "plan", "--preset", "palm-1t")
    assert_one_line_error(code, err, "palm-1t")
    with pytest.raises(ConfigError):
        make_plan(None, 0, 1.0, overrides={})


def test_config_file(capsys, tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "palm",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "vocab_size": 100,
            }
        )
    )
    code, out, _ = palm(capsys, "plan", "--config", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["d_model"] == 64


def test_json_holds_the_same_numbers(capsys):
    plan = make_plan("palm-540b", **PAPER, **PAPER_540B_RUN)
    code, out, _ = palm(
        capsys,
        "plan",
        "--preset",
        "palm-540b",
        "--seq-len",
        "2048",
        "--tokens",
        "780e9",
        "--devices",
        "6144",
        "--fsdp",
        "256",
        "--tp",
        "12",
        "--tokens-per-s",
        "238.3e3",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert data == json.loads(plan.to_json())
    assert data["params"] == plan.params and f"{data['params'] / 1e9:.2f}" == "540.35"
    assert format_tflops(data["flops_per_token"]) == "3.28"
    assert format_sci(data["total_flops"]) == "2.56e24"
    assert f"{100 * data['mfu_observed_no_attention']:.1f}" == "45.7"
    assert data["memory"]["weights"] == math.ceil(plan.params_total * 2 / 3072)
    assert "540.35B" in render(plan)


def test_selective_checkpointing_memory_lies_between_none_and_full():
    m = make_plan("small", 512, 1e9, "cpu", 1, None, None, None, 0.5, None, 4096, None, {}).memory
    assert m["activations_remat"] < m["activations_selective"] < m["activations_no_remat"]
    assert m["total_selective"] - m["activations_selective"] == m["total_no_remat"] - m["activations_no_remat"]


def test_compute_copies_add_a_bf16_copy_and_its_gradient_and_activations_follow_the_compute_dtype():
    fp32 = make_plan("small", 1024, 1.0, device="cpu", param_bytes=4)
    copies = make_plan("small", 1024, 1.0, device="cpu", param_bytes=4, compute_copies=True)
    n = copies.params_total
    assert copies.memory["compute_copies"] == 4 * n and fp32.memory["compute_copies"] == 0
    # fp32 activations, and the backward's working set of gradients of them, are twice bf16's
    for key in ("activations_no_remat", "activations_remat", "activations_selective", "backward"):
        assert fp32.memory[key] == pytest.approx(2 * copies.memory[key], rel=1e-6)
    transient = ("activations_no_remat", "backward")
    assert copies.memory["total_no_remat"] == (
        fp32.memory["total_no_remat"]
        - sum(fp32.memory[k] for k in transient)
        + sum(copies.memory[k] for k in transient)
        + 4 * n
    )
    with pytest.raises(ConfigError, match="--param-bytes 4"):
        make_plan("small", 1024, 1.0, device="cpu", param_bytes=2, compute_copies=True)


def _bench(name):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", Path(__file__).parent.parent / "bench" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured_runs(tmp_path_factory):
    """bench/checkpointing.py's accounting at the sizes a test can afford: `palm train` in a fresh process,
    its peak RSS less the interpreter's baseline, beside palm plan for the same run."""
    bench = _bench("checkpointing")
    scratch = tmp_path_factory.mktemp("plan-vs-train")
    bench.write_corpus(scratch / "python-docs.txt")
    bench.train_tokenizer(scratch / "python-docs.txt", scratch / "tok", 8192)
    return bench, scratch, bench.baseline_rss()


# fp32 on every processor; auto is bf16 on compute copies where bf16 is native (Zen 4, AMX), fp32 elsewhere.
# Not `tiny`: there palm train holds about 55 MiB beyond the interpreter that are not the run's tensors (plan /
# measured 0.83-0.85 on a Zen 4, bf16 and fp32), which the plan does not model and which is under 2% at `small`.
@pytest.mark.parametrize(
    "preset, seq_len, batch, mode, dtype",
    [
        ("small", 256, 4, "none", "auto"),
        ("small", 256, 4, "none", "fp32"),
        ("small", 512, 4, "full", "auto"),
        ("small", 256, 8, "selective", "auto"),
        ("small", 256, 4, "selective", "fp32"),
    ],
)
def test_plan_is_within_15_percent_of_palm_trains_peak_memory(measured_runs, preset, seq_len, batch, mode, dtype):
    import torch

    from palm.core.runtime import pick_dtype

    bench, scratch, baseline = measured_runs
    row = bench.run(scratch, scratch / "tok", preset, seq_len, mode, steps=2, batch=batch, dtype=dtype)
    assert row["returncode"] == 0, row.get("error")
    measured = row["peak_rss"] - baseline
    copies = pick_dtype(dtype, torch.device("cpu")) == torch.bfloat16
    plan = bench.predicted(preset, seq_len, mode, copies, batch=batch, vocab_size=row["vocab_size"])
    print(f"{preset} {seq_len}x{batch} {mode} {dtype}: plan/measured {plan / measured:.3f}")
    assert plan == pytest.approx(measured, rel=0.15), (
        f"plan {plan / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB above a {baseline / 2**20:.0f} MiB baseline"
    )
