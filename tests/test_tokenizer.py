import json

import pytest
from conftest import corpus_texts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from palm import PalmTokenizer, TokenizerError, train_tokenizer
from palm.data.documents import iter_documents
from palm.text.tokenizer import BYTE_TOKENS, SPECIAL_TOKENS

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Arbitrary Unicode (hypothesis leaves out lone surrogates, which are not valid Unicode), plus a
# dense mix of the characters where lossless tokenizers usually slip.
TRICKY = st.text(
    alphabet=st.sampled_from(list(" \t\n\r\x00\x0b\u00a0\u3000▁<>/s0123456789.éeé\u0301我喜欢，😀👍🏽\u200d\ufeff")),
    max_size=60,
)
ANY_TEXT = st.one_of(st.text(max_size=200), TRICKY)


@SETTINGS
@given(ANY_TEXT)
def test_round_trip_is_lossless(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@SETTINGS
@given(ANY_TEXT)
def test_auto_tokenizer_gives_palm_ids(tokenizer, tokenizer_dir, text):
    hf = _auto(tokenizer_dir)
    assert hf(text).input_ids == tokenizer.encode(text)
    assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text


_AUTO = {}


def _auto(path):
    if path not in _AUTO:
        _AUTO[path] = AutoTokenizer.from_pretrained(path)
    return _AUTO[path]


def test_paper_digit_example(tokenizer):
    assert tokenizer.pieces("123.5") == ["1", "2", "3", ".", "5"]


@SETTINGS
@given(st.integers(min_value=0, max_value=10**30), st.text(alphabet="abc ,.", max_size=3))
def test_every_number_splits_into_digits(tokenizer, n, glue):
    digits = [p for p in tokenizer.pieces(f"{glue}{n}{glue}") if any(c.isdigit() for c in p)]
    assert digits == list(str(n))


def test_unseen_characters_fall_back_to_utf8_bytes(tokenizer):
    for ch in ["ꙮ", "🦜", "ᚠ", "\x07"]:
        assert ch not in tokenizer.hf.get_vocab()
        assert tokenizer.pieces(ch) == [f"<0x{b:02X}>" for b in ch.encode("utf-8")]


def test_vocabulary_layout(tokenizer):
    vocab = tokenizer.hf.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert [vocab[t] for t in BYTE_TOKENS] == list(range(5, 261))
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.eod_id) == (0, 1, 2, 4)
    assert len(tokenizer) == 1024


def test_special_token_text_is_plain_text(tokenizer):
    ids = tokenizer.encode("<s></s><eod><0x41>", bos=False)
    assert not set(ids) & {0, 1, 2, 3, 4} and tokenizer.decode(ids) == "<s></s><eod><0x41>"


def test_whitespace_survives_pretokenization(tokenizer):
    text = "def f(x):\n\tif x:\n        return  x  \n"
    words = [w for w, _ in tokenizer.hf.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert "".join(words) == text
    # an indentation run stays whole, less the one space that a word carries in front of it
    assert "\n" + " " * 7 in words and " return" in words and "  \n" in words


def test_auto_tokenizer_specials_and_padding(tokenizer_dir):
    hf = _auto(tokenizer_dir)
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.padding_side) == ("<s>", "</s>", "<pad>", "left")
    batch = hf(["a", "a longer line"], padding=True)
    assert batch.input_ids[0][0] == hf.pad_token_id and batch.attention_mask[0][0] == 0


def test_jsonl_and_folder_corpora(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n"
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_text("third", encoding="utf-8")
    (sub / ".hidden").write_text("skipped", encoding="utf-8")
    (sub / "c.pyc").write_bytes(b"\x00\x01binary")  # binaries inside a folder are passed over
    assert list(iter_documents([tmp_path])) == ["first doc", "second", "third"]


def test_small_vocab_rejected():
    with pytest.raises(TokenizerError, match="at least"):
        train_tokenizer(lambda: ["some text"], vocab_size=10)


def test_load_missing_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        PalmTokenizer.load(tmp_path)


def test_batch_encoding_gives_the_same_ids_as_one_by_one(tokenizer):
    texts = ["def f(x):\n    return x  # 12\n\n\n", "我喜欢编程，因为 ✨ e\u0301", "<s> \t tail  ", ""]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t, bos=False) for t in texts]
    assert tokenizer.encode_batch(texts, bos=True) == [tokenizer.encode(t) for t in texts]


def test_same_corpus_gives_the_same_tokenizer(tmp_path):
    # Many characters of a small corpus share a count; the vocabulary must not depend on hash order.
    for name in ("a", "b", "c"):
        train_tokenizer(corpus_texts, vocab_size=1024).save(tmp_path / name)
    files = {(tmp_path / name / "tokenizer.json").read_bytes() for name in ("a", "b", "c")}
    assert len(files) == 1


def test_template_markup_has_special_tokens_and_leaves_plain_text_alone(tokenizer):
    ids, offsets = tokenizer.encode_markup("<s>User: hi\nAssistant: yo</s>\n")
    assert ids[0] == tokenizer.bos_id and tokenizer.eos_id in ids and len(offsets) == len(ids)
    # Encoding markup must not change how the same tokenizer reads text afterwards (the server shares one).
    assert tokenizer.bos_id not in tokenizer.encode("<s></s>", bos=False)
    assert tokenizer.decode(tokenizer.encode("<s></s>")) == "<s></s>"
