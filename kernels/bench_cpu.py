"""CPU attention benchmark: our formulation next to the PyTorch baselines, in one run.

    python -m triforce_chat.kernels.bench_cpu [--threads N] [--dtype fp32|bf16] [--lengths 1024,7168,32768]

Shape: SmolLM2-135M (30 layers, 9 query / 3 KV heads, head_dim 64). The KV lives in one
preallocated [layers, Hkv, max_len, D] buffer per K and V, like `decoding.cache.KVCache`, so that
every layer's keys are a strided view and the 30 layers together exceed the caches at long
context. One "step" = attention of every layer (projections and MLP excluded).

Printed per context length: time per step for
  exact     kernels.exact.invariant_attend (T = 1): what the full-cache target uses for decode
            and verification (batch-invariant, so greedy speculation stays bitwise lossless),
            with one Workspace reused across calls like the cache does
  ours      kernels.attention.attend (T = 1), default method (the other caches)
  ours-fl   cpu_attend(method="flash"): torch's CPU flash kernel, GQA folded, LSE merge
  grouped   the previous grouped-GEMM formulation (reference point)
  sdpa-gqa  F.scaled_dot_product_attention(enable_gqa=True)
  repeat    repeat_kv + SDPA (what transformers does)
with the KV bytes read per second and that as a % of the measured copy bandwidth (bytes read +
written per second by a large tensor copy, the figure quoted in shared/FACTS.md), then
  verify-8 / step-1   ours with T = 8 over the same cache, divided by ours with T = 1
and at the longest length the retrieval draft step (1K budget: the view's one buffer per layer of
gathered chunks + recent window + scratch, one attention call) divided by a full step at 1K
context, plus the cost of one retrieval rebuild (score chunk means, top-k, gather; all layers). Ratios, not pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from .attention import attend, cpu_attend
from .exact import BLOCK, Workspace, invariant_attend
from .retrieval import gather_chunks, select_chunks

LAYERS, HQ, HKV, D = 30, 9, 3, 64
SCALE = D**-0.5


def _time(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `reps` runs (the machine is shared: medians, not means)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth(n_bytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes read + written per second by a tensor copy of n_bytes (bytes/s)."""
    a = torch.ones(n_bytes // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    t = _time(lambda: b.copy_(a), reps)
    return 2 * n_bytes / t


def _grouped(q, k, v, scale):
    """The formulation this package started from (kept here as a reference point)."""
    hq, t, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    s = torch.matmul(q.reshape(hkv, g * t, d), k.transpose(1, 2)).float() * scale
    if t > 1:
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        s[..., n - t :].view(hkv, g, t, t).masked_fill_(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p.to(v.dtype), v).reshape(hq, t, d)


def _flash_method(q, k, v, scale):
    return cpu_attend(q, [(k, v)], scale, method="flash")


def _sdpa_gqa(q, k, v, scale):
    t, n = q.shape[1], k.shape[1]
    mask = torch.ones(t, n, dtype=torch.bool).tril(n - t) if t > 1 else None
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]


