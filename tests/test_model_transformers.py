"""palm's model as Transformers' tools use it: attention backends, masks, caches, outputs, export,
compile, and the generate() strategies (all in fp32, compared to 1e-5 or exactly)."""

import warnings

import pytest
import torch
from conftest import lively_model, tiny_config
from transformers import DynamicCache, StaticCache

from palm.inference.generate import KVCache, forward_step
from palm.inference.kvcache import attention_mask, decode_mask

PROMPTS = ["我喜欢编程，因为", "The quick brown fox", "x = 12"]


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively_model(tiny_config(tokenizer))


@pytest.fixture(scope="module")
def batch(tokenizer_dir):
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(tokenizer_dir)(PROMPTS, return_tensors="pt", padding=True)
    assert (encoded.attention_mask == 0).any()  # left padding is exercised
    return encoded


def test_eager_and_sdpa_give_the_same_logits(tokenizer, batch):
    outs = {}
    for implementation in ("eager", "sdpa"):
        m = lively_model(tiny_config(tokenizer, attn_implementation=implementation))
        assert m.config._attn_implementation == implementation
        with torch.no_grad():
            outs[implementation] = m(**batch).logits
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(outs["eager"][mask], outs["sdpa"][mask], rtol=1e-5, atol=1e-5)


def test_hidden_states_and_attentions_per_layer(model, batch):
    n, T = model.config.num_hidden_layers, batch.input_ids.shape[1]
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        plain = model(**batch)
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n
    assert all(h.shape == (len(PROMPTS), T, model.config.hidden_size) for h in out.hidden_states)
    assert all(a.shape == (len(PROMPTS), model.config.num_attention_heads, T, T) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(len(PROMPTS), model.config.num_attention_heads, T))
    full = int(batch.attention_mask.all(-1).nonzero()[0])  # a row without padding: exactly causal
    assert torch.equal(out.attentions[0][full].triu(1), torch.zeros_like(out.attentions[0][full]))
    real = batch.attention_mask.bool()  # padding positions are never read, and differ between kernels
    torch.testing.assert_close(out.logits[real], plain.logits[real], rtol=1e-5, atol=1e-5)  # the eager path agrees
    torch.testing.assert_close(out.hidden_states[-1][real], model.model(**batch).last_hidden_state[real])


def test_return_dict_false_gives_tuples(model, batch):
    with torch.no_grad():
        out = model(**batch, return_dict=False, use_cache=False)
        base = model.model(**batch, return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and torch.equal(out[0], model(**batch).logits)
    assert isinstance(base, tuple) and base[0].shape[-1] == model.config.hidden_size


def test_past_key_values_is_accepted_with_a_deprecation_warning(model, batch):
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = model(**batch, past_key_values=DynamicCache(config=model.config)).logits
    assert any("past_key_values" in str(w.message) for w in caught)
    with torch.no_grad():
        torch.testing.assert_close(old, model(**batch, cache=DynamicCache(config=model.config)).logits)


def test_a_4d_mask_equals_the_2d_mask_it_stands_for(model, batch):
    pad = batch.attention_mask.bool()
    T = pad.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask4d = causal[None, None] & pad[:, None, None, :]
    mask4d |= torch.eye(T, dtype=torch.bool)[None, None]  # padding queries see themselves
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
        b = model(input_ids=batch.input_ids, attention_mask=mask4d, position_ids=positions).logits
    torch.testing.assert_close(a[pad], b[pad], rtol=1e-5, atol=1e-5)


def test_static_cache_greedy_equals_dynamic_cache_greedy(model, batch):
    kw = dict(max_new_tokens=12, do_sample=False)
    dynamic = model.generate(**batch, **kw)
    static = model.generate(**batch, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)
    assert len(set(dynamic[0, batch.input_ids.shape[1] :].tolist())) > 3


def test_static_cache_forward_matches_full_forward(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("我喜欢编程，因为 it is fun")])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = StaticCache(config=model.config, max_cache_len=64)
        first = model(ids[:, :5], cache=cache).logits
        rest = model(ids[:, 5:], cache=cache, position_ids=torch.arange(5, ids.shape[1])[None]).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_torch_export_takes_the_whole_forward(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("export me, 42 times")])
    exported = torch.export.export(model, args=(), kwargs={"input_ids": ids, "use_cache": False}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(input_ids=ids, use_cache=False).logits, model(ids).logits)


def test_compiled_full_graph_decode_step_equals_eager(model, tokenizer):
    prompt = torch.tensor([tokenizer.encode("compile the decode step")])
    size, T = 32, prompt.shape[1]

    def prefilled() -> tuple[KVCache, torch.Tensor]:
        cache, filled = (
            KVCache(model.config, 1, size, torch.float32, torch.device("cpu")),
            torch.zeros(1, size, dtype=torch.bool),
        )
        filled[:, :T] = True
        slots = torch.arange(T)[None]
        forward_step(model, cache, prompt, slots, slots, attention_mask(filled, slots))
        filled[:, T] = True  # the slot the decode step writes
        return cache, filled

    token, slot = torch.tensor([[7]]), torch.tensor([[T]])
    compiled_step = torch.compile(forward_step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        cache, filled = prefilled()
        eager = forward_step(model, cache, token, slot, slot, decode_mask(filled))
        cache, filled = prefilled()
        compiled = compiled_step(model, cache, token, slot, slot, decode_mask(filled))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ---- generate() strategies ----------------------------------------------------------------------------


def greedy(model, batch, **kw):
    return model.generate(**batch, max_new_tokens=10, do_sample=False, **kw)


def test_return_dict_in_generate_carries_scores_logits_hidden_states_and_attentions(model, batch):
    out = greedy(
        model,
        batch,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_hidden_states=True,
        output_attentions=True,
    )
    n = model.config.num_hidden_layers
    assert torch.equal(out.sequences, greedy(model, batch))
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == len(out.attentions) == 10
    assert out.scores[0].shape == (len(PROMPTS), model.config.vocab_size)
    assert torch.equal(out.logits[0].argmax(-1), out.sequences[:, batch.input_ids.shape[1]])
    assert len(out.hidden_states[0]) == n + 1 and len(out.attentions[0]) == n
    assert out.attentions[1][0].shape[-2:] == (1, batch.input_ids.shape[1] + 1)  # one query over the cache


def test_beam_search_runs_and_one_beam_is_greedy(model, batch):
    beams = model.generate(**batch, max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=2)
    assert beams.shape[0] == 2 * len(PROMPTS)
    one = model.generate(**batch, max_new_tokens=8, num_beams=1, do_sample=False)
    assert torch.equal(one, model.generate(**batch, max_new_tokens=8, do_sample=False))


def test_assisted_decoding_with_a_draft_model_equals_greedy(model, tokenizer):
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    draft = lively_model(tiny_config(tokenizer, num_hidden_layers=1), seed=1)
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft), expected)
    # with attentions asked for, which assisted decoding reads from the eager path
    out = model.generate(
        ids,
        max_new_tokens=12,
        do_sample=False,
        assistant_model=draft,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)


def test_prompt_lookup_decoding_equals_greedy(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("a b c d a b c d a b c d a b")])
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3), expected)
