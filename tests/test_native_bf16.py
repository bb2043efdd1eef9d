"""The attention with bf16 products (kernels/cpu/attention_bf16.h): against float64 on the same
bf16-rounded inputs, and exact: a query's output bitwise the same alone or in a window, at any
thread count, across the 32-key block and 256-key segment edges, and through the whole forward
with int8 activations. Builds without AVX512-BF16 must report it unavailable (tested there)."""

from __future__ import annotations

import pytest
import torch

from gguf_models import load as load_gguf
from gguf_models import random_ids, write_gguf
from triforce_chat.kernels import native
from triforce_chat.kernels.attention import reference_attention
from triforce_chat.kernels.backends import attention_products

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status().reason}")

MAX_WINDOW = 32


def has_bf16() -> bool:
    return native.available() and bool(native.status().bf16_attention)


needs_bf16 = pytest.mark.skipif(
    not has_bf16(), reason="this build of the kernels has no bf16 attention (it needs AVX512-BF16)"
)


def ops():
    return native.ops()


def kv(hkv, length, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(hkv, length + 7, d, generator=g).to(dtype)  # capacity past `length`: never read
    v = torch.randn(hkv, length + 7, d, generator=g).to(dtype)
    return k, v


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.float().to(torch.bfloat16).double()


@pytest.mark.skipif(has_bf16(), reason="this build has bf16 attention (the fallback is tested where it does not)")
def test_without_bf16_the_attention_is_unavailable_and_the_model_stays_fp32(tmp_path):
    from triforce_chat.decoding.models.loading import choose_attention

    assert native.status().bf16_attention == ""
    k, v = kv(1, 8, 64, torch.float16, 0)
    with pytest.raises(RuntimeError, match="AVX512-BF16"):
        ops().attention_bf16(torch.randn(1, 2, 64), k, v, 8, 0.1)
    model = load_gguf(write_gguf(tmp_path / "m.gguf", "llama", qtype="Q8_0"))
    assert "AVX512-BF16" in model.attention_available("bf16")
    assert choose_attention(model, "auto") == ("fp32", "")
    mode, notice = choose_attention(model, "bf16")
    assert mode == "fp32" and "unavailable" in notice


def test_the_bf16_attention_is_reported_with_the_build():
    st = native.status()
    assert st.bf16_attention in ("", "avx512-bf16")
    assert st.bf16_attention == ops().attention_bf16_path()


@needs_bf16
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 2, 7, 8])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bf16_attention_matches_float64_on_the_same_rounded_inputs(d, g, kv_dtype):
    """The only rounding left against the reference is the softmax weights' (bf16, relative
    2^-9): outputs, weighted means of values of order 1, within 4e-3. The fp32 kernel's outputs
    differ by more than that reference's (bf16 keys and values): the bf16 path really ran."""
    hkv, scale = 2, d**-0.5
    for length in (1, 31, 33, 300, 530):
        k, v = kv(hkv, length, d, kv_dtype, seed=length + g)
        t = min(length, 9)
        q = torch.randn(t, hkv * g, d, generator=torch.Generator().manual_seed(length))
        out = ops().attention_bf16(q, k, v, length, scale)
        ref = reference_attention(bf16(q.transpose(0, 1) * scale), bf16(k[:, :length]), bf16(v[:, :length]), 1.0)
        err = (out.double() - ref.transpose(0, 1)).abs()
        assert err.max() < 4e-3 and err.mean() < 5e-4, (length, err.max())
        if kv_dtype != torch.bfloat16 and length > 1:
            assert (ops().attention(q, k, v, length, scale) - out).abs().max() > 1e-4


@needs_bf16
@pytest.mark.parametrize("d,g", [(64, 3), (64, 7), (128, 6), (128, 1)])
def test_bf16_attention_windows_equal_single_queries_bitwise(d, g, threads):
    """Lengths put windows inside a block, across the 32-key block and 256-key segment edges."""
    hkv = 2
    for length in (5, 32, 33, 40, 255, 256, 257, 270, 511, 530):
        k, v = kv(hkv, length, d, torch.float16, seed=length)
        t = min(length, MAX_WINDOW)
        q = torch.randn(t, hkv * g, d, generator=torch.Generator().manual_seed(length + 1))
        window = ops().attention_bf16(q, k, v, length, 0.1)
        for i in range(t):
            single = ops().attention_bf16(q[i : i + 1], k, v, length - t + i + 1, 0.1)
            assert torch.equal(window[i : i + 1], single), (length, i)


