"""A static KV cache for palm's own decoding (gpt-fast style), and the attention masks that go with it.

Each row of the batch owns a line of `max_len` slots per layer, [batch, n_kv_heads, max_len, head_dim],
allocated once and written in place. With multi-query attention n_kv_heads is 1: the cache is
1/n_heads the size of a multi-head one. The caller says where each new token goes (`slots`, per row,
so rows may be at different lengths) and which slots hold real tokens (`filled`); attention runs
under a mask built from those, so a decode step's shapes do not depend on the rows' contents.

`bind` chooses the window a forward pass works on: rows `first`..`first + B` (B from `slots`) and
the first `span` slots of each. A continuous-batching pool (palm.inference.engine) decodes its lowest rows
and attends over the slots its longest row has reached, rather than over every row and slot.
"""

from __future__ import annotations

import torch

from ..model.config import PalmConfig


class KVCache:
    """Keys and values per layer, written at `slots` [B, T] by the model's `cache.update(k, v, layer)`."""

    is_compileable = True

    def __init__(self, config: PalmConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.rows = torch.arange(batch, device=device)[:, None]
        self.slots = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.first, self.span = 0, max_len
        if device.type == "cuda":  # CUDA graphs replay on fixed addresses
            for t in self.keys + self.values:
                torch._dynamo.mark_static_address(t)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def bind(self, slots: torch.Tensor, first: int = 0, span: int | None = None) -> None:
        """The next forward pass writes rows first..first+B at `slots` [B, T] and attends over `span` slots."""
        self.slots, self.first, self.span = slots, first, self.max_len if span is None else span

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[: self.slots.shape[0]]
        window = slice(self.first, self.first + self.slots.shape[0])
        keys, values = self.keys[layer_idx][window], self.values[layer_idx][window]
        # Advanced indices around a slice put their dims first: [B, T, KV, D] on both sides.
        keys[rows, :, self.slots] = k.transpose(1, 2).to(keys.dtype)
        values[rows, :, self.slots] = v.transpose(1, 2).to(values.dtype)
        return keys[:, :, : self.span], values[:, :, : self.span]

    def copy_slots(self, src: int, dst: int, length: int) -> None:
        """Row dst's first `length` slots become row src's (every layer's keys and values)."""
        for t in self.keys + self.values:
            t[dst, :, :length] = t[src, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.slots.max()) + 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def attention_mask(filled: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, S] bool: the query at slots[b, t] sees the filled slots at or before it, and itself.

    `filled` [B, S] must already mark the slots being written. A padding query (not filled) sees only
    itself, so attention never has an empty row (SDPA would return NaN there).
    """
    keys = torch.arange(filled.shape[1], device=filled.device)[None, None, :]
    queries = slots[:, :, None]
    return ((filled[:, None, :] & (keys <= queries)) | (keys == queries))[:, None]


def decode_mask(filled: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, S]: a decoding query is each row's newest token, so it sees every filled slot."""
    return filled[:, None, None, :]
