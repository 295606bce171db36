"""palm import --format cohere: palm's own export comes back bitwise; Transformers' random CohereForCausalLM
models (multi-head, grouped, multi-query, their own logit scale and RoPE theta) give the same logits and
greedy tokens in palm, with their own tokenizer and chat template; what palm cannot run is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, lively_model, run_cli, tiny_config
from safetensors import safe_open

from palm.export import export, import_model
from palm.export.importing import write_shards
from palm.inference.generate import Generator, SamplingConfig
from palm.text.chat import encode_prompt
from palm.weights.modeldir import load_model, quiet_transformers

TEXTS = ["我喜欢编程，因为它让我的大脑跳跃。", "the theme of the thesis", "x = 42;  y = x * 7"]
COHERE_SPECIALS = [
    "<PAD>",
    "<UNK>",
    "<CLS>",
    "<SEP>",
    "<MASK_TOKEN>",
    "<BOS_TOKEN>",
    "<EOS_TOKEN>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
    "<|SYSTEM_TOKEN|>",
]
COHERE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|START_OF_TURN_TOKEN|>{% if m['role'] == 'user' %}<|USER_TOKEN|>"
    "{% elif m['role'] == 'system' %}<|SYSTEM_TOKEN|>{% else %}<|CHATBOT_TOKEN|>{% endif %}{{ m['content'] }}"
    "<|END_OF_TURN_TOKEN|>{% endfor %}{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    "{% endif %}"
)


def stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update((k, f.get_tensor(k)) for k in f.keys())
    return out


def cohere_tokenizer(template: bool = True):
    """A byte-level BPE with Command-R's special tokens and turn markup, built offline."""
    from transformers import CohereTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {t: i for i, t in enumerate(COHERE_SPECIALS)}
    vocab.update((ch, len(COHERE_SPECIALS) + i) for i, ch in enumerate(bytes_to_unicode().values()))
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġthe", "s"), ("ç", "¼")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CohereTokenizer(vocab=vocab, merges=merges, extra_special_tokens=COHERE_SPECIALS[7:], add_bos_token=True)
    tok.chat_template = COHERE_TEMPLATE if template else None
    return tok


def cohere_dir(
    out: Path, *, heads=4, kv=4, head_dim=None, hidden=64, seed=0, dtype=torch.float32, template=True, **extra
) -> Path:
    """A randomly initialised CohereForCausalLM with enough spread in its weights that greedy tokens vary."""
    from transformers import CohereConfig, CohereForCausalLM

    tok = cohere_tokenizer(template)
    config = CohereConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.3,
        **extra,
    )
    if head_dim is not None:
        config.head_dim = head_dim
    torch.manual_seed(seed)
    model = CohereForCausalLM(config).to(dtype).eval()
    with quiet_transformers():
        model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("palm-tiny")
    lively_model(tiny_config(tokenizer, num_key_value_heads=2)).save_pretrained(str(out))
    tokenizer.save(out)
    return out


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_import_of_an_export_is_bitwise_the_model(tiny_dir, tokenizer, tmp_path, dtype):
    back = tmp_path / "back"
    config = import_model("cohere", export("cohere", tiny_dir, tmp_path / "cohere", dtype), back)
    original, returned = stored(tiny_dir), stored(back)
    assert set(returned) == set(original) - {"lm_head.weight"}
    for name, tensor in returned.items():
        want = original[name] if dtype is None else original[name].to(torch.bfloat16)
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
    assert config.head_scale == 64**-0.5 and config.num_key_value_heads == 2
    model, tok = load_model(back, device="cpu", dtype="fp32")
    assert [tok.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]
    assert tok.own and tok.hf.chat_template == tokenizer.hf.chat_template
    if dtype is None:
        reference, _ = load_model(tiny_dir, device="cpu", dtype="fp32")
        ids = torch.tensor([tokenizer.encode(TEXTS[0])])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)


