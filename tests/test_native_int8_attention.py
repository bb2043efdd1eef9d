"""The attention with int8 products (kernels/cpu/attention_int8.h): against a reference that follows
the header's words (the scores bitwise, the outputs within the weights' 8-bit rounding), and exact:
a query's output bitwise the same alone or in a window, at any thread count, across the 32-key
block and 256-key segment edges, with blocks prepared by the cache or made per call, through the
whole forward and the levels; and the AVX2 kernel bitwise the VNNI kernel. Builds without either
must report it unavailable (tested there)."""

from __future__ import annotations

import math

import pytest
import torch

from gguf_models import load as load_gguf
from gguf_models import random_ids, write_gguf
from test_native_bf16 import FAST_MODELS, drive, drive_view, load_fast_model
from test_native_int8 import INT8_PATHS, outputs_of_every_path
from triforce_chat.decoding.cache import KVCache, PreparedBlocks
from triforce_chat.kernels import native
from triforce_chat.kernels.attention import reference_attention
from triforce_chat.kernels.backends import BlockView, attention_products

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status().reason}")

MAX_WINDOW = 32
BLOCK = 32


def has_int8_attention() -> bool:
    return native.available() and bool(native.status().int8_attention)


needs_int8 = pytest.mark.skipif(
    not has_int8_attention(), reason="this build of the kernels has no int8 attention (it needs AVX2 or AVX512-VNNI)"
)


def ops():
    return native.ops()


def kv(hkv, length, d, dtype, seed, outliers=False):
    """Keys and values; with `outliers`, keys with a few large dimensions as Qwen's biased keys have."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(hkv, length + 7, d, generator=g)  # capacity past `length`: never read
    if outliers:
        k[:, :, 3] += 30.0
        k[:, :, 3 + d // 2] -= 22.0
    v = torch.randn(hkv, length + 7, d, generator=g)
    return k.to(dtype), v.to(dtype)


def smoothing(hkv, d, seed):
    return torch.rand(hkv, d, generator=torch.Generator().manual_seed(seed)) + 0.5


def prepared(k, v, c, blocks=None):
    """k/v's full blocks prepared as the cache keeps them; returns (kp, vp, keys prepared)."""
    hkv, n, d = k.shape
    nblk = blocks if blocks is not None else n // BLOCK
    kp = torch.zeros(hkv, max(nblk, 1), BLOCK * d + 256, dtype=torch.uint8)
    vp = torch.zeros_like(kp)
    ops().prepare_kv_int8(k, v, kp, vp, 0, nblk, c)
    return kp, vp, nblk * BLOCK


