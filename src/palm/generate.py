"""palm's own decoding path: a preallocated KV cache holding only the shared K/V head(s), one
prefill pass, then one small forward per token, without Transformers' generate() machinery.

Greedy decoding gives the same tokens as `model.generate(do_sample=False)`; sampling (temperature,
top-k, top-p, repetition penalty) is reproducible from a seed; batches are left-padded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, GenerationInputError
from .flops import fast_bf16
from .model import PalmForCausalLM
from .tokenizer import BYTE_TOKENS, SPECIAL_TOKENS, PalmTokenizer


# A request that cannot be served: empty or over-long prompt, bad sampling values.
GenerationError = GenerationInputError


BYTE_IDS = range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(BYTE_TOKENS))  # the <0xXX> pieces


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be 0 (greedy) or positive"),
            (self.top_k >= 0, "top_k must be 0 (off) or positive"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be positive"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"


class StaticCache:
    """Preallocated keys and values, [batch, n_kv_heads, max_len, head_dim] per layer, written in place.

    With multi-query attention n_kv_heads is 1: the cache is 1/n_heads the size of a multi-head
    one. It speaks the `update(k, v, layer_idx)` protocol the model's blocks use for any cache.
    """

    def __init__(self, model: PalmForCausalLM, batch: int, max_len: int, dtype: torch.dtype):
        c = model.config
        shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
        device = model.device
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_hidden_layers)]
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[-2]
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        if layer_idx == len(self.keys) - 1:
            self.length = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def sample_next(logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]; `seen` [B, S] are the ids in context (pads < 0)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        # Transformers' rule (CTRL paper): shrink the logits of every token already in the context.
        index = seen.clamp(min=0)
        prev = logits.gather(1, index)
        prev = torch.where(prev < 0, prev * cfg.repetition_penalty, prev / cfg.repetition_penalty)
        logits = logits.scatter(1, index, torch.where(seen >= 0, prev, logits.gather(1, index)))
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)


class Generator:
    """Loads a palm model directory once and decodes prompts with palm's fast path."""

    def __init__(self, model: PalmForCausalLM, tokenizer: PalmTokenizer, compile: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context = model.config.max_position_embeddings
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else [tokenizer.eos_id, tokenizer.eod_id]
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.cache_dtype = next(model.parameters()).dtype
        self._forward = torch.compile(self._step, dynamic=True) if compile else self._step

    @classmethod
    def load(cls, model_dir: str | Path, device: str | None = None, dtype: str = "auto", compile: bool = False) -> Generator:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a model directory (config.json is missing)")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar would garble streamed output
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        want = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and fast_bf16(dev)) else torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=want).to(dev)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(model, PalmForCausalLM):
            raise CheckpointError(f"{path} holds a {type(model).__name__}, not a palm model")
        return cls(model, PalmTokenizer.load(path), compile=compile)

    def _step(self, ids, mask, positions, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if len(ids) >= self.context:
            raise GenerationError(f"prompt is {len(ids)} tokens; the model's context is {self.context}")
        return ids

    @torch.inference_mode()
    def token_stream(self, prompts: list[list[int]], cfg: SamplingConfig) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, step by step (rows that finished keep yielding eos)."""
        cfg.validate()
        if not prompts or any(not p for p in prompts):
            raise GenerationError("every prompt must have at least one token")
        device = self.model.device
        longest = max(map(len, prompts))
        new = min(cfg.max_new_tokens, self.context - longest)
        if new < 1:
            raise GenerationError(f"prompt is {longest} tokens; the model's context is {self.context}")
        pad = self.tokenizer.pad_id
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        padded = bool((mask == 0).any())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        seen = torch.where(mask.bool(), ids, -1)
        cache = StaticCache(self.model, len(prompts), longest + new, self.cache_dtype)
        gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
        logits = self._forward(ids, mask if padded else None, positions, cache)
        for _ in range(new):
            token = sample_next(logits, seen, cfg, gen)
            yield token
            seen = torch.cat([seen, token[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
            positions = positions[:, -1:] + 1
            logits = self._forward(token[:, None], mask if padded else None, positions, cache)

    def generate(self, prompts: list[str], cfg: SamplingConfig) -> list[Completion]:
        """Complete a batch of prompts together (left-padded)."""
        encoded = [self.encode(p) for p in prompts]
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        texts = [""] * len(prompts)
        reasons = ["length"] * len(prompts)
        for token in self.token_stream(encoded, cfg):
            for r, t in enumerate(token.tolist()):
                if done[r]:
                    continue
                if t in self.eos_ids:
                    done[r], reasons[r] = True, "stop"
                    continue
                rows[r].append(t)
                text, stopped = self._cut_at_stop(self.tokenizer.decode(rows[r]), cfg.stop)
                texts[r] = text
                if stopped:
                    done[r], reasons[r] = True, "stop"
            if all(done):
                break
        return [Completion(t, ids, len(e), why) for t, ids, e, why in zip(texts, rows, encoded, reasons)]

    def stream(self, prompt: str, cfg: SamplingConfig, stats: dict | None = None) -> Iterator[str]:
        """Text of one completion as it is produced: whole characters only, never past a stop string."""
        ids: list[int] = []
        emitted, finish, start = 0, "length", time.perf_counter()
        for token in self.token_stream([self.encode(prompt)], cfg):
            t = int(token[0])
            if t in self.eos_ids:
                finish = "stop"
                break
            ids.append(t)
            text, stopped = self._cut_at_stop(self.tokenizer.decode(ids), cfg.stop)
            if stopped:
                finish = "stop"
                break
            safe = min(self._printable(text, cfg.stop), self._settled(ids))
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = self._cut_at_stop(self.tokenizer.decode(ids), cfg.stop)[0]
        if len(text) > emitted:
            yield text[emitted:]
        if stats is not None:
            stats.update(tokens=len(ids), seconds=time.perf_counter() - start, finish_reason=finish)

    def _settled(self, ids: list[int]) -> int:
        """Length of the text that later tokens can no longer change: all but the trailing run of byte
        tokens. A run decodes as one UTF-8 sequence, or as one U+FFFD per byte where it is invalid, so
        a byte already shown as "j" may become U+FFFD once the next byte joins its run."""
        end = len(ids)
        while end and ids[end - 1] in BYTE_IDS:
            end -= 1
        return len(self.tokenizer.decode(ids[:end]))

    @staticmethod
    def _printable(text: str, stops: list[str]) -> int:
        """How much of `text` can be shown: not a trailing incomplete UTF-8 sequence (decoded as U+FFFD),
        nor a tail that may yet grow into a stop string."""
        safe = len(text.rstrip("\ufffd"))
        held = 0
        for s in stops:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    held = max(held, k)
                    break
        return safe - held

    @staticmethod
    def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
        cuts = [text.find(s) for s in stops if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)
