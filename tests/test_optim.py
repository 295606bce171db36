"""The PaLM optimizer against the paper's update rule worked by hand, and its schedules."""

import copy
import math

import pytest
import torch

from palm.model.config import ConfigError
from palm.training.optim import PalmAdafactor, build_optimizer, cosine_lr, lr_at, palm_beta2, palm_lr

EPS1 = 1e-30


def rms(xs: list[float]) -> float:
    return math.sqrt(sum(x * x for x in xs) / len(xs))


def test_two_steps_match_the_paper_by_hand():
    """Steps 1 and 2 worked out with python floats: beta2 schedule, clipping, parameter scaling, momentum, lr^2 decay."""
    p0 = [0.5, -1.0, 0.25, 2.0, -0.75, 1.5]
    g1 = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6]
    g2 = [0.03, 0.01, -0.02, -0.05, 0.04, 0.02]  # small next to g1, so step 2 is *not* clipped
    lr1, lr2, beta1, clip = 0.01, 0.005, 0.9, 0.5

    # Step 1: beta2 = 1 - 1^-0.8 = 0, so v = g^2 + eps1 and u = g/|g| = sign(g), rms 1 > clip: clipped to 0.5.
    b2 = 0.0
    v1 = [b2 * 0.0 + (1 - b2) * (g * g + EPS1) for g in g1]
    u = [g / math.sqrt(v) for g, v in zip(g1, v1)]
    assert rms(u) / clip > 1  # the clipping branch is taken
    u = [x / max(1.0, rms(u) / clip) for x in u]
    scaled = lr1 * max(1e-3, rms(p0))
    assert rms(p0) > 1e-3  # parameter scale, not the floor
    s = [scaled * x for x in u]
    m1 = [beta1 * 0.0 + (1 - beta1) * x for x in s]
    p1 = [p - m - p * lr1**2 for p, m in zip(p0, m1)]

    # Step 2: beta2 = 1 - 2^-0.8.
    b2 = 1 - 2**-0.8
    v2 = [b2 * v + (1 - b2) * (g * g + EPS1) for v, g in zip(v1, g2)]
    u = [g / math.sqrt(v) for g, v in zip(g2, v2)]
    assert rms(u) / clip < 1  # unclipped: max(1, .) must pick 1
    u = [x / max(1.0, rms(u) / clip) for x in u]
    scaled = lr2 * max(1e-3, rms(p1))
    s = [scaled * x for x in u]
    m2 = [beta1 * m + (1 - beta1) * x for m, x in zip(m1, s)]
    p2 = [p - m - p * lr2**2 for p, m in zip(p1, m2)]

    param = torch.nn.Parameter(torch.tensor(p0).reshape(2, 3))
    opt = PalmAdafactor([param], lr=lr1, clip_threshold=clip)
    param.grad = torch.tensor(g1).reshape(2, 3)
    opt.step()
    torch.testing.assert_close(param.detach(), torch.tensor(p1).reshape(2, 3), rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.state[param]["exp_avg_sq"], torch.tensor(v1).reshape(2, 3), rtol=1e-6, atol=0)
    assert opt.state[param]["step"] == 1

    opt.param_groups[0]["lr"] = lr2
    param.grad = torch.tensor(g2).reshape(2, 3)
    opt.step()
    torch.testing.assert_close(param.detach(), torch.tensor(p2).reshape(2, 3), rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.state[param]["exp_avg"], torch.tensor(m2).reshape(2, 3), rtol=1e-6, atol=0)
    assert opt.state[param]["step"] == 2


def test_near_zero_param_uses_eps2_floor_without_momentum():
    """rms(p) << eps2: the step is lr * eps2 * u; beta1=None applies it directly and keeps no momentum."""
    p0 = [1e-6, -2e-6, 0.0, 3e-6]
    g = [0.2, -0.1, 0.4, 0.3]
    lr, eps2 = 0.01, 1e-3
    assert rms(p0) < eps2
    v = [x * x + EPS1 for x in g]  # beta2 = 0 at step 1
    u = [x / math.sqrt(y) for x, y in zip(g, v)]  # sign(g), rms 1: not clipped at threshold 1
    u = [x / max(1.0, rms(u) / 1.0) for x in u]
    expected = [p - lr * eps2 * x - p * lr**2 for p, x in zip(p0, u)]

    param = torch.nn.Parameter(torch.tensor(p0))
    opt = PalmAdafactor([param], lr=lr, beta1=None, eps2=eps2)
    param.grad = torch.tensor(g)
    opt.step()
    torch.testing.assert_close(param.detach(), torch.tensor(expected), rtol=1e-6, atol=1e-12)
    assert "exp_avg" not in opt.state[param]


