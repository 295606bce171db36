"""`palm plan`: the compute, memory and time a PaLM training run needs, worked out on paper.

FLOPs follow the paper's Appendix B: a token costs 6N + 12LHQT FLOPs to train, where N counts the
weight matrices (Table 1's parameter count), L layers, H heads, Q head size and T sequence length.
Rematerialisation is not counted there (that gives MFU); the hardware count with full remat
(HFU) adds the recomputed forward pass: 75% of the non-attention forward (1.5N) and all of the
attention forward (4LHQT), so 7.5N + 16LHQT, which reproduces Table 21's 4.10 TFLOPs for 540B.

Memory per device, in bytes. Assumptions (all estimates; nothing here builds a model):

* Parameters in memory are the weight matrices plus the LayerNorm scales, (L + 1) * d more.
* Sharding rule: weights, gradients, master weights and optimizer state are each split evenly over
  the `fsdp * tp` devices of one model replica (the paper's 2D layout: 12-way model parallel x
  256-way fully sharded data parallel in a pod); the `dp` axis (pods) replicates them.
* Weights are `param_bytes` each (2: bf16). Gradients are kept in the same dtype.
* Mixed precision (param_bytes < 4) adds fp32 master weights: 4 bytes per parameter.
* Optimizer: PaLM's Adafactor *without factorisation* keeps full fp32 first and second moments,
  8 bytes per parameter (it is Adam-like; a factored Adafactor would need far less).
* `compute_copies` (`--compute-copies`, how `palm train` runs bf16 on one process): fp32 weights
  (`param_bytes` 4) and fp32 gradients, plus a bf16 copy of every weight and its bf16 gradient, 4 bytes
  per parameter more.
* Activations are in the compute dtype (bf16, 2 bytes, under mixed precision or on compute copies; else
  `param_bytes`) and fully sharded: a device holds `batch_tokens / devices` tokens'
  worth of each activation tensor ("one fully sharded activation is saved per layer", paper §4).
  Without rematerialisation a parallel block saves, per token, about 2d + 3HQ + 2KQ + 4f elements
  (LN input and output; q and k after RoPE, v; attention output twice, as SDPA output and output
  projection input; gate, up, silu(gate) and their product), with K the key/value heads and f = d_ff.
  Attention is assumed flash-style (no T x T probabilities saved). With full rematerialisation only
  each layer's input is kept, L * tokens * d * 2 bytes, plus one layer's full set while it is
  recomputed during the backward pass. Selective checkpointing (palm's `selective`) keeps the outputs
  of the matmuls and of attention, 3d + 2HQ + 2KQ + 2f per token and layer, and recomputes the rest.
* The output logits are counted apart, in fp32 (4 bytes per vocabulary entry per token), and are in
  every total. So is the backward pass's working set: the gradients into and out of one layer's ops,
  2 x that layer's activation elements in the compute dtype (a term that `palm train` at `tiny` showed
  missing: 9% of its peak, under 1% at `1b`). Temporary buffers (an all-gathered layer of weights, communication buffers,
  allocator fragmentation) are not counted.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from ..model.config import PRESETS, ConfigError, PalmConfig
from .flops import DATASHEET_BF16_FLOPS, flops_per_token, matrix_params

ACT_BYTES = 2  # bf16 activations
LOGIT_BYTES = 4  # fp32 logits for the loss
MASTER_BYTES = 4  # fp32 master weights under mixed precision
OPTIMIZER_BYTES = 8  # fp32 first and second moments (unfactored Adafactor with momentum)
GIB = 2**30

# Dense bf16 peak FLOP/s per chip (data sheets) and memory per chip in GiB.
DEVICES: dict[str, dict] = {
    "tpu-v4": {"peak": 275e12, "memory_gib": 32},
    "a100": {"peak": DATASHEET_BF16_FLOPS[(8, 0)], "memory_gib": 80},
    "h100": {"peak": DATASHEET_BF16_FLOPS[(9, 0)], "memory_gib": 80},
    "h200": {"peak": DATASHEET_BF16_FLOPS[(9, 0)], "memory_gib": 141},
    "cpu": {"peak": None, "memory_gib": None},
}


@dataclass
class Plan:
    model: str  # preset name or "config"
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    seq_len: int
    params: int  # weight matrices, as Table 1 counts them
    params_total: int  # plus the LayerNorm scales; what memory is reckoned on
    flops_per_token: float  # 6N + 12LHQT
    flops_per_token_no_attention: float  # 6N
    flops_per_token_remat: float  # 7.5N + 16LHQT: hardware FLOPs with full rematerialisation
    tokens: float
    total_flops: float
    device: str
    devices: int
    peak_flops_per_device: float | None
    device_memory_bytes: int | None
    dp: int
    fsdp: int
    tp: int
    param_bytes: int
    batch_tokens: float
    tokens_per_device: float
    memory: dict[str, int] = field(default_factory=dict)  # bytes per device
    mfu: float | None = None
    time_s: float | None = None  # training time at `mfu`
    tokens_per_s_at_mfu: float | None = None
    tokens_per_s: float | None = None  # an observed throughput, if given
    mfu_observed: float | None = None  # with attention (Table 3's 46.2%)
    mfu_observed_no_attention: float | None = None  # 6N only (Appendix B's worked 45.7%)
    hfu_observed: float | None = None  # with full-remat FLOPs (the paper's 57.8% HFU)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _positive(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value}")


def _layout(devices: int, dp: int | None, fsdp: int | None, tp: int | None) -> tuple[int, int, int]:
    tp = 1 if tp is None else tp
    for name, value in (("--dp", dp), ("--fsdp", fsdp), ("--tp", tp)):
        _positive(name, value)
    if dp is None and fsdp is None:
        fsdp = 1
    if dp is None:
        dp, rest = divmod(devices, fsdp * tp)
        if rest or not dp:
            raise ConfigError(f"--fsdp {fsdp} x --tp {tp} = {fsdp * tp} does not divide {devices} devices")
    elif fsdp is None:
        fsdp, rest = divmod(devices, dp * tp)
        if rest or not fsdp:
            raise ConfigError(f"--dp {dp} x --tp {tp} = {dp * tp} does not divide {devices} devices")
    if dp * fsdp * tp != devices:
        raise ConfigError(f"the layout --dp {dp} x --fsdp {fsdp} x --tp {tp} = {dp * fsdp * tp} devices, not {devices}")
    return dp, fsdp, tp


def _ceil_div(a: float, b: float) -> int:
    return math.ceil(a / b)


def make_plan(
    preset: str | None,
    seq_len: int,
    tokens: float,
    device: str = "tpu-v4",
    devices: int = 1,
    dp: int | None = None,
    fsdp: int | None = None,
    tp: int | None = None,
    mfu: float = 0.462,
    tokens_per_s: float | None = None,
    batch_tokens: float | None = None,
    peak_tflops: float | None = None,
    overrides: dict | None = None,
    param_bytes: int = 2,
    compute_copies: bool = False,
) -> Plan:
    """Work out a Plan; a setting that cannot describe a run raises ConfigError (one sentence)."""
    overrides = dict(overrides or {})
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    for name, value in (
        ("--seq-len", seq_len),
        ("--tokens", tokens),
        ("--devices", devices),
        ("--tokens-per-s", tokens_per_s),
        ("--batch-tokens", batch_tokens),
        ("--peak-tflops", peak_tflops),
        ("--param-bytes", param_bytes),
        ("--mfu", mfu),
    ):
        _positive(name, value)
    if mfu > 1:
        raise ConfigError(f"--mfu is a fraction of peak in (0, 1], got {mfu}")
    if device not in DEVICES and peak_tflops is None:
        raise ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)} or give --peak-tflops")
    spec = DEVICES.get(device, {"peak": None, "memory_gib": None})
    peak = peak_tflops * 1e12 if peak_tflops is not None else spec["peak"]
    memory_bytes = None if spec["memory_gib"] is None else int(spec["memory_gib"] * GIB)
    dp, fsdp, tp = _layout(devices, dp, fsdp, tp)

    config = PalmConfig.from_preset(preset, **overrides) if preset is not None else PalmConfig(**overrides)
    L, d, f = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    H, K, Q = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    n = matrix_params(config)
    n_total = n + (L + 1) * d
    fpt = flops_per_token(config, seq_len)
    lhqt = L * H * Q * seq_len
    fpt_remat = 7.5 * n + 16 * lhqt

    # Memory per device: states over the fsdp x tp shards of one replica, activations over all devices.
    shards = fsdp * tp
    batch_tokens = float(batch_tokens) if batch_tokens is not None else float(seq_len * dp * fsdp)
    t = batch_tokens / devices
    per_layer_elements = 2 * d + 3 * H * Q + 2 * K * Q + 4 * f
    if compute_copies and param_bytes != MASTER_BYTES:
        raise ConfigError("--compute-copies describes fp32 weights computed on as bf16 copies: give --param-bytes 4")
    # Activations in the compute dtype: bf16 under mixed precision and on compute copies, else the weights'.
    act = ACT_BYTES if param_bytes < MASTER_BYTES or compute_copies else param_bytes
    memory = {
        "weights": _ceil_div(n_total * param_bytes, shards),
        "gradients": _ceil_div(n_total * param_bytes, shards),
        "master_weights": _ceil_div(n_total * MASTER_BYTES, shards) if param_bytes < MASTER_BYTES else 0,
        "optimizer": _ceil_div(n_total * OPTIMIZER_BYTES, shards),
        # palm.training.compute.ComputeCopies: a bf16 copy of every weight, and its bf16 gradient through the backward
        "compute_copies": _ceil_div(n_total * 2 * ACT_BYTES, shards) if compute_copies else 0,
        "activations_no_remat": math.ceil(L * t * per_layer_elements * act),
        "activations_remat": math.ceil(L * t * d * act + t * per_layer_elements * act),
        # selective (`--activation-checkpointing selective`): the matmul and attention outputs stay, the
        # norms, RoPE and SwiGLU are recomputed, so no matmul runs twice
        "activations_selective": math.ceil(L * t * (3 * d + 2 * H * Q + 2 * K * Q + 2 * f) * act),
        "logits": math.ceil(t * config.vocab_size * LOGIT_BYTES),
        # the backward's working set: the gradients flowing into and out of one layer's ops, about twice
        # that layer's saved activations (measured at tiny, where it is 9% of the run; at 1b it is under 1%)
        "backward": math.ceil(2 * t * per_layer_elements * act),
    }
    states = (
        memory["weights"]
        + memory["gradients"]
        + memory["master_weights"]
        + memory["optimizer"]
        + memory["compute_copies"]
    )
    transient = memory["logits"] + memory["backward"]
    memory["total_no_remat"] = states + memory["activations_no_remat"] + transient
    memory["total_remat"] = states + memory["activations_remat"] + transient
    memory["total_selective"] = states + memory["activations_selective"] + transient

    plan = Plan(
        model=preset or "config",
        layers=L,
        d_model=d,
        heads=H,
        kv_heads=K,
        head_dim=Q,
        d_ff=f,
        vocab_size=config.vocab_size,
        seq_len=seq_len,
        params=n,
        params_total=n_total,
        flops_per_token=fpt,
        flops_per_token_no_attention=6.0 * n,
        flops_per_token_remat=fpt_remat,
        tokens=float(tokens),
        total_flops=fpt * tokens,
        device=device,
        devices=devices,
        peak_flops_per_device=peak,
        device_memory_bytes=memory_bytes,
        dp=dp,
        fsdp=fsdp,
        tp=tp,
        param_bytes=param_bytes,
        batch_tokens=batch_tokens,
        tokens_per_device=t,
        memory=memory,
        mfu=mfu,
        tokens_per_s=tokens_per_s,
    )
    if peak:
        system = devices * peak
        plan.time_s = plan.total_flops / (system * mfu)
        plan.tokens_per_s_at_mfu = system * mfu / fpt
        if tokens_per_s is not None:
            plan.mfu_observed = tokens_per_s * fpt / system
            plan.mfu_observed_no_attention = tokens_per_s * 6.0 * n / system
            plan.hfu_observed = tokens_per_s * fpt_remat / system
    return plan


def format_sci(x: float) -> str:
    """2.56e24, as the paper prints 2.56 x 10^24."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_tflops(flops: float) -> str:
    """Three significant figures, trailing zeros kept: Table 21's 0.0550, 0.388, 3.28."""
    return f"{flops / 1e12:#.3g}"


