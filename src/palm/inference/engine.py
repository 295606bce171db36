"""Continuous batching: requests join a running batch at any step and leave it when they are done.

The engine owns a pool of KV-cache rows (`max_batch` rows of `max_len` slots, allocated once, so a
full pool waits rather than runs out of memory). A request takes the lowest free row, has its prompt
written into it a block at a time, then decodes one token per step next to every other decoding
row, each under its own sampling settings and seeded generator (palm.inference.sampling). Each `step` runs the
prefill of waiting prompts, blocks of `block` tokens (one forward pass each, cut at multiples of `block`
from the prompt's start whatever else is waiting), up to `prefill_chunk` tokens in all, then one decode
step for every row that was decoding: a long prompt never stalls the streams already running, and it
advances at every step.

The decode step covers rows 0..B and slots 0..S, B and S the powers of two that hold the highest
decoding row and the longest one: a few fixed shapes, so few compiled graphs. Rows inside the window
that are not decoding (free, or still being prefilled) go along with a dummy token written at the
last slot, which no mask shows until a real token is written there.

Stop strings and clients that leave are the caller's (palm.serve.worker): it calls `remove`, and the
row is free for the next request at the next step.

Prefix reuse: each row remembers which prompt (and adapter) its first slots hold, running or free, until
another request writes there. Before each of a waiting request's prefill blocks, the longest whole-block
prefix of its prompt that some row holds is copied from that row (a free row holding it is taken first,
and then nothing moves), and only the rest is prefilled. Blocks are cut at multiples of `block` from the
prompt's start, so the copied keys and values are bit for bit the ones the request would have computed
(32 clients sharing a 400-token system prompt prefill their own words only, and the last block of it). A row that holds the
whole of the same prompt gives its last position's logits too: the request forks from it without any
prefill (the n choices of one prompt, OpenAI's `n`, prefill once).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from .generate import Generator
from .kvcache import KVCache, attention_mask
from .sampling import GenerationError, SamplingConfig, sample_rows
from .structured import Constraint, restrict

MIN_SPAN = 16  # the smallest attention window: shorter ones would only add compiled graphs
# Prompt tokens per prefill pass with prefix reuse on: what reuse can share. Each pass reads every weight, so
# smaller blocks prefill slower (1,000 tokens at `base`, bf16, Zen 4: +4-10% against 256-token passes, +20% at 64).
BLOCK = 128


# A token's log-probability under the model (its raw log-softmax, before any sampling setting), and the
# k most likely tokens with theirs.
Score = tuple[float, list[tuple[int, float]]]


def scores_of(logits: torch.Tensor, tokens: list[int], k: int) -> list[Score]:
    """The Score of tokens[i] under logits[i] [N, V]."""
    logp = logits.float().log_softmax(-1)
    top = logp.topk(k, dim=-1) if k else None
    chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    return [
        (c, list(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else [])
        for i, c in enumerate(chosen)
    ]


@dataclass(eq=False)
class Request:
    """One generation in the engine: its prompt, settings, and what it has produced."""

    prompt: list[int]
    cfg: SamplingConfig
    tokens: list[int] = field(default_factory=list)  # generated so far (an eos included, as the last)
    finish: str | None = None  # "stop" at eos, "length" at max_new_tokens or the row's end; None while running
    row: int | None = None
    fed: int = 0  # prompt tokens already written to the cache
    rng: torch.Generator | None = None
    adapter: int = 0  # the served LoRA adapter this row decodes with (palm.inference.multilora); 0 is the base model
    logprobs: int | None = None  # None: none; k: each generated token's log-probability and the top k
    prompt_logprobs: bool = False  # the prompt's tokens scored too (OpenAI's echo with logprobs)
    constraint: Constraint | None = None  # structured output: the row's grammar (palm.inference.structured)
    scores: list[Score] = field(default_factory=list)  # per generated token, when logprobs is set
    prompt_scores: list[Score | None] = field(default_factory=list)  # per prompt token (None: the first)
    last_logits: torch.Tensor | None = None  # the prompt's last position's [1, V], for requests that fork from it

    @property
    def decoding(self) -> bool:
        return self.row is not None and self.fed == len(self.prompt) and self.finish is None


def bucket(n: int, low: int, high: int) -> int:
    """The power of two at or above n, within [low, high]."""
    return min(high, max(low, 1 << (n - 1).bit_length()))


def pool_bytes(generator: Generator, max_batch: int, max_len: int | None = None) -> int:
    """Bytes an engine's pool takes: keys and values of every layer, plus a mask bit and a context id per slot."""
    c, length = generator.model.config, min(max_len or generator.context, generator.context)
    per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * generator.cache_dtype.itemsize + 1 + 8
    return max_batch * length * per_slot


