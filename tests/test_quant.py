"""The decoder's weight formats (palm.inference.quant): the same function in fewer bytes, compilable whole."""

import pytest
import torch
from conftest import lively_model, tiny_config

from palm.inference.generate import Generator, SamplingConfig
from palm.inference.quant import QuantizeError, decoding_model, fbgemm_available, weight_bytes

CPU = torch.device("cpu")
PROMPTS = ["我喜欢编程，因为", "The quick brown fox jumps", "x = 12"]
needs_fbgemm = pytest.mark.skipif(not fbgemm_available(CPU), reason="fbgemm kernels need an x86 CPU")


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively_model(tiny_config(tokenizer))


def agreement(model, decoder, tokenizer) -> float:
    """Share of the model's greedy tokens the decoder also picks, teacher-forced on them."""
    agree = total = 0
    for done, prompt in zip(Generator(model, tokenizer).generate(PROMPTS, SamplingConfig(max_new_tokens=24)), PROMPTS):
        context = tokenizer.encode(prompt)
        ids = torch.tensor([context + done.token_ids])
        with torch.no_grad():
            choices = decoder(ids).logits[0, len(context) - 1 : -1].argmax(-1)
        agree += int((choices == torch.tensor(done.token_ids)).sum())
        total += len(done.token_ids)
    return agree / total


def test_the_transposed_layout_is_the_same_function_and_leaves_the_model_alone(model):
    decoder = decoding_model(model, "none")
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(decoder(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert type(model.lm_head) is torch.nn.Linear and type(decoder.lm_head) is not torch.nn.Linear
    assert decoder.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, not copied
    assert weight_bytes(decoder) == weight_bytes(model)


@needs_fbgemm
@pytest.mark.parametrize("quantize, share, least", [("int8", 4, 0.85), ("fp16", 2, 0.97)])
def test_quantized_weights_read_fewer_bytes_and_mostly_agree(model, tokenizer, quantize, share, least):
    decoder = decoding_model(model, quantize)
    assert weight_bytes(decoder) <= weight_bytes(model) / share * 1.1  # int8 carries a scale per channel
    assert agreement(model, decoder, tokenizer) >= least


def test_weight_only_int8_off_fbgemm_dequantizes_in_the_matmul(model, tokenizer, monkeypatch):
    import palm.inference.quant

    monkeypatch.setattr(palm.inference.quant, "fbgemm_available", lambda device: False)
    decoder = decoding_model(model, "int8")
    assert decoder.lm_head.weight.dtype == torch.int8
    assert agreement(model, decoder, tokenizer) >= 0.85
    with pytest.raises(QuantizeError, match="fbgemm"):
        decoding_model(model, "fp16")


def test_an_unknown_format_is_refused(model):
    with pytest.raises(QuantizeError, match="int8"):
        decoding_model(model, "int4")


@needs_fbgemm
def test_fbgemm_weights_compile_in_one_graph(model):
    layer = decoding_model(model, "int8").lm_head
    x = torch.randn(3, 1, model.config.hidden_size)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), layer(x))


@needs_fbgemm
def test_the_generator_decodes_int8_weights_repeatably(model, tokenizer):
    gen = Generator(model, tokenizer, quantize="int8")
    cfg = SamplingConfig(max_new_tokens=12)
    first, again = gen.generate(PROMPTS[:1], cfg)[0], gen.generate(PROMPTS[:1], cfg)[0]
    assert first.token_ids == again.token_ids and len(first.token_ids) == 12


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"),
    reason="aten's int8 x bf16 matmul is vectorised on AVX512 and AMX CPUs only",
)
def test_bf16_models_on_avx512_get_weight_only_int8_that_is_batch_exact(tokenizer, monkeypatch):
    from palm.inference.quant import Int8PackLinear

    monkeypatch.setenv("PALM_MATVEC", "0")  # aten's kernel, what runs without palm's own (no C compiler)
    bf16 = lively_model(tiny_config(tokenizer)).to(torch.bfloat16)
    decoder = decoding_model(bf16, "int8")
    assert isinstance(decoder.lm_head, Int8PackLinear) and decoder.lm_head.weight.dtype == torch.int8
    assert agreement(bf16, decoder, tokenizer) >= 0.85
    x = torch.randn(5, 1, bf16.config.hidden_size, dtype=torch.bfloat16)
    together = decoder.lm_head(x)
    assert all(torch.equal(decoder.lm_head(x[i : i + 1]), together[i : i + 1]) for i in range(5))  # rows alone


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 kernels here")
def test_bf16_weights_prepacked_for_onednn_give_the_models_own_numbers(tokenizer, monkeypatch):
    from palm.inference.quant import OneDNNLinear

    monkeypatch.setenv("PALM_MATVEC", "0")  # oneDNN, what runs without palm's own kernels (no C compiler)
    bf16 = lively_model(tiny_config(tokenizer)).to(torch.bfloat16)
    decoder = decoding_model(bf16, "none")
    assert isinstance(decoder.lm_head, OneDNNLinear) and weight_bytes(decoder) == weight_bytes(bf16)
    ids = torch.randint(5, bf16.config.vocab_size, (3, 7))
    with torch.no_grad():
        assert torch.equal(decoder(ids).logits, bf16(ids).logits)
        assert torch.equal(decoder(ids[1:2]).logits, decoder(ids).logits[1:2])  # a row's numbers whatever its batch
    compiled = torch.compile(decoder.lm_head, fullgraph=True, dynamic=False)
    x = torch.randn(2, 1, bf16.config.hidden_size, dtype=torch.bfloat16)
    assert torch.equal(compiled(x), decoder.lm_head(x))


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decoding_in_place_frees_the_models_weights_and_decodes_the_same(tokenizer, quantize, dtype):
    import weakref

    cfg = SamplingConfig(max_new_tokens=16)
    expected = Generator(lively_model(tiny_config(tokenizer)).to(dtype), tokenizer, quantize=quantize).generate(
        PROMPTS, cfg
    )
    model = lively_model(tiny_config(tokenizer)).to(dtype)
    replaced = [weakref.ref(b.in_proj.weight) for b in model.model.layers] + [
        weakref.ref(model.model.layers[0].mlp_out.weight)
    ]
    embedding = model.model.embed_tokens.weight
    gen = Generator(model, tokenizer, quantize=quantize, in_place=True)
    assert gen.generate(PROMPTS, cfg) == expected
    assert all(ref() is None for ref in replaced)  # gone, not kept beside their decoding forms
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model.model.embed_tokens.weight is embedding  # still looked up


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"),
    reason="aten's int8 x bf16 matmul is vectorised on AVX512 and AMX CPUs only",
)
def test_int8_prefills_of_many_rows_compute_the_same_product(tokenizer):
    from palm.inference.quant import MANY_ROWS, Int8PackLinear

    w = torch.randn(96, 64)
    layer = Int8PackLinear(w.to(torch.bfloat16))
    x = torch.randn(MANY_ROWS + 3, 64, dtype=torch.bfloat16)
    many = layer(x)  # the widened weight
    few = torch.cat([layer(x[i : i + 8]) for i in range(0, len(x), 8)])  # aten's int8 kernel
    exact = (x.float() @ layer.weight.float().t()) * layer.scales.float()
    torch.testing.assert_close(many.float(), exact, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(many.float(), few.float(), rtol=2e-2, atol=2e-2)
