"""`palm import --format cohere` at a pretrained model's size: time and peak RSS against the model's bytes.

Writes a random CohereForCausalLM of an Aya-Expanse-8B / Command-R-like shape (bf16, 8.0B parameters, 16 GB)
to disk a layer at a time (it is never whole in memory here either), then runs `palm import` on it in a fresh
process under a launcher that reads its peak RSS, and `palm generate` on the result for a few tokens. Results
go to bench/results/importing.json. Needs about twice the model's size free on disk.

    python bench/importing.py                      # the 8B shape
    python bench/importing.py --layers 4           # the same width, fewer layers: a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from checkpointing import PALM, baseline_rss, cpu_name, measured

from palm.core.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "importing.json"
# Aya Expanse 8B (Cohere layout): d 4096, 32 layers, 32 heads of 128, 8 K/V heads, d_ff 14336, vocab 256000.
SHAPE = dict(
    vocab_size=256000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
)


def write_random_cohere(out: Path, shape: dict, dtype=torch.bfloat16) -> int:
    """A random Cohere directory written a layer per safetensors file; returns the bytes of its weights."""
    from safetensors.torch import save_file
    from transformers import CohereConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_importing import cohere_tokenizer

    out.mkdir(parents=True)
    config = CohereConfig(**shape, tie_word_embeddings=True)
    config.save_pretrained(str(out))
    cohere_tokenizer().save_pretrained(str(out))
    d, f, heads, kv = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
    )
    dh = d // heads
    gen = torch.Generator().manual_seed(0)

    def rand(*dims):
        return (torch.randn(*dims, generator=gen) * dims[-1] ** -0.5).to(dtype)

    weight_map, total = {}, 0
    files = [
        (
            "model-embed.safetensors",
            {
                "model.embed_tokens.weight": rand(shape["vocab_size"], d),
                "model.norm.weight": torch.ones(d, dtype=dtype),
            },
        )
    ]
    for i in range(shape["num_hidden_layers"]):
        at = f"model.layers.{i}."
        files.append(
            (
                f"model-layer{i:03d}.safetensors",
                {
                    at + "input_layernorm.weight": torch.ones(d, dtype=dtype),
                    at + "self_attn.q_proj.weight": rand(heads * dh, d),
                    at + "self_attn.k_proj.weight": rand(kv * dh, d),
                    at + "self_attn.v_proj.weight": rand(kv * dh, d),
                    at + "self_attn.o_proj.weight": rand(d, heads * dh),
                    at + "mlp.gate_proj.weight": rand(f, d),
                    at + "mlp.up_proj.weight": rand(f, d),
                    at + "mlp.down_proj.weight": rand(d, f),
                },
            )
        )
        name, tensors = files.pop()  # made and written one at a time
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    name, tensors = files.pop()
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    total += sum(t.nbytes for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--scratch", default=None, help="a folder with room for twice the model (default: a temp dir)")
    args = parser.parse_args()
    shape = {**SHAPE, "num_hidden_layers": args.layers}
    scratch = Path(tempfile.mkdtemp(prefix="palm-import-", dir=args.scratch))
    try:
        start = time.perf_counter()
        size = write_random_cohere(scratch / "cohere", shape)
        made = time.perf_counter() - start
        baseline = baseline_rss()
        start = time.perf_counter()
        code, out, err, peak = measured(
            [*PALM, "import", "--format", "cohere", "--model", str(scratch / "cohere"), "--out", str(scratch / "palm")]
        )
        seconds = time.perf_counter() - start
        if code:
            raise SystemExit(f"palm import failed: {err.strip().splitlines()[-1]}")
        gen_code, gen_out, gen_err, gen_peak = measured(
            [
                *PALM,
                "generate",
                "我喜欢编程，因为",
                "--model",
                str(scratch / "palm"),
                "--max-new-tokens",
                "4",
                "--temperature",
                "0",
            ]
        )
        row = {
            "processor": cpu_name(),
            "date": time.strftime("%Y-%m-%d"),
            "shape": shape,
            "parameters": size // 2,
            "weights_bytes": size,
            "write_source_s": round(made, 1),
            "import_s": round(seconds, 1),
            "import_peak_rss": peak,
            "baseline_rss": baseline,
            "peak_over_baseline_per_model": round((peak - baseline) / size, 3),
            "generate_ok": gen_code == 0,
            "generate_peak_rss": gen_peak,
        }
        print(json.dumps(row, indent=2))
        print(
            f"import of {size / 1e9:.1f} GB ({size // 2 / 1e9:.2f}B parameters, bf16): {seconds:.0f} s, peak RSS "
            f"{peak / 2**30:.2f} GiB ({(peak - baseline) / 2**30:.2f} GiB above the interpreter's "
            f"{baseline / 2**30:.2f}) = {peak / size:.2f}x the model; generate ok: {gen_code == 0} "
            f"(peak {gen_peak / 2**30:.1f} GiB)"
        )
        if gen_code:
            print(gen_err.strip().splitlines()[-1])
        RESULTS.parent.mkdir(exist_ok=True)
        write_json(RESULTS, row, indent=2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
