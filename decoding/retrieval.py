"""The middle level's KV store: the target's own full cache seen through a chunk selection.

The view keeps one small contiguous buffer per layer, so that a middle-level step is a single
attention call over about `budget` keys, as cheap as a step at that context length (merging
separate segments cost twice that):

    [ selected chunks | full[sel_end : full.length] | scratch[:scratch_len] ]

- selected chunks: the sink chunk + the top-scoring chunks, chosen against the latest query and
  gathered from the full cache at each rebuild;
- the recent window: tokens that arrived after the selection, copied from the full cache as they
  come (a few per round), so generation length is not bounded by the budget;
- scratch: the middle level's own drafted tokens, discarded after every verification (the full
  target's keys/values for the accepted tokens then land in the full cache and are copied in as
  recent tokens, over the old scratch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from triforce_chat.decoding.cache import KVCache, PreparedBlocks
from triforce_chat.decoding.config import parse_budget
from triforce_chat.kernels.backends import attend_tokens, select_chunks
from triforce_chat.kernels.retrieval import ChunkMeans, gather_chunks


def recent_window_for(budget: int, chunk_size: int) -> int:
    """Tokens at the end of the context always kept, for a budget of `budget` tokens."""
    return max(chunk_size, min(256, budget // 8) // chunk_size * chunk_size)


def recent_limit_for(budget: int, chunk_size: int) -> int:
    """Recent tokens held before a rebuild re-selects; the buffer keeps this much headroom."""
    return max(recent_window_for(budget, chunk_size) * 2, budget // 2)


def view_buffer_tokens(context: int, budget: int, chunk_size: int, scratch: int = 256) -> int:
    """The most tokens the buffer reserves at a rebuild over `context` tokens: the selection (at
    most the budget), the recent headroom and the scratch, in whole 256-token steps; 0 when the
    budget covers the context (the view is then the full cache). The memory guard's figure."""
    if context <= budget:
        return 0
    need = min(budget, context) + recent_limit_for(budget, chunk_size) + scratch
    return -(-need // 256) * 256


class RetrievalView:
    """A KVStore for the middle level (see module docstring)."""

    exact_windows = False  # a drafter: its windows need not equal its single steps

    def __init__(self, cache: KVCache, budget: str | int = 4096, chunk_size: int = 8, scratch: int = 256):
        if chunk_size < 1:
            raise ValueError("chunk size must be >= 1")
        self.cache = cache
        self.chunk_size = chunk_size
        self.scratch_capacity = scratch
        self.budget_tokens, self.budget_fraction = parse_budget(budget)
        self.chunks = ChunkMeans(cache, chunk_size)
        self.k = self.v = cache.k[:, :, :0]  # [layers, Hkv, capacity, D], allocated at rebuild
        self.blocks: PreparedBlocks | None = None  # as the full cache's, when it keeps them (_reserve)
        self.scratch_len = 0
        self._scratch_base = 0  # buffer index of scratch[0], set by positions() for the forward
        self.n_sel = 0  # buffer tokens holding the selected chunks
        self.sel_end = 0  # tokens before sel_end are covered by the selection (or are dropped)
        self.copied_end = 0  # full-cache tokens in [sel_end, copied_end) are in the buffer
        self.n_selected_chunks = 0
        self.rebuilds = 0
        self.stale = True
        self.rebuild_listeners: list = []  # called after every rebuild (decoding/sources.py reads the same query)
        cache.listeners.append(self)

    # -- selection -------------------------------------------------------------------------------
    def budget_for(self, context: int) -> int:
        if self.budget_fraction:
            return max(self.chunk_size * 2, int(self.budget_fraction * context))
        return self.budget_tokens

    def selects(self, context: int) -> bool:
        """Whether a context of this many tokens is more than the budget: else the view holds all of
        it, and the "middle level" would be the target itself (it is skipped)."""
        return context > self.budget_for(context)

    @property
    def recent_window(self) -> int:
        """Tokens at the end of the context always kept (read from the full cache as they are)."""
        return recent_window_for(self.budget_for(self.cache.length), self.chunk_size)

    @property
    def recent_tokens(self) -> int:
        return self.cache.length - self.sel_end

    @property
    def recent_limit(self) -> int:
        """Recent tokens held before a rebuild re-selects; the buffer keeps this much headroom."""
        return recent_limit_for(self.budget_for(self.cache.length), self.chunk_size)

    @property
    def needs_rebuild(self) -> bool:
        """Stale after a rollback below the selection, or when the recent part has grown past half
        the budget (generation is long: re-score so that the budget stays the cost)."""
        return self.stale or self.recent_tokens > self.recent_limit

    def rebuild(self) -> None:
        """Select chunks against the latest query of every layer and gather them into the buffer."""
        cache, c = self.cache, self.chunk_size
        length = cache.length
        budget = self.budget_for(length)
        self.scratch_len = 0
        self.stale = False
        self.rebuilds += 1
        self.sel_end = self.copied_end = self.n_sel = self.n_selected_chunks = 0
        if length <= budget or cache.last_query[0] is None:  # everything fits: the view is the full cache
            return
        recent = self.recent_window
        self.sel_end = self.copied_end = min(self.chunks.n_complete, (length - recent) // c) * c
        n_pick = max(1, (budget - (length - self.sel_end)) // c)
        n = min(n_pick, self.sel_end // c) * c  # select_chunks picks at most the chunks there are
        # room for the selection, the recent window as it grows until the next rebuild, the scratch
        self._reserve(n + self.recent_limit + self.scratch_capacity, keep=False)
        for layer in range(cache.k.shape[0]):
            idx = select_chunks(cache.last_query[layer], self.chunks.means(layer)[:, : self.sel_end // c], n_pick)
            keys, values = cache.k[layer, :, : self.sel_end], cache.v[layer, :, : self.sel_end]
            gather_chunks(keys, values, idx, c, out=(self.k[layer, :, :n], self.v[layer, :, :n]))
            if self.blocks is not None:  # the selection's blocks now, in the rebuild's measured cost
                self.blocks.refresh(layer, self.k[layer], self.v[layer], 0, n)
        self.n_sel = n
        self.n_selected_chunks = int(idx.shape[1])
        for listener in self.rebuild_listeners:
            listener()

    def _reserve(self, need: int, keep: bool = True) -> None:
        """A buffer of at least `need` tokens; `keep` copies what it held."""
        if self.k.shape[2] < need:
            old_k, old_v = self.k, self.v
            self.k = old_k.new_empty(*old_k.shape[:2], -(-need // 256) * 256, old_k.shape[3])
            self.v = torch.empty_like(self.k)
            if self.cache.blocks is not None:  # made again as they are read
                self.blocks = self.cache.blocks.like(self.k.shape[2])
            if keep:
                self.k[:, :, : old_k.shape[2]] = old_k
                self.v[:, :, : old_v.shape[2]] = old_v

    def _sync_recent(self) -> int:
        """Copy the full cache's tokens that arrived since the last call; returns where scratch starts."""
        cache = self.cache
        start = self.n_sel + self.copied_end - self.sel_end
        base = self.n_sel + cache.length - self.sel_end
        self._reserve(base + self.scratch_capacity)  # grows only if a rebuild's headroom ran out
        if cache.length > self.copied_end:
            full = slice(self.copied_end, cache.length)
            if self.blocks is not None:
                self.blocks.truncate(start)
            self.k[:, :, start:base] = cache.k[:, :, full]
            self.v[:, :, start:base] = cache.v[:, :, full]
            self.copied_end = cache.length
        return base

    # -- KVStore protocol ------------------------------------------------------------------------
    def positions(self, n: int) -> Tensor:
        start = self.cache.length + self.scratch_len
        if self.scratch_len + n > self.scratch_capacity:
            raise ValueError("retrieval scratch overflow: draft window too long")
        self._scratch_base = self._sync_recent()
        return torch.arange(start, start + n, device=self.cache.k.device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D] over the buffer (causal in its tail)."""
        end = self._scratch_base + self.scratch_len + k.shape[0]
        start = end - k.shape[0]
        k_buf, v_buf = self.k[layer], self.v[layer]
        k_buf[:, start:end] = k.transpose(0, 1)
        v_buf[:, start:end] = v.transpose(0, 1)
        blocks = self.blocks.refresh(layer, k_buf, v_buf, start, end) if self.blocks else None
        return attend_tokens(q, k_buf, v_buf, end, self.cache.scale, blocks)

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
        self.copied_end = max(self.sel_end, min(self.copied_end, length))

    # -- figures ------------------------------------------------------------------------------------
    @property
    def buffer_bytes(self) -> int:
        """Memory of the view's buffers (keys and values, and their prepared blocks, allocated)."""
        blocks = 2 * self.blocks.k.numel() * self.blocks.k.element_size() if self.blocks is not None else 0
        return 2 * self.k.numel() * self.k.element_size() + blocks

    @property
    def attended_tokens(self) -> int:
        return self.n_selected_chunks * self.chunk_size + self.recent_tokens
