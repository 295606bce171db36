"""palm's own decoding path (gpt-fast style): a static KV cache holding only the shared K/V head(s),
one prefill pass, then one fixed-shape decode step per token, optionally compiled whole
(`torch.compile(fullgraph=True)`, with CUDA graphs on a GPU), without Transformers' generate() machinery.
The step (palm.inference.step) runs on the weights in a decoding layout (palm.inference.quant: prepacked or transposed for
the CPU, or int8 / fp16), the one `palm serve`'s continuous batching runs too: a copy beside a model
handed in, or, for a model loaded for decoding alone (`Generator.load`), in its place.

Greedy decoding gives the same tokens as `model.generate(do_sample=False)`; sampling (temperature,
top-k, top-p, repetition penalty) is reproducible from a seed; batches are left-padded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..model.model import PalmForCausalLM
from ..text.tokenizer import PalmTokenizer
from .kvcache import KVCache, attention_mask, decode_mask
from .sampling import GenerationError, SamplingConfig, sample_rows, saved_defaults
from .step import Stepper, forward_step

if TYPE_CHECKING:
    from .multilora import AdapterRows
    from .structured import Grammars

__all__ = ["Completion", "GenerationError", "Generator", "KVCache", "SamplingConfig", "forward_step"]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"


def cache_length(needed: int, context: int, compiled: bool) -> int:
    """Slots to allocate: exactly what is needed, or (compiled) the next power of two, so that a few
    shapes, and so a few compiled graphs, serve every request length."""
    if not compiled:
        return needed
    return min(context, max(64, 1 << (needed - 1).bit_length()))


class Generator:
    """Loads a palm model directory once and decodes prompts with palm's fast path."""

    def __init__(
        self,
        model: PalmForCausalLM,
        tokenizer: PalmTokenizer,
        compile: bool = False,
        quantize: str = "none",
        in_place: bool = False,
    ):
        """`in_place`: the decoding weights replace the model's own (one copy of them in memory); the model
        then decodes, and Transformers' generate() still runs on it, but it is not one to train or save."""
        self.model = model.eval()  # as given, unless in_place: Transformers' generate() and scoring keep using it
        self.tokenizer = tokenizer
        self.context = model.config.max_position_embeddings
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else [tokenizer.eos_id, tokenizer.eod_id]
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.defaults = saved_defaults(model.generation_config)  # what a caller's unsaid settings become
        self.cache_dtype = next(model.parameters()).dtype
        self.compiled = compile
        self.step = Stepper(model, quantize, compile, in_place=in_place)
        self.adapters: AdapterRows | None = None  # served LoRA adapters, chosen per row (palm.inference.multilora)
        self._grammars: Grammars | None = None

    def grammars(self) -> Grammars:
        """The grammar compiler for this model's vocabulary (structured output), made when first asked for."""
        if self._grammars is None:
            from .structured import Grammars

            self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size, sorted(self.eos_ids))
        return self._grammars

    def add_adapters(self, adapters: Mapping[str, str | Path], max_rows: int = 256) -> None:
        """Serve these LoRA adapters (name -> peft directory) beside the base model, a choice per row."""
        from .multilora import attach

        self.adapters = attach(self.step.decoder, adapters, self.tokenizer, max_rows)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str | None = None,
        dtype: str = "auto",
        compile: bool = False,
        quantize: str = "none",
        adapter: str | Path | None = None,
    ) -> Generator:
        """The model in `model_dir`, with the LoRA adapter in `adapter` merged in when one is given; it is
        loaded for this generator alone, so its decoding weights take the place of its own."""
        if adapter is not None:
            from ..weights.lora import load_merged

            model, tokenizer = load_merged(model_dir, adapter, device=device, dtype=dtype)
        else:
            from ..weights.modeldir import load_model
            from .quant import decoding_weights

            model, tokenizer = load_model(model_dir, device=device, dtype=dtype, place=decoding_weights(quantize))
        return cls(model, tokenizer, compile=compile, quantize=quantize, in_place=True)

    def sampling(self, **given) -> SamplingConfig:
        """Settings for a request: those given (None means unsaid), else the model's saved defaults."""
        return SamplingConfig(**{**self.defaults, **{k: v for k, v in given.items() if v is not None}})

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's ids (BOS first); ids are taken as they are (a chat prompt, say), checked the same way."""
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        if len(ids) >= self.context:
            raise GenerationError(f"prompt is {len(ids)} tokens; the model's context is {self.context}")
        return ids

    @torch.inference_mode()
    def token_stream(self, prompts: list[list[int]], cfg: SamplingConfig) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, step by step (rows that finished keep yielding eos)."""
        cfg.validate()
        if self.adapters is not None:
            self.adapters.rows.zero_()  # a static batch decodes with the base model
        if not prompts or any(not p for p in prompts):
            raise GenerationError("every prompt must have at least one token")
        device = self.model.device
        longest = max(map(len, prompts))
        new = min(cfg.max_new_tokens, self.context - longest)
        if new < 1:
            raise GenerationError(f"prompt is {longest} tokens; the model's context is {self.context}")
        batch, pad = len(prompts), self.tokenizer.pad_id
        size = cache_length(longest + new, self.context, self.compiled)
        cache = KVCache(self.model.config, batch, size, self.cache_dtype, device)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
        filled = torch.zeros(batch, size, dtype=torch.bool, device=device)
        filled[:, :longest] = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts])
        seen = torch.full((batch, size), -1, dtype=torch.long, device=device)  # context ids, for the penalty
        seen[:, :longest] = torch.where(filled[:, :longest], ids, -1)
        positions = (filled[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
        slots = torch.arange(longest, device=device).expand(batch, -1)
        logits = self.step.prefill(cache, ids, positions, slots, attention_mask(filled, slots))
        cfgs, gens = [cfg] * batch, [cfg.generator(device)] * batch
        for step in range(new):
            token = sample_rows(logits, seen, cfgs, gens, [longest] * batch)
            yield token
            if step == new - 1:
                break
            slot = longest + step
            filled[:, slot] = True
            seen[:, slot] = token
            positions = positions[:, -1:] + 1
            slots = torch.full((batch, 1), slot, dtype=torch.long, device=device)
            logits = self.step.decode(cache, token[:, None], positions, slots, decode_mask(filled))

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
                text, stopped = cut_at_stop(self.tokenizer.decode(rows[r]), cfg.stop)
                texts[r] = text
                if stopped:
                    done[r], reasons[r] = True, "stop"
            if all(done):
                break
        return [Completion(t, ids, len(e), why) for t, ids, e, why in zip(texts, rows, encoded, reasons)]

    def stream(self, prompt: str | list[int], cfg: SamplingConfig, stats: dict | None = None) -> Iterator[str]:
        """Text of one completion as it is produced: whole characters only, never past a stop string."""
        ids: list[int] = []
        emitted, finish, start = 0, "length", time.perf_counter()
        for token in self.token_stream([self.encode(prompt)], cfg):
            t = int(token[0])
            if t in self.eos_ids:
                finish = "stop"
                break
            ids.append(t)
            text, stopped = cut_at_stop(self.tokenizer.decode(ids), cfg.stop)
            if stopped:
                finish = "stop"
                break
            safe = min(printable(text, cfg.stop), settled(self.tokenizer, ids))
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = cut_at_stop(self.tokenizer.decode(ids), cfg.stop)[0]
        if len(text) > emitted:
            yield text[emitted:]
        if stats is not None:
            stats.update(tokens=len(ids), seconds=time.perf_counter() - start, finish_reason=finish)


def settled(tokenizer: PalmTokenizer, ids: list[int]) -> int:
    """Length of the text that later tokens can no longer change: all but the trailing run of byte
    tokens. A run decodes as one UTF-8 sequence, or as one U+FFFD per byte where it is invalid, so
    a byte already shown as "j" may become U+FFFD once the next byte joins its run."""
    end = len(ids)
    while end and ids[end - 1] in tokenizer.byte_ids:
        end -= 1
    return len(tokenizer.decode(ids[:end]))


def printable(text: str, stops: list[str]) -> int:
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


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