@needs_bf16
def test_bf16_attention_refuses_other_head_widths():
    k, v = kv(1, 8, 96, torch.float16, 0)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops().attention_bf16(torch.randn(1, 2, 96), k, v, 8, 0.1)


# Qwen2-layout GGUF models in the shapes of the 0.5B (head_dim 64, 7 query heads per KV head) and
# the 1.5B (head_dim 128, 6), for the fast modes' whole-forward tests
FAST_MODELS = {
    "q5_0-d64-gqa7": dict(dim=896, n_heads=14, n_kv_heads=2, qtype="Q5_0", ffn=1024,
                          qtypes={"attn_v": "Q8_0", "ffn_down": "Q6_K", "output": "Q8_0"}),
    "q4_k-d128-gqa6": dict(dim=768, n_heads=6, n_kv_heads=1, head_dim=128, qtype="Q4_K", ffn=1024,
                           qtypes={"attn_v": "Q6_K"}),
}


def load_fast_model(tmp_path_factory, name: str, attention: str):
    """FAST_MODELS[name] with int8 activations and `attention` products."""
    model = load_gguf(write_gguf(tmp_path_factory.mktemp("gguf") / f"{name}.gguf", "qwen2", **FAST_MODELS[name]))
    model.set_activations("int8")
    model.set_attention(attention)
    return model


@pytest.fixture(scope="module", params=list(FAST_MODELS))
def fast_model(request, tmp_path_factory):
    if not (has_bf16() and native.status().int8):
        pytest.skip("this build has no int8 activations and bf16 attention (AVX2 or AVX512-VNNI, and AVX512-BF16)")
    return load_fast_model(tmp_path_factory, request.param, "bf16")


def test_fast_mode_windows_are_bitwise_equal_to_single_steps(fast_model, threads):
    from test_model import assert_windows_equal_steps

    assert_windows_equal_steps(fast_model, random_ids(600, fast_model.args.vocab_size, seed=5), starts=(250, 257))


def test_the_model_reads_its_kv_stores_with_bf16_products(fast_model):
    """The mode reaches the kernel: the same forward with fp32 attention gives other logits. (How
    close they are is the kernel tests' and the perplexity's business: random weights saturate the
    softmax, where any rounding of the scores moves the logits a lot.)"""
    from triforce_chat.decoding.cache import KVCache

    ids = random_ids(40, fast_model.args.vocab_size, seed=3)
    cache = KVCache.for_model(fast_model, max_len=64)
    a = fast_model(ids, cache)
    fast_model.set_attention("fp32")
    try:
        b = fast_model(ids, KVCache.for_model(fast_model, max_len=64))
    finally:
        fast_model.set_attention("bf16")
    assert not torch.equal(a, b) and torch.isfinite(a).all()


@needs_bf16
def test_load_model_takes_bf16_attention_with_int8_activations(smollm2_path):
    """bf16 where it is asked for, or where auto does not find the int8 attention (it comes first:
    test_native_int8_attention.py)."""
    from triforce_chat.decoding.models.loading import load_model
    from triforce_chat.decoding.session import kernels_label

    if not native.status().int8:
        pytest.skip("no int8 activations in this build: auto keeps fp32 attention with them")
    asked = "bf16" if native.status().int8_attention else None
    lm = load_model("smollm2-135m", log=lambda m: None, attention=asked)
    assert (lm.model.activations, lm.model.attention) == ("int8", "bf16") and not lm.notices
    assert kernels_label(lm.model.device, lm.model.activations, lm.model.attention).endswith("bf16 attention")
    assert lm.model.numerics.endswith("-int8-bf16att")
    lm = load_model("smollm2-135m", log=lambda m: None, activations="fp32")
    assert (lm.model.activations, lm.model.attention) == ("fp32", "fp32")
    lm = load_model("smollm2-135m", log=lambda m: None, activations="fp32", attention="bf16")
    assert (lm.model.activations, lm.model.attention) == ("fp32", "bf16")


