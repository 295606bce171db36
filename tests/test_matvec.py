"""palm's decode-time matmul kernels (palm/inference/matvec.c): built once, right on every CPU that runs them,
and each row's result independent of the rows beside it."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from palm.inference import matvec
from palm.inference.quant import MatvecLinear, OneDNNLinear, linear_for

FLAGS = matvec.cpu_flags()
needs_compiler = pytest.mark.skipif(
    matvec.build() is None, reason="no C compiler here: palm decodes with aten's kernels (tested in test_quant)"
)
SHAPES = [(37, 70), (64, 64), (8, 33), (300, 1000), (16, 2048), (9, 129)]  # tails of rows and of columns


def bf16_kernels() -> list[str]:
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= FLAGS
    return (["palm_bf16_avx512"] if avx512 else []) + (["palm_bf16_avx2"] if {"avx2", "fma"} <= FLAGS else [])


def run_bf16(name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
    getattr(matvec.library().lib, name)(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], w.shape[1], w.shape[0], 2)
    return y


def test_the_library_is_built_once_and_a_failing_compiler_means_none(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    first = matvec.build(folder=tmp_path)
    assert first is not None and first.parent == tmp_path
    stamp = first.stat().st_mtime_ns
    assert matvec.build(folder=tmp_path) == first and first.stat().st_mtime_ns == stamp  # from the cache
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporaries left behind
    assert matvec.build(folder=tmp_path / "other", compiler="false") is None  # a compiler that fails


def test_the_kernels_chosen_follow_the_cpus_flags(tmp_path):
    path = matvec.build(folder=tmp_path)
    if path is None:
        pytest.skip("no C compiler on this machine")
    zen4 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"})
    lib = matvec.Library(path, zen4)
    assert lib.bf16 is lib.lib.palm_bf16_avx512 and lib.int8
    avx2 = matvec.Library(path, frozenset({"avx2", "fma"}))
    assert avx2.bf16 is avx2.lib.palm_bf16_avx2 and not avx2.int8
    assert matvec.Library(path, frozenset()).bf16 is None


@needs_compiler
@pytest.mark.parametrize("name", bf16_kernels())
def test_bf16_kernels_match_a_float64_product_and_rows_do_not_depend_on_their_batch(name):
    torch.manual_seed(0)
    for out, k in SHAPES:
        w = torch.randn(out, k, dtype=torch.bfloat16)
        x = torch.randn(7, k, dtype=torch.bfloat16)
        y = run_bf16(name, x, w)
        exact = x.double() @ w.double().T
        assert ((y.double() - exact).abs() / (exact.abs() + 1)).max() < 0.01  # bf16's rounding of the result
        for m in (1, 2, 3, 6):  # pairs of rows share a tile, and the odd one runs alone
            assert torch.equal(run_bf16(name, x[:m].contiguous(), w), y[:m])
        assert all(torch.equal(run_bf16(name, x[i : i + 1].contiguous(), w)[0], y[i]) for i in range(7))


@needs_compiler
@pytest.mark.skipif(not matvec.int8_available(torch.zeros(1, dtype=torch.bfloat16)), reason="no AVX512-VNNI here")
def test_int8_kernel_is_close_to_its_dequantized_product_and_rows_do_not_depend_on_their_batch():
    torch.manual_seed(0)
    for out, k in SHAPES:
        layer = matvec.MatvecInt8(torch.randn(out, k, dtype=torch.bfloat16))
        w = torch.bitwise_xor(layer.weight.view(torch.int8), -128).double() * layer.scale.double()[:, None]
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(7, k, dtype=dtype)
            y = layer(x)
            exact = x.double() @ w.T
            # activations quantized per block of 64: about 1/127 of each block's largest value
            assert ((y.double() - exact).abs().amax(1) / exact.abs().amax(1)).max() < 0.03
            assert all(torch.equal(layer(x[i : i + 1]), y[i : i + 1]) for i in range(7))
        many = torch.randn(matvec.MANY_ROWS, k, dtype=torch.bfloat16)  # a prefill block: aten's matmul
        exact = many.double() @ w.T
        assert ((layer(many).double() - exact).abs().amax(1) / exact.abs().amax(1)).max() < 0.02


@needs_compiler
def test_bf16_decoding_form_shares_the_models_weight_and_hands_many_rows_to_aten():
    if not matvec.bf16_available(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("neither AVX512-BF16 nor AVX2 here")
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    layer = linear_for(w, "none")
    assert isinstance(layer, matvec.MatvecBf16) and layer.weight.data_ptr() == w.data_ptr()  # no second copy
    many = torch.randn(1, matvec.MANY_ROWS, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(many), F.linear(many, w))
    few = torch.randn(3, 1, 64, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(few), layer(few)) and compiled(few).shape == (3, 1, 96)


def test_palm_matvec_0_decodes_with_aten_as_a_machine_without_a_compiler(monkeypatch):
    monkeypatch.setenv("PALM_MATVEC", "0")
    assert matvec.library() is None
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    assert isinstance(
        linear_for(w, "none"), OneDNNLinear if torch.ops.mkldnn._is_mkldnn_bf16_supported() else MatvecLinear
    )
