"""README.md and the pages of docs/ are a tested contract: every fenced `python` and `bash` block runs, in a
folder laid out as `make demo` leaves it (demo/run/final is a small model trained here), so a page whose
commands, flags or paths drift from the code fails `make test`; and every relative link resolves.

A block preceded by `<!-- readme-test: scale -->` may have its step counts and sizes scaled down
(each distinct value of a flag below becomes a small one, keeping their order, so a resumed run still
extends the first). A block preceded by `<!-- readme-test: server COMMAND -->` runs while COMMAND
serves (its port replaced by a free one). The lines below that need hardware or hours are not run;
each says why, and each must still be in the README, so this list cannot drift either.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# In the order a reader goes, which is the order the blocks run in (a later page may use what an earlier one made).
DOCS = [
    "pretraining",
    "data",
    "scaling-out",
    "finetuning",
    "generation-and-serving",
    "evaluation",
    "export",
    "performance",
    "model-and-tokenizer",
    "architecture",
]
PAGES = [README, *(ROOT / "docs" / f"{name}.md" for name in DOCS), ROOT / "CONTRIBUTING.md"]
BIN = Path(sys.executable).parent

NOT_RUN = {
    "make demo": "this is the README's own quick start: it takes minutes and rebuilds demo/ (CI runs make test)",
    "make test": "the test suite itself (make test-bf16, test-fp32, test-matrix too)",
    "make setup": "the set-up make test has already done",
    "make lint": "make test runs it",
    "make typecheck": "make test runs it",
    ".venv/bin/python -m pytest": "the test suite itself",
    ".venv/bin/ruff": "rewrites the checkout's sources; make lint runs ruff in check mode",
    "make bench-setup": "installs the benchmark peers from the package registry",
    "python bench/": "benchmarks: minutes of CPU each, run by hand; tests/test_bench.py checks their helpers",
    "python examples/finetune_tasks.py --model": "about 13 minutes of CPU; its task files and the two palm finetune "
    "commands after it run, scaled down",
    "python examples/qa.py --model": "a baseline, the model before, and two fine-tuning runs of minutes each; "
    "tests/test_examples_applications.py runs it scaled down on a tiny model",
    "python examples/translate.py --model": "as examples/qa.py above; tests/test_examples_applications.py writes its data",
    "python examples/chat_lora.py --model": "two fine-tuning runs of minutes each; tests/test_lora.py and tests/test_chat.py check the parts",
    "torchrun --nnodes": "needs several machines",
    "torchrun --standalone": "needs a run.toml and 2 processes; tests/test_distributed.py runs these commands",
    "palm train --resume RUN": "RUN stands for a run folder; tests/test_distributed.py resumes FSDP runs this way",
    "lm-eval run": "the lm-eval console script indexes its 15,000 task files (20 s or more); tests/test_evaluate.py runs lm-eval",
    "palm serve --model": "a server runs until stopped; the blocks that use it start one themselves",
    "vllm serve": "vLLM needs a GPU",
    "llama-cli": "llama.cpp's command-line program is not installed by palm",
}

SCALED_FLAGS = {
    "--max-steps": (2, 3, 4),
    "--steps": (2, 3, 4),
    "--batch-size": (4,),
    "--eval-every": (1,),
    "--hold-steps": (1,),
    "--patience": (1,),
    "--max-new-tokens": (8,),
    "--checkpoint-every": (1,),
}


@dataclass
class Block:
    lang: str
    code: str
    line: int
    directive: str = ""
    page: str = "README.md"


def blocks(page: Path = README) -> list[Block]:
    out, lines, directive = [], page.read_text(encoding="utf-8").splitlines(), ""
    i = 0
    while i < len(lines):
        note = re.fullmatch(r"<!-- readme-test: (.*) -->", lines[i].strip())
        if note:
            directive = note.group(1)
        fence = re.fullmatch(r"```(\w+)", lines[i].strip())
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if fence.group(1) in ("python", "bash"):
                out.append(
                    Block(fence.group(1), "\n".join(lines[i + 1 : end]), i + 1, directive, str(page.relative_to(ROOT)))
                )
            directive, i = "", end
        elif lines[i].strip() and not note:
            directive = ""  # a directive applies to the block right after it
        i += 1
    return out


def commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(re.sub(r"\s+#\s.*$", "", line))
    return out


def scale(command: str, seen: dict[str, list[str]]) -> str:
    for flag, small in SCALED_FLAGS.items():

        def replace(match, flag=flag, small=small):
            values = seen.setdefault(flag, [])
            if match.group(1) not in values:
                values.append(match.group(1))
            rank = sorted(values, key=float).index(match.group(1))
            return f"{flag} {small[min(rank, len(small) - 1)]}"

        command = re.sub(rf"{flag} (\d+)", replace, command)
    return command


def reason(command: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_dir):
    """A folder laid out as `make demo` leaves one: demo/run/final is a small model, trained here for the
    blocks to use (the real demo's 1,400 steps would take minutes)."""
    from palm.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("readme")
    for name in ("examples", "bench"):
        (root / name).symlink_to(ROOT / name)
    train(
        TrainConfig.from_settings(
            dict(
                corpus=[str(corpus_dir)],
                out=str(root / "demo" / "run"),
                preset="tiny",
                vocab_size=1024,
                seq_len=64,
                model=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32),
                max_steps=60,
                batch_size=8,
                lr=3e-2,
                eval_every=60,
                checkpoint_every=60,
                progress=False,
                threads=1,
            )
        )
    )
    return root