def attend(q, k, v, length, scale, c, keys=None):
    """The kernel reading the first `keys` keys (default: every full block below `length`) from
    prepared blocks; keys=0: every block made per call."""
    kp, vp, _ = prepared(k, v, c, length // BLOCK)
    keys = length // BLOCK * BLOCK if keys is None else keys
    return ops().attention_int8(q, k, v, kp, vp, keys, length, scale, c)


def quantize(x: torch.Tensor):
    """The header's per-row quantization (fp32, as the kernel computes it): codes, scale."""
    a = x.abs().amax(-1, keepdim=True)
    inv = torch.tensor(127.0) / a
    used = (a > 0) & torch.isfinite(inv)  # a row so small that 127 / a overflows counts as zeros
    codes = torch.where(used, torch.round(x * inv), torch.zeros_like(x))
    return codes, torch.where(used, a / 127.0, torch.zeros_like(a))


F32 = torch.float32


def fused(a: torch.Tensor, b, c) -> torch.Tensor:
    """fp32 a * b + c rounded once, as an FMA (exact in float64 but for far-apart exponents)."""
    return (a.double() * torch.as_tensor(b, dtype=F32).double() + torch.as_tensor(c, dtype=F32).double()).to(F32)


def exp_weights(x: torch.Tensor) -> torch.Tensor:
    """attention_int8.cpp's exp_weights, operation by operation in fp32."""
    x = torch.maximum(x, torch.tensor(-87.3365447504, dtype=F32))
    n = torch.round(x * torch.tensor(1.44269504088896341, dtype=F32))
    r = fused(-n, 0.693359375, x)
    r = fused(-n, -2.12194440e-4, r)
    p = torch.full_like(x, 1.0 / 24)
    for coef in (1.0 / 6, 0.5, 1.0, 1.0):
        p = fused(p, r, coef)
    return torch.ldexp(p, n)


def reference_int8_attention(q, k, v, length, scale, c):
    """What attention_int8.h says it computes: its quantization, scores and weights in fp32 as the
    kernel computes them (the same bits, but for its accurate exp, here float64's: a weight's
    code can round the other way at a near-tie), each segment's running max as in the kernel, and
    the sums in float64. -> [T, Hq, D] float64."""
    t, hq, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    kc, ks = quantize(k[:, :length].float() * (1.0 / c)[:, None, :])  # [Hkv, L, D], [Hkv, L, 1]
    vc, vs = quantize(v[:, :length].float())
    out = torch.empty(t, hq, d, dtype=torch.float64)
    for h in range(hq):
        kvh = h // g
        qc, qs = quantize((q[:, h].float() * scale) * c[kvh])  # [T, D], [T, 1]
        scores = (qc.double() @ kc[kvh].double().T).float() * (ks[kvh, :, 0][None, :] * qs)  # fp32, exact ints
        for i in range(t):
            pos = length - t + i
            parts = []  # per block: (running max after it, numerator, denominator) relative to it
            for s0 in range(0, pos + 1, 256):
                m = torch.tensor(-math.inf, dtype=F32)
                for b0 in range(s0, min(s0 + 256, pos + 1), BLOCK):
                    sb = scores[i, b0 : min(b0 + BLOCK, pos + 1)]
                    vsb = vs[kvh, b0 : b0 + len(sb), 0]
                    bm = sb.max()
                    m = torch.maximum(m, bm)
                    e = exp_weights(sb - m)
                    vmax = vsb.max()
                    inv_vmax = (1.0 / vmax).to(F32) if vmax > 0 else torch.tensor(0.0, dtype=F32)
                    inv = (torch.tensor(255.0, dtype=F32) * torch.exp((m - bm).double()).to(F32)) * inv_vmax
                    far = not (bm - m >= -87.3365447504) or not torch.isfinite(inv)  # no weight from the block
                    codes = torch.zeros_like(e) if far else torch.round((e * vsb) * inv)
                    wsc = 0.0 if far else float(torch.exp((bm - m).double()).to(F32) * vmax / 255)
                    parts.append((float(m), wsc * (codes.double() @ vc[kvh, b0 : b0 + len(sb)].double()),
                                  e.double().sum()))
            top = max(mb for mb, _, _ in parts)
            num = sum(math.exp(mb - top) * nb for mb, nb, _ in parts)
            den = sum(math.exp(mb - top) * db for mb, _, db in parts)
            out[i, h] = num / den
    return out


def test_the_int8_attention_is_reported_with_the_build():
    st = native.status()
    assert st.int8_attention in ("", *INT8_PATHS)
    assert st.int8_attention == ops().attention_int8_path()


@pytest.mark.skipif(has_int8_attention(), reason="this build has int8 attention (the fallback is tested where not)")
def test_without_avx2_the_int8_attention_is_unavailable_and_not_chosen(tmp_path):
    from triforce_chat.decoding.models.loading import choose_attention

    k, v = kv(1, 40, 64, torch.float16, 0)
    kp = torch.zeros(1, 1, BLOCK * 64 + 256, dtype=torch.uint8)
    vp = torch.zeros_like(kp)
    with pytest.raises(RuntimeError, match="AVX2 or AVX512-VNNI"):
        ops().attention_int8(torch.randn(1, 2, 64), k, v, kp, vp, 0, 8, 0.1, torch.ones(1, 64))
    model = load_gguf(write_gguf(tmp_path / "m.gguf", "llama", qtype="Q8_0"))
    assert "AVX2 or AVX512-VNNI" in model.attention_available("int8")
    assert choose_attention(model, "auto")[0] != "int8"
    mode, notice = choose_attention(model, "int8")
    assert mode == "fp32" and "unavailable" in notice


@needs_int8
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 2, 7, 8])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_attention_follows_its_reference(d, g, kv_dtype):
    """Outputs are weighted means of values of order 1: within 1e-5 of the reference but where a
    weight's code rounded the other way at a near-tie (1/255 of a block's largest weight times a
    value: within 2e-2, in under 1% of the outputs). Blocks prepared or made per call give the same
    bits."""
    hkv, scale = 2, d**-0.5
    for length in (1, 31, 33, 300, 530):
        k, v = kv(hkv, length, d, kv_dtype, seed=length + g, outliers=True)
        c = smoothing(hkv, d, seed=length)
        t = min(length, 9)
        q = torch.randn(t, hkv * g, d, generator=torch.Generator().manual_seed(length))
        out = attend(q, k, v, length, scale, c)
        assert torch.equal(out, attend(q, k, v, length, scale, c, keys=0)), length
        err = (out.double() - reference_int8_attention(q, k, v, length, scale, c)).abs()
        assert err.max() < 2e-2 and (err > 1e-5).double().mean() < 0.01, (length, err.max(), (err > 1e-5).sum())


