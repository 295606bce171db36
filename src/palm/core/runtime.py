"""Where palm computes and in what precision: the one home for device, dtype and thread choices.

bf16 is chosen by capability, never by device name: CUDA with bf16 support, or a CPU with AMX or
AVX512-BF16 matrix instructions. Elsewhere (an AVX2-only CPU emulates bf16 ~100x slower than fp32)
palm computes in fp32. `PALM_FAST_BF16=1` or `=0` overrides the capability check, so that either path
can be exercised on any machine (the test suite runs both ways).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .errors import PalmError

FAST_BF16_ENV = "PALM_FAST_BF16"
DTYPES = ("auto", "bf16", "fp32")


class RuntimeSettingError(PalmError):
    """A device, dtype or thread setting that this machine cannot honour."""


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native on `device` (tensor cores, AMX or AVX512-BF16), or forced by PALM_FAST_BF16."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def pick_device(name: str | None = None) -> torch.device:
    """The named device, else CUDA where there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RuntimeSettingError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeSettingError(f"device {name} was asked for, but this machine has no CUDA GPU")
    return device


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The compute dtype for "auto" (bf16 where it is native, else fp32), "bf16" or "fp32"."""
    if setting not in DTYPES:
        raise RuntimeSettingError(f"dtype must be one of {', '.join(DTYPES)}, not {setting!r}")
    if setting == "bf16" or (setting == "auto" and fast_bf16(device)):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast when `dtype` is bf16 (weights stay fp32 masters), a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the body with `count` intra-op threads (None: leave torch's choice), then restore the old count."""
    if count is None:
        yield
        return
    if count < 1:
        raise RuntimeSettingError(f"thread count must be positive, not {count}")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
