"""A preallocated key/value cache indexed by batch slot (gpt-fast's static cache, with slots).

Every running request owns one slot: row `slot` of each layer's [slots, heads, context, head
dim] buffers. Joining writes the prompt's keys into a free row and leaving just frees the
row, so neither copies anyone else's cache (a left-padded DynamicCache concatenates and
re-indexes the whole batch each time a request joins or leaves). Memory is allocated once:
DistilGPT2 at 32 slots x 1,024 positions in bf16 is 6 layers x 2 x 32 x 1,024 x 768 x 2 B
= 604 MB.

Prefix caching: a slot remembers the token ids whose keys it holds (`held`), also after its
request ends, so a later prompt that starts with them (the next turn of a conversation, the
same context with another continuation) copies those positions instead of recomputing them.
DistilGPT2 in float32, 800 positions: 6 layers x 2 x 800 x 768 x 4 B = 29 MB, ~2 ms to copy
at 20 GB/s, against ~0.5 s to recompute on 2 cores. Nothing is allocated for it: what is
remembered lives in the free slots of the same buffers, and a new request takes the lowest
free slot (packing) after moving that slot's memory into the free slot used least recently,
so the one forgotten is the least recently used (LRU); when the prefix it wants is in another
free slot, the two trade memories and nothing is forgotten. Scoring requests (echo + logprobs) need
every prompt position's scores, so those are remembered with the keys (a few KB per slot).
"""

from __future__ import annotations

import heapq

import torch


class SlotKVCache:
    def __init__(self, n_layer: int, slots: int, n_head: int, context: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, n_head, context, head_dim)
        # one buffer, so that moving a slot's positions is one copy call for every layer's keys
        # and values, not 2 x n_layer: each call is a parallel region that a core taken by
        # another process stalls (~8 ms a call measured with a second busy process on 2 cores)
        self.kv = torch.zeros((2, n_layer, *shape), dtype=dtype, device=device)
        self.keys = list(self.kv[0].unbind(0))  # [slots, heads, context, head dim] views per layer
        self.values = list(self.kv[1].unbind(0))
        self.lengths = [0] * slots  # tokens held per slot
        self.held: list[list[int]] = [[] for _ in range(slots)]  # their ids, kept after release
        # per slot, scores of held tokens 1.. (entry j scores held[j + 1]) and their top-k, from
        # a request that asked for prompt scores: a later one with the same top-k reuses them
        self.scores: list[tuple[int, list] | None] = [None] * slots
        self._used = [0] * slots  # when each slot's memory was last written or reused
        self._clock = 0
        self._free = list(range(slots))  # a heap: the lowest free slot is taken first, which
        # keeps the used slots packed at the front and the decoded range [0, highest) short

    @property
    def slots(self) -> int:
        return len(self.lengths)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self.allocate_for(None)[0]

    def allocate_for(self, prefix_of: list[int] | None) -> tuple[int, int]:
        """The lowest free slot and how many leading ids of `prefix_of` it already holds (0 with
        no ids): copied there from the slot holding the longest prefix of them, if any."""
        src, n = self.longest_prefix(prefix_of) if prefix_of else (-1, 0)
        slot = heapq.heappop(self._free)
        scores = self.scores[src] if n else None
        if n and src != slot and src in self._free:  # both free: trade memories, forget neither
            self._swap(src, slot)
        else:
            if src != slot and self.held[slot]:  # keep its memory: evict the least recently used instead
                lru = min((s for s in self._free if s != src), key=self._used.__getitem__, default=None)
                if lru is not None and self._used[lru] < self._used[slot]:
                    self._move(slot, lru)
            if n and src != slot:
                self.copy(src, slot, n)
            if n:
                self._touch(src)  # its memory just served: the last to be forgotten
        self.held[slot] = list(prefix_of[:n]) if n else []
        # the first n ids match, so do the scores of ids 1 .. n-1
        self.scores[slot] = (scores[0], scores[1][:n - 1]) if scores else None
        self.lengths[slot] = n
        return slot, n

    def truncate(self, slot: int, n: int) -> None:
        """Keep only the first n positions of `slot` (the rest will be recomputed)."""
        self.lengths[slot] = min(n, self.lengths[slot])
        del self.held[slot][n:]

    def release(self, slot: int, held: list[int] | None = None) -> None:
        """Free `slot`; `held`: the ids whose keys it holds, remembered for later prompts."""
        self.held[slot] = list(held[:self.lengths[slot]]) if held else []
        if not self.held[slot]:
            self.scores[slot] = None
        self.lengths[slot] = 0
        self._touch(slot)
        heapq.heappush(self._free, slot)

    def longest_prefix(self, ids: list[int]) -> tuple[int, int]:
        """(slot, n): the slot holding the longest prefix of `ids`, and its length n (0: none)."""
        best, n = -1, 0
        for slot, held in enumerate(self.held):
            if len(held) > n and (m := common_prefix(held, ids)) > n:
                best, n = slot, m
        return best, n

    def remember(self, slot: int, ids: list[int], scores: tuple[int, list] | None = None) -> None:
        """`slot` now holds the keys of `ids` (a prefill wrote them) and, if given, the scores
        of ids 1.. with their top-k."""
        self.held[slot] = list(ids)
        if scores is not None:
            self.scores[slot] = scores
        self._touch(slot)

    def copy(self, src: int, dst: int, n: int) -> None:
        self.kv[:, :, dst, :, :n] = self.kv[:, :, src, :, :n]

    def _move(self, src: int, dst: int) -> None:
        self.copy(src, dst, len(self.held[src]))
        self.held[dst], self.scores[dst], self._used[dst] = self.held[src], self.scores[src], self._used[src]

    def _swap(self, a: int, b: int) -> None:
        n = len(self.held[b])
        saved = self.kv[:, :, b, :, :n].clone()
        self.copy(a, b, len(self.held[a]))
        self.kv[:, :, a, :, :n] = saved
        self.held[a], self.held[b] = self.held[b], self.held[a]
        self.scores[a], self.scores[b] = self.scores[b], self.scores[a]
        self._used[a], self._used[b] = self._used[b], self._used[a]

    def forget(self) -> None:
        """Remember nothing (the memory stays allocated)."""
        self.held = [[] for _ in self.held]
        self.scores = [None] * len(self.scores)

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self._used[slot] = self._clock


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by bisection over slice comparisons: ~10 C-speed
    compares for 1,024 ids where an element-wise Python loop takes ~50 us per slot."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
