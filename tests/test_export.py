"""palm export --format cohere: CohereForCausalLM, in a process where palm cannot be imported, gives palm's
logits, greedy tokens and token ids; and bad input to `palm export` is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, lively_model, run_cli, tiny_config

import palm
from palm.export import export
from palm.export.cohere import cohere_weights, rope_pairs_permutation
from palm.export.formats import ExportError
from palm.export.gguf import check_runnable
from palm.weights.modeldir import load_model

DEMO = Path(__file__).resolve().parent.parent / "demo" / "run" / "final"
TEXTS = [
    "我喜欢编程，因为它让我的大脑跳跃。",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
    "The function returns 42, and   three spaces.",
]
GREEDY = dict(do_sample=False, max_new_tokens=32, min_new_tokens=32, repetition_penalty=1.0)

# Run by a fresh interpreter in which any import of palm fails: what a user without palm has.
WITHOUT_PALM = r"""
import importlib.abc, json, sys
class NoPalm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "palm" or name.startswith("palm."):
            raise ImportError("palm is not installed here")
sys.meta_path.insert(0, NoPalm())
import numpy as np, torch
from transformers import AutoTokenizer, CohereForCausalLM
exported, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = CohereForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(exported)
ids = [tok(t).input_ids for t in texts]
with torch.no_grad():
    logits = [model(torch.tensor([i])).logits[0].numpy() for i in ids]
    greedy = [model.generate(torch.tensor([i]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                             repetition_penalty=1.0)[0, len(i):].tolist() for i in ids]
assert not any(m == "palm" or m.startswith("palm.") for m in sys.modules)
np.savez(out, *logits)
json.dump({"ids": ids, "greedy": greedy, "model": type(model).__name__}, open(out + ".json", "w"))
"""


def trained_model_dir(tmp_path_factory, corpus_dir, tokenizer_dir) -> tuple[Path, str]:
    """(the demo model if `make demo` has made it, else a `small` model trained for a few steps, its name).

    Built once per session, whichever test module asks first."""
    if (DEMO / "config.json").is_file():
        return DEMO, "demo/run/final"
    out = tmp_path_factory.getbasetemp() / "export-trained"
    if not (out / "final" / "config.json").is_file():
        from palm.training.train import TrainConfig, train

        train(
            TrainConfig.from_settings(
                dict(
                    corpus=[str(corpus_dir)],
                    out=str(out),
                    tokenizer=tokenizer_dir,
                    preset="small",
                    max_steps=8,
                    seq_len=32,
                    batch_size=8,
                    checkpoint_every=8,
                    eval_every=8,
                    eval_tokens=256,
                    cache_dir=str(out.parent / "export-cache"),
                    progress=False,
                    threads=2,
                )
            )
        )
    return out / "final", "small, trained 8 steps"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("palm-tiny")
    lively_model(tiny_config(tokenizer)).save_pretrained(str(out))
    tokenizer.save(out)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir, tokenizer_dir):
    return trained_model_dir(tmp_path_factory, corpus_dir, tokenizer_dir)


def palm_reference(model_dir):
    model, tok = load_model(model_dir, device="cpu", dtype="fp32")
    ids = [tok.encode(t) for t in TEXTS]
    with torch.no_grad():
        logits = [model(torch.tensor([i])).logits[0].numpy() for i in ids]
        greedy = [model.generate(torch.tensor([i]), **GREEDY)[0, len(i) :].tolist() for i in ids]
    return ids, logits, greedy


def check_cohere_without_palm(model_dir, tmp_path, label):
    exported = export("cohere", model_dir, tmp_path / "cohere")
    result = tmp_path / "result"
    subprocess.run([sys.executable, "-c", WITHOUT_PALM, str(exported), json.dumps(TEXTS), str(result)], check=True)
    got = json.loads(Path(str(result) + ".json").read_text())
    arrays = np.load(str(result) + ".npz")
    ids, logits, greedy = palm_reference(model_dir)
    assert got["model"] == "CohereForCausalLM"
    assert got["ids"] == ids, label
    errors = [float(np.abs(arrays[f"arr_{i}"] - ref).max()) for i, ref in enumerate(logits)]
    print(f"{label}: largest logit difference {max(errors):.2e}, greedy tokens equal: {got['greedy'] == greedy}")
    assert max(errors) < 1e-4, (label, errors)
    assert got["greedy"] == greedy, label


def test_cohere_export_of_a_random_tiny_model_matches_palm_without_palm(tiny_dir, tmp_path):
    check_cohere_without_palm(tiny_dir, tmp_path, "random tiny")


def test_cohere_export_of_a_trained_model_matches_palm_without_palm(trained, tmp_path):
    model_dir, label = trained
    check_cohere_without_palm(model_dir, tmp_path, label)


def test_every_carried_over_difference_matters(tiny_dir, tokenizer):
    """Leave out any of the three differences and the logits move far past the tolerance."""
    from transformers import CohereForCausalLM

    from palm.export.cohere import load_cohere

    _, config, state = load_cohere(tiny_dir)
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    model = load_model(tiny_dir, device="cpu", dtype="fp32")[0]
    with torch.no_grad():
        ref = model(ids).logits

    def error(config, state):
        cohere = CohereForCausalLM(config)
        cohere.load_state_dict(state, strict=False)
        with torch.no_grad():
            return (cohere.eval()(ids).logits - ref).abs().max().item()

    assert error(config, state) < 1e-4
    unrotated = dict(state)
    inverse = torch.argsort(rope_pairs_permutation(config.head_dim))
    for name in [n for n in state if n.endswith(("q_proj.weight", "k_proj.weight"))]:
        w = state[name]
        unrotated[name] = w.reshape(-1, config.head_dim, w.shape[1])[:, inverse].reshape(w.shape)
    assert error(config, unrotated) > 1e-2
    for field, value in (("logit_scale", 0.0625), ("rope_parameters", {"rope_type": "default", "rope_theta": 5e5})):
        changed = type(config).from_dict({**config.to_dict(), field: value})
        changed.head_dim = config.head_dim
        assert error(changed, state) > 1e-2, field


def test_the_fused_matrix_is_split_in_palms_order(tokenizer):
    config = tiny_config(tokenizer, num_key_value_heads=2)
    model = lively_model(config)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    out = cohere_weights(config, weights)
    fused = weights["model.layers.1.in_proj.weight"]
    q, k = config.num_attention_heads * config.head_dim, 2 * config.head_dim
    assert torch.equal(out["model.layers.1.self_attn.v_proj.weight"], fused[q + k : q + 2 * k])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], fused[-config.intermediate_size :])
    # Pair (2i, 2i+1) of a Cohere head is palm's (i, i + head_dim/2).
    half = config.head_dim // 2
    assert torch.equal(
        out["model.layers.1.self_attn.k_proj.weight"][config.head_dim + 1], fused[q + config.head_dim + half]
    )


@pytest.mark.parametrize(
    "shape, words",
    [
        (dict(hidden_size=16, num_hidden_layers=64, num_attention_heads=2, head_dim=8), ["64 layers", "q/k"]),
        (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=32), ["4 x 32 != 64"]),
    ],
)
def test_gguf_refuses_the_shapes_llama_cpp_cannot_run(tokenizer, tmp_path, capsys, shape, words):
    config = tiny_config(tokenizer, **shape)
    with pytest.raises(ExportError):
        check_runnable(config)
    model_dir = tmp_path / "model"
    palm.PalmForCausalLM(config).save_pretrained(str(model_dir))
    tokenizer.save(model_dir)
    capsys.readouterr()
    code, _, err = run_cli(
        capsys, "export", "--format", "gguf", "--model", str(model_dir), "--out", str(tmp_path / "m.gguf")
    )
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "m.gguf").exists()


def test_bad_input_is_one_line(tiny_dir, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    cases = [
        (["--format", "onnx", "--model", str(tiny_dir), "--out", str(tmp_path / "o")], ["unknown format 'onnx'"]),
        (
            ["--format", "cohere", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
            ["no model directory"],
        ),
        (["--format", "gguf", "--model", str(tmp_path), "--out", str(tmp_path / "o.gguf")], ["config.json is missing"]),
        (
            ["--format", "gguf", "--model", str(tiny_dir), "--out", str(tmp_path / "o.gguf"), "--type", "q4"],
            ["unknown type"],
        ),
        (
            ["--format", "cohere", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--type", "q8_0"],
            ["unknown type"],
        ),
        (
            ["--format", "gguf", "--model", str(tiny_dir), "--out", str(tmp_path / "file.txt" / "o.gguf")],
            ["in the way"],
        ),
        (["--format", "gguf", "--model", str(tiny_dir), "--out", str(tmp_path)], ["is a folder"]),
        (["--model", str(tiny_dir), "--out", str(tmp_path / "o")], ["--format"]),
    ]
    for argv, words in cases:
        code, _, err = run_cli(capsys, "export", *argv)
        assert_one_line_error(code, err, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_an_exported_directory_is_not_a_palm_model(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "export", "--format", "cohere", "--model", str(tiny_dir), "--out", str(tmp_path / "c")
    )
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "export", "--format", "cohere", "--model", str(tmp_path / "c"), "--out", str(tmp_path / "d")
    )
    assert_one_line_error(code, err, "'cohere' model, not a palm model")
    code, _, err = run_cli(
        capsys, "export", "--format", "cohere", "--model", str(tiny_dir), "--out", str(tmp_path / "c")
    )
    assert_one_line_error(code, err, "already exists")
    code, _, err = run_cli(
        capsys,
        "export",
        "--format",
        "cohere",
        "--model",
        str(tiny_dir),
        "--out",
        str(tmp_path / "c"),
        "--type",
        "bf16",
        "--force",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "config.json").read_text())["dtype"] == "bfloat16"


def test_exports_hold_one_layer_of_stored_weights_at_a_time(tiny_dir):
    """`palm export` streams: every stored tensor is read once, when it is needed, and none outlives the
    layer it belongs to (at `1b` the fp32 weights are 4 GB; holding them beside the export doubled the peak)."""
    import gc
    import weakref

    from palm.export.cohere import iter_cohere_weights, read_palm

    config, stored = read_palm(tiny_dir)
    assert not any(torch.is_tensor(v) for v in vars(stored).values())  # a map of names to files, no tensors
    reads, alive = [], []

    class Watched(dict):
        def __getitem__(self, key):
            tensor = stored[key]
            reads.append(key)
            alive.append((key, weakref.ref(tensor)))
            return tensor

    seen = set()
    for name, tensor in iter_cohere_weights(config, Watched(), torch.bfloat16):
        assert tensor.dtype == torch.bfloat16 and name not in seen
        seen.add(name)
        gc.collect()
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        held = {key for key, ref in alive if ref() is not None}
        # what is still held belongs to the layer being written (the fused matrix that q..up come from)
        assert all(key.startswith(f"model.layers.{layer}.") for key in held), (name, held)
        del tensor
    assert sorted(reads) == sorted(stored) and len(reads) == len(set(reads))
