"""Loading a palm model directory (palm.weights.modeldir): what Transformers' from_pretrained loads, without its peak."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import lively_model, tiny_config
from transformers import AutoModelForCausalLM

from palm.weights.modeldir import load_model


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_load_model_reads_what_from_pretrained_reads(model_dir, dtype, torch_dtype):
    model, _ = load_model(model_dir, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == torch_dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the config says
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    assert model.config.to_dict() == reference.config.to_dict()
    assert not model.training
    ids = torch.tensor([[1, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.fixture(scope="module")
def big_dir(tokenizer, tmp_path_factory):
    """57M parameters saved in fp32, as `palm train` writes them: large enough that a copy shows in RSS."""
    out = tmp_path_factory.mktemp("big")
    big = lively_model(
        tiny_config(tokenizer, hidden_size=768, num_hidden_layers=8, head_dim=64, num_attention_heads=12)
    )
    big.save_pretrained(str(out))
    tokenizer.save(out)
    return out, max(p.numel() * 4 for p in big.parameters())


def peak_growth(load: str) -> tuple[int, int]:
    """(peak RSS added by running `load`, which sets `held` to the bytes its result holds), in a fresh process."""
    script = textwrap.dedent(f"""
        import torch, transformers.generation, palm.inference.generate, palm.inference.quant
        from palm.inference.generate import Generator
        from palm.weights.modeldir import load_model
        from palm.inference.quant import weight_bytes
        def status(key):
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
        before = status("VmRSS")
        {load}
        print(status("VmHWM") - before, held)
    """)
    # glibc serves blocks under its dynamic mmap threshold (up to 32 MB) from its heap and keeps them when
    # freed; a fixed 1 MB threshold returns every freed tensor, as a 1B model's (85 MB and up) are anyway.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    grown, held = map(int, done.stdout.split()[-2:])
    return grown, held


def test_loading_holds_the_model_and_one_tensor_beside_it(big_dir):
    """An fp32 file read into bf16: at most the bf16 model plus its largest fp32 tensor is ever resident.
    Transformers' from_pretrained kept the whole file's pages too (1.5x the model more, here)."""
    path, largest = big_dir
    grown, held = peak_growth(
        f"model, _ = load_model({str(path)!r}, dtype='bf16'); "
        "held = sum(p.numel() * p.element_size() for p in model.parameters())"
    )
    assert held < grown <= 1.15 * held + largest + (16 << 20), (grown, held, largest)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_generator_holds_one_copy_of_the_weights_in_its_decoding_form(big_dir, quantize):
    """What `palm generate` loads: each matmul weight goes into its decoding form as it is read (int8: the
    bf16 model is never whole in memory), and the model keeps no copy of its own beside them."""
    path, largest = big_dir
    grown, held = peak_growth(
        f"g = Generator.load({str(path)!r}, dtype='bf16', quantize={quantize!r}); "
        "e = g.model.model.embed_tokens.weight; "
        "held = weight_bytes(g.step.decoder) + e.numel() * e.element_size()"
    )
    assert held < grown <= 1.15 * held + largest + (16 << 20), (grown, held, largest)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_weights_placed_while_loading_decode_as_the_loaded_model_does(model_dir, quantize):
    from palm.inference.generate import Generator, SamplingConfig

    cfg = SamplingConfig(max_new_tokens=12)
    model, tokenizer = load_model(model_dir, dtype="fp32")
    expected = Generator(model, tokenizer, quantize=quantize).generate(["我喜欢编程，因为", "x = 1"], cfg)
    loaded = Generator.load(model_dir, dtype="fp32", quantize=quantize)
    assert loaded.generate(["我喜欢编程，因为", "x = 1"], cfg) == expected
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "model-0.1.0"


def test_a_directory_saved_before_the_package_layout_still_loads_with_palm(tmp_path):
    """tests/fixtures/model-0.1.0 was saved by palm before src/palm became packages (its config.py, model.py
    and loss.py are the old flat modules): palm's own loader and the Auto classes give its saved greedy tokens."""
    import json

    from transformers import AutoModelForCausalLM

    from palm.inference.generate import Generator, SamplingConfig

    want = json.loads((FIXTURE.parent / "model-0.1.0.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32)
    assert type(model).__module__ == "palm.model.model"
    ids = torch.tensor([want["prompt_ids"]])
    greedy = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)  # not the saved sampling defaults
    assert model.generate(ids, **greedy)[0, ids.shape[1] :].tolist() == want["greedy_fp32"]
    generator = Generator.load(FIXTURE, dtype="fp32")
    assert generator.encode(want["prompt"]) == want["prompt_ids"]
    done = generator.generate(
        [want["prompt"]], SamplingConfig(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    )[0]
    assert list(done.token_ids) == want["greedy_fp32"] and len(set(want["greedy_fp32"])) > 3


def test_a_directory_saved_before_the_package_layout_loads_its_own_code_without_palm(tmp_path):
    """The same directory through trust_remote_code, in a process that never imports palm: its own copied code."""
    import json

    want = json.loads((FIXTURE.parent / "model-0.1.0.json").read_text())
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(FIXTURE)!r}, trust_remote_code=True, dtype=torch.float32)
ids = AutoTokenizer.from_pretrained({str(FIXTURE)!r}, trust_remote_code=True)({want["prompt"]!r}, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.0)[0, ids.shape[1]:].tolist()
assert "palm" not in sys.modules, "palm was imported"
print("RESULT", json.dumps({{"module": type(model).__module__, "prompt_ids": ids[0].tolist(), "greedy": out}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert got["module"].startswith("transformers_modules.")
    assert got["prompt_ids"] == want["prompt_ids"] and got["greedy"] == want["greedy_fp32"]