VARIANTS = {
    "multi-head": dict(heads=4, kv=4),
    "grouped": dict(heads=4, kv=2),
    "multi-query, head_dim 32": dict(heads=4, kv=1, head_dim=32),
    "palm's scale and theta": dict(
        heads=2, kv=1, logit_scale=0.125, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_random_transformers_cohere_model_runs_the_same_in_palm(variant, tmp_path):
    from transformers import AutoTokenizer, CohereForCausalLM

    source = cohere_dir(tmp_path / "cohere", **VARIANTS[variant])
    import_model("cohere", source, tmp_path / "palm")
    reference = CohereForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    model, tok = load_model(tmp_path / "palm", device="cpu", dtype="fp32")
    hf_tok = AutoTokenizer.from_pretrained(str(source))
    generator = Generator(model, tok)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text).input_ids and ids[0] == hf_tok.bos_token_id
        x = torch.tensor([ids])
        with torch.no_grad():
            want, got = reference(x).logits, model(x).logits
            assert (want - got).abs().max() < 1e-5, variant
            greedy = dict(do_sample=False, max_new_tokens=24, min_new_tokens=24, repetition_penalty=1.0)
            want_tokens = reference.generate(x, **greedy)[0, len(ids) :].tolist()
            assert model.generate(x, **greedy)[0, len(ids) :].tolist() == want_tokens
        fast = generator.generate([ids], SamplingConfig(max_new_tokens=24))[0].token_ids
        assert fast == want_tokens[: len(fast)] and len(set(want_tokens)) > 2
    # the model's own chat template and special tokens, as AutoTokenizer renders them
    conversation = [{"role": "user", "content": "hi"}]
    assert (
        encode_prompt(tok, conversation)
        == hf_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert AutoTokenizer.from_pretrained(str(tmp_path / "palm")).chat_template == COHERE_TEMPLATE


def test_an_imported_model_takes_palm_generate_and_chat(tmp_path, capsys):
    source = cohere_dir(tmp_path / "cohere", heads=4, kv=1)
    code, out, err = run_cli(
        capsys, "import", "--format", "cohere", "--model", str(source), "--out", str(tmp_path / "m")
    )
    assert code == 0 and "wrote" in out, err
    code, out, err = run_cli(
        capsys, "generate", "我喜欢编程，因为", "--model", str(tmp_path / "m"), "--max-new-tokens", "8", "--seed", "1"
    )
    assert code == 0 and out.strip(), err
    code, out, err = run_cli(
        capsys,
        "generate",
        "say <|END_OF_TURN_TOKEN|> now",
        "--model",
        str(tmp_path / "m"),
        "--chat",
        "--max-new-tokens",
        "4",
    )
    assert_one_line_error(code, err, "<|END_OF_TURN_TOKEN|>")
    bare = cohere_dir(tmp_path / "bare", template=False)
    run_cli(capsys, "import", "--format", "cohere", "--model", str(bare), "--out", str(tmp_path / "b"))
    code, out, err = run_cli(capsys, "generate", "hi", "--model", str(tmp_path / "b"), "--chat")
    assert_one_line_error(code, err, "no chat template")


def test_shards_stream_and_index(tmp_path):
    weights = [(f"w{i}", torch.full((256,), float(i))) for i in range(10)]  # 1 KB each
    write_shards(tmp_path, iter(weights), shard_bytes=3000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5 and index["metadata"]["total_size"] == 10 * 1024
    assert all(torch.equal(stored(tmp_path)[n], t) for n, t in weights)


REFUSALS = {
    "use_qk_norm": (dict(use_qk_norm=True), "use_qk_norm"),
    "rope scaling": (
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        "rope_parameters",
    ),
    "untied head": (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    "attention bias": (dict(attention_bias=True), "attention_bias"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_layouts_palm_cannot_run_are_one_line(case, tmp_path, capsys):
    extra, words = REFUSALS[case]
    source = cohere_dir(tmp_path / "cohere", **extra)
    code, _, err = run_cli(capsys, "import", "--format", "cohere", "--model", str(source), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, words)
    assert not (tmp_path / "o").exists()


def test_bad_directories_are_one_line(tmp_path, capsys, tiny_dir):
    source = cohere_dir(tmp_path / "cohere")

    def refused(folder, *words, fmt="cohere"):
        code, _, err = run_cli(capsys, "import", "--format", fmt, "--model", str(folder), "--out", str(tmp_path / "o"))
        assert_one_line_error(code, err, *words)
        assert not (tmp_path / "o").exists()

    refused(tmp_path / "missing", "no model directory")
    refused(source, "unknown format", fmt="llama")
    refused(tiny_dir, "'palm' model")
    cfg = json.loads((source / "config.json").read_text())
    (tmp_path / "cohere2").mkdir()
    (tmp_path / "cohere2" / "config.json").write_text(json.dumps({**cfg, "model_type": "cohere2"}))
    refused(tmp_path / "cohere2", "sliding-window")
    bad = tmp_path / "shape"
    shutil.copytree(source, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    refused(bad, "mlp.gate_proj.weight")
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "two"}))
    refused(bad, "config")
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    refused(bad, "model.layers.2")
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    refused(bad, "safetensors")
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"x")
    refused(bad, "pickled")
    shutil.copytree(source, tmp_path / "notok")
    (tmp_path / "notok" / "tokenizer.json").unlink()
    refused(tmp_path / "notok", "tokenizer.json")