def _repeat_sdpa(q, k, v, scale):
    g = q.shape[0] // k.shape[0]
    t, n = q.shape[1], k.shape[1]
    mask = torch.ones(t, n, dtype=torch.bool).tril(n - t) if t > 1 else None
    kr, vr = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    return F.scaled_dot_product_attention(q[None], kr[None], vr[None], attn_mask=mask, scale=scale)[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--lengths", default="1024,7168,32768")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--baselines", default="grouped,sdpa-gqa,repeat", help="comma list, or 'none'")
    ap.add_argument("--chunk-size", type=int, default=8, help="retrieval chunk size")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    lengths = [int(x) for x in args.lengths.split(",")]
    baselines = {"grouped": _grouped, "sdpa-gqa": _sdpa_gqa, "repeat": _repeat_sdpa}
    chosen = [b for b in args.baselines.split(",") if b in baselines]

    bw = copy_bandwidth()
    print(f"threads={args.threads} dtype={args.dtype}  shape: {LAYERS} layers x {HQ}q/{HKV}kv heads x d{D}")
    print(f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s")
    max_len = (max(lengths) // BLOCK + 2) * BLOCK
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(LAYERS, HKV, max_len, D, generator=gen).to(dtype)
    V = torch.randn(LAYERS, HKV, max_len, D, generator=gen).to(dtype)
    q1 = torch.randn(HQ, 1, D, generator=gen).to(dtype)
    q8 = torch.randn(HQ, 8, D, generator=gen).to(dtype)

    def step(fn, q, n):
        return lambda: [fn(q, K[layer, :, :n], V[layer, :, :n], SCALE) for layer in range(LAYERS)]

    workspace = Workspace()  # reused across calls, as `decoding.cache.KVCache` does

    def exact_step(q, n):
        return lambda: [invariant_attend(q, K[layer], V[layer], n, SCALE, workspace) for layer in range(LAYERS)]

    header = f"{'context':>8} {'impl':>9} {'ms/step':>9} {'KV GB/s':>8} {'% copy':>7}"
    print(header)
    ours_t1, flash_t1, exact_t1 = {}, {}, {}
    for n in lengths:
        kv_bytes = 2 * LAYERS * HKV * n * D * K.element_size()
        rows = [("exact", exact_step(q1, n)), ("ours", step(attend, q1, n)), ("ours-fl", step(_flash_method, q1, n))]
        rows += [(b, step(baselines[b], q1, n)) for b in chosen]
        reps = args.reps if n <= 8192 else max(3, args.reps // 2)
        for name, fn in rows:
            if name == "repeat" and n > 8192:
                continue  # minutes per step at long context: known to be far behind
            t = _time(fn, reps)
            if name == "ours":
                ours_t1[n] = t
            if name == "exact":
                exact_t1[n] = t
            if name == "ours-fl":
                flash_t1[n] = t
            gbs = kv_bytes / t
            print(f"{n:>8} {name:>9} {t * 1e3:>9.1f} {gbs / 1e9:>8.1f} {100 * gbs / bw:>6.0f}%")
        t8e = _time(exact_step(q8, n), reps)
        print(f"{n:>8} {'verify-ex':>9} {t8e * 1e3:>9.1f}   (exact) verify-8 / step-1 = {t8e / exact_t1[n]:.2f}")
        t8 = _time(step(attend, q8, n), reps)
        print(f"{n:>8} {'verify-8':>9} {t8 * 1e3:>9.1f}   verify-8 / step-1 = {t8 / ours_t1[n]:.2f}")
        t8f = _time(step(_flash_method, q8, n), reps)
        print(f"{n:>8} {'verify-fl':>9} {t8f * 1e3:>9.1f}   (flash method) verify-8 / step-1 = {t8f / flash_t1[n]:.2f}")

    # retrieval draft step: 1K budget at the longest context vs a full step at 1K context
    n = max(lengths)
    c = args.chunk_size
    budget, recent, scratch = 1024, 128, 1
    n_chunks = (n - recent) // c
    pick = (budget - recent) // c
    torch.manual_seed(0)
    idx = [select_chunks(torch.randn(HQ, D).to(dtype), torch.randn(HKV, n_chunks, D), pick) for _ in range(LAYERS)]
    # the view's layout (decoding/retrieval.py): one buffer per layer [selected | recent | scratch],
    # gathered at the rebuild; a draft step copies the newly accepted token in and attends once
    buf_k = torch.empty(LAYERS, HKV, budget + 16, D, dtype=dtype)
    buf_v = torch.empty_like(buf_k)
    n_sel = idx[0].shape[1] * c  # fewer than `pick` chunks when the context is short
    for i in range(LAYERS):
        out = (buf_k[i, :, :n_sel], buf_v[i, :, :n_sel])
        gather_chunks(K[i, :, : n_chunks * c], V[i, :, : n_chunks * c], idx[i], c, out=out)
    buf_k[:, :, n_sel : n_sel + recent] = K[:, :, n - recent : n]
    buf_v[:, :, n_sel : n_sel + recent] = V[:, :, n - recent : n]
    end = n_sel + recent + scratch

    def sparse_step():
        buf_k[:, :, end - 1 : end] = K[:, :, n - 1 : n]  # the recent window's sync (one token)
        buf_v[:, :, end - 1 : end] = V[:, :, n - 1 : n]
        for i in range(LAYERS):
            attend(q1, buf_k[i, :, :end], buf_v[i, :, :end], SCALE)

    full_1k = step(attend, q1, budget)
    t_sparse = _time(sparse_step, args.reps * 2)
    t_full = _time(full_1k, args.reps * 2)
    print(f"retrieval draft step (budget {budget} at {n}): {t_sparse * 1e3:.2f} ms; full step at {budget}: "
          f"{t_full * 1e3:.2f} ms; sparse / full-1K = {t_sparse / t_full:.2f}")

    means = torch.randn(LAYERS, HKV, n_chunks, D)
    qlast = torch.randn(LAYERS, HQ, D).to(dtype)

    def rebuild():
        for i in range(LAYERS):
            ix = select_chunks(qlast[i], means[i], pick)
            gather_chunks(K[i, :, : n_chunks * c], V[i, :, : n_chunks * c], ix, c)

    t_rb = _time(rebuild, args.reps)
    print(f"retrieval rebuild (score {n_chunks} chunk means, top-{pick}, gather; {LAYERS} layers): "
          f"{t_rb * 1e3:.2f} ms = {t_rb / ours_t1[n]:.2f} x a full decode step at {n}")


if __name__ == "__main__":
    main()
