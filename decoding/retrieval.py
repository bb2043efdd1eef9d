"""The middle level's KV store: the target's own full cache seen through a chunk selection.

There is one copy of the KV (the full cache). The view holds, per layer, the gathered keys/values
of the selected chunks (sink chunk + top-scoring chunks, chosen against the latest query), reads the
tokens that arrived after the selection directly from the full cache (the recent window: generation
length is not bounded by the budget), and writes the middle level's own drafted tokens into a small
scratch buffer that is discarded after every verification (the full target's keys/values for the
accepted tokens then land in the full cache and become part of the recent window).

Layout per layer: [ selected chunks | full[sel_end : full.length] | scratch[:scratch_len] ]
"""

from __future__ import annotations

import torch
from torch import Tensor

from triforce_chat.decoding.cache import KVCache
from triforce_chat.kernels.attention import attend_segments
from triforce_chat.kernels.retrieval import ChunkMeans, gather_chunks, select_chunks


def parse_budget(budget: str | int | float) -> tuple[int, float]:
    """'4096' -> (4096 tokens, 0.0); '0.1' or '10%' -> (0, 0.1 of the context)."""
    text = str(budget).strip()
    try:
        if text.endswith("%"):
            frac = float(text[:-1]) / 100
        else:
            value = float(text)
            if value >= 1:
                if value != int(value):
                    raise ValueError
                return int(value), 0.0
            frac = value
    except ValueError:
        raise ValueError(
            f"budget must be a token count (e.g. 4096) or a fraction of the context (e.g. 0.1 or 10%): {budget}"
        ) from None
    if not 0 < frac < 1:
        raise ValueError(f"budget fraction must be between 0 and 1: {budget}")
    return 0, frac


class RetrievalView:
    """A KVStore for the middle level (see module docstring)."""

    def __init__(self, cache: KVCache, budget: str | int = 4096, chunk_size: int = 8, scratch: int = 256):
        if chunk_size < 1:
            raise ValueError("chunk size must be >= 1")
        self.cache = cache
        self.chunk_size = chunk_size
        self.budget_tokens, self.budget_fraction = parse_budget(budget)
        self.chunks = ChunkMeans(cache, chunk_size)
        n_layers, hkv, _, d = cache.k.shape
        self.scratch_k = torch.empty(n_layers, hkv, scratch, d, dtype=cache.k.dtype, device=cache.k.device)
        self.scratch_v = torch.empty_like(self.scratch_k)
        self.scratch_len = 0
        self.sel_k: list[Tensor] = []
        self.sel_v: list[Tensor] = []
        self.sel_end = 0  # tokens before sel_end are covered by the selection (or are dropped)
        self.n_selected_chunks = 0
        self.rebuilds = 0
        self.stale = True
        cache.listeners.append(self)

    # -- selection -------------------------------------------------------------------------------
    def budget_for(self, context: int) -> int:
        if self.budget_fraction:
            return max(self.chunk_size * 2, int(self.budget_fraction * context))
        return self.budget_tokens

    @property
    def recent_window(self) -> int:
        """Tokens at the end of the context always kept (read from the full cache as they are)."""
        budget = self.budget_for(self.cache.length)
        return max(self.chunk_size, min(256, budget // 8) // self.chunk_size * self.chunk_size)

    @property
    def recent_tokens(self) -> int:
        return self.cache.length - self.sel_end

    @property
    def needs_rebuild(self) -> bool:
        """Stale after a rollback below the selection, or when the recent part has grown past half
        the budget (generation is long: re-score so that the budget stays the cost)."""
        return self.stale or self.recent_tokens > max(self.recent_window * 2, self.budget_for(self.cache.length) // 2)

    def rebuild(self) -> None:
        """Select chunks against the latest query of every layer and gather them."""
        cache, c = self.cache, self.chunk_size
        length = cache.length
        budget = self.budget_for(length)
        self.sel_k, self.sel_v = [], []
        self.scratch_len = 0
        self.stale = False
        self.rebuilds += 1
        if length <= budget or cache.last_query[0] is None:
            self.sel_end = 0  # everything fits: the view is the full cache
            self.n_selected_chunks = 0
            return
        recent = self.recent_window
        self.sel_end = min(self.chunks.n_complete, (length - recent) // c) * c
        n_pick = max(1, (budget - (length - self.sel_end)) // c)
        for layer in range(cache.k.shape[0]):
            idx = select_chunks(cache.last_query[layer], self.chunks.means(layer)[:, : self.sel_end // c], n_pick)
            k, v = gather_chunks(cache.k[layer, :, : self.sel_end], cache.v[layer, :, : self.sel_end], idx, c)
            self.sel_k.append(k)
            self.sel_v.append(v)
        self.n_selected_chunks = int(idx.shape[1])

    # -- KVStore protocol ------------------------------------------------------------------------
    def positions(self, n: int) -> Tensor:
        start = self.cache.length + self.scratch_len
        if self.scratch_len + n > self.scratch_k.shape[2]:
            raise ValueError("retrieval scratch overflow: draft window too long")
        return torch.arange(start, start + n, device=self.cache.k.device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s, e = self.scratch_len, self.scratch_len + k.shape[1]
        self.scratch_k[layer, :, s:e] = k
        self.scratch_v[layer, :, s:e] = v
        cache = self.cache
        segments = []
        if self.sel_k:
            segments.append((self.sel_k[layer], self.sel_v[layer]))
        recent = slice(self.sel_end, cache.length)
        segments.append((cache.k[layer, :, recent], cache.v[layer, :, recent]))
        segments.append((self.scratch_k[layer, :, :e], self.scratch_v[layer, :, :e]))
        return attend_segments(q, segments, cache.scale)

    def advance(self, n: int) -> None:
        self.scratch_len += n

    def truncate_scratch(self, n: int) -> None:
        self.scratch_len = n

    # -- full-cache listener -----------------------------------------------------------------------
    def on_append(self, cache: KVCache, start: int, end: int) -> None:
        pass

    def on_truncate(self, cache: KVCache, length: int) -> None:
        if length < self.sel_end:
            self.stale = True

    # -- figures ------------------------------------------------------------------------------------
    @property
    def attended_tokens(self) -> int:
        return self.n_selected_chunks * self.chunk_size + self.recent_tokens