@needs_int8
def test_the_reference_is_not_the_bf16_or_fp32_attention():
    """The kernel's own rounding, not another kernel's: its outputs differ from the fp32 and bf16
    attention's by far more than from its reference (so the test above has teeth)."""
    k, v = kv(2, 300, 64, torch.float16, seed=1, outliers=True)
    c, q = smoothing(2, 64, 1), torch.randn(4, 14, 64, generator=torch.Generator().manual_seed(1))
    out = attend(q, k, v, 300, 0.125, c).double()
    ref = reference_int8_attention(q, k, v, 300, 0.125, c)
    assert (ops().attention(q, k, v, 300, 0.125).double() - out).abs().max() > 5 * (out - ref).abs().max()


@needs_int8
def test_smoothing_the_keys_keeps_their_small_dimensions():
    """Keys with two dimensions tens of times the others (Qwen's biased keys): quantized per key
    alone (c = 1), the small dimensions drown; with c = sqrt(each dimension's magnitude), as the
    model derives it from its weights, the error against exact attention is nearly halved here (the
    rest is the values' and weights' 8 bits; on the real model's keys perplexity went from +3% to
    +0.1% of fp32's: docs/performance.md)."""
    d, hkv, length = 64, 2, 400
    k, v = kv(hkv, length, d, torch.float16, seed=3, outliers=True)
    q = torch.randn(8, 14, d, generator=torch.Generator().manual_seed(3))
    exact = reference_attention(q.transpose(0, 1).double() * 0.125, k[:, :length].double(), v[:, :length].double(),
                                1.0).transpose(0, 1)
    magnitude = k[:, :length].float().abs().amax(1)  # [Hkv, D]
    smoothed = attend(q, k, v, length, 0.125, magnitude.sqrt().contiguous())
    plain = attend(q, k, v, length, 0.125, torch.ones(hkv, d))
    assert (plain.double() - exact).abs().mean() > 1.6 * (smoothed.double() - exact).abs().mean()


