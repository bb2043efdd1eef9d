"""One attention entry point for every cache in `decoding/`.

`attend(q, k, v, scale)`: T new queries against L keys/values of which the last T belong to the
queries themselves (causal among them; every earlier key is visible). GQA is handled by grouping
the query heads of each KV head into one GEMM operand ([Hkv, G*T, D] @ [Hkv, D, L]): K/V are never
repeated.

`attend_segments(q, segments, scale)`: the same over keys/values given as several segments (the
retrieval view: gathered chunks + the recent part of the full cache + the draft scratch), merged
exactly with log-sum-exp weights instead of being concatenated.

Shapes: q [Hq, T, D]; k, v [Hkv, L, D]; out [Hq, T, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Above this many queries, the work is compute bound (prefill): hand it to SDPA's flash kernel.
_SDPA_MIN_QUERIES = 32


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal-in-the-tail attention over one contiguous K/V range."""
    if q.device.type == "cuda":
        from .backends import cuda_attend

        return cuda_attend(q, k, v, scale)
    if q.shape[1] >= _SDPA_MIN_QUERIES:
        return _sdpa_attend(q, k, v, scale)
    out, _ = _grouped_attend(q, k, v, scale, causal_tail=True)
    return out


def attend_segments(q: Tensor, segments: list[tuple[Tensor, Tensor]], scale: float) -> Tensor:
    """Attention over the union of K/V segments; the queries' own keys are the tail of the last
    segment (causal among them). Empty segments are skipped."""
    segments = [(k, v) for k, v in segments if k.shape[1] > 0]
    if len(segments) == 1:
        return attend(q, *segments[0], scale)
    outs, lses = [], []
    for i, (k, v) in enumerate(segments):
        o, lse = _grouped_attend(q, k, v, scale, causal_tail=i == len(segments) - 1)
        outs.append(o)
        lses.append(lse)
    return merge_partials(outs, lses).to(q.dtype)


def merge_partials(outs: list[Tensor], lses: list[Tensor]) -> Tensor:
    """Combine softmax-normalised partial outputs [Hq, T, D] with their log-sum-exps [Hq, T]."""
    lse = torch.stack(lses)  # [S, Hq, T]
    w = torch.softmax(lse, dim=0).unsqueeze(-1)  # [S, Hq, T, 1]
    return (torch.stack([o.float() for o in outs]) * w).sum(0)


def _grouped_attend(q: Tensor, k: Tensor, v: Tensor, scale: float, causal_tail: bool) -> tuple[Tensor, Tensor]:
    """Returns (out [Hq, T, D] in q's dtype, lse [Hq, T] fp32)."""
    Hq, T, D = q.shape
    Hkv, L, _ = k.shape
    G = Hq // Hkv
    qg = q.reshape(Hkv, G * T, D)  # query heads of one KV head side by side: rows g*T + t
    s = torch.matmul(qg, k.transpose(1, 2)).float() * scale  # [Hkv, G*T, L]
    if causal_tail and T > 1:
        # query t sits at position L-T+t: it must not see keys L-T+t+1 .. L-1
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # [T, T]
        s[..., L - T :].view(Hkv, G, T, T).masked_fill_(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, G*T]
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.matmul(p.to(v.dtype), v)  # [Hkv, G*T, D]
    return out.reshape(Hq, T, D), lse.reshape(Hq, T)


def _sdpa_attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    T, L = q.shape[1], k.shape[1]
    # bottom-right aligned causal mask: query t sees keys 0 .. L-T+t
    mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(0)


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
