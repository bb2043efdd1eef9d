"""The full KV cache: preallocated per layer, written in place, rolled back by moving a pointer.

Speculative decoding writes keys/values for drafted tokens and then rejects some of them; with a
length pointer, rejecting k tokens is `truncate(length - k)`: O(1) and exact (the stale entries
past the pointer are never read and are overwritten by the next write).

Storage is 16-bit on CPU when the native kernels are there (float16: half the bytes a step reads;
the kernels convert to fp32 in registers and compute in fp32), else float32. Where the model runs
the bf16 attention, the cache also keeps its full blocks of 32 keys in the form that kernel reads
(`PreparedBlocks`): made once per block, not on every step that reads it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triforce_chat.decoding.model import MAX_WINDOW  # noqa: F401  (re-exported for callers)
from triforce_chat.kernels.backends import attend_tokens, prepare_blocks

BLOCK = 32  # keys per block of the native attention (kernels/cpu/attention.h: kBlock)


class PreparedBlocks:
    """The cache's full blocks of 32 keys as the bf16 attention reads them (kernels/cpu/attention_bf16.h:
    keys rounded to bf16 and transposed, values rounded and interleaved by pairs of keys).

    Without them the kernel makes each block again on every step, and that, with the strided reads
    it takes, was half of a step's attention at 7K-29K tokens. The bits are the same either way (the
    kernel's own routine makes both). It costs as many bytes again as the 16-bit cache, resident as
    blocks fill (the buffers are allocated, not written, up front).

    k, v: [n_layers, Hkv, max_len // 32, 32 * D] bf16. Layer l's blocks below `ready[l]` keys hold
    what the cache's rows hold: a block is made once its 32 rows are written, and forgotten once a
    row in it may be rewritten (a write at or past the cache's length, a truncation).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int):
        shape = (n_layers, n_kv_heads, max_len // BLOCK, BLOCK * head_dim)
        self.k = torch.empty(shape, dtype=torch.bfloat16)
        self.v = torch.empty(shape, dtype=torch.bfloat16)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # per-layer views, made once
        self.ready = [0] * n_layers

    def refresh(self, layer: int, k_buf: Tensor, v_buf: Tensor, start: int, end: int) -> tuple[Tensor, Tensor, int]:
        """After rows start .. end - 1 of k_buf/v_buf [Hkv, L, D] were written: drop the blocks
        they touch, make the full blocks below `end`; returns (k_blocks, v_blocks, keys ready)."""
        k_blocks, v_blocks = self._layers[layer]
        ready = min(self.ready[layer], start // BLOCK * BLOCK)
        full = end // BLOCK * BLOCK
        if full > ready:
            prepare_blocks(k_buf, v_buf, k_blocks, v_blocks, ready // BLOCK, full // BLOCK)
            ready = full
        self.ready[layer] = ready
        return k_blocks, v_blocks, ready

    def truncate(self, length: int) -> None:
        cut = length // BLOCK * BLOCK
        self.ready = [min(r, cut) for r in self.ready]

    @property
    def bytes_per_token(self) -> int:
        n_layers, hkv, _, width = self.k.shape
        return 2 * n_layers * hkv * width // BLOCK * self.k.element_size()


class KVCache:
    """Keys/values of every token the target has seen, for all layers.

    k, v: [n_layers, Hkv, max_len, D]. `length` tokens are valid. `last_query[layer]` keeps the
    (post-RoPE) query of the most recent token, which the retrieval level scores chunks against.
    """

    exact_windows = True  # the target verifies windows on this store: they must equal single steps

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, scale: float,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", prepared_blocks: bool = False,
    ):
        shape = (n_layers, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.scale = scale
        self.length = 0
        self.last_query: list[Tensor | None] = [None] * n_layers
        self.listeners: list = []  # objects with on_append(cache, start, end) / on_truncate(cache, length)
        self.blocks = PreparedBlocks(n_layers, n_kv_heads, head_dim, max_len) if prepared_blocks else None

    @classmethod
    def for_model(cls, model, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        a = model.args
        return cls(a.n_layers, a.n_kv_heads, a.head_dim, max_len or model.max_len, model.scale,
                   dtype=dtype or getattr(model, "kv_dtype", torch.float32), device=model.device,
                   prepared_blocks=getattr(model, "attention", "fp32") == "bf16")  # set_attention checked it runs

    # -- KVStore protocol --------------------------------------------------------------------------
    def positions(self, n: int) -> Tensor:
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} tokens > {self.max_len}")
        return torch.arange(self.length, self.length + n, device=self.k.device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, start: int | None = None) -> Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]: the T tokens' keys/values written at
        positions start .. start + T - 1 (default: the cache's length), then their queries attend
        over everything up to their own position. A tree window (decoding/tree.py) passes `start`
        to give each branch the positions it would have alone; the length moves only on `advance`."""
        start = self.length if start is None else start
        blocks = self.write(layer, start, k, v)
        self.last_query[layer] = q[-1].float().clone()  # [Hq, D]
        return attend_tokens(q, self.k[layer], self.v[layer], start + k.shape[0], self.scale, blocks)

    def write(self, layer: int, start: int, k: Tensor, v: Tensor):
        """Keys/values [T, Hkv, D] of one layer into positions start .. start + T - 1 (no attention),
        the prepared blocks they touch made again; returns what `attend_tokens` takes as blocks."""
        end = start + k.shape[0]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > {self.max_len}")
        k_buf, v_buf = self.k[layer], self.v[layer]
        k_buf[:, start:end] = k.transpose(0, 1)
        v_buf[:, start:end] = v.transpose(0, 1)
        return self.blocks.refresh(layer, k_buf, v_buf, start, end) if self.blocks else None

    def advance(self, n: int) -> None:
        start = self.length
        self.length += n
        for listener in self.listeners:
            listener.on_append(self, start, self.length)

    # -- rollback ------------------------------------------------------------------------------------
    def truncate(self, length: int) -> None:
        """Forget every token at or after `length` (O(1))."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
        if self.blocks is not None:
            self.blocks.truncate(length)
        for listener in self.listeners:
            listener.on_truncate(self, length)

    # -- figures for the stats panel ------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        n_layers, hkv, _, d = self.k.shape
        return 2 * n_layers * hkv * d * self.k.element_size()

    @property
    def used_bytes(self) -> int:
        return self.length * self.bytes_per_token

    @property
    def allocated_bytes(self) -> int:
        return self.k.shape[2] * self.bytes_per_token

    @property
    def blocks_bytes_per_token(self) -> int:
        """What the prepared blocks add per token (0 without them)."""
        return self.blocks.bytes_per_token if self.blocks is not None else 0

    @property
    def blocks_bytes(self) -> int:
        """The prepared blocks' resident bytes (they are written as they fill, unlike the cache)."""
        return self.length * self.blocks_bytes_per_token

    @property
    def scratch_bytes(self) -> int:
        """The attention kernel's scratch is per thread inside the extension (a few MB at most)."""
        return 0
