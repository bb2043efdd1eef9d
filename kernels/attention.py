"""Attention in PyTorch operations: the portable path (`backends` chooses the native or CUDA kernels).

`attend(q, k, v, scale)`: T new queries against L keys/values of which the last T belong to the
queries themselves (causal among them; every earlier key is visible). GQA is handled by grouping
the query heads of each KV head into one GEMM operand: K/V are never repeated.

`attend_segments(q, segments, scale)`: the same over keys/values given as several segments (the
retrieval view: gathered chunks + the recent part of the full cache + the draft scratch). The
segments are never concatenated: they share one softmax (GEMM path) or are merged exactly by
log-sum-exp (flash path).

Shapes: q [Hq, T, D]; k, v [Hkv, L, D] (the inner [L, D] part contiguous); out [Hq, T, D].

CPU formulations (decode and verification windows, T < 32), chosen by measurement on the 2-core
Sapphire Rapids of this project with torch 2.13 (`python -m triforce_chat.kernels.bench_cpu`):

* "flash" (opt-in, TRIFORCE_CPU_ATTENTION=flash; see _DEFAULT_METHOD): torch's CPU flash kernel
  (`aten._scaled_dot_product_flash_attention_for_cpu`, which also returns the log-sum-exp) with GQA
  folded into the query axis: q [Hkv, G*T, D] against k [Hkv, n, D], so K/V are never repeated and
  no mask is needed. The queries' own T keys (causal) are done separately with a tiny masked GEMM;
  segments and the own-key part are merged by log-sum-exp. Verification (T = 8) and bf16 run
  1.5-3x faster this way than with explicit score GEMMs (MKL/oneDNN pack the K operand for a
  3..27-row GEMM, which costs more than reading it).
* "gemm" (default; with "flash", still used for fp32 single-query decode over >= 8K keys): explicit
  scores, splitting the key axis over threads: one batched GEMM for the scores and one for P @ V,
  the query heads of a KV head forming the rows (M = G*T). Orientation: fp32 with few rows
  "query-major" [Hkv, M, L] = q @ K^T; bf16 or many rows "key-major" [Hkv, L, M] = K @ q^T then
  P^T @ V. A batched GEMM is parallelised over its batch (3 KV heads on 2 threads leave one thread
  idle half the time), so long segments are cut into `n_threads` blocks of the key axis (as_strided
  views whose last block may overlap the previous by < n_threads keys, masked to -inf once).
  Short segments share one score buffer (GEMM `out=` into slices), one softmax, and P @ V per
  segment. Softmax in place; normalisation applied to the [Hkv, M, D] output.

Prefill (T >= 32) is compute bound: the same flash kernel, past keys unmasked (GQA folded) + the
new tokens' own keys with the square causal mask, merged by log-sum-exp, in chunks of 512 queries:
nothing of size T x L is materialised (no [T, L] mask either) at long context.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

# Above this many queries, the work is compute bound (prefill): hand it to SDPA's flash kernel.
_SDPA_MIN_QUERIES = 32
# fp32 single-query decode over at least this many keys: the GEMM formulation (it also splits the key
# axis over threads); everything else: torch's CPU flash kernel with GQA folded into the query axis.
_GEMM_MIN_KEYS = 8192
# Default CPU method for T < 32. "gemm" keeps a verification window's rows equal to single-token
# steps as often as the previous formulation did (tests/test_model.py checks bf16 bitwise equality);
# "flash" is faster for bf16 and for verification windows but rounds differently from a single step.
# TRIFORCE_CPU_ATTENTION=flash|gemm overrides.
_DEFAULT_METHOD = os.environ.get("TRIFORCE_CPU_ATTENTION", "flash")
# fp32: up to this many GEMM rows (G*T) the query-major orientation is faster; above, key-major.
_QM_MAX_ROWS = 8
# Cut a segment into `n_threads` blocks only if it has at least this many keys per thread.
_SPLIT_MIN_KEYS_PER_THREAD = 1024

Segments = list[tuple[Tensor, Tensor]]


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal-in-the-tail attention over one contiguous K/V range (PyTorch operations)."""
    if q.shape[1] >= _SDPA_MIN_QUERIES:
        return _sdpa_attend(q, k, v, scale)
    return cpu_attend(q, [(k, v)], scale)


