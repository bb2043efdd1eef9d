"""The full KV cache: preallocated per layer, written in place, rolled back by moving a pointer.

Speculative decoding writes keys/values for drafted tokens and then rejects some of them; with a
length pointer, rejecting k tokens is `truncate(length - k)`: O(1) and exact (the stale entries
past the pointer are never read and are overwritten by the next write).

Storage is 16-bit on CPU when the native kernels are there (float16: half the bytes a step reads;
the kernels convert to fp32 in registers and compute in fp32), else float32. Where the model runs
the bf16 or int8 attention, the cache also keeps its full blocks of 32 keys in the form that kernel
reads (`PreparedBlocks`): made once per block, not on every step that reads it.
"""

from __future__ import annotations

import math
import mmap

import torch
from torch import Tensor

from triforce_chat.decoding.model import MAX_WINDOW  # noqa: F401  (re-exported for callers)
from triforce_chat.kernels.backends import INT8_BLOCK_EXTRA, BlockView, attend_tokens, prepare_blocks

BLOCK = 32  # keys per block of the native attention (kernels/cpu/attention.h: kBlock)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """Zeros that take memory only where they are written: on a CPU, an anonymous mapping, whose pages
    the OS hands out (zeroed) on first touch.

    Why: a session's cache is allocated for the model's whole context (32,768 positions: 0.9 GB for
    the 1.5B), and `torch.zeros` writes every page of it, so a chat over a few pages of text held the
    full-context cache resident from the start. The mapping lives as long as the tensor does."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = numel * dtype.itemsize
    if hasattr(mmap, "MAP_ANONYMOUS"):  # private: Python's default for -1 is a shared (shmem) mapping
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:  # Windows: backed by the paging file, committed as it is touched
        pages = mmap.mmap(-1, nbytes)
    return torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)


class PreparedBlocks:
    """The cache's full blocks of 32 keys as the bf16 or int8 attention reads them
    (kernels/cpu/attention_bf16.h: keys rounded to bf16 and transposed, values rounded and
    interleaved by pairs of keys; attention_int8.h: keys smoothed and values quantized per key, the
    codes laid out for `vpdpbusd`, with their scales).

    Without them the kernel makes each block again on every step, and that, with the strided reads
    it takes, was half of a step's attention at 7K-29K tokens. The bits are the same either way (the
    kernel's own routine makes both). bf16 blocks cost as many bytes again as the 16-bit cache, int8
    blocks a little more than half as many; resident as blocks fill (allocated, not written, up front).

    k, v: [n_layers, Hkv, max_len // 32, bytes of a block]: bf16 (32 * D) or, with
    `key_smoothing` ([n_layers, Hkv, D], the model's: decoding/model.py), uint8 (32 * D + 256).
    Layer l's blocks below `ready[l]` keys hold what the cache's rows hold: a block is made once its
    32 rows are written, and forgotten once a row in it may be rewritten (a write at or past the
    cache's length, a truncation).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 key_smoothing: Tensor | None = None):
        blocks = max_len // BLOCK
        if key_smoothing is None:
            shape, dtype = (n_layers, n_kv_heads, blocks, BLOCK * head_dim), torch.bfloat16
        else:
            shape, dtype = (n_layers, n_kv_heads, blocks, BLOCK * head_dim + INT8_BLOCK_EXTRA), torch.uint8
        self.head_dim = head_dim
        self.key_smoothing = key_smoothing
        self.k = torch.empty(shape, dtype=dtype)
        self.v = torch.empty(shape, dtype=dtype)
        smooth = list(key_smoothing.unbind(0)) if key_smoothing is not None else [None] * n_layers
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), smooth, strict=True))  # per-layer views, made once
        self.ready = [0] * n_layers

    @property
    def kind(self) -> str:
        """"int8" or "bf16": the products the blocks are made for (the Cache panel says which)."""
        return "bf16" if self.key_smoothing is None else "int8"

    def like(self, max_len: int) -> PreparedBlocks:
        """Empty blocks of the same kind for another store of `max_len` keys (the retrieval view's)."""
        return PreparedBlocks(self.k.shape[0], self.k.shape[1], self.head_dim, max_len, self.key_smoothing)

    def refresh(self, layer: int, k_buf: Tensor, v_buf: Tensor, start: int, end: int) -> BlockView:
        """After rows start .. end - 1 of k_buf/v_buf [Hkv, L, D] were written: drop the blocks
        they touch, make the full blocks below `end`; returns what `attend_tokens` reads."""
        k_blocks, v_blocks, smooth = self._layers[layer]
        ready = min(self.ready[layer], start // BLOCK * BLOCK)
        full = end // BLOCK * BLOCK
        if full > ready:
            prepare_blocks(k_buf, v_buf, k_blocks, v_blocks, ready // BLOCK, full // BLOCK, smooth)
            ready = full
        self.ready[layer] = ready
        return BlockView(k_blocks, v_blocks, ready, smooth)

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
        key_smoothing: Tensor | None = None,
    ):
        shape = (n_layers, n_kv_heads, max_len, head_dim)
        self.k = lazy_zeros(shape, dtype, device)  # resident as the context grows
        self.v = lazy_zeros(shape, dtype, device)
        self.max_len = max_len
        self.scale = scale
        self.length = 0
        self.last_query: list[Tensor | None] = [None] * n_layers
        self.listeners: list = []  # objects with on_append(cache, start, end) / on_truncate(cache, length)
        # bf16 blocks where asked; int8 blocks (which the int8 attention cannot do without) with a smoothing
        self.blocks = PreparedBlocks(n_layers, n_kv_heads, head_dim, max_len, key_smoothing) \
            if prepared_blocks or key_smoothing is not None else None

    @classmethod
    def for_model(cls, model, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        a = model.args
        products = getattr(model, "attention", "fp32")  # set_attention checked that it runs here
        return cls(a.n_layers, a.n_kv_heads, a.head_dim, max_len or model.max_len, model.scale,
                   dtype=dtype or getattr(model, "kv_dtype", torch.float32), device=model.device,
                   prepared_blocks=products == "bf16",
                   key_smoothing=model.key_smoothing if products == "int8" else None)

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
        """The prepared blocks' resident bytes (written as they fill, as the cache's rows are)."""
        return self.length * self.blocks_bytes_per_token

    @property
    def scratch_bytes(self) -> int:
        """The attention kernel's scratch is per thread inside the extension (a few MB at most)."""
        return 0