# -- prepared blocks (decoding/cache.py: PreparedBlocks) ---------------------------------------------------


def prepared(k, v, n_blocks, capacity=None):
    """k/v's first n_blocks blocks prepared; the blocks past them are NaN (they must never be read)."""
    hkv, _, d = k.shape
    shape = (hkv, capacity or n_blocks, 32 * d)
    kp = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    vp = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    ops().prepare_kv_bf16(k, v, kp, vp, 0, n_blocks)
    return kp, vp


@needs_bf16
@pytest.mark.parametrize("d,g", [(64, 7), (128, 3)])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_prepared_blocks_give_the_bits_of_blocks_made_per_call(d, g, kv_dtype, threads):
    """Every split between prepared blocks and blocks the call makes, at block and segment edges,
    for single queries and windows: bitwise the same output."""
    for length in (1, 31, 32, 33, 255, 256, 257, 600):
        k, v = kv(2, length, d, kv_dtype, seed=length)
        full = length // 32
        kp, vp = prepared(k, v, full, capacity=full + 3)
        for t in {1, min(3, length), min(8, length)}:
            q = torch.randn(t, 2 * g, d, generator=torch.Generator().manual_seed(t))
            plain = ops().attention_bf16(q, k, v, length, 0.1)
            for ready in sorted({0, 1, full // 2, full}):
                out = ops().attention_bf16_prepared(q, k, v, kp, vp, 32 * ready, length, 0.1)
                assert torch.equal(out, plain), (length, t, ready)


@needs_bf16
def test_prepared_blocks_are_checked():
    k, v = kv(2, 64, 64, torch.float16, 0)
    kp, vp = prepared(k, v, 2)
    q = torch.randn(1, 4, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops().attention_bf16_prepared(q, k, v, kp, vp, 40, 64, 0.1)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops().attention_bf16_prepared(q, k, v, kp, vp, 96, 64, 0.1)  # more than the blocks hold
    with pytest.raises(RuntimeError, match="out of range"):
        ops().prepare_kv_bf16(k, v, kp, vp, 0, 3)
    with pytest.raises(RuntimeError, match="64-byte aligned"):
        flat = torch.empty(2 * 2 * 32 * 64 + 1, dtype=torch.bfloat16)
        ops().prepare_kv_bf16(k, v, flat[1:].view(2, 2, 32 * 64), vp, 0, 2)


def drive(cache, g: torch.Generator, rounds: int, n_layers: int, hq: int, d: int):
    """A decoder's use of a cache: windows written and attended at every layer, then kept in part,
    dropped by a truncation, or written over again in place, and rows restored from a document
    cache; yields each output."""
    hkv = cache.k.shape[1]
    for _ in range(rounds):
        t = int(torch.randint(1, 9, (1,), generator=g))
        if cache.length + t >= cache.max_len:
            cache.truncate(int(torch.randint(0, cache.length, (1,), generator=g)))
        for layer in range(n_layers):
            q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
            yield cache.attend(layer, q, k, v)
        what = int(torch.randint(0, 11, (1,), generator=g))
        if what < 8:  # keep the window, or part of it
            cache.advance(t)
            if what % 2:
                cache.truncate(cache.length - int(torch.randint(0, t, (1,), generator=g)))
        elif what == 8:  # reject it, and some of what came before
            cache.truncate(max(0, cache.length - int(torch.randint(0, 40, (1,), generator=g))))
        elif what == 10:  # a restore (store/doccache.py): cut back, rows copied in, then appended
            start = max(0, cache.length - int(torch.randint(0, 80, (1,), generator=g)))
            n = min(int(torch.randint(1, 70, (1,), generator=g)), cache.max_len - 9 - start)
            cache.truncate(start)
            cache.k[:, :, start : start + n] = torch.randn(n_layers, hkv, n, d, generator=g)
            cache.v[:, :, start : start + n] = torch.randn(n_layers, hkv, n, d, generator=g)
            cache.advance(n)
        # what == 9: nothing kept; the next window writes over the same rows


@needs_bf16
def test_a_cache_with_prepared_blocks_attends_as_one_without(threads):
    """Windows accepted, cut, rejected and written over, across many blocks: the cache that keeps
    prepared blocks gives bitwise the outputs of one that makes every block per call. A block kept
    past a truncation, an overwrite or a restore would give other outputs (the rows are random)."""
    from triforce_chat.decoding.cache import KVCache

    n_layers, hq, hkv, d = 2, 14, 2, 64
    with_blocks = KVCache(n_layers, hkv, d, 300, 0.125, dtype=torch.float16, prepared_blocks=True)
    without = KVCache(n_layers, hkv, d, 300, 0.125, dtype=torch.float16)
    a = drive(with_blocks, torch.Generator().manual_seed(1), 300, n_layers, hq, d)
    b = drive(without, torch.Generator().manual_seed(1), 300, n_layers, hq, d)
    peak = 0
    with attention_products("bf16"):  # around the generators: a context set inside one leaks out
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
            peak = max(peak, *with_blocks.blocks.ready)
    assert with_blocks.length == without.length and peak >= 192
    assert with_blocks.blocks_bytes == with_blocks.used_bytes == without.used_bytes and not without.blocks_bytes


def test_the_cache_prepares_blocks_for_the_bf16_attention_only(fast_model):
    from triforce_chat.decoding.cache import KVCache

    assert KVCache.for_model(fast_model, max_len=64).blocks is not None
    fast_model.set_attention("fp32")
    try:
        assert KVCache.for_model(fast_model, max_len=64).blocks is None
    finally:
        fast_model.set_attention("bf16")


def drive_view(cache, g: torch.Generator, rounds: int, n_layers: int, hq: int, d: int):
    """The middle level's use of its view: rebuilt when it asks, drafts in its scratch, the target's
    windows accepted in part into the full cache (the view copies them in), and rollbacks below the
    selection; yields every output of the view and of the cache."""
    from triforce_chat.decoding.retrieval import RetrievalView

    hkv = cache.k.shape[1]
    view = RetrievalView(cache, budget="160", chunk_size=8)

    def window(store, t):
        outs = []
        for layer in range(n_layers):
            q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
            outs.append(store.attend(layer, q, k, v))
        return outs

    for _ in range(0, 400, 50):  # the prefill
        cache.positions(50)
        yield from window(cache, 50)
        cache.advance(50)
    for _ in range(rounds):
        if view.needs_rebuild:
            view.rebuild()
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):  # drafts
            t = int(torch.randint(1, 4, (1,), generator=g))
            view.positions(t)
            yield from window(view, t)
            view.advance(t)
        view.truncate_scratch(0)
        t = int(torch.randint(1, 8, (1,), generator=g))  # the target's window
        yield from window(cache, t)
        cache.advance(t)
        cache.truncate(cache.length - int(torch.randint(0, t, (1,), generator=g)))
        if int(torch.randint(0, 12, (1,), generator=g)) == 0:  # a rollback below the selection
            cache.truncate(max(200, cache.length - int(torch.randint(20, 80, (1,), generator=g))))
    yield torch.tensor(view.rebuilds)


@needs_bf16
def test_a_retrieval_view_with_prepared_blocks_attends_as_one_without(threads):
    """The view's own blocks through rebuilds, drafts, recent tokens copied in and rollbacks: the
    same outputs, bitwise, as a view over a cache without blocks."""
    from triforce_chat.decoding.cache import KVCache

    n_layers, hq, hkv, d = 2, 14, 2, 64
    with_blocks = KVCache(n_layers, hkv, d, 1024, 0.125, dtype=torch.float16, prepared_blocks=True)
    without = KVCache(n_layers, hkv, d, 1024, 0.125, dtype=torch.float16)
    with attention_products("bf16"):
        a = list(drive_view(with_blocks, torch.Generator().manual_seed(2), 120, n_layers, hq, d))
        b = list(drive_view(without, torch.Generator().manual_seed(2), 120, n_layers, hq, d))
    assert len(a) == len(b) and int(a[-1]) >= 3  # rebuilt a few times
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
