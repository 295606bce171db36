"""The weights of palm's decoder, laid out for reading once per token: transposed, int8 or fp16.

Decoding a few rows at a time multiplies a handful of vectors by every weight matrix, so a step
costs what reading the weights costs. Three formats, each with the kernel that reads it fastest
where palm runs:

- "none": the model's own dtype. On a CPU, bf16 weights are prepacked once into oneDNN's blocked
  layout (what inductor's freezing does): aten's bf16 matmul reorders the weight at every call, and
  ran 2-5x slower at batch 1 on a Zen 4 EPYC; the packed product gives the same bits as `F.linear`,
  row by row whatever the batch. fp32 weights are stored transposed ([in, out]): MKL's
  matrix-vector product over the [out, in] layout of `nn.Linear` ran 1.5-6x slower on the tall
  matrices (the fused input projection, the vocabulary head) of a 2-core AVX2 EPYC, at the same bytes.
- "int8": a quarter of fp32's bytes, one scale per output channel. A bf16 model on an AVX512 or AMX
  CPU runs it weight-only through `torch.ops.aten._weight_int8pack_mm` (vectorised there: twice
  bf16's speed at half its bytes on a Zen 4 EPYC, and a row's result does not depend on its batch).
  Other x86 CPUs run fbgemm's dynamic int8 kernel (activations are quantized per call too, 7-bit:
  less accurate, and a row's result depends slightly on which rows share its batch, so it is for
  single streams, not for serving exactly); `_weight_int8pack_mm` is a scalar loop on AVX2, and on
  fp32 activations (1-2 GB/s). Elsewhere it is weight-only (`F.linear(x, w.to(x.dtype)) * scale`,
  which torch.compile fuses on a GPU).
- "fp16": half of fp32's bytes, weight-only, fp32 arithmetic (fbgemm, x86 CPUs only): the
  precision of bf16's bytes for CPUs that lack native bf16.

fbgemm's packed weights are TorchScript objects, and oneDNN's are opaque tensors, which torch.compile
cannot take as inputs, so they are reached through custom ops that take a handle (an int, constant
in a compiled graph).
"""

from __future__ import annotations

import copy
import itertools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import PalmError
from . import matvec
from .matvec import MANY_ROWS, int8_rows  # rows from which a prefill block goes to aten's matmul

QUANTIZE = ("none", "int8", "fp16")
MATMULS = ("in_proj", "attn_out", "mlp_out")  # a block's weight matrices

_packed: dict[int, object] = {}  # handle -> fbgemm's or oneDNN's packed weight; its module's finalizer removes it
_handles = itertools.count()


class QuantizeError(PalmError):
    """A weight format this device has no kernel for."""


@torch.library.custom_op("palm::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int, int8: bool) -> torch.Tensor:
    packed = _packed[handle]
    x = x.contiguous()
    # reduce_range: 7-bit activations, so that AVX2's 16-bit multiply-add of int8 pairs cannot saturate.
    if int8:
        return torch.ops.quantized.linear_dynamic(x, packed, True)
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


# Defined through torch.library.Library rather than @custom_op: its dispatch costs ~10 us less per
# call, and a batch-1 step of a small model makes some twenty of them.
_LIBRARY = torch.library.Library("palm", "FRAGMENT")
_LIBRARY.define("onednn_linear(Tensor x, int handle, int out_features) -> Tensor")


def _onednn_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), _packed[handle], None, "none", [], "")


_LIBRARY.impl("onednn_linear", _onednn_linear, "CPU")


@torch.library.register_fake("palm::onednn_linear")
def _onednn_linear_shape(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, handle: int, out_features: int, int8: bool) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def fbgemm_available(device: torch.device) -> bool:
    return device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


class MatvecLinear(nn.Module):
    """`x @ W.T` with W stored transposed, [in, out], the layout that MKL's matrix-vector product reads fastest."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("wt", weight.detach().t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.wt

    def nbytes(self) -> int:
        return self.wt.numel() * self.wt.element_size()


def onednn_bf16(weight: torch.Tensor) -> bool:
    """Whether oneDNN can prepack this weight: bf16, on a CPU whose oneDNN has bf16 kernels."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _register(packed: object, owner: nn.Module) -> int:
    handle = next(_handles)
    _packed[handle] = packed
    weakref.finalize(owner, _packed.pop, handle, None)
    return handle


