"""Triton chunk scoring and top-k selection for the retrieval level.

`_score_kernel`: one program per (KV head, block of chunks): score[h, c] = (sum of the group's
query heads) . mean[h, c]; the `always` chunks get +inf, padding gets -inf.
`_topk_kernel`: one program per KV head: each score is packed with its chunk index into one int64
whose order is the score's order (IEEE bits made monotone, index in the low 32 bits), sorted
descending; the first k indices are then sorted ascending and stored.
Interpreter-safe: masked loads, fp32 arithmetic, tl.sort only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Above this many chunks per head, the sort of one program would not fit: torch.topk takes over.
MAX_SORT_CHUNKS = 16384


@triton.jit
def _score_kernel(
    Q, M, S, ALWAYS, sq_h, sm_h, sm_c, ss_h, C, G, D,
    N_ALWAYS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    h = tl.program_id(0)
    cb = tl.program_id(1)
    gg = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    qg = tl.load(Q + (h * G + gg)[:, None] * sq_h + dd[None, :], mask=(gg < G)[:, None] & d_ok[None, :], other=0.0)
    qsum = tl.sum(qg.to(tl.float32), 0)  # [BLOCK_D]
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    m = tl.load(M + h * sm_h + cc[:, None] * sm_c + dd[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.sum(m.to(tl.float32) * qsum[None, :], 1)  # [BLOCK_C]
    for a in tl.static_range(N_ALWAYS):
        s = tl.where(cc == tl.load(ALWAYS + a), float("inf"), s)
    tl.store(S + h * ss_h + cc, s, mask=c_ok)


@triton.jit
def _topk_kernel(S, OUT, ss_h, so_h, C, K_SEL, BLOCK_C: tl.constexpr):
    h = tl.program_id(0)
    cc = tl.arange(0, BLOCK_C)
    s = tl.load(S + h * ss_h + cc, mask=cc < C, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    packed = (key.to(tl.int64) << 32) | cc.to(tl.int64)
    packed = tl.sort(packed, descending=True)
    idx = (packed & 0xFFFFFFFF).to(tl.int32)
    sel = tl.where(cc < K_SEL, idx, 2147483647)
    sel = tl.sort(sel)
    tl.store(OUT + h * so_h + cc, sel.to(tl.int64), mask=cc < K_SEL)


def chunk_scores(query: Tensor, means: Tensor, always=(0,)) -> Tensor:
    """query [Hq, D], means [Hkv, C, D] -> fp32 [Hkv, C] (always-chunks = +inf)."""
    hkv, c, d = means.shape
    g = query.shape[0] // hkv
    query = query.contiguous()
    if means.stride(-1) != 1:
        means = means.contiguous()
    forced = [i for i in always if 0 <= i < c]
    alw = torch.tensor(forced or [0], dtype=torch.int32, device=means.device)
    s = torch.empty(hkv, c, dtype=torch.float32, device=means.device)
    block_c = 128
    _score_kernel[(hkv, triton.cdiv(c, block_c))](
        query, means, s, alw, query.stride(0), means.stride(0), means.stride(1), s.stride(0), c, g, d,
        N_ALWAYS=len(forced), BLOCK_C=block_c, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_G=triton.next_power_of_2(g),
    )
    return s


def select_chunks(query: Tensor, means: Tensor, k: int, always=(0,)) -> Tensor:
    """Same contract as `kernels.retrieval.select_chunks`: LongTensor [Hkv, min(k, C)] ascending."""
    hkv, c, _ = means.shape
    k = min(k, c)
    if k <= 0:
        return torch.empty(hkv, 0, dtype=torch.long, device=means.device)
    s = chunk_scores(query, means, always)
    if c > MAX_SORT_CHUNKS:
        return s.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    out = torch.empty(hkv, k, dtype=torch.long, device=means.device)
    _topk_kernel[(hkv,)](s, out, s.stride(0), out.stride(0), c, k, BLOCK_C=triton.next_power_of_2(c))
    return out
