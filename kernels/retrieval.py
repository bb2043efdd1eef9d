"""Chunk-level retrieval over the full KV cache, for the middle speculation level.

The KV of every layer is cut into chunks of `chunk_size` tokens; each chunk is represented by its
mean key (per KV head). The middle level attends only to the chunks whose mean key scores highest
against the current query, plus the attention-sink chunk and the recent tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChunkMeans:
    """Mean key of every complete chunk, per layer and KV head, kept up to date as tokens are
    appended (only newly completed chunks are computed) and rolled back (a pointer moves)."""

    def __init__(self, cache, chunk_size: int):
        n_layers, hkv, max_len, d = cache.k.shape
        self.chunk_size = chunk_size
        self._means = torch.zeros(n_layers, hkv, max_len // chunk_size, d, dtype=torch.float32, device=cache.k.device)
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
        keys = cache.k[:, :, first * c : last * c].float()  # [n_layers, Hkv, n*c, D]
        n_layers, hkv, _, d = keys.shape
        self._means[:, :, first:last] = keys.view(n_layers, hkv, last - first, c, d).mean(3)
        self._n_complete = last

    def on_truncate(self, cache, length: int) -> None:
        self._n_complete = min(self._n_complete, length // self.chunk_size)


def select_chunks(query: Tensor, means: Tensor, k: int, always: list[int] | tuple[int, ...] = (0,)) -> Tensor:
    """Top-k chunks per KV head. query [Hq, D]; means [Hkv, C, D] -> LongTensor [Hkv, min(k, C)]
    sorted ascending; the chunks in `always` are always part of the selection."""
    hkv, n_chunks, _ = means.shape
    k = min(k, n_chunks)
    if k <= 0:
        return torch.empty(hkv, 0, dtype=torch.long, device=means.device)
    g = query.shape[0] // hkv
    q = query.float().view(hkv, g, -1).sum(1)  # summed scores of a group = group-summed query . key
    scores = torch.einsum("hd,hcd->hc", q, means)  # [Hkv, C]
    for idx in always:
        if idx < n_chunks:
            scores[:, idx] = float("inf")
    top = scores.topk(k, dim=-1).indices
    return top.sort(dim=-1).values


def gather_chunks(k_layer: Tensor, v_layer: Tensor, chunk_idx: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """k_layer/v_layer [Hkv, L, D], chunk_idx [Hkv, n] -> gathered [Hkv, n*chunk_size, D] each."""
    hkv, n = chunk_idx.shape
    offsets = torch.arange(chunk_size, device=chunk_idx.device)
    pos = (chunk_idx.unsqueeze(-1) * chunk_size + offsets).reshape(hkv, n * chunk_size)  # [Hkv, n*c]
    index = pos.unsqueeze(-1).expand(-1, -1, k_layer.shape[-1])
    return torch.gather(k_layer, 1, index), torch.gather(v_layer, 1, index)