class OneDNNLinear(nn.Module):
    """bf16 `x @ W.T` with W prepacked by oneDNN: the model's own numbers, without a reorder per call."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach()
        self.out_features, self._nbytes = w.shape[0], w.numel() * w.element_size()
        self.handle = _register(torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1), self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.palm.onednn_linear(x, self.handle, self.out_features)

    def nbytes(self) -> int:
        return self._nbytes


class PackedLinear(nn.Module):
    """fbgemm's int8 (dynamic) or fp16 (weight-only) linear, for x86 CPUs."""

    def __init__(self, weight: torch.Tensor, int8: bool):
        super().__init__()
        w = weight.detach().float()
        out_features = w.shape[0]
        if int8:
            scales = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
            with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's kernels take only them
                warnings.simplefilter("ignore", UserWarning)
                q = torch.quantize_per_channel(w, scales, torch.zeros(out_features, dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(q, None)
        else:
            packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        self.out_features, self.int8 = out_features, int8
        self._nbytes = w.numel() * (1 if int8 else 2) + (out_features * 4 if int8 else 0)
        self.handle = _register(packed, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x.float(), self.handle, self.out_features, self.int8).to(x.dtype)

    def nbytes(self) -> int:
        return self._nbytes


def int8pack_fast(weight: torch.Tensor) -> bool:
    """Whether aten's weight-only int8 matmul has a vectorised kernel for this weight's dtype and CPU."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    )


class Int8PackLinear(nn.Module):
    """Weight-only int8, one scale per output channel, through aten's int8 x bf16 matmul (AVX512 CPUs)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scales = int8_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] >= MANY_ROWS:
            # aten's int8 kernel is built for a few rows: a 512-token prefill of a 1B model ran at 66 tokens/s
            # through it and at 2-3x that through bf16's matmul on the weight widened for the call (Zen 4).
            # int8 values are exact in bf16, so this is the same product, rounded once more by the scale.
            flat = F.linear(rows, self.weight.to(rows.dtype)) * self.scales  # type: ignore[arg-type]
        else:
            flat = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        return flat.reshape(*x.shape[:-1], flat.shape[-1])

    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()


class Int8Linear(nn.Module):
    """Weight-only int8 with one scale per output channel, dequantized in the matmul (gpt-fast's form)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scales = int8_rows(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales  # type: ignore[arg-type]

    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()


def linear_for(weight: torch.Tensor, quantize: str) -> nn.Module | None:
    """The decoding form of one weight matrix [out, in]; None where the model's own Linear is best."""
    device = weight.device
    if quantize == "none":
        if matvec.bf16_available(weight):
            return matvec.MatvecBf16(weight)
        if onednn_bf16(weight):
            return OneDNNLinear(weight)
        return MatvecLinear(weight) if device.type == "cpu" else None
    if quantize == "fp16":
        if not fbgemm_available(device):
            raise QuantizeError("fp16 weights need fbgemm (an x86 CPU); on a GPU use bf16 (--dtype bf16)")
        return PackedLinear(weight, int8=False)
    if quantize == "int8":
        if matvec.int8_available(weight):
            return matvec.MatvecInt8(weight)
        if int8pack_fast(weight):
            return Int8PackLinear(weight)
        return PackedLinear(weight, int8=True) if fbgemm_available(device) else Int8Linear(weight)
    raise QuantizeError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")


def decoding_model(model: nn.Module, quantize: str = "none", in_place: bool = False) -> nn.Module:
    """A palm model for decoding only, its matmul weights in `quantize`'s format.

    By default a copy: the model itself is left as it is (Transformers' generate() and training keep
    using it), and the decoding weights sit beside its own. `in_place` puts them in the model's place
    instead, so that the model's weights are freed as their decoding forms are made (one copy of
    the weights, for a caller that only decodes with it). Where the model's own layout is already the
    fastest (a GPU, no quantization), the model is returned.
    """
    if quantize not in QUANTIZE:
        raise QuantizeError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    if linear_for(torch.zeros(1, 1, device=model.device), quantize) is None:
        return model
    if in_place:
        decoder = model
    else:  # a new module tree over the same tensors; only the replaced matmuls get new storage
        shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        decoder = copy.deepcopy(model, memo=shared)
    for block in decoder.model.layers:
        for name in MATMULS:
            if isinstance(getattr(block, name), nn.Linear):  # else made while loading (decoding_weights)
                setattr(block, name, linear_for(getattr(block, name).weight, quantize))
    decoder.lm_head = linear_for(decoder.lm_head.weight, quantize)  # type: ignore[arg-type]
    return decoder.eval()


def decoding_weights(quantize: str):
    """What `modeldir.load_model(place=...)` calls with each tensor it reads: a block's matmul weight goes
    straight into its decoding form, so that the model's own copy of it is never made (`palm generate
    --quantize int8` of a 1B model peaked at its bf16 size plus the int8 copy before). Other tensors
    load as usual; `decoding_model(..., in_place=True)` then does the head."""
    if quantize not in QUANTIZE:
        raise QuantizeError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")

    def place(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
        parts = name.split(".")
        if len(parts) != 5 or parts[:2] != ["model", "layers"] or parts[3] not in MATMULS or parts[4] != "weight":
            return False
        block = model.model.layers[int(parts[2])]
        own = getattr(block, parts[3]).weight
        form = linear_for(tensor.to(device=own.device, dtype=own.dtype), quantize)
        if form is None:  # the model's own layout is the decoding one
            return False
        setattr(block, parts[3], form)
        return True

    return place


def weight_bytes(decoder: nn.Module) -> int:
    """Bytes of weights a decode step reads: every matmul weight (in its format) and the norms;
    of the embedding only the rows looked up, which is nothing next to the rest."""
    total = 0
    for module in decoder.modules():
        if hasattr(module, "nbytes") and callable(module.nbytes):
            total += module.nbytes()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, nn.LayerNorm):
            total += module.weight.numel() * module.weight.element_size()
    return total
