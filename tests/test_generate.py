"""palm's decoding path against Transformers' generate(), and the `palm generate` command."""

import copy
import re

import pytest
import torch
from conftest import lively_model, run_cli, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from palm.cli import main
from palm.inference.generate import GenerationError, Generator, KVCache, SamplingConfig
from palm.inference.sampling import sample_rows

PROMPTS = ["我喜欢编程，因为", "The quick brown fox jumps", "x = 12"]


@pytest.fixture(scope="module")
def generator(tokenizer):
    return Generator(lively_model(tiny_config(tokenizer)), tokenizer)


def hf_greedy(generator, tokenizer_dir, prompts, n):
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = hf(prompts, return_tensors="pt", padding=True)
    out = generator.model.generate(**batch, max_new_tokens=n, do_sample=False)
    rows = []
    for row in out[:, batch.input_ids.shape[1] :].tolist():
        ids = []
        for t in row:
            if t in generator.eos_ids:
                break
            ids.append(t)
        rows.append(ids)
    return rows


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS[1:2], PROMPTS], ids=["zh", "en", "left-padded batch"])
def test_greedy_equals_transformers_generate(generator, tokenizer_dir, prompts):
    ours = generator.generate(prompts, SamplingConfig(max_new_tokens=16))
    assert [c.token_ids for c in ours] == hf_greedy(generator, tokenizer_dir, prompts, 16)
    assert all(len(set(c.token_ids)) > 3 for c in ours)


def test_bf16_greedy_agrees_with_fp32_for_most_tokens(generator):
    """Teacher-forced on fp32's own greedy continuation, so one early flip cannot derail the rest."""
    bf16 = copy.deepcopy(generator.model).to(torch.bfloat16)
    agree = total = 0
    for prompt, done in zip(PROMPTS, generator.generate(PROMPTS, SamplingConfig(max_new_tokens=24))):
        context = generator.tokenizer.encode(prompt)
        ids = torch.tensor([context + done.token_ids])
        with torch.no_grad():
            choices = bf16(ids).logits[0, len(context) - 1 : -1].argmax(-1)
        agree += int((choices == torch.tensor(done.token_ids)).sum())
        total += len(done.token_ids)
    assert agree / total >= 0.9, agree / total


def test_batch_rows_equal_single_prompts(generator):
    cfg = SamplingConfig(max_new_tokens=10)
    together = generator.generate(PROMPTS, cfg)
    assert [c.token_ids for c in together] == [generator.generate([p], cfg)[0].token_ids for p in PROMPTS]


def test_seeded_sampling_repeats(generator):
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=7)
    a, b = generator.generate(PROMPTS[:1], cfg)[0], generator.generate(PROMPTS[:1], cfg)[0]
    other = generator.generate(PROMPTS[:1], SamplingConfig(**{**cfg.__dict__, "seed": 8}))[0]
    assert a.token_ids == b.token_ids and a.token_ids != other.token_ids
    assert "".join(generator.stream(PROMPTS[0], cfg)) == a.text


def test_stop_string_ends_the_text(generator):
    full = generator.generate(PROMPTS[1:2], SamplingConfig(max_new_tokens=24))[0].text
    stop = full[5:8]
    assert stop and full.find(stop) >= 5
    cut = generator.generate(PROMPTS[1:2], SamplingConfig(max_new_tokens=24, stop=[stop]))[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(generator.stream(PROMPTS[1], SamplingConfig(max_new_tokens=24, stop=[stop])))
    assert streamed == cut.text


def test_cache_holds_one_kv_head_per_layer(generator):
    cfg = generator.model.config
    cache = KVCache(cfg, batch=2, max_len=64, dtype=torch.float32, device=torch.device("cpu"))
    assert len(cache.keys) == cfg.num_hidden_layers
    assert all(tuple(k.shape) == (2, 1, 64, cfg.head_dim) for k in cache.keys + cache.values)
    multi_head = 2 * cfg.num_hidden_layers * 2 * cfg.num_attention_heads * 64 * cfg.head_dim * 4
    assert cache.nbytes() * cfg.num_attention_heads == multi_head


def test_stream_never_splits_a_character(generator, tokenizer, monkeypatch):
    char_bytes = [5 + b for b in "ꙮ".encode()]  # an unseen character: three byte tokens
    assert tokenizer.decode(char_bytes) == "ꙮ"
    ids = [tokenizer.encode("ab", bos=False)[0], *char_bytes, tokenizer.eos_id]
    monkeypatch.setattr(Generator, "token_stream", lambda self, prompts, cfg: (torch.tensor([t]) for t in ids))
    pieces = list(generator.stream("x", SamplingConfig(max_new_tokens=10)))
    assert "".join(pieces) == tokenizer.decode(ids[:-1]) and all("\ufffd" not in p for p in pieces)


def test_prompt_longer_than_the_context(generator):
    with pytest.raises(GenerationError, match="context"):
        generator.generate(["hello " * 400], SamplingConfig(max_new_tokens=4))


def test_bad_sampling_values():
    for bad in [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(stop=[""])]:
        with pytest.raises(GenerationError):
            SamplingConfig(**bad).validate()


def test_palm_generate_streams_and_summarises(capsys, model_dir):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "generate",
                "--model",
                model_dir,
                "--temperature",
                "0",
                "--repetition-penalty",
                "1.3",
                "--max-new-tokens",
                "6",
                "我喜欢编程，因为",
            ]
        )
        raise SystemExit(0)
    out, err = capsys.readouterr()
    assert info.value.code == 0 and out.startswith("我喜欢编程，因为")
    expected = (
        Generator.load(model_dir)
        .generate(["我喜欢编程，因为"], SamplingConfig(max_new_tokens=6, repetition_penalty=1.3))[0]
        .text
    )
    assert out == "我喜欢编程，因为" + expected + "\n"
    assert re.fullmatch(r"\[\d+ tokens, [\d.]+ tokens/s, (stop|length)\]", err.strip())


