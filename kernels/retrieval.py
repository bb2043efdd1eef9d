"""Chunk-level retrieval over the full KV cache, for the middle speculation level.

The KV of every layer is cut into chunks of `chunk_size` tokens; each chunk is represented by its
mean key (per KV head). The middle level attends only to the chunks whose mean key scores highest
against the current query, plus the attention-sink chunk and the recent tokens.

Costs (see `kernels/bench_cpu.py`): the means are kept incrementally (a decode step that completes
a chunk averages that one chunk for every layer in one op); scoring is one small batched GEMV per
layer; gathering copies whole chunks (`chunk_size * D` contiguous elements each) with one indexing
op per K and V, never an element-wise index.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChunkMeans:
    """Mean key of every complete chunk, per layer and KV head, kept up to date as tokens are
    appended (only newly completed chunks are computed) and rolled back (a pointer moves)."""

    def __init__(self, cache, chunk_size: int):
        if chunk_size < 1:
            raise ValueError("chunk size must be >= 1")
        n_layers, hkv, max_len, d = cache.k.shape
        self.chunk_size = chunk_size
        self._means = torch.zeros(
            n_layers, hkv, max_len // chunk_size, d, dtype=torch.float32, device=cache.k.device
        )
        self._n_complete = 0
        cache.listeners.append(self)
        self.on_append(cache, 0, cache.length)

    @property
    def n_complete(self) -> int:
        return self._n_complete

    def means(self, layer: int) -> Tensor:  # [Hkv, n_complete, D]
        return self._means[layer, :, : self._n_complete]

    def on_append(self, cache, start: int, end: int) -> None:
        c = self.chunk_size
        first, last = self._n_complete, end // c
        if last <= first:
            return
        keys = cache.k[:, :, first * c : last * c]  # [n_layers, Hkv, n*c, D], any dtype
        n_layers, hkv, _, d = keys.shape
        # fp32 accumulation without materialising an fp32 copy of the keys
        torch.mean(keys.reshape(n_layers, hkv, last - first, c, d), dim=3, dtype=torch.float32,
                   out=self._means[:, :, first:last])
        self._n_complete = last

    def on_truncate(self, cache, length: int) -> None:
        self._n_complete = min(self._n_complete, length // self.chunk_size)


def chunk_scores(query: Tensor, means: Tensor) -> Tensor:
    """query [Hq, D], means [Hkv, C, D] -> fp32 [Hkv, C]: the scores of a KV head's query heads
    summed (= the group-summed query dotted with each mean)."""
    hkv = means.shape[0]
    g = query.shape[0] // hkv
    q = query.float().view(hkv, g, -1).sum(1, keepdim=True)  # [Hkv, 1, D]
    return torch.bmm(q, means.float().transpose(1, 2)).squeeze(1)


def select_chunks_torch(query: Tensor, means: Tensor, k: int, always=(0,)) -> Tensor:
    """Top-k chunks per KV head in plain PyTorch (any device; `backends.select_chunks` dispatches).
    query [Hq, D]; means [Hkv, C, D] -> LongTensor [Hkv, min(k, C)] sorted ascending; the chunks
    in `always` are always part of the selection."""
    hkv, n_chunks, _ = means.shape
    k = min(k, n_chunks)
    if k <= 0:
        return torch.empty(hkv, 0, dtype=torch.long, device=means.device)
    if k == n_chunks:
        return torch.arange(n_chunks, device=means.device).expand(hkv, n_chunks).clone()
    scores = chunk_scores(query, means)
    forced = [i for i in always if 0 <= i < n_chunks]
    if forced:
        scores[:, forced] = float("inf")
    top = scores.topk(k, dim=-1, sorted=False).indices
    return top.sort(dim=-1).values


select_chunks = select_chunks_torch


def gather_chunks(
    k_layer: Tensor, v_layer: Tensor, chunk_idx: Tensor, chunk_size: int, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """k_layer/v_layer [Hkv, L, D], chunk_idx [Hkv, n] -> gathered [Hkv, n*chunk_size, D] each,
    chunks in the order of `chunk_idx`. With `out`, writes into those [Hkv, n*chunk_size, D]
    tensors (e.g. views of a preallocated buffer) and returns them."""
    hkv, n = chunk_idx.shape
    _, length, d = k_layer.shape
    c = chunk_size
    n_chunks = length // c
    heads = torch.arange(hkv, device=chunk_idx.device).unsqueeze(1)  # [Hkv, 1]
    result = []
    for i, x in enumerate((k_layer, v_layer)):
        chunks = x[:, : n_chunks * c].unflatten(1, (n_chunks, c))  # [Hkv, C, c, D] view
        gathered = chunks[heads, chunk_idx].reshape(hkv, n * c, d)  # whole chunks copied
        if out is not None:
            gathered = out[i].copy_(gathered)
        result.append(gathered)
    return result[0], result[1]
