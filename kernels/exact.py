"""Batch-invariant attention: a query's result does not depend on how many queries share the call.

Why: greedy speculative decoding is lossless only if the target's logits for a token are the same
whether the token is verified inside a window of T drafts or decoded alone. Ordinary kernels break
that in the last bits: a GEMM over L keys blocks its reduction by L (which differs between a window
and a single step), and a one-row GEMM takes a GEMV path that rounds differently. On a 7K-token
context in bf16 that moved logits by up to 0.5 and flipped greedy tokens.

How: keys are cut into *absolute* blocks of `BLOCK` positions (block b covers positions
[b*BLOCK, (b+1)*BLOCK)), whatever the query count or cache length. Scores are one batched GEMM
with the keys as rows (BLOCK x D x M: a score is a D-long dot product, and the GEMM gives the same
bits for any M), copied to one fp32 row per (query, block). Per row, the block max and a softmax
over the BLOCK scores (a fused per-row kernel) give the block's normalised weights, and
1 / max(softmax) the block's sum of exponentials. Then a fixed-shape GEMM per block (M x BLOCK x D)
whose rows are independent of M once M reaches MIN_ROWS (fewer rows are padded) and of the number
of blocks in the batch gives the block's normalised output. Only the last one or two blocks can
hold positions past a query; they alone are masked, so a block contributes an exact zero weight
to queries it does not reach. Blocks are merged with the exact global max and a pairwise sum over
absolute block indices, so trailing zero-weight blocks (a longer window's extra keys) leave every
sum bitwise unchanged. The per-head loop keeps keys/values views of the cache (no copies).

The cache buffers must be allocated to a multiple of BLOCK and hold finite values past `length`.
Shapes: q [Hq, T, D] for positions length-T .. length-1; k_buf, v_buf [Hkv, >= nb*BLOCK, D].
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

BLOCK = 256
# GEMMs of fewer rows take paths that round differently (measured when the scores were q @ K^T:
# MKL fp32 rounded 1 row, and at head_dim 128 2-5 rows, differently from 6+; oneDNN bf16 was
# invariant). The values GEMM still has the query rows as M: pad.
MIN_ROWS = {torch.float32: 6}
MIN_ROWS_DEFAULT = 3
# Masked scores: finite, so that a block no key of which a row may see gives a uniform softmax
# (not NaN) whose merge weight exp(NEG - max) is exactly 0.
NEG = -1e30


@functools.lru_cache(maxsize=256)
def _key_positions(start: int, n: int, device: str) -> Tensor:
    return torch.arange(start * BLOCK, (start + n) * BLOCK, device=device).view(n, 1, BLOCK)


def _pairwise_sum(x: Tensor) -> Tensor:
    """Sum over dim 1 by a fixed tree over absolute indices: (0+1)+(2+3)..., padding with zeros."""
    while x.shape[1] > 1:
        if x.shape[1] % 2:
            x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        x = x[:, 0::2] + x[:, 1::2]
    return x[:, 0]


class Workspace:
    """Scratch tensors kept from one call to the next, grown when a call needs more.

    Why: a call's scores take ~10 MB per head for an 8-token window at 32K. Allocated afresh, glibc
    returns those pages to the OS on free and the next call faults them in again: 43,000 minor page
    faults per window (all 30 layers), and its time swung from 292 to 404 ms (measured at 32K, bf16,
    1 thread). Reused: ~80 faults, 286-292 ms. Not thread-safe: one per cache, used by the thread
    that decodes with it.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of `shape`, a view of buffer `name` (valid until the next take)."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def invariant_attend(
    q: Tensor, k_buf: Tensor, v_buf: Tensor, length: int, scale: float, workspace: Workspace | None = None,
) -> Tensor:
    """Causal attention of T queries (the last T of `length` positions) over k_buf/v_buf[:, :length].

    `workspace` keeps the scratch tensors between calls (a new one per call when None)."""
    hq, t, d = q.shape
    hkv = k_buf.shape[0]
    g = hq // hkv
    nb = -(-length // BLOCK)
    # blocks [0, nf) lie wholly at or before every query's position: no mask needed there; only the
    # last one or two blocks (a window of <= BLOCK queries) are masked
    nf = (length - t + 1) // BLOCK
    qg = (q * scale).reshape(hkv, g * t, d)  # rows g*T + t
    qpos = torch.arange(length - t, length, device=q.device).repeat(g)  # [G*T] position of each row
    pad = max(0, MIN_ROWS.get(q.dtype, MIN_ROWS_DEFAULT) - g * t)
    if pad:  # repeat the first row
        qg = torch.cat([qg, qg[:, :1].expand(hkv, pad, d)], dim=1)
        qpos = torch.cat([qpos, qpos[:1].expand(pad)])
    m = qg.shape[1]
    mask = _key_positions(nf, nb - nf, str(q.device)) > qpos.view(1, m, 1)  # [nb - nf, M, B]
    f32, dev = torch.float32, q.device
    ws = workspace or Workspace()
    m_b = ws.take("m_b", (hkv, nb, m), f32, dev)  # block max of the scores
    p_max = ws.take("p_max", (hkv, nb, m), f32, dev)  # block max of the softmax = 1 / (block sum of exp(s - m_b))
    o_b = ws.take("o_b", (hkv, nb, m, d), q.dtype, dev)  # block softmax @ values
    s_keys = ws.take("s_keys", (nb, BLOCK, m), q.dtype, dev)  # scores, one row per key
    s = ws.take("s", (nb, m, BLOCK), f32, dev)  # scores, one row per query
    p32 = ws.take("p32", (nb, m, BLOCK), f32, dev)  # block softmax
    p = p32 if q.dtype == f32 else ws.take("p", (nb, m, BLOCK), q.dtype, dev)
    for h in range(hkv):  # per head: the buffers' [Hkv, max_len] slices are views, never copies
        keys = k_buf[h, : nb * BLOCK].view(nb, BLOCK, d)
        values = v_buf[h, : nb * BLOCK].view(nb, BLOCK, d)
        # keys as the GEMM's rows: it streams the cache 1.5-1.7x faster than q @ K^T (measured at
        # 32K, 1 thread), and its scores are the same bits for any M (measured, both dtypes, 1-8
        # threads, head_dim 64 and 128; the tests check windows against single steps)
        torch.bmm(keys, qg[h].t().expand(nb, d, m), out=s_keys)  # [nb, B, M]
        s.copy_(s_keys.transpose(1, 2))  # [nb, M, B] fp32: torch's fp32 row kernels are 1.2-3x faster
        s[nf:].masked_fill_(mask, NEG)
        torch.amax(s, -1, out=m_b[h])
        torch.ops.aten._softmax.out(s, -1, False, out=p32)  # one fused pass per row of BLOCK scores
        torch.amax(p32, -1, out=p_max[h])
        if p is not p32:
            p.copy_(p32)  # the values' dtype for the GEMM
        torch.bmm(p, values, out=o_b[h])
    w = torch.exp(m_b - m_b.amax(1, keepdim=True)) / p_max  # [Hkv, nb, M]; 0 past the row
    total = _pairwise_sum(w)  # [Hkv, M]
    out = _pairwise_sum(o_b.float() * w.unsqueeze(-1)) / total.unsqueeze(-1)  # [Hkv, M, D]
    return out[:, : g * t].reshape(hq, t, d).to(q.dtype)