def test_palm_beta2_schedule():
    assert palm_beta2(1) == 0.0
    assert palm_beta2(2) == pytest.approx(1 - 2**-0.8, rel=1e-12)
    assert palm_beta2(100, decay_rate=0.5) == pytest.approx(0.9, rel=1e-12)
    with pytest.raises(ValueError):
        palm_beta2(0)


def test_palm_lr_holds_then_decays_as_inverse_sqrt():
    assert palm_lr(1) == palm_lr(9_999) == palm_lr(10_000) == pytest.approx(1e-2)
    for k in (10_000, 10_001, 40_000, 1_000_000):
        assert palm_lr(k) == pytest.approx(1 / math.sqrt(k), rel=1e-12)
    # continuous at the hold boundary, and the custom peak/hold scale the same curve
    assert palm_lr(101, peak_lr=0.5, hold_steps=100) == pytest.approx(0.5 * math.sqrt(100 / 101))
    assert palm_lr(400, peak_lr=0.5, hold_steps=100) == pytest.approx(0.25)
    assert palm_lr(50, peak_lr=0.5, hold_steps=100) == 0.5
    with pytest.raises(ValueError):
        palm_lr(0)


def test_cosine_lr_warmup_and_decay_endpoints():
    peak, warm, total = 3e-4, 10, 110
    assert cosine_lr(1, peak, warm, total) == pytest.approx(peak / warm)
    assert cosine_lr(5, peak, warm, total) == pytest.approx(peak / 2)
    assert cosine_lr(warm, peak, warm, total) == pytest.approx(peak)
    assert cosine_lr(60, peak, warm, total) == pytest.approx(0.55 * peak)  # halfway: mean of peak and floor
    assert cosine_lr(total, peak, warm, total) == pytest.approx(0.1 * peak)
    assert cosine_lr(10 * total, peak, warm, total) == pytest.approx(0.1 * peak)
    assert cosine_lr(1, peak, 0, total) == pytest.approx(peak, rel=1e-3)  # no warmup: starts near peak


def test_lr_at_picks_the_schedule_of_the_optimizer():
    assert lr_at(40_000, "palm", 1e-2, 10_000, 100, 1000) == pytest.approx(5e-3)
    assert lr_at(50, "adamw", 1e-3, 10_000, 100, 1000) == pytest.approx(5e-4)
    with pytest.raises(ConfigError):
        lr_at(1, "sgd", 1e-2, 10_000, 100, 1000)


def _steps(params, opt, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.param_groups[0]["lr"] = palm_lr(i + 1, hold_steps=2)
        opt.step()


def test_state_dict_round_trip_is_bitwise():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(5))]
    opt_a = PalmAdafactor(a)
    _steps(a, opt_a, 3, seed=1)
    saved = copy.deepcopy(opt_a.state_dict())

    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = PalmAdafactor(b, lr=0.123)  # a different lr must be overwritten by the loaded groups
    opt_b.load_state_dict(saved)
    assert opt_b.state[b[0]]["step"] == 3

    _steps(a, opt_a, 2, seed=2)
    _steps(b, opt_b, 2, seed=2)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    assert torch.equal(opt_a.state[a[0]]["exp_avg"], opt_b.state[b[0]]["exp_avg"])


def test_weight_decay_is_param_times_lr_squared():
    p0 = torch.tensor([[0.5, -1.0, 0.25], [2.0, -0.75, 1.5]])
    g = torch.tensor([[0.1, -0.2, 0.3], [-0.4, 0.5, -0.6]])
    lr = 0.05
    results = {}
    for exp in (None, 2.0):
        p = torch.nn.Parameter(p0.clone())
        opt = PalmAdafactor([p], lr=lr, weight_decay_lr_exponent=exp)
        p.grad = g.clone()
        opt.step()
        results[exp] = p.detach()
    torch.testing.assert_close(results[None] - results[2.0], p0 * lr**2, rtol=1e-4, atol=1e-9)
    assert not torch.equal(results[None], results[2.0])


def test_bf16_param_keeps_fp32_state_across_save_and_load():
    p = torch.nn.Parameter(torch.randn(3, 4).to(torch.bfloat16))
    before = p.detach().clone()
    opt = PalmAdafactor([p])
    _steps([p], opt, 2, seed=3)
    assert p.dtype == torch.bfloat16
    assert not torch.equal(p.detach(), before)
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    assert opt.state[p]["exp_avg"].dtype == torch.float32

    q = torch.nn.Parameter(p.detach().clone())
    opt_q = PalmAdafactor([q])
    opt_q.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("exp_avg_sq", "exp_avg"):
        assert opt_q.state[q][key].dtype == torch.float32
        assert torch.equal(opt_q.state[q][key], opt.state[p][key])


