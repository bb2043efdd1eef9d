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
    assert "AVX512-BF16" in model.bf16_attention_available()
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


@pytest.fixture(scope="module", params=["q5_0-d64-gqa7", "q4_k-d128-gqa6"])
def fast_model(request, tmp_path_factory):
    if not (has_bf16() and native.status().int8):
        pytest.skip("this build has no int8 activations and bf16 attention (AVX2 or AVX512-VNNI, and AVX512-BF16)")
    kwargs = {
        "q5_0-d64-gqa7": dict(dim=896, n_heads=14, n_kv_heads=2, qtype="Q5_0", ffn=1024,
                              qtypes={"attn_v": "Q8_0", "ffn_down": "Q6_K", "output": "Q8_0"}),
        "q4_k-d128-gqa6": dict(dim=768, n_heads=6, n_kv_heads=1, head_dim=128, qtype="Q4_K", ffn=1024,
                               qtypes={"attn_v": "Q6_K"}),
    }[request.param]
    model = load_gguf(write_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", "qwen2", **kwargs))
    model.set_activations("int8")
    model.set_attention("bf16")
    return model


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
    from triforce_chat.decoding.models.loading import load_model
    from triforce_chat.decoding.session import kernels_label

    if not native.status().int8:
        pytest.skip("no int8 activations in this build: auto keeps fp32 attention with them")
    lm = load_model("smollm2-135m", log=lambda m: None)
    assert (lm.model.activations, lm.model.attention) == ("int8", "bf16") and not lm.notices
    assert kernels_label(lm.model.device, lm.model.activations, lm.model.attention).endswith("bf16 attention")
    assert lm.model.numerics.endswith("-int8-bf16att")
    lm = load_model("smollm2-135m", log=lambda m: None, activations="fp32")
    assert (lm.model.activations, lm.model.attention) == ("fp32", "fp32")
    lm = load_model("smollm2-135m", log=lambda m: None, activations="fp32", attention="bf16")
    assert (lm.model.activations, lm.model.attention) == ("fp32", "bf16")