def attend_segments(q: Tensor, segments: Segments, scale: float) -> Tensor:
    """Attention over the union of K/V segments; the queries' own keys are the tail of the last
    segment (causal among them). Empty segments are skipped."""
    segments = [(k, v) for k, v in segments if k.shape[1] > 0]
    if not segments:
        raise ValueError("attend_segments needs at least one non-empty segment")
    if segments[-1][0].shape[1] < q.shape[1]:
        raise ValueError("the last segment must hold the queries' own keys")
    if len(segments) == 1:
        return attend(q, *segments[0], scale)
    if q.shape[1] >= _SDPA_MIN_QUERIES:
        outs, lses = [], []
        for i, (k, v) in enumerate(segments):
            o, lse = _sdpa_partial(q, k, v, scale, causal_tail=i == len(segments) - 1)
            outs.append(o)
            lses.append(lse)
        return merge_partials(outs, lses).to(q.dtype)
    return cpu_attend(q, segments, scale)


# -- CPU: decode and verification windows ----------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _causal_mask(t: int, key_major: bool, device: str) -> Tensor:
    """True where key j of the tail must be hidden from query i (j > i). Query-major: [G=1, i, j]
    broadcast over (Hkv, G); key-major: [j, 1, i] broadcast over (Hkv, ., G, .)."""
    m = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)  # [i, j]
    return m.t().unsqueeze(1) if key_major else m


def _blocks(x: Tensor, nb: int) -> tuple[Tensor, int, int]:
    """[H, n, D] -> ([H, nb, Bp, D] view, Bs, Bp): block b covers keys [b*Bs, b*Bs + Bp); the last
    block ends at n exactly, and consecutive blocks overlap by Bp - Bs (< nb) keys."""
    h, n, d = x.shape
    if nb == 1:
        return x.unsqueeze(1), n, n
    if x.stride(2) != 1 or x.stride(1) != d:
        x = x.contiguous()
    bs = n // nb
    bp = n - (nb - 1) * bs
    view = x.as_strided((h, nb, bp, d), (x.stride(0), bs * d, d, 1), x.storage_offset())
    return view, bs, bp


