"""CPU kernel benchmark: the native kernels as a fraction of this machine's memory bandwidth, and
the activation modes (fp32, int8) side by side.

    python -m triforce_chat.kernels.bench_cpu [--model NAME|FILE.gguf] [--threads N] [--lengths 1024,7168,32768]
        [--modes fp32,int8,int8+bf16,int8+int8] [--rows 1,2,4,8,16,32] [--context 1024]
        [--prefill-chunk 512 (0: skip)] [--ppl-tokens 0]

For the model's real shapes and weights (default: the default model when installed, else the
bundled SmolLM2), in one run:
  bandwidth   a large tensor copy (bytes read + written per second) and a large sum (read)
  modes       fp32; int8 (int8 activations in the matrix products); int8+bf16 (and attention with
              bf16 products)
  matmul      every linear layer of one decode step (the GGUF blocks as shipped, the output head
              included) for T = 1, 2, 4 ... rows, in each activation mode: ms, and the cost of a
              window of T rows in steps (verify-T / step-1); bytes of weights read per second at T = 1
  forward     the whole forward (every layer, attention over a `--context` cache, the head) for
              T tokens, per mode, and verify-T / step-1; a prefill chunk of `--prefill-chunk`
              tokens (no head): tokens per second
  attention   every layer's attention over a float16 KV cache of each length (fp32 products, and
              bf16 or int8 ones over prepared blocks when int8+bf16 or int8+int8 is among the
              modes): ms, KV bytes read per second (the bytes that kernel reads), % of the read
              bandwidth; verify-8 / step-1
  step        a decode step's matrix products plus its attention at each length, in the fastest
              mode, against the bandwidth floor: the weights and the KV read once
  retrieval   a middle-level step over a 1K-token view at the longest length / a full step at 1K,
              and one rebuild (score the chunk means, top-k, gather)
  perplexity  (with --ppl-tokens N) of each mode over the first N tokens of Python's own
              documentation (pydoc_data.topics), in forward chunks of --ppl-chunk tokens
Ratios and fractions, not pass/fail: the machine is shared, so read them side by side (each figure
is a median of --reps runs, the modes interleaved).
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


def perplexity(model, ids: torch.Tensor, chunk: int = 512) -> float:
    """exp(mean negative log-likelihood) of ids[1:] given the prefix, teacher-forced in forward
    chunks of `chunk` tokens over one KV cache (the model's current activation mode)."""
    import math

    from triforce_chat.decoding.cache import KVCache

    cache = KVCache.for_model(model, max_len=len(ids) + 1)
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        logits = model(ids[start : start + chunk], cache, logits="all")
        target = ids[start + 1 : start + 1 + logits.shape[0]]
        logp = torch.log_softmax(logits[: len(target)].double(), dim=-1)
        nll -= logp.gather(1, target[:, None]).sum().item()
        n += len(target)
    return math.exp(nll / n)


def documentation_tokens(tokenizer, n: int) -> torch.Tensor:
    """The first n tokens of Python's own documentation (pydoc_data.topics, in sorted topic order)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return torch.tensor(tokenizer(text).input_ids[:n])


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
    ap.add_argument("--modes", default=None, help="activation modes to compare (default: every one this build has)")
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="window lengths T for matmul and forward")
    ap.add_argument("--context", type=int, default=1024, help="KV cache length for the whole-forward windows")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk to time (0: skip)")
    ap.add_argument("--ppl-tokens", type=int, default=0, help="perplexity over this many tokens (0: skip)")
    ap.add_argument("--ppl-chunk", type=int, default=512)
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
        rows = [int(t) for t in args.rows.split(",")]
    except ValueError:
        ap.error("--lengths and --rows are comma lists of whole numbers")
    if min(args.threads, args.reps, args.context, args.chunk_size, args.ppl_chunk, *lengths, *rows) < 1 or min(
        args.prefill_chunk, args.ppl_tokens
    ) < 0:
        ap.error("--threads, --reps, --context, --chunk-size, --ppl-chunk, --lengths and --rows must be positive; "
                 "--prefill-chunk and --ppl-tokens at least 0")
    torch.set_num_threads(args.threads)
    st = native.status()
    if not st.available:
        print(f"native kernels unavailable: {st.reason}")
        return
    ops = native.ops()
    lm = _load(args.model)
    m, a = lm.model, lm.model.args
    # the forward section writes --context tokens, then the longest window or the prefill chunk
    if (need := args.context + max(max(rows), args.prefill_chunk)) > m.max_len:
        ap.error(f"--context {args.context} plus the longest of --rows and --prefill-chunk is {need} positions; "
                 f"{lm.model_id} covers {m.max_len}")
    if args.modes:
        modes = args.modes.split(",")
    else:
        modes = ["fp32"] + (["int8"] if not m.int8_available() else [])
        modes += ["int8+bf16"] if "int8" in modes and not m.attention_available("bf16") else []
        modes += ["int8+int8"] if "int8" in modes and not m.attention_available("int8") else []
    for mode in modes:
        _set_mode(m, mode)  # refuses a mode this build or these weights cannot run
    int8 = f"int8 path {st.int8}" if st.int8 else "no int8 path"
    print(f"{cpu_line()}; torch {torch.__version__}; {args.threads} thread(s); native {st.isa}, {int8}")
    print(f"model {lm.model_id}: {a.n_layers} layers, {a.n_heads}q/{a.n_kv_heads}kv heads x d{a.head_dim}, "
          f"weights {m.weights_label}")
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"copy bandwidth (read+write): {copy_bw / 1e9:.1f} GB/s; read bandwidth (sum): {read_bw / 1e9:.1f} GB/s")

    # -- matmul: every linear layer of one step, weights streamed from memory --------------------------
    linears = m.linears()
    w_bytes = sum(lin.nbytes for lin in linears)
    xs = {lin: torch.randn(max(rows), lin.in_features) for lin in linears}

    def matmuls(t: int):  # in the model's current mode
        def run():
            for lin in linears:
                x = xs[lin][:t]
                lin.int8_product(x) if lin.int8 else ops.linear(x, lin.parts, lin.types, lin.bias)
        return run

    # int8+bf16 and int8+int8 have the matrix products of int8
    mm_modes = list(dict.fromkeys("int8" if mode.startswith("int8+") else mode for mode in modes))
    mm = {}
    for mode in mm_modes:
        _set_mode(m, mode)
        mm.update({(t, mode): _time(matmuls(t), args.reps) for t in rows})
    _table("matmul, all linears of a step", rows, mm_modes, mm)
    for mode in mm_modes:
        t1 = mm[1, mode] if 1 in rows else float("nan")
        print(f"  {mode}: T=1 {w_bytes / t1 / 1e9:5.1f} GB/s of weights, "
              f"{100 * w_bytes / t1 / read_bw:3.0f}% of read bw")

    # -- the whole forward: windows over a cache of --context tokens, and a prefill chunk --------------
    from triforce_chat.decoding.cache import KVCache

    ctx, chunk = args.context, args.prefill_chunk
    ids = torch.randint(0, a.vocab_size, (need,), generator=torch.Generator().manual_seed(1))
    fw, pre = {}, {}
    for mode in modes:
        _set_mode(m, mode)
        cache = KVCache.for_model(m, max_len=need)
        m(ids[:ctx], cache, logits="none")
        for t in rows:
            def window(t=t, cache=cache):
                cache.truncate(ctx)
                m(ids[ctx : ctx + t], cache)
            fw[t, mode] = _time(window, args.reps)
        def prefill(cache=cache):
            cache.truncate(ctx)
            m(ids[ctx : ctx + chunk], cache, logits="none")
        if chunk:
            pre[mode] = _time(prefill, max(1, args.reps // 2))
    _table(f"forward, T tokens over a {ctx}-token cache", rows, modes, fw)
    if chunk:
        print("prefill chunk of " + str(chunk) + " tokens at " + str(ctx) + ": "
              + ";  ".join(f"{mode} {pre[mode]:.2f} s = {chunk / pre[mode]:.0f} tok/s" for mode in modes)
              + "".join(f";  {mode} / fp32 speed = {pre['fp32'] / pre[mode]:.2f}x" for mode in modes
                        if mode != "fp32" and "fp32" in modes))
    _set_mode(m, modes[0])

    # -- attention: every layer over a float16 cache ------------------------------------------------
    gen = torch.Generator().manual_seed(0)
    max_len = max(lengths) + 8
    K = torch.randn(a.n_layers, a.n_kv_heads, max_len, a.head_dim, generator=gen).half()
    V = torch.randn(a.n_layers, a.n_kv_heads, max_len, a.head_dim, generator=gen).half()
    q1 = torch.randn(1, a.n_heads, a.head_dim, generator=gen)
    q8 = torch.randn(8, a.n_heads, a.head_dim, generator=gen)
    scale = a.head_dim**-0.5

    def per_call(kernel):  # (q, layer, keys) -> the kernel over that layer's K/V
        return lambda q, i, n: kernel(q, K[i], V[i], n, scale)

    def prepared(products, smoothing=None):
        """What the model's cache runs: its full blocks prepared once (decoding/cache.py: PreparedBlocks)."""
        from triforce_chat.decoding.cache import BLOCK, PreparedBlocks
        from triforce_chat.kernels.backends import attend_tokens, attention_products

        blocks = PreparedBlocks(a.n_layers, a.n_kv_heads, a.head_dim, max_len, smoothing)
        views = [blocks.refresh(i, K[i], V[i], 0, max_len) for i in range(a.n_layers)]

        def run(q, i, n):
            with attention_products(products):
                return attend_tokens(q, K[i], V[i], n, scale, views[i]._replace(keys=n // BLOCK * BLOCK))
        return run

    kernels = {"fp32": per_call(ops.attention)}
    if any(mode.endswith("bf16") for mode in modes):
        kernels["bf16"] = prepared("bf16")
        kernels["bf16 per call"] = per_call(ops.attention_bf16)  # each call makes the blocks it reads
    if any(mode.endswith("+int8") for mode in modes):
        kernels["int8"] = prepared("int8", m.key_smoothing)

    def attention(q, n, kernel):
        return lambda: [kernel(q, i, n) for i in range(a.n_layers)]

    def kv_bytes_read(kernel: str, n: int) -> int:
        """The bytes of K and V a step over n keys reads: the fp16 cache, or the prepared blocks (bf16;
        int8 codes with their per-block scales and sums)."""
        per_key = (a.head_dim + 8) if kernel == "int8" else 2 * a.head_dim  # int8: int8_block_bytes(D) / 32
        return 2 * a.n_layers * a.n_kv_heads * n * per_key

    step_t, attention_t = {}, {}
    for n in lengths:
        reps = args.reps if n <= 8192 else max(3, args.reps // 2)
        for name, kernel in kernels.items():
            kv_bytes = kv_bytes_read(name.split(" ")[0], n)
            s1 = _time(attention(q1, n, kernel), reps)
            s8 = _time(attention(q8, n, kernel), reps)
            step_t.setdefault(n, s1)
            attention_t[n, name] = s1
            print(f"attention {n:>6} {name}: T=1 {s1 * 1e3:7.1f} ms  {kv_bytes / s1 / 1e9:5.1f} GB/s of KV  "
                  f"{100 * kv_bytes / s1 / read_bw:3.0f}% of read bw;  T=8 {s8 * 1e3:7.1f} ms  "
                  f"verify-8 / step-1 = {s8 / s1:.2f}")
    if 1 in rows:  # a decode step's two big parts against what reading their bytes once would take
        for n in lengths:
            # the fastest mode: its matrix products and its attention kernel
            att = {mode: mode.split("+")[1] if "+" in mode else "fp32" for mode in modes}
            parts = {mode: (mm[1, "int8" if mode.startswith("int8") else "fp32"], attention_t[n, att[mode]])
                     for mode in modes}
            mode = min(parts, key=lambda k: sum(parts[k]))
            (step_mm, step_att), kv_bytes = parts[mode], kv_bytes_read(att[mode], n)
            step, floor = step_mm + step_att, (w_bytes + kv_bytes) / read_bw
            print(f"step at {n:>6} ({mode}): matmul {step_mm * 1e3:.1f} + attention {step_att * 1e3:.1f} = "
                  f"{step * 1e3:.1f} ms;  bandwidth floor (weights + KV once at read bw) {floor * 1e3:.1f} ms;  "
                  f"step / floor = {step / floor:.2f}")

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
    t_full = _time(attention(q1, end, kernels["fp32"]), args.reps)
    print(f"retrieval draft step (view of {end} at {n}): {t_view * 1e3:.2f} ms; full step at {end}: "
          f"{t_full * 1e3:.2f} ms; sparse / full-1K = {t_view / t_full:.2f}")
    print(f"retrieval rebuild (score {n_chunks} chunk means, top-{pick}, gather; {a.n_layers} layers): "
          f"{t_rb * 1e3:.2f} ms = {t_rb / step_t[n]:.2f} x the attention of a full step at {n}")


    # -- perplexity of each mode over real text ------------------------------------------------------
    if args.ppl_tokens:
        doc = documentation_tokens(lm.tokenizer, args.ppl_tokens)
        ppl = {}
        for mode in modes:
            _set_mode(m, mode)
            t0 = time.perf_counter()
            ppl[mode] = perplexity(m, doc, args.ppl_chunk)
            print(f"perplexity {mode}: {ppl[mode]:.4f} over {len(doc) - 1} tokens of pydoc_data.topics "
                  f"(chunks of {args.ppl_chunk}; {time.perf_counter() - t0:.0f} s)")
        for mode in ppl:
            if mode != "fp32" and "fp32" in ppl:
                print(f"perplexity {mode} / fp32 = {ppl[mode] / ppl['fp32']:.4f}")


MODES = {"fp32": ("fp32", "fp32"), "int8": ("int8", "fp32"), "int8+bf16": ("int8", "bf16"),
         "int8+int8": ("int8", "int8")}


def _set_mode(model, mode: str) -> None:
    """A benchmark mode: fp32, int8 (activations), int8+bf16 or int8+int8 (and bf16 or int8
    attention products)."""
    if mode not in MODES:
        raise SystemExit(f"--modes: one of {', '.join(MODES)}, not {mode!r}")
    activations, attention = MODES[mode]
    model.set_activations(activations)
    model.set_attention(attention)


def _table(title: str, rows: list[int], modes: list[str], t: dict) -> None:
    """ms per mode for each T, then verify-T / step-1 per mode, side by side."""
    print(f"{title}: ms (verify-T / step-1)")
    print("   T  " + "".join(f"{mode:>20}" for mode in modes))
    for r in rows:
        cells = []
        for mode in modes:
            ratio = f"({t[r, mode] / t[1, mode]:.2f})" if 1 in rows else ""
            cells.append(f"{t[r, mode] * 1e3:10.1f} {ratio:>8}")
        print(f"{r:4d}  " + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