def run(command: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
    }
    return subprocess.run(
        command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, executable="/bin/bash"
    )


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]


def test_every_line_that_is_not_run_is_still_in_the_readme():
    every = [c for b in ALL_BLOCKS for c in commands(b.code)]
    text = "".join(page.read_text(encoding="utf-8") for page in PAGES)
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for c in every) or prefix in text, prefix


def links(page: Path) -> list[str]:
    """The relative targets of the page's markdown links (outside code blocks), anchors dropped."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link either
    found = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in found if not re.match(r"[a-z]+:", t) and t.split("#")[0]]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    missing = [t for t in links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to what is not there: {missing}"


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[here](here.md) [there](https://example.com) `[x](y)`\n```\n[not](a-link.md)\n```\n")
    assert links(page) == ["here.md"]


def test_every_page_of_docs_is_tested():
    assert sorted(p.stem for p in (ROOT / "docs").glob("*.md")) == sorted(DOCS)


def test_the_readme_is_a_front_door():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: f"{b.page}:{b.line}")
def test_block_runs(block, workspace):
    seen: dict[str, list[str]] = {}
    if block.lang == "python":
        server = None
        code = block.code
        if block.directive.startswith("server "):
            port = free_port()
            command = block.directive.removeprefix("server ").replace("8000", str(port))
            code = code.replace("8000", str(port))
            server = subprocess.Popen(
                shlex.split(command),
                cwd=workspace,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                executable=str(BIN / shlex.split(command)[0]),
            )
            wait_until_serving(port, server)
        try:
            done = subprocess.run(
                [sys.executable, "-c", "import torch; torch.manual_seed(0)\n" + code],
                cwd=workspace,
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
        assert done.returncode == 0, f"{block.page} line {block.line}:\n{done.stderr[-3000:]}"
        return
    for command in commands(block.code):
        if reason(command):
            continue
        if block.directive == "scale":
            command = scale(command, seen)
        done = run(command, workspace)
        assert done.returncode == 0, f"{block.page} line {block.line}: {command}\n{done.stderr[-3000:]}"


def wait_until_serving(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError("the server did not come up")


def repeats(ids: list[int], n: int = 8, times: int = 3) -> bool:
    """Whether some n-token sequence occurs `times` times or more in `ids`."""
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - n + 1):
        key = tuple(ids[i : i + n])
        counts[key] = counts.get(key, 0) + 1
    return max(counts.values(), default=0) >= times


def test_the_saved_generation_defaults_do_not_loop(workspace):
    """The README's first snippet, as a user copies it: generate() with the defaults the model was saved with."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = workspace / "demo" / "run" / "final"
    tokenizer, model = AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final)
    assert model.generation_config.do_sample and model.generation_config.repetition_penalty > 1
    inputs = tokenizer("我喜欢编程，因为", return_tensors="pt")
    for seed in range(3):
        torch.manual_seed(seed)
        new = model.generate(**inputs, max_new_tokens=40)[0, inputs.input_ids.shape[1] :].tolist()
        assert len(new) > 8 and not repeats(new), tokenizer.decode(new)
    greedy = model.generate(**inputs, max_new_tokens=40, do_sample=False, repetition_penalty=1.0)[0].tolist()
    assert len(greedy) > inputs.input_ids.shape[1]  # greedy stays available
    assert repeats([1, 2, 3, 4, 5, 6, 7, 8] * 3) and not repeats(list(range(40)))  # the check can fail
