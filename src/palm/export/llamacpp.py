"""An exported GGUF run with llama-cpp-python (`pip install 'palm[gguf]'`): palm's ids in, ids and
logits out, and llama.cpp's own tokenizer measured against palm's.

Two pitfalls of llama-cpp-python are avoided here. `Llama.detokenize` copies each piece through a
32-byte buffer and silently mangles longer ones (palm has whitespace-run pieces longer than that),
and it drops a space after a leading BOS (a habit of Llama 1's vocabulary); `piece_bytes` asks
llama.cpp for each piece with a buffer of the size it says it needs. And llama.cpp's defaults (an F16
KV cache, flash attention where it likes) cost about 1e-3 in the logits, so `open_gguf(exact=True)`
keeps the cache in F32 with flash attention off.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..text.tokenizer import PalmTokenizer
from .formats import ExportError


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ExportError("running GGUF needs llama-cpp-python: pip install 'palm[gguf]'") from None
    return llama_cpp


def version() -> str:
    return _llama_cpp().__version__


def open_gguf(
    path: str | Path,
    n_ctx: int = 512,
    threads: int | None = None,
    exact: bool = True,
    all_logits: bool = True,
    vocab_only: bool = False,
):
    """A `llama_cpp.Llama` on the file at `path`; `all_logits` keeps every position's logits (for
    `logits`), which costs a prefill the head's matmul at every position; `vocab_only` reads the
    tokenizer and no weights (enough for `tokenize`, `piece_bytes`, `agreement`). Close it when done."""
    llama_cpp = _llama_cpp()
    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if exact else {}
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=all_logits,
            flash_attn=False,
            vocab_only=vocab_only,
            verbose=False,
            **cache,
        )
    except ValueError as e:  # what llama-cpp-python raises for a file llama.cpp will not load
        raise ExportError(f"llama.cpp cannot load {path}: {e}") from None


def logits(llm, ids: Sequence[int]) -> np.ndarray:
    """[len(ids), vocab] logits for `ids` from an empty context."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: Sequence[int], n: int, never: Iterable[int] = ()) -> list[int]:
    """The next `n` ids after `ids`: the argmax of llama.cpp's logits at each step, decoding one token at a
    time on its KV cache, leaving out the ids in `never` (what Transformers' `min_new_tokens` does to the
    end ids, so that both sides can be asked for the same 32 tokens; an end id does not stop it)."""
    llama_cpp = _llama_cpp()
    # llama-cpp-python's own way to bar ids is a logits processor that it marks "probably broken";
    # reading the last position's logits and taking the argmax here is the greedy sampler without it.
    barred = np.array(sorted(set(never)), dtype=np.int64)
    llm.reset()
    llm.eval(list(ids))
    out: list[int] = []
    while len(out) < n:
        if out:
            llm.eval(out[-1:])
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        row[barred] = -np.inf
        out.append(int(row.argmax()))
    return out


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's own ids for `text`, without BOS, special-token names read as text."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def piece_bytes(llm, ids: Iterable[int]) -> bytes:
    """The bytes of `ids` as llama.cpp decodes them, piece by piece, with no length limit."""
    llama_cpp = _llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    size = 64
    buffer = ctypes.create_string_buffer(size)
    out = bytearray()
    for token in ids:
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if n < 0:  # the piece needs -n bytes
            size = -n
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        out += buffer.raw[:n]
    return bytes(out)


@dataclass
class Agreement:
    """Of `lines` texts: how many llama.cpp tokenizes to palm's ids, and how many it cannot give back."""

    lines: int = 0
    same_ids: int = 0
    lost_text: int = 0  # decoding llama.cpp's ids does not give the text back

    @property
    def share(self) -> float:
        return self.same_ids / self.lines if self.lines else 1.0


def agreement(tokenizer: PalmTokenizer, llm, texts: Iterable[str]) -> Agreement:
    result = Agreement()
    for text in texts:
        ids = tokenize(llm, text)
        result.lines += 1
        result.same_ids += ids == tokenizer.encode(text, bos=False)
        result.lost_text += piece_bytes(llm, ids) != text.encode("utf-8")
    return result