def test_skips_params_without_grad():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = PalmAdafactor([p, q])
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(q.detach(), torch.ones(3))
    assert q not in opt.state
    assert not torch.equal(p.detach(), torch.ones(3))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.LayerNorm(4, bias=False)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied


def test_build_optimizer_adamw_decays_only_matrices_and_dedupes_tied():
    model = _Tiny()
    opt = build_optimizer("adamw", model.named_parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    by_decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert set(by_decay) == {0.1, 0.0}
    assert [p.dim() for p in by_decay[0.1]] == [2]  # the tied embedding/head, once
    assert by_decay[0.1][0] is model.embed.weight
    assert by_decay[0.0] == [model.norm.weight]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_build_optimizer_palm_and_unknown_name():
    model = _Tiny()
    opt = build_optimizer("palm", model.named_parameters(), lr=1e-2)
    assert isinstance(opt, PalmAdafactor)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'; choose palm or adamw"):
        build_optimizer("sgd", model.named_parameters(), lr=1e-2)


def test_the_multi_tensor_step_equals_the_per_tensor_step():
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (32, 16), (5, 3)]
    params = {mode: [torch.nn.Parameter(torch.randn(s)) for s in shapes] for mode in ("one", "foreach")}
    for a, b in zip(*params.values()):
        b.data.copy_(a.data)
    opts = {mode: PalmAdafactor(ps, lr=1e-2, foreach=mode == "foreach") for mode, ps in params.items()}
    for step in range(5):
        grads = [torch.randn(s) for s in shapes]
        for mode, ps in params.items():
            for p, g in zip(ps, grads):
                p.grad = None if (step == 2 and p.dim() == 1) else g.clone()  # a tensor that skips a step
            opts[mode].step()
    for a, b in zip(*params.values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert opts["foreach"].state[params["foreach"][1]]["step"] == 4  # the skipped step was not counted


def reference_step(p, g, v, m, step, lr=1e-2, beta1=0.9, eps1=1e-30, eps2=1e-3, clip=1.0):
    """PalmAdafactor's update with a fresh tensor for every temporary, in fp32: (new p, v, m)."""
    g, p, v, m = g.float(), p.float(), v.clone(), m.clone()
    beta2 = palm_beta2(step)
    v.mul_(beta2).add_(g.square().add_(eps1), alpha=1.0 - beta2)
    u = g / v.sqrt()
    u.div_(torch.clamp(u.square().mean().sqrt() / clip, min=1.0))
    s = u.mul_(lr * torch.clamp(p.square().mean().sqrt(), min=eps2))
    m.mul_(beta1).add_(s, alpha=1.0 - beta1)
    new = p - m
    new.sub_(p, alpha=lr**2)
    return new, v, m


@pytest.mark.parametrize("block", [64, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocked_update_is_the_update_written_out(dtype, block):
    """On a CPU each tensor is updated a block of elements at a time (here 64: many blocks, a short last
    one; and the default, one block), with scratch shared by every tensor of the step: each tensor (larger
    and smaller ones, bf16 parameters with fp32 moments) moves as the update written out with whole-tensor
    operations, with and without clipping; v bit for bit, the rest up to fp32 rounding."""
    torch.manual_seed(0)
    shapes = [(64, 48), (7,), (1000,), (3, 5, 11), (48, 64)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    moments = [(torch.zeros(s), torch.zeros(s)) for s in shapes]
    opt = PalmAdafactor(params, lr=1e-2)
    opt.block = block
    for step in range(1, 5):
        expected = []
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, dtype=dtype) * (30 if step == 3 else 1)  # step 3 is clipped
            new, *moments[i] = reference_step(p.detach(), p.grad, *moments[i], step)
            expected.append(new)
        opt.step()
        for p, want, (v, m) in zip(params, expected, moments):
            assert torch.equal(opt.state[p]["exp_avg_sq"], v)
            torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-5, atol=1e-9)
            if dtype == torch.float32:
                torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-8)
            else:  # rounded to bf16 once, from an fp32 value within fp32 rounding of the written-out one
                torch.testing.assert_close(p.detach().float(), want, rtol=2**-8, atol=0)
            opt.state[p]["exp_avg"].copy_(m)  # the next step starts from the written-out state
            p.data.copy_(want)