@needs_int8
@pytest.mark.parametrize("d,g", [(64, 3), (64, 7), (128, 6), (128, 1)])
def test_int8_attention_windows_equal_single_queries_bitwise(d, g, threads):
    """Lengths put windows inside a block, across the 32-key block and 256-key segment edges; the
    window's last block is made per call and holds keys its earlier rows must not see."""
    hkv = 2
    c = smoothing(hkv, d, 0)
    for length in (5, 32, 33, 40, 255, 256, 257, 270, 511, 530):
        k, v = kv(hkv, length, d, torch.float16, seed=length, outliers=True)
        t = min(length, MAX_WINDOW)
        q = torch.randn(t, hkv * g, d, generator=torch.Generator().manual_seed(length + 1))
        kp, vp, keys = prepared(k, v, c, length // BLOCK)
        window = ops().attention_int8(q, k, v, kp, vp, keys, length, 0.1, c)
        for i in range(t):
            n = length - t + i + 1
            single = ops().attention_int8(q[i : i + 1], k, v, kp, vp, n // BLOCK * BLOCK, n, 0.1, c)
            assert torch.equal(window[i : i + 1], single), (length, i)
            if i % 5 == 0:  # and with every block made in the call
                assert torch.equal(single, ops().attention_int8(q[i : i + 1], k, v, kp, vp, 0, n, 0.1, c)), (length, i)


@needs_int8
@pytest.mark.parametrize("d,g", [(64, 12), (128, 16)])
def test_long_calls_and_wide_groups_equal_single_queries_made_per_call(d, g):
    """130 queries (three slices of 64) and 12-16 query heads per KV head (two groups of score
    rows): each row bitwise as a single query whose blocks are all made in the call."""
    hkv, length, t = 1, 300, 130
    c = smoothing(hkv, d, 1)
    k, v = kv(hkv, length, d, torch.float16, seed=4, outliers=True)
    q = torch.randn(t, hkv * g, d, generator=torch.Generator().manual_seed(4))
    window = attend(q, k, v, length, 0.1, c)
    for i in range(0, t, 7):
        single = attend(q[i : i + 1], k, v, length - t + i + 1, 0.1, c, keys=0)
        assert torch.equal(window[i : i + 1], single), i


@needs_int8
def test_thread_counts_give_the_same_bits():
    k, v = kv(2, 530, 64, torch.float16, seed=6, outliers=True)
    c = smoothing(2, 64, 6)
    q = torch.randn(9, 14, 64, generator=torch.Generator().manual_seed(6))
    previous = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            outs.append(attend(q, k, v, 530, 0.125, c))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_int8
def test_a_key_or_value_with_a_nan_or_an_infinity_counts_as_zeros():
    """Such a row gets zero codes (the header): the same bits as a zero row there, in windows and
    alone; a query row with a NaN attends as a zero query (uniform weights)."""
    k, v = kv(2, 300, 64, torch.float16, seed=7)
    c = smoothing(2, 64, 7)
    q = torch.randn(5, 14, 64, generator=torch.Generator().manual_seed(7))
    bad_k, bad_v, zero_k, zero_v = k.clone(), v.clone(), k.clone(), v.clone()
    bad_k[0, 40, 3], bad_v[1, 41, 60], bad_k[1, 298, 0] = float("nan"), float("inf"), float("-inf")
    zero_k[0, 40], zero_v[1, 41], zero_k[1, 298] = 0, 0, 0
    for keys in (None, 0):
        assert torch.equal(attend(q, bad_k, bad_v, 300, 0.1, c, keys), attend(q, zero_k, zero_v, 300, 0.1, c, keys))
    bad_q, zero_q = q.clone(), q.clone()
    bad_q[2, 5, 9], zero_q[2, 5] = float("nan"), 0
    assert torch.equal(attend(bad_q, k, v, 300, 0.1, c), attend(zero_q, k, v, 300, 0.1, c))


@needs_int8
def test_int8_attention_checks_its_arguments():
    k, v = kv(2, 64, 64, torch.float16, 0)
    c = smoothing(2, 64, 0)
    kp, vp, _ = prepared(k, v, c, 2)
    q = torch.randn(1, 4, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops().attention_int8(q, k, v, kp, vp, 40, 64, 0.1, c)
    with pytest.raises(RuntimeError, match="key smoothing"):
        ops().attention_int8(q, k, v, kp, vp, 0, 64, 0.1, torch.ones(1, 64))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        c_bad = c.clone()
        c_bad[1, 7] = bad
        with pytest.raises(RuntimeError, match="finite and positive"):
            ops().attention_int8(q, k, v, kp, vp, 0, 64, 0.1, c_bad)
    with pytest.raises(RuntimeError, match="uint8"):
        ops().attention_int8(q, k, v, kp.view(torch.int8), vp, 0, 64, 0.1, c)
    with pytest.raises(RuntimeError, match="out of range"):
        ops().prepare_kv_int8(k, v, kp, vp, 0, 3, c)
    k96, v96 = kv(1, 40, 96, torch.float16, 0)
    b96 = torch.zeros(1, 1, BLOCK * 96 + 256, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops().attention_int8(torch.randn(1, 2, 96), k96, v96, b96, b96.clone(), 0, 8, 0.1, torch.ones(1, 96))


class UnpreparedBlocks(PreparedBlocks):
    """int8 blocks never kept: every call makes every block (the kernel's own routine)."""

    def refresh(self, layer, k_buf, v_buf, start, end):
        view = super().refresh(layer, k_buf, v_buf, start, end)
        return BlockView(view.k, view.v, 0, view.key_smooth)

    def like(self, max_len):
        return UnpreparedBlocks(self.k.shape[0], self.k.shape[1], self.head_dim, max_len, self.key_smoothing)


def int8_caches(n_layers, hkv, d, max_len):
    """A cache keeping int8 blocks, and one whose blocks are made on every call."""
    c = torch.rand(n_layers, hkv, d, generator=torch.Generator().manual_seed(9)) + 0.5
    kept = KVCache(n_layers, hkv, d, max_len, 0.125, dtype=torch.float16, key_smoothing=c)
    per_call = KVCache(n_layers, hkv, d, max_len, 0.125, dtype=torch.float16, key_smoothing=c)
    per_call.blocks = UnpreparedBlocks(n_layers, hkv, d, max_len, c)
    return kept, per_call


@needs_int8
def test_a_cache_keeping_int8_blocks_attends_as_blocks_made_per_call(threads):
    """Windows accepted, cut, rejected and written over, and rows restored, across many blocks: a
    block kept past a truncation, an overwrite or a restore would give other outputs."""
    n_layers, hq, hkv, d = 2, 14, 2, 64
    kept, per_call = int8_caches(n_layers, hkv, d, 300)
    assert kept.blocks.k.dtype == torch.uint8 and kept.blocks.bytes_per_token < kept.bytes_per_token
    a = drive(kept, torch.Generator().manual_seed(1), 300, n_layers, hq, d)
    b = drive(per_call, torch.Generator().manual_seed(1), 300, n_layers, hq, d)
    peak = 0
    with attention_products("int8"):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
            peak = max(peak, *kept.blocks.ready)
    assert kept.length == per_call.length and peak >= 192


@needs_int8
def test_a_retrieval_view_keeping_int8_blocks_attends_as_blocks_made_per_call(threads):
    n_layers, hq, hkv, d = 2, 14, 2, 64
    kept, per_call = int8_caches(n_layers, hkv, d, 1024)
    with attention_products("int8"):
        a = list(drive_view(kept, torch.Generator().manual_seed(2), 120, n_layers, hq, d))
        b = list(drive_view(per_call, torch.Generator().manual_seed(2), 120, n_layers, hq, d))
    assert len(a) == len(b) and int(a[-1]) >= 3
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_the_int8_attention_needs_a_store_made_for_it():
    from triforce_chat.kernels.backends import attend_tokens

    if not native.available():
        pytest.skip("native kernels")
    k, v = kv(2, 40, 64, torch.float16, 0)
    with attention_products("int8"), pytest.raises(ValueError, match="made for it"):
        attend_tokens(torch.randn(1, 14, 64), k, v, 8, 0.1)
    int8_blocks = BlockView(torch.zeros(2, 1, BLOCK * 64 + 256, dtype=torch.uint8),
                            torch.zeros(2, 1, BLOCK * 64 + 256, dtype=torch.uint8), 32, torch.ones(2, 64))
    with attention_products("bf16"), pytest.raises(ValueError, match="int8 blocks"):
        attend_tokens(torch.randn(1, 14, 64), k, v, 40, 0.1, int8_blocks)


# -- the AVX2 kernel against the VNNI kernel, bitwise --------------------------------------------------------


def attention_path_cases() -> dict:
    """Both head widths, every cache type, 1, 7 and 8 query heads per KV head, lengths inside a block
    and across block and segment edges, keys with outlier dimensions; and rows that take the rare
    branches: zero and non-finite keys, values and queries, and a query 300 times the others (its
    scores spread so far that whole blocks fall ~87 nats under the running max)."""
    cases = {}
    for d in (64, 128):
        for g in (1, 7, 8):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for length in (5, 33, 257, 530):
                    seed = d + 10 * g + length
                    k, v = kv(2, length, d, dtype, seed, outliers=True)
                    q = torch.randn(min(length, 9), 2 * g, d, generator=torch.Generator().manual_seed(seed))
                    cases[f"d{d} g{g} {dtype} {length}"] = (q, k, v, smoothing(2, d, seed), length)
    k, v = kv(2, 300, 64, torch.float16, seed=9, outliers=True)
    k[0, 40], v[1, 41], k[1, 100, 5], v[0, 120, 9], k[0, 298, 0] = 0, 0, float("nan"), float("inf"), float("-inf")
    q = torch.randn(6, 14, 64, generator=torch.Generator().manual_seed(9))
    q[1] *= 300.0
    q[2, 3], q[3, 4, 7] = 0, float("nan")
    cases["rare branches"] = (q, k, v, smoothing(2, 64, 9), 300)
    k, v = kv(2, 300, 64, torch.float32, seed=10)
    k[0, 50] *= 1e-38  # rows so small that 127 / their largest overflows: zeros, not codes of -128
    v[1, 60] *= 1e-38
    cases["tiny rows"] = (torch.randn(5, 14, 64, generator=torch.Generator().manual_seed(10)), k, v,
                          smoothing(2, 64, 10), 300)
    cases["a block ~82 nats under the max"] = gap_case()
    return cases


def gap_case():
    """One query along dimension 0; block 0 holds a key whose score is 87.5, block 1 keys ~82 nats
    lower, block 2 keys farther still. Block 1's bound pb * vmax (~1e-38) is so small that 255 over
    it overflows: it gets no weight, as a block past ~87 nats does. Block 0's values are zero in
    dimension 5, so that output is exactly zero unless block 1 leaks into it."""
    g = torch.Generator().manual_seed(11)
    k = torch.randn(1, 103, 64, generator=g) * 0.01
    k[0, 0, 0], k[0, 32:64, 0], k[0, 64:96, 0] = 700.0, 44.0, -100.0
    v = torch.randn(1, 103, 64, generator=g)
    v[0, :32, 5] = 0.0
    q = torch.zeros(1, 2, 64)
    q[:, :, 0] = 1.0
    return q, k.half(), v.half(), torch.ones(1, 64), 96


def attention_outputs(cases: dict) -> dict:
    """For each case: the prepared blocks, the window of all its queries, and each query alone with
    every block made in the call."""
    out = {}
    for name, (q, k, v, c, length) in cases.items():
        kp, vp, keys = prepared(k, v, c, length // BLOCK)
        window = ops().attention_int8(q, k, v, kp, vp, keys, length, 0.125, c)
        t = q.shape[0]
        singles = torch.cat([ops().attention_int8(q[i : i + 1], k, v, kp, vp, 0, length - t + i + 1, 0.125, c)
                             for i in range(t)])
        out[name] = (kp, vp, window, singles)
    return out


@pytest.fixture(scope="module")
def attention_paths(tmp_path_factory) -> dict:
    return outputs_of_every_path(tmp_path_factory, attention_path_cases(), native.status().int8_attention,
                                 attention_outputs)


def test_every_int8_attention_kernel_gives_the_avx2_kernels_bits(attention_paths):
    """Same inputs, same bits: prepared blocks, windows and queries alone (1 and 2 threads)."""
    avx2 = attention_paths["avx2"]
    assert len(avx2) == 75
    parts = ("key blocks", "value blocks", "window", "queries alone")
    for path, other in attention_paths.items():
        assert other.keys() == avx2.keys()
        for case in avx2:
            if path != "avx2":
                for a, b, what in zip(avx2[case], other[case], parts, strict=True):
                    assert torch.equal(a, b), (path, case, what)
            assert torch.equal(other[case][2], other[case][3]), (path, case)  # windows are its single queries
    assert not torch.isnan(avx2["rare branches"][2]).any()
    assert (avx2["a block ~82 nats under the max"][2][..., 5] == 0).all()


@pytest.fixture(scope="module", params=list(FAST_MODELS))
def int8_model(request, tmp_path_factory):
    if not (has_int8_attention() and native.status().int8):
        pytest.skip("this build has no int8 activations and int8 attention (AVX2 or AVX512-VNNI)")
    return load_fast_model(tmp_path_factory, request.param, "int8")


def test_int8_attention_windows_are_bitwise_equal_to_single_steps(int8_model, threads):
    from test_model import assert_windows_equal_steps

    assert_windows_equal_steps(int8_model, random_ids(600, int8_model.args.vocab_size, seed=5), starts=(250, 257))


def test_the_model_keeps_int8_blocks_and_reads_them(int8_model):
    """The cache keeps int8 blocks made with the model's smoothing, and the forward reads its stores
    with int8 products: another smoothing changes the logits (so it reached the kernel)."""
    from triforce_chat.decoding.model import key_smoothing

    cache = KVCache.for_model(int8_model, max_len=64)
    assert cache.blocks.k.dtype == torch.uint8 and cache.blocks.key_smoothing is int8_model.key_smoothing
    assert cache.blocks.kind == "int8"
    ids = random_ids(40, int8_model.args.vocab_size, seed=2)
    base = int8_model(ids, cache)
    saved = int8_model.key_smoothing
    try:
        int8_model.key_smoothing = torch.ones_like(saved)
        assert not torch.equal(int8_model(ids, KVCache.for_model(int8_model, max_len=64)), base)
    finally:
        int8_model.key_smoothing = saved
    assert torch.equal(key_smoothing(int8_model), saved)  # from the weights alone: the same every load
    assert "-i8att" in int8_model.numerics


def test_key_smoothing_follows_the_key_projection(tmp_path):
    """Positive and finite, the same for both dimensions of a RoPE pair, and larger for a dimension
    whose bias is large."""
    from triforce_chat.decoding.model import key_smoothing

    model = load_gguf(write_gguf(tmp_path / "m.gguf", "qwen2", dim=256, n_heads=4, n_kv_heads=2, qtype="Q8_0"))
    a = model.args
    hq, hkv, d = a.n_heads, a.n_kv_heads, a.head_dim
    c = key_smoothing(model)
    assert c.shape == (a.n_layers, hkv, d) and bool((c > 0).all()) and bool(torch.isfinite(c).all())
    assert torch.equal(c[..., : d // 2], c[..., d // 2 :])
    bias = model.layers[0].attention.wqkv.bias
    bias[hq * d + 5] = 1000.0  # KV head 0, dimension 5
    c2 = key_smoothing(model)
    assert c2[0, 0, 5] == c2[0, 0, 5 + d // 2] and c2[0, 0, 5] > 3 * c2[0, 0].median()
    assert torch.equal(c2[1:], c[1:])


@needs_int8
def test_greedy_levels_are_token_identical_with_int8_attention(tmp_path):
    """The levels, the draft model and tree windows over a Qwen2-layout pair in the int8 mode."""
    from test_speculative import Engine, repetitive_prompt
    from triforce_chat.decoding.sampling import Sampler

    if not native.status().int8:
        pytest.skip("no int8 activations in this build")
    target = load_gguf(write_gguf(tmp_path / "target.gguf", "qwen2", vocab=64, qtype="Q5_0", seed=1,
                                  qtypes={"attn_v": "Q8_0", "ffn_down": "Q6_K", "output": "Q8_0"}))
    draft = load_gguf(write_gguf(tmp_path / "draft.gguf", "qwen2", vocab=64, n_layers=1, qtype="Q4_K", seed=2))
    for model in (target, draft):
        model.set_activations("int8")
        model.set_attention("int8")
    engine = Engine(target, repetitive_prompt(5, 280, 64), budget=48, chunk=4, draft_model=draft)
    want, _ = engine.run(0, 60, Sampler(0.0))
    for level, drafter, adaptive in [(1, "ngram", False), (2, "suffix", True), (2, "model", False), (2, "both", True)]:
        got, _ = engine.run(level, 60, Sampler(0.0), drafter, 5, 3, adaptive)
        assert got == want, f"level {level} ({drafter}, adaptive={adaptive}) differs from level 0"


@needs_int8
def test_load_model_takes_int8_attention_where_it_runs(smollm2_path):
    from triforce_chat.decoding.models.loading import load_model
    from triforce_chat.decoding.session import kernels_label

    if not native.status().int8:
        pytest.skip("no int8 activations in this build")
    lm = load_model("smollm2-135m", log=lambda m: None)
    assert (lm.model.activations, lm.model.attention) == ("int8", "int8") and not lm.notices
    assert kernels_label(lm.model.device, "int8", "int8").endswith("int8 attention")
    lm = load_model("smollm2-135m", log=lambda m: None, attention="bf16")
    assert lm.model.attention == ("bf16" if native.status().bf16_attention else "fp32")
