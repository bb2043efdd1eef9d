"""The bottom level's KV store: StreamingLLM attention (sink tokens + a sliding window).

A small draft model over a long document cannot afford a full cache, and its draft quality never
affects correctness (the levels above verify every token), so it attends to the first `sink` tokens
plus the last `window` tokens only. Keys keep their true positions (RoPE is applied when they are
written), so nothing is re-rotated on eviction.

Visibility is defined per query, not per call: the query at absolute position p sees keys j with
j <= p and (j < sink or j > p - window). That makes every key/value a function of the token prefix
alone, independent of how the context was chunked into forwards or how it was reached through
extend/truncate, which is what lets rollback be exact and testable against a fresh cache.

Buffer layout per layer ([n_layers, Hkv, capacity, D]):
    [ positions 0 .. sink-1 | positions base .. length-1 | free ]
Before anything is evicted base == sink and slot j holds position j. When the buffer fills, the
recent part is compacted (one copy) down to the last `window + slack` positions: `slack` extra
tokens are kept so that rolling back up to `slack` tokens still leaves the full window visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from triforce_chat.kernels.backends import attend, attend_segments


class StreamingCache:
    """Sink + sliding-window KV store with exact rollback of up to `slack` tokens (see module doc)."""

    exact_windows = False  # the bottom drafter's cache

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, scale: float, *,
        sink: int = 4, window: int = 1024, slack: int = 64, headroom: int | None = None,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ):
        if sink < 0 or window < 1 or slack < 0:
            raise ValueError(f"invalid streaming cache sizes: sink={sink}, window={window}, slack={slack}")
        self.sink, self.window, self.slack, self.scale = sink, window, slack, scale
        # Room beyond window + slack before a compaction: larger means rarer copies. Each compaction
        # copies about window + slack tokens, so with headroom >= window/2 the amortised copy is
        # under ~3 token-copies per appended token.
        self.headroom = max(256, window // 2) if headroom is None else max(1, headroom)
        self.keep = window + slack  # recent positions kept by a compaction
        capacity = sink + self.keep + self.headroom
        shape = (n_layers, n_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # tokens of context the cache represents
        self.base = sink  # oldest non-sink position still stored
        # Oldest non-sink position whose keys/values are known to equal a fresh cache's (raised by
        # restart(), whose re-prefill sees a truncated past; see ModelDrafter.truncate).
        self.exact_from = sink
        self.compactions = 0
        self._mask_key: tuple[int, int, int, int] | None = None
        self._mask = torch.empty(0, dtype=torch.bool)

    @classmethod
    def for_model(cls, model, **kwargs) -> StreamingCache:
        a = model.args
        # float32 on CPU: the drafter's short cache goes through PyTorch's masked attention
        dtype = model.dtype
        return cls(a.n_layers, a.n_kv_heads, a.head_dim, model.scale, dtype=dtype, device=model.device, **kwargs)

    # -- layout ------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _slot(self, pos: int) -> int:
        return pos if pos < self.sink else self.sink + pos - self.base

    def _lowest_visible(self, pos: int) -> int:
        """Oldest non-sink position the query at `pos` reads."""
        return max(self.sink, pos - self.window + 1, self.base)

    def _make_room(self, n: int) -> None:
        """Ensure slots for n more tokens: compact the recent part, growing the buffer only when a
        single forward is larger than the headroom."""
        if self._slot(self.length + n - 1) < self.capacity or self.length + n <= self.sink:
            return
        new_base = max(self.sink, self.length - self.keep, self.base)
        if new_base > self.base:
            src = slice(self._slot(new_base), self._slot(self.length))
            count = self.length - new_base
            # source and destination overlap when count > shift: copy through a temporary
            self.k[:, :, self.sink : self.sink + count] = self.k[:, :, src].clone()
            self.v[:, :, self.sink : self.sink + count] = self.v[:, :, src].clone()
            self.base = new_base
            self.compactions += 1
        need = self._slot(self.length + n - 1) + 1
        if need > self.capacity:
            extra = need - self.capacity + self.headroom
            pad = self.k.new_empty(*self.k.shape[:2], extra, self.k.shape[3])
            self.k = torch.cat([self.k, pad], dim=2)
            self.v = torch.cat([self.v, pad], dim=2)

    # -- KVStore protocol ----------------------------------------------------------------------------
    def positions(self, n: int) -> Tensor:
        self._make_room(n)
        return torch.arange(self.length, self.length + n, device=self.k.device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]."""
        T, hq, d = q.shape
        out = self._attend_heads(layer, q.transpose(0, 1).to(self.k.dtype), k.transpose(0, 1), v.transpose(0, 1))
        return out.transpose(0, 1).reshape(T, hq * d).to(q.dtype)

    def _attend_heads(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [Hq, T, D]; k, v [Hkv, T, D] -> [Hq, T, D]
        T = k.shape[1]
        first, last = self.length, self.length + T - 1  # positions of the new tokens
        lo_w, hi_w = self._slot(first), self._slot(last) + 1
        self.k[layer, :, lo_w:hi_w] = k
        self.v[layer, :, lo_w:hi_w] = v
        K, V = self.k[layer], self.v[layer]  # [Hkv, capacity, D]
        lo = self._lowest_visible(first)  # oldest non-sink key any of the queries reads
        n_sink = min(self.sink, last + 1)
        if lo == self.sink and self.base == self.sink and last - self.window + 1 <= self.sink:
            # nothing evicted and no query's window excludes anything: plain causal attention over
            # slots 0..last (the same kernel the full cache uses)
            return attend(q, K[:, :hi_w], V[:, :hi_w], self.scale)
        rec = slice(self._slot(lo), hi_w)
        if T == 1:
            # one query sees exactly the sinks plus [lo, last]: no mask needed
            return attend_segments(q, [(K[:, :n_sink], V[:, :n_sink]), (K[:, rec], V[:, rec])], self.scale)
        keys = torch.cat([K[:, :n_sink], K[:, rec]], dim=1)  # [Hkv, Lk, D]
        vals = torch.cat([V[:, :n_sink], V[:, rec]], dim=1)
        return masked_attend(q, keys, vals, self._band_mask(first, last, lo, n_sink), self.scale)

    def _band_mask(self, first: int, last: int, lo: int, n_sink: int) -> Tensor:
        """[T, Lk] visibility of keys (sinks, then lo..last) for queries first..last; the same for
        every layer of one forward, so it is built once."""
        key = (first, last, lo, n_sink)
        if self._mask_key != key:
            dev = self.k.device
            kpos = torch.cat([torch.arange(n_sink, device=dev), torch.arange(lo, last + 1, device=dev)])
            # kpos [Lk]: positions of the sink keys, then of lo..last
            qpos = torch.arange(first, last + 1, device=dev).unsqueeze(1)  # [T, 1]
            self._mask = (kpos <= qpos) & ((kpos < self.sink) | (kpos > qpos - self.window))  # [T, Lk]
            self._mask_key = key
        return self._mask

    def advance(self, n: int) -> None:
        self.length += n

    # -- rollback ------------------------------------------------------------------------------------
    def can_truncate(self, length: int) -> bool:
        """Whether truncating to `length` leaves the query at `length` exactly the keys a fresh
        cache would give it."""
        if not 0 <= length <= self.length:
            return False
        floor = max(self.base, self.exact_from)
        return length <= self.sink or floor == self.sink or length - self.window + 1 >= floor

    def truncate(self, length: int) -> None:
        """Forget every token at or after `length` (O(1)); raises if evicted keys would be needed."""
        if not self.can_truncate(length):
            raise ValueError(
                f"cannot roll a streaming cache of {self.length} tokens back to {length}: "
                f"keys before position {max(self.base, self.exact_from)} are gone"
            )
        self.length = length
        if length <= self.sink:
            self.base = self.exact_from = self.sink

    def restart(self, start: int, approximate: bool = False) -> None:
        """Keep the sink tokens, drop everything else and continue from position `start` as if the
        tokens between the sinks and `start` had never existed.

        Re-prefilling from `start` then gives layer l exact keys/values from position
        start + l * (window - 1) on (each layer's window reaches one window further back), so a caller
        that needs exactness at position p restarts at p - n_layers * (window - 1) or earlier.
        `approximate`: the caller accepts the re-prefilled keys as they come (a cheaper rebuild);
        later rollbacks may then reach back to `start`."""
        if start <= self.sink:
            self.length = min(start, self.length)
            self.base = self.exact_from = self.sink
            return
        if self.length < self.sink:
            raise ValueError("cannot restart past the sinks before they are filled")
        self.length = self.base = start
        self.exact_from = start if approximate else start + (self.k.shape[0] - 1) * (self.window - 1)

    # -- figures ---------------------------------------------------------------------------------------
    def visible(self) -> tuple[int, int]:
        """(sink tokens, recent tokens) the context's last token attended to."""
        n = self.length
        if n <= self.sink:
            return n, 0
        return self.sink, n - max(self.sink, n - self.window)

    @property
    def bytes_per_token(self) -> int:
        n_layers, hkv, _, d = self.k.shape
        return 2 * n_layers * hkv * d * self.k.element_size()

    @property
    def allocated_bytes(self) -> int:
        return self.capacity * self.bytes_per_token


def masked_attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention with an explicit boolean mask [T, L] (True: visible); q [Hq, T, D], k/v [Hkv, L, D].
    GQA without repeating K/V: the query heads of one KV head are stacked into one GEMM operand."""
    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    G = Hq // Hkv
    if q.device.type == "cuda":
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True
        )
        return out.squeeze(0)
    qg = q.reshape(Hkv, G * T, D)
    s = torch.matmul(qg, k.transpose(1, 2)).float() * scale  # [Hkv, G*T, L]
    s = s.view(Hkv, G, T, L).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).view(Hkv, G * T, L)
    return torch.matmul(p.to(v.dtype), v).reshape(Hq, T, D)
