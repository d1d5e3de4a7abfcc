"""The transformers forward for models the lean GPT-2 forward does not cover.

Rows live in one left-padded DynamicCache: each row has its own attention mask and position
ids; joining rows are left-padded to the batch's length and concatenated, leaving rows are
removed with index_select, and leading columns that are padding in every row are cropped.
Slower than gpt2.py (every join and leave copies the cache) but works for any causal LM.
"""

from __future__ import annotations

import heapq

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a buffer with room for GROW more tokens.

    DynamicLayer appends each token with torch.cat, copying the whole cache every step (batch
    32 after 128 tokens in bf16: 6 layers x 2 x 32 x 12 heads x 128 x 64 x 2 B = 75 MB per
    step). Here a step writes one column in place and the copy happens once per GROW steps.
    """

    GROW = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = self.keys, self.values
        n, m = (k.shape[-2] if k.numel() else 0), key_states.shape[-2]
        buf = getattr(self, "_buf", None)
        if (buf is None or k.data_ptr() != buf[0].data_ptr() or n + m > buf[0].shape[-2]
                or buf[0].shape[:2] != key_states.shape[:2] or buf[0].dtype != key_states.dtype):
            shape = (*key_states.shape[:2], n + m + self.GROW, key_states.shape[-1])
            buf = self._buf = (key_states.new_empty(shape), value_states.new_empty(shape))
            if n:
                buf[0][:, :, :n], buf[1][:, :, :n] = k, v
        buf[0][:, :, n:n + m], buf[1][:, :, n:n + m] = key_states, value_states
        self.keys, self.values = buf[0][:, :, :n + m], buf[1][:, :, :n + m]
        return self.keys, self.values


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class HFForward:
    """Same interface as GPT2Forward (builder.Forward): allocate/release slots, prefill, decode."""

    def __init__(self, model, slots: int, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.rows: list[int] = []  # the slot of each batch row
        self.cache: DynamicCache | None = None
        self.mask = self.pos = None
        self._free = list(range(slots))

    def allocate(self) -> int:
        return heapq.heappop(self._free)

    def describe(self) -> None:
        return None  # transformers' own kernels

    def release(self, slots: list[int], held: list[list[int]] | None = None) -> None:
        """`held` is ignored: no prefix cache here (its KV lives in transformers' cache)."""
        for s in slots:
            heapq.heappush(self._free, s)
        keep = [i for i, s in enumerate(self.rows) if s not in slots]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.pos = None
            return
        idx = torch.tensor(keep, device=self.device)
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        first = int(self.mask.any(0).int().argmax())  # columns that are padding in every row
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]

    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        order = [self.rows.index(s) for s in slots]
        ids = torch.empty(len(self.rows), dtype=torch.long, device=self.device)
        ids[order] = tokens
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        out = self.model(input_ids=ids[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                         cache=self.cache, use_cache=True)
        self.pos = self.pos + 1
        return out.logits[order, -1].float()

    def prefill(self, slots: list[int], prompts: list[list[int]], every_position: bool = False):
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        cache.layers = [_GrowingLayer() for _ in cache.layers]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                         cache=cache, use_cache=True, logits_to_keep=0 if every_position else 1)
        self._merge(slots, cache, mask, mask.sum(1))
        if every_position:  # left padding: prompt i fills the last len(prompt i) positions
            return [out.logits[i, width - len(p):].float() for i, p in enumerate(prompts)]
        return out.logits[:, -1].float()

    def _merge(self, slots: list[int], cache: DynamicCache, mask: torch.Tensor, pos: torch.Tensor) -> None:
        if self.cache is None:
            self.rows, self.cache, self.mask, self.pos = list(slots), cache, mask, pos
            return
        la, lb = self.mask.shape[1], mask.shape[1]
        width = max(la, lb)
        self.mask = torch.cat([_left_pad(self.mask, width - la, 1), _left_pad(mask, width - lb, 1)])
        for a, b in zip(self.cache.layers, cache.layers):
            a.keys = torch.cat([_left_pad(a.keys, width - la, 2), _left_pad(b.keys, width - lb, 2)])
            a.values = torch.cat([_left_pad(a.values, width - la, 2), _left_pad(b.values, width - lb, 2)])
        self.pos = torch.cat([self.pos, pos])
        self.rows += slots
