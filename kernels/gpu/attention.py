"""Triton decode/verify attention over gathered (sparse) or dense KV segments, flash-decoding style.

One program per (KV head, split of the key axis). A program loads the G*T query rows of its KV
head (the G query heads of the group times the T window queries: K/V are read once per group, never
repeated), streams its keys in BLOCK_N blocks with an online softmax, and writes a normalised
partial output and its log-sum-exp. The partials of all splits and all segments are merged with
log-sum-exp weights (`merge`), which is exact.

A segment is dense (`k[h, j]`, j < n) or chunk-gathered: key j of head h is
`k[h, chunk_idx[h, j // CHUNK] * CHUNK + j % CHUNK]`, read in place from the full cache (no gather
copy). The queries' own keys are the last T keys of the causal segment.

Interpreter-safe (TRITON_INTERPRET=1): every load is masked, K/V/Q are converted to fp32 right
after loading when `DOT_FP32` (always under the interpreter, whose bf16 arithmetic is wrong);
no block pointers, no libdevice, no autotune.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _partial_kernel(
    Q, K, V, IDX, O, LSE,
    sq_h, sq_t, sk_h, sk_n, sv_h, sv_n, si_h, so_h, so_s, so_m, sl_h, sl_s,
    n_keys, keys_per_split, T, G, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)  # row r = g * T + t
    g = rows // T
    t = rows % T
    row_ok = rows < G * T
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    q = tl.load(Q + (h * G + g)[:, None] * sq_h + t[:, None] * sq_t + dd[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
    if not DOT_FP32:
        q = q.to(K.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = sp * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)
    last_visible = n_keys - T + t  # causal: query t sees keys j <= n_keys - T + t
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < end
        if CHUNK > 0:
            c = tl.load(IDX + h * si_h + j // CHUNK, mask=j_ok, other=0)
            pos = c.to(tl.int64) * CHUNK + j % CHUNK
        else:
            pos = j.to(tl.int64)
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(K + h * sk_h + pos[:, None] * sk_n + dd[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + h * sv_h + pos[:, None] * sv_n + dd[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
        valid = row_ok[:, None] & j_ok[None, :]
        if CAUSAL:
            valid = valid & (j[None, :] <= last_visible[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.log(l_safe), float("-inf"))
    o_mask = d_ok[None, :] & (rows[:, None] >= 0)  # every row of the partial is written
    tl.store(O + h * so_h + sp * so_s + rows[:, None] * so_m + dd[None, :], o, mask=o_mask)
    tl.store(LSE + h * sl_h + sp * sl_s + rows, lse)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def partial_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, *, chunk_idx: Tensor | None = None, chunk_size: int = 0,
    causal: bool = False, n_splits: int | None = None, block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Partials of q [Hq, T, D] over one segment: (o [Hkv, S, BLOCK_M, D] fp32, lse [Hkv, S, BLOCK_M]).
    Rows r < G*T of BLOCK_M are the queries (r = g*T + t). Dense segment: k/v [Hkv, n, D]. Gathered:
    k/v are the full cache of the layer [Hkv, L, D] and chunk_idx [Hkv, n_chunks] selects chunks."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if chunk_idx is not None:
        n_keys = chunk_idx.shape[1] * chunk_size
        idx = chunk_idx if chunk_idx.stride(-1) == 1 else chunk_idx.contiguous()
    else:
        n_keys = k.shape[1]
        idx = q  # unused pointer
        chunk_size = 0
    block_m = _pow2(g * t)
    block_d = _pow2(d)
    block_n = block_n or (32 if INTERPRET else 64)
    if n_splits is None:
        # enough programs to fill the GPU: ~4 per SM over all KV heads
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        n_splits = max(1, min(triton.cdiv(n_keys, block_n), (4 * sms) // hkv))
    keys_per_split = triton.cdiv(triton.cdiv(n_keys, n_splits), block_n) * block_n
    n_splits = max(1, triton.cdiv(n_keys, keys_per_split))
    o = torch.empty(hkv, n_splits, block_m, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(hkv, n_splits, block_m, dtype=torch.float32, device=q.device)
    dot_fp32 = INTERPRET or q.dtype == torch.float32
    _partial_kernel[(hkv, n_splits)](
        q, k, v, idx, o, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        idx.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        n_keys, keys_per_split, t, g, d, float(scale),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        CHUNK=chunk_size, CAUSAL=causal, DOT_FP32=dot_fp32,
    )
    return o, lse


def merge(partials: list[tuple[Tensor, Tensor]], hq: int, t: int, dtype: torch.dtype) -> Tensor:
    """Exact log-sum-exp merge of partials from `partial_attention` -> [Hq, T, D] in `dtype`."""
    o = torch.cat([p[0] for p in partials], dim=1)  # [Hkv, S, BLOCK_M, D]
    lse = torch.cat([p[1] for p in partials], dim=1)  # [Hkv, S, BLOCK_M]
    hkv, _, _, d = o.shape
    rows = hq // hkv * t
    o, lse = o[:, :, :rows], lse[:, :, :rows]
    w = torch.softmax(lse, dim=1).nan_to_num_(0.0)  # splits that saw no key have lse = -inf
    out = (o * w.unsqueeze(-1)).sum(1)  # [Hkv, G*T, D]
    return out.reshape(hq, t, d).to(dtype)


def attend_segments(q: Tensor, segments: list[tuple[Tensor, Tensor]], scale: float, **kw) -> Tensor:
    """Dense segments; the queries' own keys are the last T keys of the last segment."""
    segments = [(k, v) for k, v in segments if k.shape[1] > 0]
    last = len(segments) - 1
    parts = [partial_attention(q, k, v, scale, causal=i == last, **kw) for i, (k, v) in enumerate(segments)]
    return merge(parts, q.shape[0], q.shape[1], q.dtype)


def sparse_attend(
    q: Tensor, k_full: Tensor, v_full: Tensor, chunk_idx: Tensor, chunk_size: int,
    tail: list[tuple[Tensor, Tensor]], scale: float, **kw,
) -> Tensor:
    """Retrieval attention without a gather copy: the chunks `chunk_idx` [Hkv, n] of the full cache
    k_full/v_full [Hkv, L, D], then the dense `tail` segments (recent window, draft scratch; the
    last one holds the queries' own keys)."""
    tail = [(k, v) for k, v in tail if k.shape[1] > 0]
    parts = []
    if chunk_idx.numel():
        parts.append(partial_attention(q, k_full, v_full, scale, chunk_idx=chunk_idx, chunk_size=chunk_size, **kw))
    last = len(tail) - 1
    parts += [partial_attention(q, k, v, scale, causal=i == last, **kw) for i, (k, v) in enumerate(tail)]
    return merge(parts, q.shape[0], q.shape[1], q.dtype)
