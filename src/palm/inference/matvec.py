"""palm's own matrix products for decoding: a few rows against every weight, read at memory speed.

A decode step at batch 1 is one pass over the weights, so its speed is the rate at which the matmul reads
them. aten's and oneDNN's bf16 and int8 kernels read a 1B model's weights at 20-27 GB/s on a 2-core Zen 4
EPYC, where llama.cpp reads 40; the loops in `matvec.c` (eight weight rows in flight, each read front to
back) read at llama.cpp's rate. They are built from that one C file with the system compiler on first
use, cached by the source's hash, and loaded with ctypes; without a compiler palm decodes with aten's
kernels as before.

- bf16: the model's own [out, in] weight, no copy. AVX512-BF16's dot product where the CPU has it
  (Zen 4, Sapphire Rapids), fp32 multiply-adds on the bf16 widened by a shift on AVX2 (aten has no
  native kernel there: its bf16 matmul is emulated and 100x slower than fp32).
- int8 (AVX512-VNNI): one scale per output row, the activations quantized per call in blocks of 64
  (llama.cpp's q8 scheme), 64 multiply-adds per instruction.

A row's result does not depend on the rows beside it (see matvec.c), which continuous batching needs.
Rows from `MANY_ROWS` up (a prefill's blocks) go through aten's matmul, which is built for them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SOURCE = Path(__file__).with_name("matvec.c")
# From this many rows up, aten's matmul (a prefill's blocks); below it, these loops (every decode batch
# `palm serve` makes). At 1b on a Zen 4 EPYC the two cost about the same at 64 rows.
MANY_ROWS = 64


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags Linux reports for this CPU (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "palm" / "kernels"


def build(source: Path = SOURCE, folder: Path | None = None, compiler: str | None = None) -> Path | None:
    """The shared library built from `source`, compiled once per source and compiler into `folder`;
    None where there is no compiler or it fails (palm then decodes with aten's kernels)."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    text = source.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(text + version).hexdigest()[:16]
    folder = folder or cache_dir()
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Compiled beside its final name, then renamed: a process reading the cache never sees half a library.
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / target.name
            flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11"]
            done = subprocess.run([cc, *flags, str(source), "-o", str(built), "-lm"], capture_output=True, timeout=300)
            if done.returncode != 0:
                return None
            os.replace(built, target)
    except (OSError, subprocess.SubprocessError):
        return None
    return target


class Library:
    """The loaded kernels and which of them this CPU runs."""

    def __init__(self, path: Path, flags: frozenset[str]):
        # torch is imported first, so the library's libgomp is torch's own: one OpenMP thread pool.
        self.lib = ctypes.CDLL(str(path))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for name in ("palm_bf16_avx512", "palm_bf16_avx2"):
            getattr(self.lib, name).argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
            getattr(self.lib, name).restype = None
        self.lib.palm_int8_vnni.argtypes = [ptr, ctypes.c_int, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        self.lib.palm_int8_vnni.restype = ctypes.c_int
        avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
        self.bf16 = (
            self.lib.palm_bf16_avx512
            if avx512 and "avx512_bf16" in flags
            else self.lib.palm_bf16_avx2
            if {"avx2", "fma"} <= flags
            else None
        )
        self.int8 = avx512 and "avx512_vnni" in flags


def library() -> Library | None:
    """The kernels for this process, built or found in the cache on first call; None where they cannot be.
    PALM_MATVEC=0 turns them off (aten's kernels decode, as without a compiler)."""
    return None if os.environ.get("PALM_MATVEC", "1") == "0" else _load()


@functools.cache
def _load() -> Library | None:
    path = build()
    if path is None:
        return None
    try:
        return Library(path, cpu_flags())
    except (OSError, AttributeError):  # a library from another build of the source: rebuilt next time
        path.unlink(missing_ok=True)
        return None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


_LIBRARY = torch.library.Library("palm", "FRAGMENT")
_LIBRARY.define("matvec_bf16(Tensor x, Tensor weight) -> Tensor")
_LIBRARY.define("matvec_int8(Tensor x, Tensor weight, Tensor scale) -> Tensor")


def _matvec_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    lib = library()
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # the loop reads bf16 and nothing else
    y = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.bfloat16)
    lib.bf16(
        _ptr(rows), _ptr(weight), _ptr(y), rows.shape[0], weight.shape[1], weight.shape[0], torch.get_num_threads()
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _matvec_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    lib = library()
    rows = x.reshape(-1, x.shape[-1])
    rows = (rows if rows.dtype in (torch.bfloat16, torch.float32) else rows.float()).contiguous()
    y = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.bfloat16)
    fp32 = int(rows.dtype == torch.float32)
    n, k, out = rows.shape[0], weight.shape[1], weight.shape[0]
    if lib.lib.palm_int8_vnni(_ptr(rows), fp32, _ptr(weight), _ptr(scale), _ptr(y), n, k, out, torch.get_num_threads()):
        raise MemoryError("no memory for the quantized activations of an int8 matmul")
    return y.reshape(*x.shape[:-1], weight.shape[0])


_LIBRARY.impl("matvec_bf16", _matvec_bf16, "CPU")
_LIBRARY.impl("matvec_int8", _matvec_int8, "CPU")


@torch.library.register_fake("palm::matvec_bf16")
def _matvec_bf16_shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.bfloat16)


@torch.library.register_fake("palm::matvec_int8")
def _matvec_int8_shape(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.bfloat16)


def int8_rows(weight: torch.Tensor, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output channel) of `weight` [out, in], `rows` rows at a time, so that
    the fp32 working copies stay small beside a 1B model's largest matrices (hundreds of MB whole)."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], rows):
        block = w[start : start + rows].to(torch.float32, copy=True)  # never the weight itself
        s = (block.abs().amax(1) / 127).clamp(min=1e-12)
        q[start : start + rows] = block.div_(s[:, None]).round_().clamp_(-127, 127)
        scales[start : start + rows] = s
    return q, scales


def bf16_available(weight: torch.Tensor) -> bool:
    lib = library() if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 else None
    return lib is not None and lib.bf16 is not None


def int8_available(weight: torch.Tensor) -> bool:
    lib = library() if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 else None
    return lib is not None and lib.int8


class MatvecBf16(nn.Module):
    """bf16 `x @ W.T` on the model's own weight (no copy): palm's loop for a few rows, aten's for many."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())  # the model's own tensor, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] >= MANY_ROWS:
            return F.linear(x, self.weight)
        return torch.ops.palm.matvec_bf16(x, self.weight)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class MatvecInt8(nn.Module):
    """int8 weights (stored +128, as VNNI multiplies them), one fp32 scale per output row."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach()
        q, scale = int8_rows(w)
        q = torch.bitwise_xor(q, -128).view(torch.uint8)  # flipping the top bit adds 128
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.dtype = w.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] >= MANY_ROWS:
            # int8 values are exact in bf16: the weight widened for the call, as aten's int8 path does for prefill.
            w = torch.bitwise_xor(self.weight.view(torch.int8), -128).to(x.dtype)  # flipping the top bit takes 128 off
            return F.linear(x, w) * self.scale.to(x.dtype)
        return torch.ops.palm.matvec_int8(x, self.weight, self.scale)

    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4
