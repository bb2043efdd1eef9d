"""GPU attention benchmark: our Triton kernels next to flash-attn / SDPA, as a fraction of the
measured device-to-device copy bandwidth.

    python -m triforce_chat.kernels.bench_gpu [--dtype bf16|fp16] [--lengths 4096,32768,131072]

Without CUDA it prints one line and exits 0. Per context length and shape (SmolLM2-135M:
9q/3kv x d64; an 8B-class layer: 32q/8kv x d128), one layer's attention:
  full T=1 / T=8     backends.cuda_attend (flash-attn if installed, else SDPA)
  sdpa-gqa T=1       F.scaled_dot_product_attention(enable_gqa=True)
  triton dense T=1   the split-K Triton kernel over the whole cache
  triton sparse      the Triton kernel reading 1K / 4K budget of chunks in place (+ recent window)
  select_chunks      Triton scoring + sort vs torch (scores + topk + sort)
Bandwidth = K/V bytes the kernel must read / time; % = that / copy bandwidth (read + write bytes of
a large device copy per second).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F


def _time_cuda(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    a = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * n_bytes / _time_cuda(lambda: b.copy_(a))


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure.")
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--lengths", default="4096,32768,131072")
    ap.add_argument("--chunk-size", type=int, default=8)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16

    from . import backends

    have_triton = backends.triton_available()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth (read+write) {bw / 1e9:.0f} GB/s  "
          f"flash-attn={backends.flash_attn_available()} triton={have_triton}  dtype={args.dtype}")
    print(f"{'shape':>10} {'context':>8} {'kernel':>22} {'us':>9} {'GB/s':>7} {'% copy':>7}")
    for hq, hkv, d in [(9, 3, 64), (32, 8, 128)]:
        for n in [int(x) for x in args.lengths.split(",")]:
            _bench_shape(hq, hkv, d, n, dtype, args.chunk_size, bw, have_triton)
    return 0


def _bench_shape(hq: int, hkv: int, d: int, n: int, dtype, c: int, bw: float, have_triton: bool) -> None:
    from . import backends
    from .retrieval import select_chunks_torch

    scale = d**-0.5
    label = f"{hq}q/{hkv}kv/d{d}"
    k = torch.randn(hkv, n, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    q1 = torch.randn(hq, 1, d, device="cuda", dtype=dtype)
    q8 = torch.randn(hq, 8, d, device="cuda", dtype=dtype)

    def row(name, fn, n_keys):
        t = _time_cuda(fn)
        gbs = 2 * hkv * n_keys * d * k.element_size() / t
        print(f"{label:>10} {n:>8} {name:>22} {t * 1e6:>9.1f} {gbs / 1e9:>7.0f} {100 * gbs / bw:>6.0f}%")

    row("full T=1", lambda: backends.cuda_attend(q1, k, v, scale), n)
    row("full T=8", lambda: backends.cuda_attend(q8, k, v, scale), n)
    row("sdpa-gqa T=1", lambda: F.scaled_dot_product_attention(q1[None], k[None], v[None], scale=scale,
                                                                enable_gqa=True), n)
    if not have_triton:
        return
    from .gpu import attention as tri
    from .gpu import topk as tri_topk

    row("triton dense T=1", lambda: tri.attend_segments(q1, [(k, v)], scale), n)
    row("triton dense T=8", lambda: tri.attend_segments(q8, [(k, v)], scale), n)
    recent = 128
    n_chunks = (n - recent) // c
    tail = [(k[:, n - recent :], v[:, n - recent :])]
    for budget in (1024, 4096):
        if budget >= n:
            continue
        idx = torch.stack([torch.randperm(n_chunks, device="cuda")[: (budget - recent) // c].sort().values
                           for _ in range(hkv)])
        row(f"triton sparse {budget} T=1", functools.partial(tri.sparse_attend, q1, k, v, idx, c, tail, scale),
            budget)
    means = torch.randn(hkv, n // c, d, device="cuda")
    qq = torch.randn(hq, d, device="cuda", dtype=dtype)
    for name, fn in [("select_chunks triton", tri_topk.select_chunks), ("select_chunks torch", select_chunks_torch)]:
        t = _time_cuda(functools.partial(fn, qq, means, 1024 // c))
        print(f"{label:>10} {n:>8} {name:>22} {t * 1e6:>9.1f}")


if __name__ == "__main__":
    sys.exit(main())
