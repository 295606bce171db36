"""Two of `palm serve`'s features under load, each against itself without it, in the same run (bench/serve.py's
clients, levels and random `tiny` model; servers and clients share this machine's cores):

- `prefix`: 32 clients whose prompts share a ~400-token system prompt (each with its own question), streamed,
  with prefix reuse on and off (`--no-prefix-reuse`), at the default `--prefill-chunk`: mean time to first
  token, and its ratio.
- `constrained`: 8 clients, every request a json_schema reply, against the same load unconstrained (the same
  prompts, seeds and sampling, free text, each request's max_tokens the length of its constrained reply, so
  that both loads carry the same requests and tokens): output tokens/s, and the constrained load's cost.

    python bench/serve_features.py [--parts prefix,constrained] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import WORDS, make_model, run_server  # noqa: E402

SYSTEM = ("You are the assistant of a library. " + " ".join(WORDS * 25))[:1500]  # about 400 tokens of a tiny vocab
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "count", "ok"],
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
    },
}


def shared_prefix(clients: int, per_client: int) -> list[list[dict]]:
    return [
        [
            {
                "prompt": f"{SYSTEM}\nQuestion {c}.{j}: what is {c} + {j}?\nAnswer:",
                "max_tokens": 16,
                "stream": True,
                "temperature": 0.0,
                "seed": None,
            }
            for j in range(per_client)
        ]
        for c in range(clients)
    ]


def json_load(lengths: list[list[int]] | None = None):
    """Every reply a json_schema (lengths None), or free text with request (c, j)'s max_tokens lengths[c][j]."""

    def load(clients: int, per_client: int) -> list[list[dict]]:
        fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
        return [
            [
                {
                    "prompt": f"item {c}.{j} as JSON:",
                    "max_tokens": max(1, lengths[c][j]) if lengths else 48,
                    "stream": j % 2 == 1,
                    "temperature": 0.8,
                    "seed": c * 100 + j,
                    **({} if lengths else {"extra_body": {"response_format": fmt}}),
                }
                for j in range(per_client)
            ]
            for c in range(clients)
        ]

    return load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="prefix,constrained")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base = dict(
        max_batch=32,
        max_model_len=640,
        level_timeout=600.0,
        start_timeout=180.0,
        requests_per_client=args.requests_per_client,
    )
    print(f"on {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared by server and clients\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp))

        def levels(clients: int, variants: dict) -> dict:
            """One level of `clients` for each variant name -> (load, serve flags), each on a fresh server."""
            return {
                name: run_server(
                    "palm", model, argparse.Namespace(**base, clients=[clients], load=load, serve_flags=flags)
                )["levels"][0]
                for name, (load, flags) in variants.items()
            }

        if "prefix" in args.parts:
            chunk: list[str] = []  # the default, 256-token chunks
            runs = levels(
                32, {"reuse": (shared_prefix, chunk), "no reuse": (shared_prefix, [*chunk, "--no-prefix-reuse"])}
            )
            on, off = runs["reuse"]["ttft_mean"], runs["no reuse"]["ttft_mean"]
            print(
                f"shared ~400-token system prompt, 32 clients: mean TTFT {on * 1e3:.0f} ms with prefix reuse, "
                f"{off * 1e3:.0f} ms without: {off / on:.2f}x; failures {runs['reuse']['failed']} / "
                f"{runs['no reuse']['failed']}"
            )
            results["prefix"] = runs
        if "constrained" in args.parts:
            runs = levels(8, {"json_schema": (json_load(), [])})
            runs.update(levels(8, {"free": (json_load(runs["json_schema"]["request_tokens"]), [])}))
            free, bound = runs["free"]["tokens_per_s"], runs["json_schema"]["tokens_per_s"]
            print(
                f"8 clients: {free:.1f} output tok/s free, {bound:.1f} with every reply a json_schema: "
                f"{(1 - bound / free) * 100:.1f}% slower; failures {runs['free']['failed']} / "
                f"{runs['json_schema']['failed']}"
            )
            results["constrained"] = runs
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