def cpu_attend(
    q: Tensor, segments: Segments, scale: float, *, key_major: bool | None = None, n_split: int | None = None,
    method: str | None = None,
) -> Tensor:
    """Exact attention of q [Hq, T, D] over the concatenation of `segments` (causal in the last T
    keys of the last one). `method` ("gemm" | "flash"), `key_major` and `n_split` override the
    measured defaults (for tests and benchmarks)."""
    hq, t, d = q.shape
    hkv = segments[0][0].shape[0]
    g = hq // hkv
    m_rows = g * t
    dtype = q.dtype
    if method is None:
        long = sum(k.shape[1] for k, _ in segments) >= _GEMM_MIN_KEYS
        method = "gemm" if _DEFAULT_METHOD == "gemm" or (dtype == torch.float32 and t == 1 and long) \
            or _FLASH_OP is None else "flash"
    if method == "flash":
        return _flash_segments(q, segments, scale)
    if key_major is None:
        key_major = dtype != torch.float32 or m_rows > _QM_MAX_ROWS
    threads = torch.get_num_threads()

    qs = q.reshape(hkv, m_rows, d)
    qs = qs * scale if dtype == torch.float32 else (qs.float() * scale).to(dtype)

    splits = []
    for k, _ in segments:
        nb = n_split if n_split is not None else threads
        min_keys = _SPLIT_MIN_KEYS_PER_THREAD if n_split is None else t
        splits.append(max(1, min(nb, k.shape[1] // max(min_keys, 1))))
    if all(nb == 1 for nb in splits):
        return _attend_packed(q, qs, segments, key_major).reshape(hq, t, d)
    return _attend_blocked(q, qs, segments, key_major, splits).reshape(hq, t, d)


def _mask_tail(s: Tensor, t: int, g: int, key_major: bool, device) -> None:
    """-inf where a query of the tail must not see a later key. s [Hkv, n, M] (key-major) or
    [Hkv, M, n]: the last t keys of the key axis are the queries' own."""
    hkv = s.shape[0]
    mask = _causal_mask(t, key_major, str(device))
    if key_major:
        s[:, s.shape[1] - t :].view(hkv, t, g, t).masked_fill_(mask, float("-inf"))
    else:
        s[:, :, s.shape[2] - t :].view(hkv, g, t, t).masked_fill_(mask, float("-inf"))


def _attend_packed(q: Tensor, qs: Tensor, segments: Segments, key_major: bool) -> Tensor:
    """Short segments: every segment's scores go into one buffer (GEMM `out=` into a slice), so the
    softmax is a handful of ops whatever the number of segments. Returns [Hkv, M, D]."""
    hkv, m_rows, _ = qs.shape
    t = q.shape[1]
    g = m_rows // t
    total = sum(k.shape[1] for k, _ in segments)
    dtype = qs.dtype
    if key_major:
        s = torch.empty(hkv, total, m_rows, dtype=dtype, device=q.device)
        q_op = qs.transpose(1, 2)
    else:
        s = torch.empty(hkv, m_rows, total, dtype=dtype, device=q.device)
    off = 0
    for k, _ in segments:
        n = k.shape[1]
        if key_major:
            torch.matmul(k, q_op, out=s[:, off : off + n])
        else:
            torch.matmul(qs, k.transpose(1, 2), out=s[:, :, off : off + n])
        off += n
    if dtype != torch.float32:
        s = s.float()
    if t > 1:
        _mask_tail(s, t, g, key_major, q.device)
    key_dim = 1 if key_major else 2
    p = s.sub_(s.amax(dim=key_dim, keepdim=True)).exp_()
    den = p.sum(dim=key_dim)  # [Hkv, M]
    if dtype != torch.float32:
        p = p.to(dtype)
    acc = None
    off = 0
    for _, v in segments:
        n = v.shape[1]
        ps = p[:, off : off + n].transpose(1, 2) if key_major else p[:, :, off : off + n]
        o = torch.matmul(ps, v)
        if o.dtype != torch.float32:
            o = o.float()
        acc = o if acc is None else acc.add_(o)
        off += n
    return acc.div_(den.unsqueeze(-1)).to(dtype)


def _attend_blocked(q: Tensor, qs: Tensor, segments: Segments, key_major: bool, splits: list[int]) -> Tensor:
    """Long segments, several threads: each segment is cut into `splits[i]` blocks of the key axis
    (views), so that the batched GEMMs have Hkv * blocks independent items. Returns [Hkv, M, D]."""
    hkv, m_rows, _ = qs.shape
    t = q.shape[1]
    g = m_rows // t
    dtype = qs.dtype
    q_op = qs.transpose(1, 2).unsqueeze(1) if key_major else qs.unsqueeze(1)  # [Hkv,1,D,M] | [Hkv,1,M,D]
    key_dim = 2 if key_major else 3  # the key axis of a [Hkv, nb, ., .] score block
    pieces = []
    row_max = None
    last = len(segments) - 1
    for i, ((k, v), nb) in enumerate(zip(segments, splits, strict=True)):
        kb, bs, bp = _blocks(k, nb)
        vb, _, _ = _blocks(v, nb)
        if key_major:
            s = torch.matmul(kb, q_op)  # [Hkv, nb, Bp, M]
            if bp > bs:
                s[:, :-1, bs:].fill_(float("-inf"))
        else:
            s = torch.matmul(q_op, kb.transpose(-1, -2))  # [Hkv, nb, M, Bp]
            if bp > bs:
                s[:, :-1, :, bs:].fill_(float("-inf"))
        if s.dtype != torch.float32:
            s = s.float()
        if i == last and t > 1:
            _mask_tail(s[:, -1], t, g, key_major, q.device)
        mx = s.amax(dim=(1, key_dim))  # [Hkv, M]
        row_max = mx if row_max is None else torch.maximum(row_max, mx)
        pieces.append((s, vb))

    acc = den = None
    for s, vb in pieces:
        mx = row_max.view(hkv, 1, 1, m_rows) if key_major else row_max.view(hkv, 1, m_rows, 1)
        p = s.sub_(mx).exp_()
        ps = p.sum(dim=(1, key_dim))
        if p.dtype != vb.dtype:
            p = p.to(vb.dtype)
        o = torch.matmul(p.transpose(-1, -2) if key_major else p, vb)  # [Hkv, nb, M, D]
        o = o.sum(1, dtype=torch.float32)
        acc = o if acc is None else acc.add_(o)
        den = ps if den is None else den.add_(ps)
    return acc.div_(den.unsqueeze(-1)).to(dtype)


def _flash_segments(q: Tensor, segments: Segments, scale: float) -> Tensor:
    """torch's CPU flash kernel per segment, GQA folded into the query axis (q [Hkv, G*T, D] against
    k [Hkv, n, D]: K/V never repeated, no mask), the queries' own T keys done separately with the
    causal mask, everything merged by log-sum-exp."""
    hq, t, d = q.shape
    hkv = segments[0][0].shape[0]
    g = hq // hkv
    qf = q.reshape(hkv, g * t, d)
    if len(segments) == 1 and t == 1:  # no causal part, nothing to merge: the public SDPA entry
        k, v = segments[0]
        return F.scaled_dot_product_attention(qf[None], k[None], v[None], scale=scale)[0].reshape(hq, t, d)
    outs, lses = [], []
    last = len(segments) - 1
    for i, (k, v) in enumerate(segments):
        n = k.shape[1]
        own = t if i == last and t > 1 else 0
        if n > own:
            o, lse = _flash(qf, k[:, : n - own], v[:, : n - own], scale, causal=False)
            outs.append(o)
            lses.append(lse)
        if own:
            o, lse = _own_keys(qf, k[:, n - t :], v[:, n - t :], scale, g, t)
            outs.append(o)
            lses.append(lse)
    if len(outs) == 1:
        return outs[0].reshape(hq, t, d)
    return merge_partials(outs, lses).to(q.dtype).reshape(hq, t, d)


def _own_keys(qf: Tensor, k: Tensor, v: Tensor, scale: float, g: int, t: int) -> tuple[Tensor, Tensor]:
    """qf [Hkv, G*T, D] over the queries' own T keys (causal), fp32: (out, lse)."""
    hkv = k.shape[0]
    s = torch.matmul(qf.float(), k.float().transpose(1, 2)).mul_(scale)  # [Hkv, G*T, T]
    s.view(hkv, g, t, t).masked_fill_(_causal_mask(t, False, str(qf.device)), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(s.sub_(lse.unsqueeze(-1)).exp_(), v.float()), lse


def merge_partials(outs: list[Tensor], lses: list[Tensor]) -> Tensor:
    """Combine softmax-normalised partial outputs [Hq, T, D] with their log-sum-exps [Hq, T]."""
    w = torch.softmax(torch.stack(lses).float(), dim=0).unsqueeze_(-1)  # [S, Hq, T, 1]
    return torch.stack(outs).mul(w).sum(0)  # bf16 * fp32 promotes: fp32 result


# -- prefill: SDPA --------------------------------------------------------------------------------

_FLASH_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# Queries per SDPA call when the context is long: bounds the per-call working set.
_PREFILL_QUERY_CHUNK = 512


def _sdpa_partial(q: Tensor, k: Tensor, v: Tensor, scale: float, causal_tail: bool) -> tuple[Tensor, Tensor]:
    """(out [Hq, T, D], lse [Hq, T] fp32) of q over k/v; with `causal_tail`, the last T keys are
    the queries' own (causal), else every key is visible."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    n = k.shape[1]
    own = t if causal_tail else 0
    parts = []
    if n > own:
        # fully visible keys: GQA without repeating K/V by folding the group into the query axis
        o, lse = _flash(q.reshape(hkv, g * t, d), k[:, : n - own], v[:, : n - own], scale, causal=False)
        parts.append((o.reshape(hq, t, d), lse.reshape(hq, t)))
    if own:
        kk, vv = k[:, n - t :], v[:, n - t :]
        if g > 1:  # only the T own keys are repeated
            kk, vv = kk.repeat_interleave(g, 0), vv.repeat_interleave(g, 0)
        parts.append(_flash(q, kk, vv, scale, causal=True))
    if len(parts) == 1:
        return parts[0]
    (o1, l1), (o2, l2) = parts
    lse = torch.logaddexp(l1, l2)
    out = o1.float() * torch.exp(l1 - lse).unsqueeze(-1) + o2.float() * torch.exp(l2 - lse).unsqueeze(-1)
    return out.to(q.dtype), lse


def _flash(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """q [H, T, D], k/v [H, L, D] (same H) -> (out, lse [H, T] fp32); `causal` is top-left
    aligned, used only with T == L."""
    if _FLASH_OP is not None and q.device.type == "cpu":
        out, lse = _FLASH_OP(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, causal, attn_mask=None, scale=scale)
        return out.squeeze(0), lse.squeeze(0).float()
    # portable fallback: explicit scores
    s = q.float() @ k.float().transpose(1, 2) * scale
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.exp(s - lse.unsqueeze(-1)) @ v.float()).to(q.dtype), lse


def _sdpa_attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    t, n = q.shape[1], k.shape[1]
    if t > _PREFILL_QUERY_CHUNK:
        # query chunk c (queries c0..c1) sees keys 0 .. n - t + c1 - 1: recurse on a prefix
        outs = []
        for c0 in range(0, t, _PREFILL_QUERY_CHUNK):
            c1 = min(t, c0 + _PREFILL_QUERY_CHUNK)
            end = n - t + c1
            outs.append(_sdpa_partial(q[:, c0:c1], k[:, :end], v[:, :end], scale, causal_tail=True)[0])
        return torch.cat(outs, dim=1)
    return _sdpa_partial(q, k, v, scale, causal_tail=True)[0]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """float64 masked softmax attention with repeated K/V: the ground truth for tests."""
    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    G = Hq // Hkv
    kr = k.double().repeat_interleave(G, dim=0)
    vr = v.double().repeat_interleave(G, dim=0)
    s = q.double() @ kr.transpose(1, 2) * scale  # [Hq, T, L]
    mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ vr