@pytest.mark.parametrize("flags", [[], ["--compile"]], ids=["eager", "compiled"])
def test_palm_generate_greedy_output_is_transformers_generate(capsys, model_dir, tokenizer_dir, flags):
    # The output `palm generate` had before the compiled, transposed step: Transformers' own greedy tokens.
    generator = Generator.load(model_dir)  # the dtype the command picks
    [expected] = hf_greedy(generator, tokenizer_dir, ["def f(a, b):"], 10)
    code, out, _ = run_cli(
        capsys, "generate", "--model", model_dir, "--temperature", "0", "--max-new-tokens", "10", *flags, "def f(a, b):"
    )
    assert code == 0 and out == "def f(a, b):" + generator.tokenizer.decode(expected) + "\n"


def test_palm_generate_with_int8_weights_is_what_the_generator_gives(capsys, model_dir):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        model_dir,
        "--temperature",
        "0",
        "--quantize",
        "int8",
        "--max-new-tokens",
        "6",
        "x = 12",
    )
    expected = Generator.load(model_dir, quantize="int8").generate(["x = 12"], SamplingConfig(max_new_tokens=6))[0]
    assert code == 0 and out == "x = 12" + expected.text + "\n"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "/nonexistent", "hi"], "no model directory at /nonexistent"),
        (["--top-p", "2", "hi"], "top_p"),
        (["--file", "/nonexistent"], "does not exist"),
        (["--quantize", "int4", "hi"], "--quantize"),
    ],
)
def test_palm_generate_errors(capsys, model_dir, argv, words):
    if "--model" not in argv:
        argv = ["--model", model_dir, *argv]
    with pytest.raises(SystemExit) as info:
        main(["generate", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 1 and words in err and len(err.strip().splitlines()) == 1


def test_stream_never_shows_bytes_that_a_later_byte_rewrites(generator, monkeypatch):
    # <0x6A> alone decodes as "j", but the run <0x6A><0xE6><0x88> is invalid UTF-8 and decodes as
    # three U+FFFD: a stream that showed "j" early would disagree with the finished text.
    BYTE_IDS = generator.tokenizer.byte_ids
    byte = lambda b: BYTE_IDS[b]  # noqa: E731
    word = [t for t in generator.tokenizer.encode("the") if t not in BYTE_IDS and t >= BYTE_IDS.start]
    tokens = [byte(0x6A), byte(0xE6), byte(0x88), *word, byte(0xE6), byte(0x88), byte(0x91)]
    monkeypatch.setattr(generator, "token_stream", lambda prompts, cfg: iter(torch.tensor([[t]]) for t in tokens))
    pieces = list(generator.stream("x", SamplingConfig(max_new_tokens=len(tokens))))
    final = generator.tokenizer.decode(tokens)
    assert "".join(pieces) == final and final.startswith("\ufffd" * 3) and final.endswith("the我")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_k=st.integers(-5, 2**70),
    top_p=st.floats(allow_nan=True, allow_infinity=True),
    penalty=st.floats(allow_nan=True, allow_infinity=True),
    seed=st.one_of(st.none(), st.integers(-5, 2**70)),
    new=st.integers(-5, 2**70),
)
def test_any_sampling_values_are_refused_or_sample_a_token(temperature, top_k, top_p, penalty, seed, new):
    cfg = SamplingConfig(
        max_new_tokens=new, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed
    )
    try:
        cfg.validate()
    except GenerationError:
        return
    logits = torch.randn(2, 50) * 30
    seen = torch.tensor([[1, 2, -1], [3, -1, -1]])
    tokens = sample_rows(logits, seen, [cfg, cfg], [cfg.generator(torch.device("cpu"))] * 2)
    assert tokens.shape == (2,) and bool(((tokens >= 0) & (tokens < 50)).all())


def test_the_compiled_step_decodes_what_the_eager_one_does(generator, tokenizer):
    cfg = SamplingConfig(max_new_tokens=8)
    compiled = Generator(generator.model, tokenizer, compile=True)
    assert compiled.step.decoder is not generator.model  # the transposed copy, compiled whole
    assert [c.token_ids for c in compiled.generate(PROMPTS, cfg)] == [
        c.token_ids for c in generator.generate(PROMPTS, cfg)
    ]


def test_palm_generate_uses_the_saved_defaults_unless_told_otherwise(capsys, model_dir, tmp_path):
    """generation_config.json decides what unsaid flags are (here: greedy, 5 tokens); flags override it."""
    import json
    import shutil

    saved = tmp_path / "model"
    shutil.copytree(model_dir, saved)
    config = (
        json.loads((saved / "generation_config.json").read_text())
        if (saved / "generation_config.json").is_file()
        else {}
    )
    config.update(do_sample=False, max_new_tokens=5, repetition_penalty=1.0, eos_token_id=[])
    (saved / "generation_config.json").write_text(json.dumps(config))
    generator = Generator.load(saved)
    assert generator.sampling() == SamplingConfig(max_new_tokens=5, temperature=0.0, repetition_penalty=1.0)
    assert generator.sampling(temperature=0.5, top_k=3).temperature == 0.5
    greedy = generator.generate(["x = 12"], SamplingConfig(max_new_tokens=5))[0]
    code, out, err = run_cli(capsys, "generate", "--model", str(saved), "x = 12")
    assert code == 0 and out == "x = 12" + greedy.text + "\n" and err.startswith("[5 tokens")
    code, _, err = run_cli(capsys, "generate", "--model", str(saved), "--max-new-tokens", "3", "x = 12")
    assert code == 0 and err.startswith("[3 tokens")
