"""The full KV cache: preallocated per layer, written in place, rolled back by moving a pointer.

Speculative decoding writes keys/values for drafted tokens and then rejects some of them; with a
length pointer, rejecting k tokens is `truncate(length - k)`: O(1) and exact (the stale entries
past the pointer are never read and are overwritten by the next write).
"""

from __future__ import annotations

import torch
from torch import Tensor

from triforce_chat.kernels.attention import attend
from triforce_chat.kernels.exact import BLOCK, Workspace, invariant_attend

# Forwards of up to this many tokens (decode steps and verification windows) use the
# batch-invariant kernel, so a token's logits are bitwise the same alone or inside a window;
# longer ones (prefill chunks) use the fastest kernel. The linear layers do the same
# (`decoding.model.Linear`); tests/test_model.py checks windows up to this size.
MAX_WINDOW = 32


class KVCache:
    """Keys/values of every token the target has seen, for all layers.

    k, v: [n_layers, Hkv, max_len, D]. `length` tokens are valid. `last_query[layer]` keeps the
    (post-RoPE) query of the most recent token, which the retrieval level scores chunks against.
    """

    def __init__(
        self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, scale: float,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ):
        # rounded up to whole blocks of the invariant kernel, zeroed so that the unused tail is finite
        shape = (n_layers, n_kv_heads, -(-max_len // BLOCK) * BLOCK, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.scale = scale
        self.length = 0
        self.last_query: list[Tensor | None] = [None] * n_layers
        self.listeners: list = []  # objects with on_append(cache, start, end) / on_truncate(cache, length)
        self.workspace = Workspace()  # the exact kernel's scores, reused from step to step

    @classmethod
    def for_model(cls, model, max_len: int | None = None) -> KVCache:
        a = model.args
        return cls(a.n_layers, a.n_kv_heads, a.head_dim, max_len or model.max_len, model.scale,
                   dtype=model.dtype, device=model.device)

    # -- KVStore protocol --------------------------------------------------------------------------
    def positions(self, n: int) -> Tensor:
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} tokens > {self.max_len}")
        return torch.arange(self.length, self.length + n, device=self.k.device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        start, end = self.length, self.length + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        self.last_query[layer] = q[:, -1].clone()  # [Hq, D]
        if k.shape[1] <= MAX_WINDOW and q.device.type == "cpu":
            return invariant_attend(q, self.k[layer], self.v[layer], end, self.scale, self.workspace)
        return attend(q, self.k[layer, :, :end], self.v[layer, :, :end], self.scale)

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
    def scratch_bytes(self) -> int:
        """The attention kernel's reused scratch (grows with the context and the window length)."""
        return self.workspace.nbytes
