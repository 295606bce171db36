"""LoRA fine-tuning through peft: only the adapters train, the merge equals base + adapter, peft loads
the adapter without palm's fine-tuning code, and a killed run resumes exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from test_chat import CONVERSATION
from test_finetune import Killed, losses, settings

from palm.training.finetune import finetune
from palm.weights.lora import load_merged, merge

PROMPT = "Question: What is 3 + 4?\nAnswer: "


def lora_settings(tmp_path, model_dir, name, **kw):
    return settings(tmp_path, model_dir, name, lora_r=4, lora_alpha=8.0, lr=1e-2, **kw)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("lora")
    run = finetune(lora_settings(tmp, model_dir, "run"))
    return tmp / "run", run


def test_only_the_adapters_change(lora_run, model_dir):
    run_dir, run = lora_run
    base = load_file(os.path.join(model_dir, "model.safetensors"))
    trained = load_file(str(sorted((run_dir / "checkpoints").iterdir())[-1] / "model.safetensors"))
    lora = {k: v for k, v in trained.items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # the adapters learned
    for name, weight in base.items():
        names = {name, name.replace(".weight", ".base_layer.weight")}
        if name == "model.embed_tokens.weight":
            names.add("lm_head.weight")  # the tied tensor, saved once under either of its names
        wrapped = [k for k in trained if any(k.endswith("." + n) for n in names)]
        assert wrapped and all(torch.equal(trained[k], weight) for k in wrapped), name  # bit-identical base
    trainable, total = run.extra["trainable_params"], sum(v.numel() for v in base.values())
    assert 0 < trainable < 0.1 * total


def test_adding_adapters_warns_the_user_of_nothing(model_dir):
    # peft reads Transformers' deprecated is_gradient_checkpointing; its FutureWarning reached palm finetune's stderr
    import warnings

    from palm.weights.lora import add_adapters
    from palm.weights.modeldir import load_model

    model, _ = load_model(model_dir, dtype="fp32")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        add_adapters(model, r=2, alpha=4.0, dropout=0.0, targets=["in_proj"], seed=0)
    assert [str(w.message) for w in seen] == []


def test_the_merged_model_equals_base_plus_adapter(lora_run, model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _ = lora_run
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()(input_ids=ids).logits
        for merged_dir in (run_dir / "final", merge(model_dir, run_dir / "adapter", tmp_path / "merged")):
            merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
            torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
            assert not any("lora" in k for k in load_file(str(merged_dir / "model.safetensors")))


def test_peft_loads_the_adapter_without_palms_fine_tuning_code(lora_run, model_dir, tmp_path):
    run_dir, _ = lora_run
    merged, _ = load_merged(model_dir, run_dir / "adapter", device="cpu", dtype="fp32")
    ids = [1, 40, 41, 42, 43]
    with torch.no_grad():
        expected = merged(input_ids=torch.tensor([ids])).logits[0, -1].tolist()
    code = (
        "import sys, json, torch\n"
        "for name in ('palm.training.finetune', 'palm.weights.lora', 'palm.training.loop', 'palm.training.train'):\n"
        "    sys.modules[name] = None  # palm's training code cannot be imported here\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        f"base = AutoModelForCausalLM.from_pretrained({model_dir!r}, trust_remote_code=True, dtype=torch.float32)\n"
        f"model = PeftModel.from_pretrained(base, {str(run_dir / 'adapter')!r}).eval()\n"
        f"print(json.dumps(model(input_ids=torch.tensor([{ids}])).logits[0, -1].tolist()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(
        torch.tensor(json.loads(done.stdout.splitlines()[-1])), torch.tensor(expected), rtol=1e-5, atol=1e-5
    )


def test_a_killed_lora_run_resumes_bitwise(model_dir, tmp_path):
    straight = finetune(lora_settings(tmp_path, model_dir, "straight"))

    def kill_at_10(run, record):
        if record["step"] == 10:
            raise Killed

    with pytest.raises(Killed):
        finetune(lora_settings(tmp_path, model_dir, "killed"), on_step=kill_at_10)
    resumed = finetune(lora_settings(tmp_path, model_dir, "killed"), resume=True)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight") and resumed.step == straight.step
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chat_lora_from_the_command_line(capsys, model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}, ensure_ascii=False) + "\n" for _ in range(6)))
    code, stdout, err = run_cli(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--data",
        str(data),
        "--format",
        "chat",
        "--out",
        str(tmp_path / "run"),
        "--lora-r",
        "2",
        "--lora-targets",
        "in_proj",
        "--steps",
        "2",
        "--batch-size",
        "2",
    )
    assert code == 0, err
    assert "LoRA adapter" in stdout and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["in_proj"]
    assert (
        "chat_template" in (tmp_path / "run" / "final" / "tokenizer_config.json").read_text()
        or (tmp_path / "run" / "final" / "chat_template.jinja").is_file()
    )
    code, _, err = run_cli(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--data",
        str(data),
        "--format",
        "chat",
        "--out",
        str(tmp_path / "bad"),
        "--lora-r",
        "2",
        "--lora-targets",
        "q_proj",
    )
    assert_one_line_error(code, err, "--lora-targets")


def test_palm_merge_from_the_command_line(capsys, lora_run, model_dir, tmp_path):
    run_dir, _ = lora_run
    code, stdout, err = run_cli(
        capsys, "merge", "--base", model_dir, "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "merged")
    )
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file(), err
    for argv, words in [
        (["--adapter", str(tmp_path)], "adapter_config.json"),
        (["--adapter", str(tmp_path / "nope")], "no adapter directory"),
        (["--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "merged")], "--force"),
    ]:
        full = ["merge", "--base", model_dir, *argv]
        if "--out" not in argv:
            full += ["--out", str(tmp_path / "other")]
        code, _, err = run_cli(capsys, *full)
        assert_one_line_error(code, err, words)


def test_an_adapter_refuses_a_base_of_another_vocabulary(capsys, lora_run, model_dir, tmp_path):
    # Same width, so peft's shape checks pass; only the vocabulary says the adapter was not trained on it.
    import shutil

    from palm.text.tokenizer import train_tokenizer

    run_dir, _ = lora_run
    other = tmp_path / "other-base"
    shutil.copytree(model_dir, other)
    train_tokenizer(lambda: (f"lorem ipsum dolor {i} sit amet, Ωμέγα αλφα" for i in range(300)), vocab_size=512).save(
        other
    )
    for argv in (
        ["merge", "--base", str(other), "--out", str(tmp_path / "merged")],
        ["generate", "--model", str(other), "hello"],
    ):
        code, _, err = run_cli(capsys, *argv, "--adapter", str(run_dir / "adapter"))
        assert_one_line_error(code, err, "another vocabulary")
    assert not (tmp_path / "merged").exists()


def test_palm_serve_with_an_adapter_chats_as_palm_generate_chat(capsys, lora_run, model_dir):
    """The openai client's chat completion from `palm serve --adapter` equals `palm generate --chat --adapter`.

    The client talks to the server's app in process (Starlette's TestClient is an httpx client), so no
    uvicorn thread and its log handlers outlive the captured streams; tests/test_serve.py runs the real server."""
    import openai
    from fastapi.testclient import TestClient

    from palm.inference.generate import Generator
    from palm.serve import create_app

    adapter = str(lora_run[0] / "adapter")
    question = "Remember two numbers: five and seven."
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        model_dir,
        "--adapter",
        adapter,
        "--chat",
        question,
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--max-new-tokens",
        "12",
    )
    assert code == 0, err
    generator = Generator.load(model_dir, adapter=adapter)
    base = Generator.load(model_dir)
    ids = torch.tensor([generator.encode(question)])
    with torch.no_grad():  # the adapter is in the weights the generator decodes with (its own, in place)
        assert not torch.equal(generator.model(ids).logits, base.model(ids).logits)
    ask = dict(
        model="m",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=12,
        extra_body={"repetition_penalty": 1.0},
    )
    with TestClient(create_app(generator, "m")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)
        reply = client.chat.completions.create(**ask).choices[0].message.content
        streamed = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True) if c.choices
        )
    assert out == reply + "\n" == streamed + "\n"
    code, _, err = run_cli(capsys, "generate", "--model", model_dir, "--adapter", str(lora_run[0]), "--chat", "hi")
    assert_one_line_error(code, err, "adapter_config.json")


def crafted_adapter(src, dst, how: str):
    """A copy of the adapter at `src`, made hostile one way."""
    import shutil
    import struct

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    config_file, weights = dst / "adapter_config.json", dst / "adapter_model.safetensors"
    config = json.loads(config_file.read_text())
    edits = {
        "rank 0": {"r": 0},
        "rank of a billion": {"r": 10**9},
        "alpha not a number": {"lora_alpha": "x"},
        "a layer not there": {"layers_to_transform": [99]},
        "a foreign target": {"target_modules": ["q_proj"]},
    }
    if how in edits:
        config_file.write_text(json.dumps({**config, **edits[how]}))
    elif how == "pickled weights only":
        weights.rename(dst / "adapter_model.bin")
    elif how == "a header claiming terabytes":
        data = weights.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name] = {**header[name], "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    elif how == "a tensor of another shape":
        tensors = load_file(str(weights))
        name = next(k for k in tensors if "lora_A" in k)
        tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
        save_file(tensors, str(weights))
    return dst


HOSTILE = {
    "rank 0": "r is 0",
    "rank of a billion": "r is 1000000000",
    "alpha not a number": "lora_alpha is 'x'",
    "a layer not there": "layers_to_transform is [99]",
    "a foreign target": "target_modules is ['q_proj']",
    "pickled weights only": "pickled adapter weights",
    "a header claiming terabytes": "not a readable safetensors file",
    "a tensor of another shape": "this model and r=4 want",
}


@pytest.mark.parametrize("how", list(HOSTILE))
def test_a_hostile_adapter_is_one_line_before_its_tensors_are_read(capsys, lora_run, model_dir, tmp_path, how):
    """Merging and serving check an adapter's config and safetensors header against the base first."""
    from palm.inference.generate import Generator

    adapter = crafted_adapter(lora_run[0] / "adapter", tmp_path / "adapter", how)
    code, _, err = run_cli(
        capsys, "merge", "--base", model_dir, "--adapter", str(adapter), "--out", str(tmp_path / "m")
    )
    assert_one_line_error(code, err, HOSTILE[how])
    assert not (tmp_path / "m").exists()
    generator = Generator.load(model_dir, dtype="fp32")
    with pytest.raises(Exception, match=HOSTILE[how].replace("[", r"\[").replace("]", r"\]")) as info:
        generator.add_adapters({"hostile": adapter})
    assert type(info.value).__name__ == "CheckpointError"
