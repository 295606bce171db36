"""Several LoRA adapters, one server: rows of different adapters (and the base model) batch together in the
continuous-batching engine, and each row's tokens are that adapter's served alone and the merged model's
(fp32, greedy); the request's `model` picks the adapter through the openai client; bad adapters are one line."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from test_serve import running

from palm.inference.engine import Engine, Request
from palm.inference.generate import Generator, SamplingConfig
from palm.serve import create_app
from palm.weights.lora import add_adapters, save_adapter
from palm.weights.modeldir import load_model

PROMPTS = ["The meaning of life is", "我喜欢编程，因为", "def f(x):", "Summarize the text.\n\nRain.", "1 2 3"]
ADAPTERS = {
    "summarize": dict(r=4, targets=["in_proj", "attn_out", "mlp_out"], seed=1),
    "qa": dict(r=8, targets=["in_proj", "mlp_out"], seed=2),
    "translate": dict(r=2, targets=["attn_out"], seed=3),
}


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory):
    """Three adapters of different ranks and targets, with random (nonzero) B so that each changes the model."""
    out = {}
    for name, spec in ADAPTERS.items():
        model, tok = load_model(model_dir, device="cpu", dtype="fp32")
        peft = add_adapters(model, r=spec["r"], alpha=16.0, dropout=0.0, targets=spec["targets"], seed=spec["seed"])
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec["seed"])
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        out[name] = save_adapter(peft, tok, tmp_path_factory.mktemp(name) / "adapter")
    return out


def served(model_dir, adapter_dirs, dtype="fp32", compile=False) -> Generator:
    generator = Generator.load(model_dir, device="cpu", dtype=dtype, compile=compile)
    generator.add_adapters(adapter_dirs, max_rows=8)
    return generator


def run_engine(generator: Generator, requests: list[Request]) -> list[list[int]]:
    engine = Engine(generator, max_batch=8, prefill_chunk=8)
    for r in requests:
        assert engine.add(r)
    while engine.requests:
        engine.step()
    return [r.tokens for r in requests]


@pytest.mark.parametrize(
    "dtype,compile", [("fp32", False), ("bf16", False), ("fp32", True)], ids=["fp32", "bf16", "fp32-compiled"]
)
def test_a_mixed_batch_equals_each_adapter_served_alone_and_merged(model_dir, adapter_dirs, dtype, compile):
    generator = served(model_dir, adapter_dirs, dtype, compile)
    names = ["base", "summarize", "qa", "translate"]
    greedy = SamplingConfig(max_new_tokens=12)
    seeded = SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=20, seed=7)
    specs = [(p, i % 4, greedy if i % 5 else seeded) for i, p in enumerate(PROMPTS + PROMPTS[:3])]
    make = lambda spec: Request(generator.encode(spec[0]), spec[2], adapter=spec[1])  # noqa: E731
    mixed = run_engine(generator, [make(s) for s in specs])
    alone = [run_engine(generator, [make(s)])[0] for s in specs]
    assert mixed == alone
    for (prompt, adapter, cfg), tokens in zip(specs, mixed):  # the same as the adapter merged into the weights
        if cfg.temperature == 0 and dtype == "fp32" and not compile:
            folder = None if adapter == 0 else adapter_dirs[names[adapter]]
            reference = Generator.load(model_dir, device="cpu", dtype="fp32", adapter=folder)
            want = reference.generate([prompt], greedy)[0].token_ids
            assert tokens[: len(want)] == want, (prompt, names[adapter])
    each = run_engine(generator, [Request(generator.encode(PROMPTS[1]), greedy, adapter=a) for a in range(4)])
    assert len({tuple(t) for t in each}) == 4  # every adapter changes what is generated


def test_the_request_model_picks_the_adapter(model_dir, adapter_dirs):
    generator = served(model_dir, adapter_dirs)
    app = create_app(generator, "base-model", max_batch=8)
    with running(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["base-model", "summarize", "qa", "translate"]
        assert client.models.retrieve("qa").id == "qa"
        texts = {}
        for model in ("base-model", "summarize", "qa", "translate"):
            texts[model] = (
                client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text
            )
            merged = Generator.load(
                model_dir, device="cpu", dtype="fp32", adapter=None if model == "base-model" else adapter_dirs[model]
            )
            assert texts[model] == merged.generate([PROMPTS[1]], SamplingConfig(max_new_tokens=8))[0].text, model
        chat = client.chat.completions.create(
            model="summarize", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert chat.model == "summarize" and chat.choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_bad_adapter_flags_are_one_line(model_dir, adapter_dirs, tmp_path, capsys):
    base = ["serve", "--model", model_dir, "--port", "0"]
    for extra, words in [
        (["--adapter", "a=" + str(tmp_path / "missing")], "no adapter directory"),
        (["--adapter", f"a={adapter_dirs['qa']}", "--adapter", str(adapter_dirs["qa"])], "not a mix"),
        (["--adapter", f"a={adapter_dirs['qa']}", "--adapter", f"a={adapter_dirs['qa']}"], "twice"),
    ]:
        code, _, err = run_cli(capsys, *base, *extra)
        assert_one_line_error(code, err, words)
    bad = tmp_path / "wide"
    bad.mkdir()
    for f in adapter_dirs["qa"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    code, _, err = run_cli(capsys, *base, "--adapter", f"w={bad}")
    assert_one_line_error(code, err, "adapter w", "r=3")
