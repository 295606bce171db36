"""Shared fixtures: a small bilingual corpus, a tokenizer trained on it, and a tiny model directory."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch

import palm
from palm.text.tokenizer import PalmTokenizer, train_tokenizer

ZH = [
    "我喜欢编程，因为它让我的大脑跳跃。",
    "自然语言处理是计算机科学的一个分支，研究如何让计算机理解和生成人类语言。",
    "今天天气很好，我们一起去公园散步吧。",
    "模型在二〇二二年发布，参数量达到五千四百亿。",
    "深度学习技术在许多领域取得了显著的进展。",
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `palm ARGV` in this process: (exit code, stdout, stderr)."""
    from palm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code, err, *words):
    """A failed command: non-zero exit, one `palm: error:` line naming `words`, no traceback."""
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("palm: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


def corpus_texts() -> list[str]:
    english = sorted(pydoc_data.topics.topics.items())[:80]
    return [text for _, text in english] + [" ".join(ZH[i:] + ZH[:i]) * 3 for i in range(len(ZH))]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(corpus_texts()):
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tokenizer")
    tok = train_tokenizer(corpus_texts, vocab_size=1024)
    tok.save(out)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir) -> PalmTokenizer:
    return PalmTokenizer.load(tokenizer_dir)


def tiny_config(tok: PalmTokenizer, **overrides) -> palm.PalmConfig:
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16, max_position_embeddings=256)
    return palm.PalmConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=[tok.eos_id, tok.eod_id],
        **{**shape, **overrides},
    )


def lively_model(config: palm.PalmConfig, seed: int = 0) -> palm.PalmForCausalLM:
    """A random model whose greedy continuations vary from token to token.

    At the paper's init a tied N(0,1) embedding makes an untrained model repeat its last token
    forever, which would let cache and padding bugs hide behind identical outputs.
    """
    torch.manual_seed(seed)
    model = palm.PalmForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.3)
        for block in model.model.layers:
            block.in_proj.weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> str:
    out = tmp_path_factory.mktemp("model")
    lively_model(tiny_config(tokenizer)).save_pretrained(str(out))
    tokenizer.save(out)
    return str(out)
