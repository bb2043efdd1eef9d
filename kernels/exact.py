"""Batch-invariant attention: a query's result does not depend on how many queries share the call.

Why: greedy speculative decoding is lossless only if the target's logits for a token are the same
whether the token is verified inside a window of T drafts or decoded alone. Ordinary kernels break
that in the last bits: a GEMM over L keys blocks its reduction by L (which differs between a window
and a single step), and a one-row GEMM takes a GEMV path that rounds differently. On a 7K-token
context in bf16 that moved logits by up to 0.5 and flipped greedy tokens.

How: keys are cut into *absolute* blocks of `BLOCK` positions (block b covers positions
[b*BLOCK, (b+1)*BLOCK)), whatever the query count or cache length. Each block is one fixed-shape
GEMM (M rows x D x BLOCK, then M x BLOCK x D) whose rows are independent of M for M >= 3 (measured:
MKL fp32 rounds one and two rows differently; oneDNN bf16 is invariant; fewer rows are padded).
Positions past a query are masked, so a block contributes exact zeros to queries it does not
reach. Blocks are merged with the exact global max and a pairwise sum over absolute block
indices, so trailing all-zero blocks (a longer window's extra keys) leave every sum bitwise
unchanged.

The cache buffers must be allocated to a multiple of BLOCK and hold finite values past `length`.
Shapes: q [Hq, T, D] for positions length-T .. length-1; k_buf, v_buf [Hkv, >= nb*BLOCK, D].
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 256
MIN_ROWS = 3


@functools.lru_cache(maxsize=256)
def _key_positions(nb: int, device: str) -> Tensor:
    return torch.arange(nb * BLOCK, device=device).view(1, nb, 1, BLOCK)  # [1, nb, 1, B]


def _pairwise_sum(x: Tensor) -> Tensor:
    """Sum over dim 1 by a fixed tree over absolute indices: (0+1)+(2+3)..., padding with zeros."""
    while x.shape[1] > 1:
        if x.shape[1] % 2:
            x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        x = x[:, 0::2] + x[:, 1::2]
    return x[:, 0]


def invariant_attend(q: Tensor, k_buf: Tensor, v_buf: Tensor, length: int, scale: float) -> Tensor:
    """Causal attention of T queries (the last T of `length` positions) over k_buf/v_buf[:, :length]."""
    hq, t, d = q.shape
    hkv = k_buf.shape[0]
    g = hq // hkv
    nb = -(-length // BLOCK)
    keys = k_buf[:, : nb * BLOCK].view(hkv, nb, BLOCK, d)  # [Hkv, nb, B, D]
    values = v_buf[:, : nb * BLOCK].view(hkv, nb, BLOCK, d)
    qg = q.reshape(hkv, 1, g * t, d)  # rows g*T + t
    qpos = torch.arange(length - t, length, device=q.device).repeat(g)  # [G*T] position of each row
    pad = max(0, MIN_ROWS - g * t)
    if pad:  # GEMMs of one or two rows take paths that round differently: repeat the first row
        qg = torch.cat([qg, qg[:, :, :1].expand(hkv, 1, pad, d)], dim=2)
        qpos = torch.cat([qpos, qpos[:1].expand(pad)])
    m = qg.shape[2]
    s = torch.matmul(qg, keys.transpose(-1, -2)).float()  # [Hkv, nb, M, B]
    s.mul_(scale)
    s.masked_fill_(_key_positions(nb, str(q.device)) > qpos.view(1, 1, m, 1), float("-inf"))
    m_b = s.amax(-1)  # [Hkv, nb, M]; -inf for blocks past the row
    e = torch.exp(s - torch.where(torch.isfinite(m_b), m_b, 0.0).unsqueeze(-1))
    s_b = e.sum(-1)  # [Hkv, nb, M]
    o_b = torch.matmul(e.to(values.dtype), values).float()  # [Hkv, nb, M, D]
    w = torch.exp(m_b - m_b.amax(1, keepdim=True))  # [Hkv, nb, M]; 0 for empty blocks
    total = _pairwise_sum(s_b * w)  # [Hkv, M]
    out = _pairwise_sum(o_b * w.unsqueeze(-1)) / total.unsqueeze(-1)  # [Hkv, M, D]
    return out[:, : g * t].reshape(hq, t, d).to(q.dtype)
