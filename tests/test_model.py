import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import lively_model, tiny_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache

from palm import PalmConfig, PalmForCausalLM
from palm.model.model import CACHE_FIELD, lm_loss

PROMPTS = ["我喜欢编程，因为", "The quick brown fox", "x = 12"]


def greedy(model, input_ids, **kw):
    return model.generate(input_ids, max_new_tokens=12, do_sample=False, **kw)


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively_model(tiny_config(tokenizer))


def reference_forward(model: PalmForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The paper's equations written out naively: separate matmuls, explicit softmax, K/V copied per head."""
    c = model.config
    H, KV, D, f = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    T = ids.shape[1]
    x = model.model.embed_tokens.weight[ids]
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / c.rope_theta ** (torch.arange(0, D, 2).float() / D)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)

    def rope(t):
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return t * ang.cos() + torch.cat([-b, a], -1) * ang.sin()

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for blk in model.model.layers:
        h = F.layer_norm(x, (c.hidden_size,), blk.ln.weight, None, c.layer_norm_eps)
        Wq, Wk, Wv, Wg, Wu = blk.in_proj.weight.split([H * D, KV * D, KV * D, f, f], 0)
        q = (h @ Wq.T).view(1, T, H, D).transpose(1, 2)
        k = (h @ Wk.T).view(1, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
        v = (h @ Wv.T).view(1, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
        s = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(D)
        a = s.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        attn = a.transpose(1, 2).reshape(1, T, H * D) @ blk.attn_out.weight.T
        mlp = (F.silu(h @ Wg.T) * (h @ Wu.T)) @ blk.mlp_out.weight.T
        x = x + attn + mlp
    x = F.layer_norm(x, (c.hidden_size,), model.model.norm.weight, None, c.layer_norm_eps)
    return x @ model.model.embed_tokens.weight.T / math.sqrt(c.hidden_size)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_matches_the_paper_equations(tokenizer, kv_heads):
    model = lively_model(tiny_config(tokenizer, num_key_value_heads=kv_heads))
    ids = torch.tensor([tokenizer.encode("我喜欢编程，因为 it is fun 123")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_forward(model, ids), rtol=1e-4, atol=1e-4)


def test_block_structure_has_no_biases_and_one_fused_input(model):
    c = model.config
    assert all(getattr(m, "bias", None) is None for m in model.modules())
    blk = model.model.layers[0]
    fused = c.num_attention_heads * c.head_dim + 2 * c.head_dim + 2 * c.intermediate_size
    assert tuple(blk.in_proj.weight.shape) == (fused, c.hidden_size)
    assert c.intermediate_size == 4 * c.hidden_size
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in blk.modules()) == 1


def test_paper_initialisation():
    torch.manual_seed(0)
    model = PalmForCausalLM(PalmConfig.from_preset("tiny", vocab_size=4096))
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    assert abs(emb.std().item() - 1.0) < 0.02
    blk = model.model.layers[0]
    for lin in (blk.in_proj, blk.attn_out, blk.mlp_out):
        assert abs(lin.weight.std().item() * math.sqrt(lin.in_features) - 1.0) < 0.05
    assert torch.equal(blk.ln.weight, torch.ones_like(blk.ln.weight))


def test_causality(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog")])
    t = ids.shape[1] // 2
    changed = ids.clone()
    changed[0, t] = (changed[0, t] + 7) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_loss_is_cross_entropy_plus_z_loss(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("hello world, again and again")])
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[0, :-1]
    ce = F.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
    z = logits.logsumexp(-1)[labels[0, 1:] != -100].square().mean()
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.z_loss, z)
    torch.testing.assert_close(out.loss, ce + 1e-4 * z)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad()


def test_skip_logits_gives_the_same_loss_and_gradients_without_logits(tokenizer):
    model = lively_model(tiny_config(tokenizer))
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x * 2  # twice")] * 2)
    full = model(ids, labels=ids)
    full.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fused = model(ids, labels=ids, skip_logits=True)
    fused.loss.backward()
    assert fused.logits is None
    for name in ("loss", "lm_loss", "z_loss"):
        torch.testing.assert_close(getattr(fused, name), getattr(full, name))
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)
    # shift_labels (Transformers' name) are targets already aligned with the positions
    aligned = model(ids[:, :-1], shift_labels=ids[:, 1:], skip_logits=True)
    with torch.no_grad():
        ce, _ = lm_loss(model(ids[:, :-1]).logits, ids[:, 1:])
    torch.testing.assert_close(aligned.lm_loss.detach(), ce)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generate_same_with_and_without_cache(model, tokenizer, prompt):
    ids = torch.tensor([tokenizer.encode(prompt)])
    cached, uncached = greedy(model, ids), greedy(model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, ids.shape[1] :].tolist())) > 3  # the test model does not just repeat itself


def test_left_padded_batch_matches_each_prompt_alone(model, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = hf(PROMPTS, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    together = greedy(model, batch.input_ids, attention_mask=batch.attention_mask)
    for row, prompt in enumerate(PROMPTS):
        alone = greedy(model, hf(prompt, return_tensors="pt").input_ids)
        assert together[row, -12:].tolist() == alone[0, -12:].tolist()


def test_cached_forward_matches_full_forward(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("我喜欢编程，因为 it is fun")])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :5], cache=cache).logits
        rest = model(ids[:, 5:], cache=cache).logits  # chunked prefill on top of a cache
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_cache_holds_only_the_kv_heads(tokenizer, kv_heads):
    model = lively_model(tiny_config(tokenizer, num_key_value_heads=kv_heads))
    ids = torch.tensor([tokenizer.encode("multi-query attention")])
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (1, kv_heads, ids.shape[1], model.config.head_dim)
        assert tuple(layer.values.shape) == (1, kv_heads, ids.shape[1], model.config.head_dim)


def test_save_and_reload_gives_identical_logits(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is PalmForCausalLM
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.tensor([tokenizer.encode("round trip 42")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_bfloat16_load_generates(model_dir, tokenizer):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    out = greedy(m, torch.tensor([tokenizer.encode("我喜欢编程，因为")]))
    assert out.shape[1] > len(tokenizer.encode("我喜欢编程，因为"))


def test_activation_checkpointing_gives_the_same_gradients(tokenizer):
    ids = torch.tensor([tokenizer.encode("gradient checkpointing keeps gradients")])
    grads = []
    for checkpointing in (False, True):
        model = lively_model(tiny_config(tokenizer)).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert model.model.layers[0].gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].in_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_dropout_acts_in_training_only_and_old_configs_load(tokenizer, tmp_path):
    ids = torch.tensor([tokenizer.encode("我喜欢编程，因为 it is fun 123")])
    plain = lively_model(tiny_config(tokenizer))
    dropped = lively_model(tiny_config(tokenizer, dropout=0.1, attention_dropout=0.1))
    with torch.no_grad():
        torch.testing.assert_close(dropped(ids).logits, plain(ids).logits, rtol=0, atol=0)  # eval: no dropout
        dropped.train()
        plain.train()
        torch.manual_seed(0)
        a = dropped(ids, use_cache=False).logits
        torch.manual_seed(0)
        b = dropped(ids, use_cache=False).logits
        torch.manual_seed(1)
        c = dropped(ids, use_cache=False).logits
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert torch.equal(plain(ids, use_cache=False).logits, plain.eval()(ids, use_cache=False).logits)
    # A config.json written before the dropout fields existed loads with dropout off.
    plain.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dropout"), config.pop("attention_dropout")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config.dropout == 0.0 and loaded.config.attention_dropout == 0.0
    with pytest.raises(ValueError):
        PalmConfig(dropout=1.0)
