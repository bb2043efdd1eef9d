"""CPU kernel benchmark: the native kernels as a fraction of this machine's memory bandwidth.

    python -m triforce_chat.kernels.bench_cpu [--model NAME|FILE.gguf] [--threads N] [--lengths 1024,7168,32768]

For the model's real shapes and weights (default: the default model when installed, else the
bundled SmolLM2), in one run:
  bandwidth   a large tensor copy (bytes read + written per second) and a large sum (read)
  matmul      every linear layer of one decode step (the GGUF blocks as shipped, the output head
              included): ms, bytes of weights read per second, % of the read bandwidth;
              and T = 8 rows (a verification window) / T = 1
  attention   every layer's attention over a float16 KV cache of each length: ms, KV bytes read
              per second, % of the read bandwidth; verify-8 / step-1
  retrieval   a middle-level step over a 1K-token view at the longest length / a full step at 1K,
              and one rebuild (score the chunk means, top-k, gather)
Ratios and fractions, not pass/fail: the machine is shared, so read them side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import native
from .retrieval import gather_chunks, select_chunks_torch


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


def read_bandwidth(n_bytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes read per second by a sum over n_bytes (bytes/s)."""
    a = torch.ones(n_bytes // 4, dtype=torch.float32)
    return n_bytes / _time(lambda: a.sum(), reps)


def cpu_line() -> str:
    from pathlib import Path

    name, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "?":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} [{' '.join(simd)}]"


def _load(spec: str | None):
    from triforce_chat.decoding.models import catalog
    from triforce_chat.decoding.models.loading import load_model

    if spec is None:
        spec = catalog.DEFAULT_MODEL_NAME
        if catalog.installed_path(catalog.find(spec)) is None:
            spec = "smollm2-135m"
    return load_model(spec, log=lambda m: None, check=False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="catalogue name or .gguf file (default: the default model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lengths", default="1024,7168,32768")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=8, help="retrieval chunk size")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    st = native.status()
    if not st.available:
        print(f"native kernels unavailable: {st.reason}")
        return
    ops = native.ops()
    lm = _load(args.model)
    m, a = lm.model, lm.model.args
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"{cpu_line()}; torch {torch.__version__}; {args.threads} thread(s); native {st.isa}")
    print(f"model {lm.model_id}: {a.n_layers} layers, {a.n_heads}q/{a.n_kv_heads}kv heads x d{a.head_dim}, "
          f"weights {m.weights_label}")
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"copy bandwidth (read+write): {copy_bw / 1e9:.1f} GB/s; read bandwidth (sum): {read_bw / 1e9:.1f} GB/s")

    # -- matmul: every linear layer of one step, weights streamed from memory --------------------------
    linears = m.linears()
    w_bytes = sum(lin.nbytes for lin in linears)
    xs = {lin: torch.randn(8, lin.in_features) for lin in linears}

    def matmuls(t: int):
        return lambda: [ops.linear(xs[lin][:t], lin.parts, lin.types, lin.bias) for lin in linears]

    t1 = _time(matmuls(1), args.reps)
    t8 = _time(matmuls(8), args.reps)
    print(f"matmul  T=1 {t1 * 1e3:7.1f} ms  {w_bytes / t1 / 1e9:5.1f} GB/s of weights  "
          f"{100 * w_bytes / t1 / read_bw:3.0f}% of read bw;  T=8 {t8 * 1e3:7.1f} ms  "
          f"verify-8 / step-1 = {t8 / t1:.2f}")

    # -- attention: every layer over a float16 cache ------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    max_len = max(lengths) + 8
    K = torch.randn(a.n_layers, a.n_kv_heads, max_len, a.head_dim, generator=gen).half()
    V = torch.randn(a.n_layers, a.n_kv_heads, max_len, a.head_dim, generator=gen).half()
    q1 = torch.randn(1, a.n_heads, a.head_dim, generator=gen)
    q8 = torch.randn(8, a.n_heads, a.head_dim, generator=gen)
    scale = a.head_dim**-0.5

    def attention(q, n):
        return lambda: [ops.attention(q, K[i], V[i], n, scale) for i in range(a.n_layers)]

    step_t = {}
    for n in lengths:
        kv_bytes = 2 * a.n_layers * a.n_kv_heads * n * a.head_dim * 2
        reps = args.reps if n <= 8192 else max(3, args.reps // 2)
        s1 = step_t[n] = _time(attention(q1, n), reps)
        s8 = _time(attention(q8, n), reps)
        print(f"attention {n:>6}: T=1 {s1 * 1e3:7.1f} ms  {kv_bytes / s1 / 1e9:5.1f} GB/s of KV  "
              f"{100 * kv_bytes / s1 / read_bw:3.0f}% of read bw;  T=8 {s8 * 1e3:7.1f} ms  "
              f"verify-8 / step-1 = {s8 / s1:.2f}")

    # -- retrieval: a middle-level step over a 1K view at the longest length -------------------------
    n, c = max(lengths), args.chunk_size
    budget, recent = 1024, 128
    n_chunks = (n - recent) // c
    pick = (budget - recent) // c
    means = torch.randn(a.n_layers, a.n_kv_heads, n_chunks, a.head_dim)
    qlast = torch.randn(a.n_layers, a.n_heads, a.head_dim)
    buf_k = torch.empty(a.n_layers, a.n_kv_heads, budget + 16, a.head_dim, dtype=torch.float16)
    buf_v = torch.empty_like(buf_k)

    def rebuild():
        for i in range(a.n_layers):
            ix = select_chunks_torch(qlast[i], means[i], pick)
            sel = ix.shape[1] * c
            gather_chunks(K[i, :, : n_chunks * c], V[i, :, : n_chunks * c], ix, c,
                          out=(buf_k[i, :, :sel], buf_v[i, :, :sel]))

    t_rb = _time(rebuild, args.reps)
    end = min(budget, pick * c + recent + 1)
    t_view = _time(lambda: [ops.attention(q1, buf_k[i], buf_v[i], end, scale) for i in range(a.n_layers)], args.reps)
    t_full = _time(attention(q1, end), args.reps)
    print(f"retrieval draft step (view of {end} at {n}): {t_view * 1e3:.2f} ms; full step at {end}: "
          f"{t_full * 1e3:.2f} ms; sparse / full-1K = {t_view / t_full:.2f}")
    print(f"retrieval rebuild (score {n_chunks} chunk means, top-{pick}, gather; {a.n_layers} layers): "
          f"{t_rb * 1e3:.2f} ms = {t_rb / step_t[n]:.2f} x the attention of a full step at {n}")


if __name__ == "__main__":
    main()
