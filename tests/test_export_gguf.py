"""palm export --format gguf, run by llama.cpp (llama-cpp-python): palm's logits and greedy tokens from
palm's ids, llama.cpp's own tokenizer against palm's, and no text lost on the way."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ZH, corpus_texts, lively_model, tiny_config
from test_export import TEXTS, palm_reference, tiny_dir, trained  # noqa: F401  (fixtures)

from palm.export import export
from palm.text.tokenizer import PalmTokenizer, train_tokenizer

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (`make setup` builds it; or pip install 'palm[gguf]')"
)
from palm.export import llamacpp  # noqa: E402  (needs llama_cpp)
from palm.export.bytelevel import train_byte_level  # noqa: E402

# Text that palm's default vocabulary covers only partly: characters outside a small alphabet (some share
# their first bytes with characters inside it), an emoji, a combining mark, control characters, the
# names of special and byte pieces as plain text, and long whitespace runs.
HARD = [
    "龘靐齉 and 鱻 are rare; 𠀋 is outside the BMP.",
    "emoji 🙂🚀 and e\u0301 (a combining accent)",
    "tab\tbell\x07 nul\x00 <s> </s> <0x41> <eod>",
    "x" + " " * 40 + "y\n\n\n      z",
    "２０２２年 12345 ½",
]


def end_ids(model_dir) -> tuple[int, int]:
    """The ids palm's reference may not choose before its 32nd token (`min_new_tokens`): llama.cpp is
    barred from them too, or a model whose likeliest next token ends the text stops one side only."""
    tok = PalmTokenizer.load(model_dir)
    return tok.eos_id, tok.eod_id


def opened(model_dir, tmp_path, kind, exact=True):
    path = tmp_path / f"model-{kind}.gguf"
    export("gguf", model_dir, path, kind)
    return llamacpp.open_gguf(path, threads=2, exact=exact)


@pytest.mark.parametrize("which", ["tiny_dir", "trained"])
def test_f32_gguf_gives_palms_logits_and_greedy_tokens(which, request, tmp_path):
    model_dir, label = (
        (request.getfixturevalue(which), "random tiny") if which == "tiny_dir" else request.getfixturevalue(which)
    )
    llm = opened(model_dir, tmp_path, "f32")
    try:
        for ids, logits, greedy in zip(*palm_reference(model_dir)):
            got = llamacpp.logits(llm, ids)[:, : logits.shape[1]]
            error = float(np.abs(got - logits).max())
            print(f"{label}, f32 GGUF, F32 KV cache: largest logit difference {error:.2e}")
            assert error < 1e-4, label
            assert llamacpp.greedy(llm, ids, 32, end_ids(model_dir)) == greedy, label
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_half_precision_ggufs_give_palms_greedy_tokens(kind, trained, tmp_path):
    model_dir, label = trained
    llm = opened(model_dir, tmp_path, kind, exact=False)  # llama.cpp's default F16 cache, as users run it
    try:
        for ids, _, greedy in zip(*palm_reference(model_dir)):
            assert llamacpp.greedy(llm, ids, 32, end_ids(model_dir)) == greedy, (label, kind)
    finally:
        llm.close()


def test_q8_0_top1_agreement_is_reported(trained, tmp_path):
    model_dir, label = trained
    llm = opened(model_dir, tmp_path, "q8_0", exact=False)
    try:
        same = total = greedy_same = 0
        for ids, logits, greedy in zip(*palm_reference(model_dir)):
            got = llamacpp.logits(llm, ids)[:, : logits.shape[1]]
            same += int((got.argmax(-1) == logits.argmax(-1)).sum())
            total += len(ids)
            greedy_same += sum(a == b for a, b in zip(llamacpp.greedy(llm, ids, 32, end_ids(model_dir)), greedy))
    finally:
        llm.close()
    print(f"{label}, q8_0: top-1 agreement {same}/{total} positions, greedy {greedy_same}/{32 * len(TEXTS)} tokens")
    assert same / total >= 0.9


def test_llama_cpp_tokenizes_like_palm_and_loses_no_text(tiny_dir, tokenizer, tmp_path):
    llm = opened(tiny_dir, tmp_path, "f16")
    try:
        lines = [line for text in corpus_texts() for line in text.splitlines() if line.strip()]
        result = llamacpp.agreement(tokenizer, llm, lines)
        print(f"default vocabulary, test corpus: {result.same_ids}/{result.lines} lines with palm's ids")
        assert result.lost_text == 0 and result.share >= 0.99
        hard = llamacpp.agreement(tokenizer, llm, HARD + [ZH[0][::-1] + "龘"])
        assert hard.lost_text == 0, "llama.cpp's tokenizer lost text of the default vocabulary"
    finally:
        llm.close()


def test_the_default_vocabulary_keeps_text_that_shares_bytes_with_its_alphabet(tiny_dir, tokenizer, tmp_path):
    """A character outside palm's alphabet whose first two bytes start one inside it: the case where
    llama.cpp would stop half-way and drop bytes without the extra prefix tokens."""
    alphabet = {p for p in tokenizer.hf.get_vocab() if len(p) == 1}
    inside = next(c for c in "我喜欢编程" if c in alphabet)
    raw = inside.encode()
    outside = next(
        ch for b in range(0x80, 0xC0) if (ch := (raw[:2] + bytes([b])).decode("utf-8", "ignore")) and ch not in alphabet
    )
    text = f"{inside}{outside}{inside}"
    ids = tokenizer.encode(text, bos=False)
    assert len(ids) == 5 and tokenizer.decode(ids) == text  # palm spells the outsider in three byte pieces
    llm = opened(tiny_dir, tmp_path, "f16")
    try:
        assert llamacpp.piece_bytes(llm, llamacpp.tokenize(llm, text)) == text.encode()
    finally:
        llm.close()


def test_a_byte_level_vocabulary_gives_palms_ids_in_llama_cpp(tmp_path):
    tok = train_byte_level(corpus_texts, vocab_size=1024)
    lines = [line for text in corpus_texts() for line in text.splitlines() if line.strip()] + HARD
    for text in lines:
        assert tok.decode(tok.encode(text)) == text  # lossless, as palm's vocabulary is
    assert len(tok.encode("2022", bos=False)) == 4  # digits alone
    assert " " * 40 in tok.decode(tok.encode("x" + " " * 40 + "y"))
    model_dir = tmp_path / "model"
    lively_model(tiny_config(tok)).save_pretrained(str(model_dir))
    tok.save(model_dir)
    loaded = PalmTokenizer.load(model_dir)
    llm = opened(model_dir, tmp_path, "f32")
    try:
        result = llamacpp.agreement(loaded, llm, lines)
        assert (result.same_ids, result.lost_text) == (len(lines), 0)
    finally:
        llm.close()


def test_pieces_longer_than_32_bytes_are_decoded_whole(tmp_path):
    """llama-cpp-python's `detokenize` copies pieces through a 32-byte buffer; `piece_bytes` does not."""
    run = " " * 48
    tok = train_tokenizer(lambda: [f"a{run}b\n" * 50, "plain words for the rest\n" * 20], vocab_size=400)
    text = f"a{run}b"
    ids = tok.encode(text, bos=False)
    assert max(len(tok.pieces(text)[i].encode()) for i in range(len(ids))) > 32
    model_dir = tmp_path / "model"
    lively_model(tiny_config(tok)).save_pretrained(str(model_dir))
    tok.save(model_dir)
    llm = opened(model_dir, tmp_path, "f16")
    try:
        assert llamacpp.piece_bytes(llm, ids) == text.encode()
    finally:
        llm.close()