class Engine:
    """A pool of cache rows and the requests decoding in it; `step` advances every one of them."""

    def __init__(
        self,
        generator: Generator,
        max_batch: int = 8,
        max_len: int | None = None,
        prefill_chunk: int = 256,
        reuse: bool = True,
        block: int | None = None,
    ):
        """`prefill_chunk`: prompt tokens prefilled per step, in passes of `block` tokens at most (by default
        BLOCK with prefix reuse on, prefill_chunk without it)."""
        block = (BLOCK if reuse else prefill_chunk) if block is None else block
        if max_batch < 1 or prefill_chunk < 1 or block < 1:
            raise ValueError("max_batch, prefill_chunk and block must be positive")
        self.generator = generator
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.block = min(block, prefill_chunk)
        self.max_len = min(max_len or generator.context, generator.context)
        device = generator.model.device
        self.device = device
        self.cache = KVCache(generator.model.config, max_batch, self.max_len, generator.cache_dtype, device)
        self.filled = torch.zeros(max_batch, self.max_len, dtype=torch.bool, device=device)
        self.seen = torch.full((max_batch, self.max_len), -1, dtype=torch.long, device=device)  # for the penalty
        self.adapter_of = torch.zeros(max_batch, dtype=torch.long, device=device)  # each row's LoRA adapter
        self.reuse = reuse
        self.holds: dict[int, Request] = {}  # row -> the request whose prompt its first slots hold (`fed` of them)
        self.reused_tokens = 0  # prompt tokens copied rather than prefilled: for monitoring and tests
        if generator.adapters is not None and generator.adapters.rows.numel() < max_batch:
            raise ValueError(
                f"the adapters' selector holds {generator.adapters.rows.numel()} rows, fewer than {max_batch}"
            )
        self.requests: list[Request] = []  # admission order
        self.free = list(range(max_batch))  # a heap: the lowest free row is taken first
        self.decode_steps = 0

    @property
    def full(self) -> bool:
        return not self.free

    def nbytes(self) -> int:
        """Memory the pool holds: the cache, its masks and the context ids."""
        return self.cache.nbytes() + self.filled.numel() + self.seen.numel() * self.seen.element_size()

    def add(self, request: Request) -> bool:
        """Give `request` a row; False when every row is taken (the caller keeps it waiting)."""
        request.cfg.validate()
        if not request.prompt:
            raise GenerationError("every prompt must have at least one token")
        if len(request.prompt) >= self.max_len:
            raise GenerationError(f"prompt is {len(request.prompt)} tokens; this engine's rows hold {self.max_len}")
        if not self.free:
            return False
        source, _, _ = self._held_prefix(request)
        if source in self.free:  # a free row that already holds the prefix: take it, nothing to copy
            self.free.remove(source)
            heapq.heapify(self.free)
            request.row = source
        else:
            request.row = heapq.heappop(self.free)
        request.fed, request.tokens, request.finish, request.last_logits = 0, [], None, None
        request.scores, request.prompt_scores = [], ([None] if request.prompt_logprobs else [])
        request.rng = request.cfg.generator(self.device)
        if request.adapter and self.generator.adapters is None:
            raise GenerationError("this engine's model serves no adapters")
        self.adapter_of[request.row] = request.adapter
        # Until its first prefill, the row's slots still hold what they held, for others to copy.
        self.requests.append(request)
        return True

    def _reuse(self, request: Request) -> torch.Tensor | None:
        """Copy into the request's row the longest prefix of its prompt that a row holds, when longer than
        what it has; the logits of the prompt's last position when the whole prompt was held."""
        row = request.row
        source, length, logits = self._held_prefix(request)  # before the row is claimed: it may hold the prefix
        if self.holds.get(row) is not request:  # from now on the row holds this request's prompt
            self.filled[row] = False
            self.seen[row] = -1
            self.holds[row] = request
        if length <= request.fed:
            return None
        if source != row:
            self.cache.copy_slots(source, row, length)
        self.filled[row, :length] = True
        self.seen[row, :length] = torch.tensor(request.prompt[:length], device=self.device)
        self.reused_tokens += length - request.fed
        request.fed, request.last_logits = length, logits
        return logits

    def _held_prefix(self, request: Request) -> tuple[int | None, int, torch.Tensor | None]:
        """(a row holding the longest prefix of the request's prompt, its length, the last position's logits
        when it is the whole prompt): whole blocks, or the whole prompt where its holder kept those logits
        (a prefill otherwise keeps the prompt's last token, whose logits choose the first new one)."""
        if not self.reuse or request.prompt_logprobs:  # scoring the prompt needs its every position's logits
            return None, 0, None
        best, length, logits = None, 0, None
        prompt = request.prompt
        for row, owner in self.holds.items():
            if owner is request or owner.adapter != request.adapter:
                continue
            n = 0
            for a, b in zip(owner.prompt[: owner.fed], prompt):
                if a != b:
                    break
                n += 1
            whole = n == len(prompt) == len(owner.prompt) and owner.last_logits is not None
            if not whole:
                n = min(n, len(prompt) - 1)
                n -= n % self.block
            if n > length or n == length and n and row in self.free:
                best, length, logits = row, n, owner.last_logits if whole else None
        return best, length, logits

    def remove(self, request: Request) -> None:
        """Take `request` off the engine (done, or its client gone); its row is free from the next step."""
        if request.row is not None:
            heapq.heappush(self.free, request.row)
            request.row = None
        if request in self.requests:
            self.requests.remove(request)

    @torch.inference_mode()  # without it, a one-row step ran 30x slower (oneDNN's bf16 matmul, autograd on)
    def step(self) -> list[tuple[Request, int]]:
        """Prefill what fits in the step's budget, then decode one token for every decoding row.

        Returns each new token with its request, in order; a request that ends (eos, its budget, its
        row's end) is removed and has `finish` set.
        """
        decoding = [r for r in self.requests if r.decoding]
        events = self._prefill_some()
        if decoding:
            events += zip(decoding, self._decode(decoding))
        for request, token in events:
            self._record(request, token)
        return events

    def _prefill_some(self) -> list[tuple[Request, int]]:
        events, budget = [], self.prefill_chunk
        for request in [r for r in self.requests if r.fed < len(r.prompt)]:
            while request.fed < len(request.prompt):
                logits = self._reuse(request)  # costs no budget; looked at again before each block
                if logits is not None:  # the whole prompt was held: it forks
                    events.append((request, self._sample([request], logits)[0]))
                    break
                # Whole blocks at multiples of `block`: where a prompt is cut does not depend on which other
                # prompts share the step, so neither do its numbers (bf16 rounds each pass its own way).
                n = min(self.block, len(request.prompt) - request.fed)
                if n > budget:
                    budget = 0  # in admission order: the rest only copy
                    break
                logits = self._prefill(request, n)
                budget -= n
                if request.fed == len(request.prompt):  # the prompt is in: its first token
                    events.append((request, self._sample([request], logits)[0]))
        return events

    def _prefill(self, request: Request, n: int) -> torch.Tensor:
        row, start, end = request.row, request.fed, request.fed + n
        ids = torch.tensor([request.prompt[start:end]], device=self.device)
        slots = torch.arange(start, end, device=self.device)[None]
        self.filled[row, start:end] = True
        self.seen[row, start:end] = ids[0]
        mask = attention_mask(self.filled[row : row + 1, :end], slots)
        if self.generator.adapters is not None:
            self.generator.adapters.rows[0] = request.adapter
        every = request.prompt_logprobs
        logits = self.generator.step.prefill(self.cache, ids, slots, slots, mask, first=row, every=every)
        request.fed = end
        if every:  # position p scores prompt token p + 1; the block's last position, the next block's first
            logits = logits[0]
            following = request.prompt[start + 1 : end + 1]
            request.prompt_scores += scores_of(logits[: len(following)], following, request.logprobs or 0)
            logits = logits[-1:]
        elif end == len(request.prompt):
            request.last_logits = logits.reshape(-1, logits.shape[-1])[-1:].clone()  # for requests that fork
        return logits

    def _decode(self, decoding: list[Request]) -> list[int]:
        rows = [r.row for r in decoding]
        slots = [len(r.prompt) + len(r.tokens) - 1 for r in decoding]  # where each row's newest token goes
        b = bucket(max(rows) + 1, 1, self.max_batch)
        span = bucket(max(slots) + 1, MIN_SPAN, self.max_len)
        ids = [self.generator.tokenizer.pad_id] * b
        where = [self.max_len - 1] * b  # rows that are not decoding write a dummy at the last slot
        for r, slot in zip(decoding, slots):
            ids[r.row], where[r.row] = r.tokens[-1], slot
        index = torch.tensor(rows, device=self.device)
        self.filled[index, torch.tensor(slots, device=self.device)] = True
        where_t = torch.tensor(where, device=self.device)[:, None]
        idle = torch.ones(b, 1, dtype=torch.bool, device=self.device)
        idle[index] = False
        mask = (self.filled[:b, :span] | idle)[:, None, None, :]  # an idle row sees all: no empty softmax
        if self.generator.adapters is not None:
            self.generator.adapters.rows[:b] = self.adapter_of[:b]
        logits = self.generator.step.decode(
            self.cache, torch.tensor(ids, device=self.device)[:, None], where_t, where_t, mask
        )
        self.decode_steps += 1
        return self._sample(decoding, logits[index], span)

    def _sample(self, requests: list[Request], logits: torch.Tensor, span: int | None = None) -> list[int]:
        rows = torch.tensor([r.row for r in requests], device=self.device)
        seen = self.seen[rows, :span]
        allowed = logits
        if any(r.constraint is not None for r in requests):  # masked apart: log-probabilities stay the model's own
            allowed = logits.float().clone()
            restrict(allowed, [r.constraint for r in requests])
        tokens = sample_rows(
            allowed, seen, [r.cfg for r in requests], [r.rng for r in requests], [len(r.prompt) for r in requests]
        ).tolist()
        for i, r in enumerate(requests):
            if r.logprobs is not None:
                r.scores += scores_of(logits[i : i + 1], tokens[i : i + 1], r.logprobs)
            if r.constraint is not None:
                r.constraint.accept(tokens[i])
        return tokens

    def _record(self, request: Request, token: int) -> None:
        request.tokens.append(token)
        slot = len(request.prompt) + len(request.tokens) - 1
        if slot < self.max_len:
            self.seen[request.row, slot] = token
        if token in self.generator.eos_ids:
            request.finish = "stop"
        elif len(request.tokens) >= request.cfg.max_new_tokens or slot >= self.max_len - 1:  # no slot for more
            request.finish = "length"
        if request.finish is not None:
            self.remove(request)
