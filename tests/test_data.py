"""Token shards, deterministic batches and validation windows."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from palm.core.errors import CorpusError
from palm.data import corpora, shardbuild
from palm.data.corpora import CorpusPart
from palm.data.data import TokenData, get_batch, unigram_bits_per_byte, val_bytes_for, val_windows
from palm.data.shards import prepare_data, token_byte_lengths, token_dtype

SEQ = 16
ANIMALS = ["cat", "dog", "owl", "fox", "eel", "yak", "emu", "ant"]


def documents(n: int) -> list[str]:
    """Distinct short documents, English and Chinese, each naming its own number."""
    zh = "我们一起去公园散步吧。"
    return [
        f"Document {i}: the {ANIMALS[i % 8]} reads the {ANIMALS[(i * 3) % 8]} a story.{' ' + zh if i % 3 == 0 else ''}"
        for i in range(n)
    ]


def write_jsonl(path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


def split_documents(stream: np.ndarray, eod: int) -> list[list[int]]:
    out, current = [], []
    for t in stream.tolist():
        if t == eod:
            out.append(current)
            current = []
        else:
            current.append(t)
    assert current == []  # every document ends with <eod>
    return out


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    write_jsonl(path, documents(60))
    return path


def prepare(tokenizer, tmp_path, *paths, seq_len=SEQ, val_fraction=0.2):
    parts = [CorpusPart(str(p), 1 / len(paths), "path") for p in paths]
    return prepare_data(parts, tokenizer, tmp_path / "cache", seq_len, val_fraction=val_fraction, progress=False)


def test_token_dtype():
    assert token_dtype(1024) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_documents_are_split_whole_and_each_kept_once(tokenizer, tmp_path, corpus):
    data = prepare(tokenizer, tmp_path, corpus)
    docs = documents(60)
    train = split_documents(np.asarray(data.train[0]), tokenizer.eod_id)
    val = split_documents(np.asarray(data.val[0]), tokenizer.eod_id)
    assert train and val and len(train) + len(val) == 60
    assert sorted(tokenizer.decode(d) for d in train + val) == sorted(docs)
    assert all(ids == tokenizer.encode(tokenizer.decode(ids), bos=False) for ids in train[:5])
    assert data.val_bytes[0] == sum(len(tokenizer.decode(d).encode("utf-8")) for d in val)
    assert data.train[0].dtype == np.uint16 and data.vocab_size == len(tokenizer)

    (folder,) = data.shard_dirs
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["split"] == "document" and meta["dtype"] == "uint16"
    assert meta["train"]["docs"] == len(train) and meta["val"]["docs"] == len(val)
    assert meta["train"]["tokens"] == len(data.train[0])
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind


def test_the_split_is_the_same_every_time(tokenizer, tmp_path, corpus):
    a = prepare(tokenizer, tmp_path / "a", corpus)
    b = prepare(tokenizer, tmp_path / "b", corpus)
    assert np.array_equal(a.val[0], b.val[0]) and np.array_equal(a.train[0], b.train[0])


def test_shards_are_reused_until_a_file_changes(tokenizer, tmp_path, corpus, monkeypatch):
    first = prepare(tokenizer, tmp_path, corpus)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(shardbuild.Encoder, "encode", refuse)  # forked workers inherit it too
        again = prepare(tokenizer, tmp_path, corpus, seq_len=2 * SEQ)  # the sequence length is not part of the key
    assert again.shard_dirs == first.shard_dirs
    assert np.array_equal(again.train[0], first.train[0])

    (first.shard_dirs[0] / "train.bin").write_bytes(b"\0\0")  # damaged: rebuilt under the same key
    rebuilt = prepare(tokenizer, tmp_path, corpus)
    assert rebuilt.shard_dirs == first.shard_dirs and np.array_equal(rebuilt.val[0], first.val[0])
    assert len(rebuilt.train[0]) == len(np.fromfile(first.shard_dirs[0] / "train.bin", dtype=np.uint16))

    write_jsonl(corpus, documents(61))
    changed = prepare(tokenizer, tmp_path, corpus)
    assert changed.shard_dirs != first.shard_dirs
    assert len(changed.train[0]) + len(changed.val[0]) > len(first.train[0]) + len(first.val[0])


def test_validation_fraction_is_part_of_the_key(tokenizer, tmp_path, corpus):
    a = prepare(tokenizer, tmp_path, corpus, val_fraction=0.2)
    b = prepare(tokenizer, tmp_path, corpus, val_fraction=0.5)
    assert a.shard_dirs != b.shard_dirs and len(b.val[0]) > len(a.val[0])


def test_a_failing_corpus_leaves_no_shard(tokenizer, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", documents(30))
    (folder / "b.jsonl").write_text("not json\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="not valid JSON"):
        prepare(tokenizer, tmp_path, folder)
    assert list((tmp_path / "cache").iterdir()) == []


def test_few_documents_split_by_position(tokenizer, tmp_path):
    path = tmp_path / "small.jsonl"
    write_jsonl(path, documents(5))
    data = prepare(tokenizer, tmp_path, path, val_fraction=0.05)
    whole = np.concatenate([data.train[0], data.val[0]])
    assert split_documents(whole, tokenizer.eod_id) == [tokenizer.encode(d, bos=False) for d in documents(5)]
    assert len(data.val[0]) == SEQ + 1  # 5% would be a token or two: one full sequence instead
    assert data.val_bytes[0] == token_byte_lengths(tokenizer)[data.val[0]].sum()


def test_too_small_corpus(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("A few words.", encoding="utf-8")
    with pytest.raises(
        CorpusError, match=r"^corpus .*tiny.txt is too small: \d+ training tokens, need at least 513 for one sequence$"
    ):
        prepare(tokenizer, tmp_path, path, seq_len=512)


def test_empty_corpora(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(CorpusError, match="is empty"):
        prepare(tokenizer, tmp_path, path)
    monkeypatch.setitem(corpora.NAMED_CORPORA, "nothing", lambda: iter(()))
    with pytest.raises(CorpusError, match="^corpus nothing is empty"):
        prepare_data([CorpusPart("nothing", 1.0, "named")], tokenizer, tmp_path / "cache", SEQ, progress=False)


def test_unknown_named_corpus(tokenizer, tmp_path):
    with pytest.raises(CorpusError, match="unknown corpus 'wiki'"):
        prepare_data([CorpusPart("wiki", 1.0, "named")], tokenizer, tmp_path / "cache", SEQ, progress=False)


# ---- batches ----


def synthetic(weights=(0.75, 0.25), seq_len=SEQ) -> TokenData:
    """Two corpora whose tokens tell them apart: ids below 500 and ids from 500."""
    train = [np.arange(2000, dtype=np.uint16) % 500, 500 + np.arange(300, dtype=np.uint16)]
    return TokenData(
        ["low", "high"], list(weights), train, [np.arange(50, dtype=np.uint16)] * 2, [50, 50], 1024, seq_len
    )


def test_a_batch_is_a_function_of_seed_and_step():
    data = synthetic()
    batch = get_batch(data, step=7, seed=1, batch_size=8)
    assert batch.shape == (8, SEQ + 1) and batch.dtype == torch.int64
    assert torch.equal(batch, get_batch(data, step=7, seed=1, batch_size=8))
    assert not torch.equal(batch, get_batch(data, step=8, seed=1, batch_size=8))
    assert not torch.equal(batch, get_batch(data, step=7, seed=2, batch_size=8))
    # Rows are consecutive stretches of one corpus's stream.
    for row in batch:
        low = row[0] < 500
        assert bool((row < 500).all()) if low else bool((row >= 500).all())
        if not low:
            assert torch.equal(row.diff(), torch.ones(SEQ, dtype=torch.int64))


def test_rows_are_slices_of_the_global_batch():
    data = synthetic()
    full = get_batch(data, step=3, seed=0, batch_size=12)
    parts = [get_batch(data, step=3, seed=0, batch_size=12, rows=range(r, r + 4)) for r in (0, 4, 8)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError):
        get_batch(data, step=3, seed=0, batch_size=12, rows=range(10, 14))


def test_mixture_follows_the_weights():
    batch = get_batch(synthetic((0.75, 0.25)), step=0, seed=0, batch_size=2000)
    share = (batch[:, 0] < 500).float().mean().item()
    assert share == pytest.approx(0.75, abs=0.04)


def test_batches_are_fast_and_hold_valid_ids(tokenizer, tmp_path, corpus):
    data = prepare(tokenizer, tmp_path, corpus, seq_len=8)
    batch = get_batch(data, step=0, seed=0, batch_size=32)
    assert batch.shape == (32, 9) and 0 <= batch.min() and batch.max() < len(tokenizer)
    big = synthetic(seq_len=512)
    big.train = [np.arange(100_000, dtype=np.uint16), np.arange(50_000, dtype=np.uint16)]
    start = time.perf_counter()
    for step in range(10):
        get_batch(big, step=step, seed=0, batch_size=32)
    assert (time.perf_counter() - start) / 10 < 0.05


# ---- evaluation ----


def test_val_windows_predict_each_token_once(tokenizer, tmp_path, corpus):
    data = prepare(tokenizer, tmp_path, corpus, seq_len=8, val_fraction=0.3)
    val = np.asarray(data.val[0])
    windows = list(val_windows(data, 0))
    assert all(w.shape[0] == 1 and 2 <= w.shape[1] <= 9 and w.dtype == torch.int64 for w in windows)
    assert torch.equal(torch.cat([w[0, 1:] for w in windows]), torch.from_numpy(val[1:].astype(np.int64)))
    assert torch.equal(torch.cat([w[0, :-1] for w in windows]), torch.from_numpy(val[:-1].astype(np.int64)))

    capped = list(val_windows(data, 0, max_tokens=20))
    covered = sum(w.shape[1] - 1 for w in capped)
    assert covered == 20
    table = token_byte_lengths(tokenizer)
    assert val_bytes_for(data, 0, covered) == table[val[1:21]].sum()
    # All targets plus the first token are the whole validation text.
    assert val_bytes_for(data, 0, len(val)) + table[val[0]] == data.val_bytes[0]


@pytest.mark.parametrize(
    "text", ["plain English, with 123 digits.", "我喜欢编程，因为它让我的大脑跳跃。", "emoji 😀🦜 and 𝔘𝔫𝔦 and ✓ ⟨x⟩"]
)
def test_token_byte_lengths_count_utf8_bytes(tokenizer, text):
    table = token_byte_lengths(tokenizer)
    assert len(table) == len(tokenizer)
    assert table[tokenizer.encode(text, bos=False)].sum() == len(text.encode("utf-8"))
    assert table[[tokenizer.eod_id, tokenizer.bos_id, tokenizer.pad_id]].sum() == 0


def test_unigram_baseline_beats_uniform(tokenizer, tmp_path, corpus):
    data = prepare(tokenizer, tmp_path, corpus, val_fraction=0.3)
    table = token_byte_lengths(tokenizer)
    bpb = unigram_bits_per_byte(data, 0, table)
    targets = np.asarray(data.val[0][1:])
    uniform = math.log2(len(tokenizer)) * len(targets) / table[targets].sum()
    assert math.isfinite(bpb) and 0 < bpb < uniform