def format_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def format_bytes(b: float) -> str:
    return f"{b / GIB:,.2f} GiB"


def format_duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:,.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} s"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render(plan: Plan) -> str:
    """A readable two-column table."""
    m = plan.memory
    peak = "unknown" if not plan.peak_flops_per_device else f"{plan.peak_flops_per_device / 1e12:g} TFLOP/s"
    capacity = "" if plan.device_memory_bytes is None else f" of {format_bytes(plan.device_memory_bytes)}"
    rows: list[tuple[str, str] | None] = [
        (
            "model",
            f"{plan.model}: {plan.layers} layers, d_model {plan.d_model}, {plan.heads} heads x {plan.head_dim}"
            f" ({plan.kv_heads} kv), d_ff {plan.d_ff}, vocab {plan.vocab_size}",
        ),
        (
            "parameters",
            f"{plan.params / 1e9:.2f}B (weight matrices, Table 1); {plan.params_total:,} with LayerNorm scales",
        ),
        ("sequence length", f"{plan.seq_len}"),
        (
            "FLOPs per token",
            f"{format_tflops(plan.flops_per_token)} TFLOPs (6N + 12LHQT); "
            f"6N alone {format_tflops(plan.flops_per_token_no_attention)}; "
            f"with full remat {format_tflops(plan.flops_per_token_remat)}",
        ),
        ("training tokens", format_count(plan.tokens)),
        ("training FLOPs", f"{format_sci(plan.total_flops)} FLOPs"),
        None,
        ("devices", f"{plan.devices} x {plan.device} at {peak}"),
        ("layout", f"dp {plan.dp} x fsdp {plan.fsdp} x tp {plan.tp} (states sharded {plan.fsdp * plan.tp}-way)"),
        (
            "batch",
            f"{format_count(plan.batch_tokens)} tokens; {plan.tokens_per_device:,.1f} per device (fully sharded)",
        ),
        (
            "memory per device",
            f"weights {format_bytes(m['weights'])} ({plan.param_bytes} B/param), "
            f"gradients {format_bytes(m['gradients'])}",
        ),
        (
            "",
            f"fp32 master weights {format_bytes(m['master_weights'])}, "
            f"optimizer (fp32 m, v) {format_bytes(m['optimizer'])}"
            + (
                f", bf16 compute copies and their gradients {format_bytes(m['compute_copies'])}"
                if m["compute_copies"]
                else ""
            ),
        ),
        (
            "",
            f"activations {format_bytes(m['activations_no_remat'])} without remat, "
            f"{format_bytes(m['activations_selective'])} with selective, "
            f"{format_bytes(m['activations_remat'])} with full remat; logits {format_bytes(m['logits'])}, "
            f"backward working set {format_bytes(m['backward'])}",
        ),
        (
            "",
            f"total {format_bytes(m['total_no_remat'])} without remat, "
            f"{format_bytes(m['total_selective'])} selective, "
            f"{format_bytes(m['total_remat'])} with full remat{capacity}",
        ),
        None,
    ]
    if plan.time_s is None:
        rows.append(("time", "unknown: no peak FLOP/s for this device (give --peak-tflops)"))
    else:
        rows.append(
            (
                "time",
                f"{format_duration(plan.time_s)} at {_pct(plan.mfu)} MFU "
                f"({format_count(plan.tokens_per_s_at_mfu)} tokens/s)",
            )
        )
    if plan.tokens_per_s is not None:
        rows.append(
            (
                "observed",
                f"{format_count(plan.tokens_per_s)} tokens/s: MFU {_pct(plan.mfu_observed)} "
                f"(with attention), {_pct(plan.mfu_observed_no_attention)} (6N only, as Appendix B), "
                f"HFU {_pct(plan.hfu_observed)} (full remat)",
            )
        )
    width = max(len(r[0]) for r in rows if r)
    return "\n".join("" if r is None else f"{r[0]:<{width}}  {r[1]}" for r in rows)
