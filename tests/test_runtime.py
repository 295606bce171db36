import pytest
import torch

from palm.core.runtime import FAST_BF16_ENV, RuntimeSettingError, fast_bf16, pick_device, pick_dtype, torch_threads

CPU = torch.device("cpu")


def test_bf16_is_chosen_by_capability(monkeypatch):
    monkeypatch.delenv(FAST_BF16_ENV, raising=False)
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert fast_bf16(CPU) == native
    assert pick_dtype("auto", CPU) == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("forced, expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_the_override_forces_either_branch_on_any_machine(monkeypatch, forced, expected):
    monkeypatch.setenv(FAST_BF16_ENV, forced)
    assert fast_bf16(CPU) is (forced == "1")
    assert pick_dtype("auto", CPU) == expected
    assert pick_dtype("fp32", CPU) == torch.float32  # an explicit dtype wins over the check
    assert pick_dtype("bf16", CPU) == torch.bfloat16


def test_bad_settings_are_typed_errors():
    with pytest.raises(RuntimeSettingError, match="dtype"):
        pick_dtype("fp16", CPU)
    with pytest.raises(RuntimeSettingError, match="device"):
        pick_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeSettingError, match="no CUDA"):
            pick_device("cuda")


def test_thread_count_is_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeSettingError):
        with torch_threads(0):
            pass
