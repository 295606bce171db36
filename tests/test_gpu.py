"""The CUDA paths: bf16 training steps, the compiled decode step with CUDA graphs, attention kernels.

Each test needs a CUDA GPU and is skipped without one (`bench/gpu_check.sh` runs them on a GPU).
"""

import pytest
import torch
from conftest import lively_model, tiny_config

from palm.core.runtime import autocast, fast_bf16, pick_dtype
from palm.inference.generate import Generator, SamplingConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
PROMPTS = ["我喜欢编程，因为", "The quick brown fox jumps", "x = 12"]


def test_auto_dtype_is_bf16_on_a_bf16_gpu():
    assert fast_bf16(CUDA) == torch.cuda.is_bf16_supported()
    assert pick_dtype("auto", CUDA) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)


def test_bf16_training_step_tracks_fp32(tokenizer):
    ids = torch.tensor([tokenizer.encode("我喜欢编程，因为 it is fun 123 " * 8)])
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = lively_model(tiny_config(tokenizer)).to(CUDA).train()
        with autocast(CUDA, dtype):
            out = model(input_ids=ids.to(CUDA), labels=ids.to(CUDA), skip_logits=True)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        losses[dtype] = out.loss.item()
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=1e-2)


def test_compiled_decode_with_cuda_graphs_equals_eager(tokenizer):
    model = lively_model(tiny_config(tokenizer)).to(CUDA)
    cfg = SamplingConfig(max_new_tokens=16)
    eager = Generator(model, tokenizer).generate(PROMPTS, cfg)
    compiled = Generator(model, tokenizer, compile=True).generate(PROMPTS, cfg)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_kernels_agree_in_bf16(tokenizer, implementation):
    ids = torch.tensor([tokenizer.encode("attention kernels, 2048 times")]).to(CUDA)
    reference = lively_model(tiny_config(tokenizer)).to(CUDA)
    other = lively_model(tiny_config(tokenizer, attn_implementation=implementation)).to(CUDA, torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits.float(), reference(ids).logits, rtol=5e-2, atol=5e-2)
