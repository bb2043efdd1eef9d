"""Which kernel runs where: the one place that looks at the device and at what is installed.

Callers in `decoding/` use the entry points here; the modules below it do not import it back:
- `native` (kernels/cpu, the C++ extension) on CPU when it built: exact attention for the full
  cache and the retrieval view (`attend_tokens`);
- `attention` / `retrieval`: PyTorch formulations, the CPU fallback and the reference;
- CUDA: flash-attn `flash_attn_with_kvcache` for full-cache attention when installed, else SDPA;
  the Triton split-K and sparse kernels and top-k for the retrieval level when Triton is there.
triton and flash-attn are optional: both are imported lazily, and a failed import only means the
fallback is used. `TRIFORCE_NO_TRITON=1` / `TRIFORCE_NO_FLASH_ATTN=1` force the fallbacks.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention, native, retrieval
from .attention import merge_partials


@functools.cache
def triton_available() -> bool:
    """Triton importable and usable here: on a GPU, or anywhere under TRITON_INTERPRET=1."""
    if os.environ.get("TRIFORCE_NO_TRITON") == "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _flash_attn():
    if os.environ.get("TRIFORCE_NO_FLASH_ATTN") == "1":
        return None
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        return None
    return flash_attn_with_kvcache


def flash_attn_available() -> bool:
    return _flash_attn() is not None


def _use_triton(x: Tensor) -> bool:
    return x.device.type == "cuda" and triton_available()


def describe(device: torch.device | str = "cpu") -> str:
    """One line for the stats panel: the kernels used on `device`."""
    if torch.device(device).type != "cuda":
        st = native.status()
        if st.available:
            return f"cpu: native {st.isa} kernels, {torch.get_num_threads()} threads"
        return f"cpu: PyTorch {torch.__version__} ({st.reason}), {torch.get_num_threads()} threads"
    full = "flash-attn" if flash_attn_available() else "sdpa"
    sparse = "triton" if triton_available() else full
    return f"cuda: full={full} sparse={sparse}"


# -- full cache --------------------------------------------------------------------------------------


def _flash_call(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, lse: bool = False):
    fn = _flash_attn()
    out = fn(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
             softmax_scale=scale, causal=causal, return_softmax_lse=lse)
    if lse:
        o, l = out
        return o.squeeze(0).transpose(0, 1), l.squeeze(0).float()  # [Hq, T, D], [Hq, T]
    return out.squeeze(0).transpose(0, 1)


def cuda_attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [Hq, T, D], k/v [Hkv, L, D] -> [Hq, T, D]; causal in the tail."""
    T, L = q.shape[1], k.shape[1]
    if flash_attn_available() and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_call(q, k, v, scale, causal=T > 1)
    mask = None
    if T > 1:
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(0)


# -- retrieval view ----------------------------------------------------------------------------------


def cuda_attend_segments(q: Tensor, segments: list[tuple[Tensor, Tensor]], scale: float) -> Tensor:
    if _use_triton(q):
        from .gpu import attention as tri

        return tri.attend_segments(q, segments, scale)
    if flash_attn_available() and q.dtype in (torch.float16, torch.bfloat16):
        last = len(segments) - 1
        parts = [_flash_call(q, k, v, scale, causal=i == last and q.shape[1] > 1, lse=True)
                 for i, (k, v) in enumerate(segments)]
        return merge_partials([o for o, _ in parts], [l for _, l in parts]).to(q.dtype)
    k = torch.cat([k for k, _ in segments], dim=1)
    v = torch.cat([v for _, v in segments], dim=1)
    return cuda_attend(q, k, v, scale)


def sparse_attend(
    q: Tensor, k_full: Tensor, v_full: Tensor, chunk_idx: Tensor, chunk_size: int,
    tail: list[tuple[Tensor, Tensor]], scale: float,
) -> Tensor:
    """Attention over the chunks `chunk_idx` [Hkv, n] of k_full/v_full [Hkv, L, D] followed by the
    dense `tail` segments (the last holds the queries' own keys). Any device."""
    tail = [(k, v) for k, v in tail if k.shape[1] > 0]
    if _use_triton(q):
        from .gpu import attention as tri

        return tri.sparse_attend(q, k_full, v_full, chunk_idx, chunk_size, tail, scale)
    return attend_segments(q, [retrieval.gather_chunks(k_full, v_full, chunk_idx, chunk_size), *tail], scale)


def select_chunks(query: Tensor, means: Tensor, k: int, always=(0,)) -> Tensor:
    """Top-k chunks per KV head (see retrieval.select_chunks_torch): Triton on CUDA when there."""
    if _use_triton(means):
        from .gpu import topk

        return topk.select_chunks(query, means, k, always)
    return retrieval.select_chunks_torch(query, means, k, always)


# -- entry points for decoding/ ----------------------------------------------------------------------


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [Hq, T, D] over k/v [Hkv, L, D], causal in the last T keys."""
    if q.device.type == "cuda":
        return cuda_attend(q, k, v, scale)
    return attention.attend(q, k, v, scale)


def attend_segments(q: Tensor, segments: list[tuple[Tensor, Tensor]], scale: float) -> Tensor:
    """q [Hq, T, D] over the union of K/V segments; the queries' own keys end the last one."""
    if q.device.type == "cuda":
        segments = [(k, v) for k, v in segments if k.shape[1] > 0]
        if len(segments) == 1:
            return cuda_attend(q, *segments[0], scale)
        return cuda_attend_segments(q, segments, scale)
    return attention.attend_segments(q, segments, scale)


# The products of the native attention for the forward running in this context: "fp32", "bf16"
# (kernels/cpu/attention_bf16.h) or "int8" (kernels/cpu/attention_int8.h). A model sets it around its
# forward (Transformer.attention), so every KV store it reads through `attend_tokens` computes alike.
_attention_products: contextvars.ContextVar[str] = contextvars.ContextVar("attention_products", default="fp32")


@contextlib.contextmanager
def attention_products(mode: str) -> Iterator[None]:
    token = _attention_products.set(mode)
    try:
        yield
    finally:
        _attention_products.reset(token)


INT8_BLOCK_EXTRA = 256  # bytes after a prepared int8 block's 32 * D codes: scales (kernels/cpu/attention_int8.h)


class BlockView(NamedTuple):
    """One layer of a KV store's prepared blocks, as `attend_tokens` reads them: k/v [Hkv, blocks,
    bytes of a block], the first `keys` keys ready (a multiple of 32), and for int8 blocks the key
    smoothing they were made with ([Hkv, D]; None for bf16 blocks)."""

    k: Tensor
    v: Tensor
    keys: int
    key_smooth: Tensor | None = None


def prepared_blocks_available(head_dim: int, device: torch.device | str = "cpu", products: str = "bf16") -> bool:
    """Whether `prepare_blocks` runs here for `products` ("bf16" or "int8"): the native attention
    with those products on CPU, head_dim 64 or 128."""
    if torch.device(device).type != "cpu" or not native.available() or head_dim not in (64, 128):
        return False
    st = native.status()
    return bool(st.int8_attention if products == "int8" else st.bf16_attention)


def prepare_blocks(k_buf: Tensor, v_buf: Tensor, k_blocks: Tensor, v_blocks: Tensor, first: int, end: int,
                   key_smooth: Tensor | None = None) -> None:
    """Blocks first .. end - 1 of 32 keys of k_buf/v_buf [Hkv, L, D] into k_blocks/v_blocks as the
    attention reads them: bf16 [Hkv, blocks, 32 * D] (kernels/cpu/attention_bf16.h), or with
    `key_smooth` int8 codes and scales, uint8 [Hkv, blocks, 32 * D + 256] (attention_int8.h)."""
    if key_smooth is None:
        native.ops().prepare_kv_bf16(k_buf, v_buf, k_blocks, v_blocks, first, end)
    else:
        native.ops().prepare_kv_int8(k_buf, v_buf, k_blocks, v_blocks, first, end, key_smooth)


def attend_tokens(q: Tensor, k_buf: Tensor, v_buf: Tensor, length: int, scale: float,
                  blocks: BlockView | None = None) -> Tensor:
    """Token-major attention for the KV stores: q [T, Hq, D] (the last T of `length` positions)
    over k_buf/v_buf [Hkv, >= length, D] -> [T, Hq * D]. The native kernel reads 16-bit buffers
    directly and is exact for windows (fp32, bf16 or int8 products, see `attention_products`); the
    fallbacks use PyTorch on the buffer's dtype. `blocks`: the first `blocks.keys` keys already
    prepared (`prepare_blocks`), which the bf16 and int8 products read instead of making them
    again: the same bits, and a step at 7K-29K about twice as fast. The int8 products need them
    (their key smoothing comes with them)."""
    t, hq, d = q.shape
    if q.device.type == "cpu" and native.available():
        products = _attention_products.get()
        if products == "int8":
            if blocks is None or blocks.key_smooth is None:
                raise ValueError("the int8 attention reads a KV store made for it (prepared int8 blocks)")
            return native.ops().attention_int8(q, k_buf, v_buf, blocks.k, blocks.v, blocks.keys, length, scale,
                                               blocks.key_smooth).view(t, hq * d)
        if products == "bf16":
            if blocks is not None and blocks.key_smooth is not None:
                raise ValueError("this KV store keeps int8 blocks; the bf16 attention cannot read them")
            if blocks is not None and blocks.keys > 0:
                return native.ops().attention_bf16_prepared(q, k_buf, v_buf, blocks.k, blocks.v, blocks.keys, length,
                                                            scale).view(t, hq * d)
            return native.ops().attention_bf16(q, k_buf, v_buf, length, scale).view(t, hq * d)
        return native.ops().attention(q, k_buf, v_buf, length, scale).view(t, hq * d)
    qh = q.transpose(0, 1).to(k_buf.dtype)  # [Hq, T, D]
    out = attend(qh, k_buf[:, :length], v_buf[:, :length], scale)
    return out.transpose(0, 1).reshape(t, hq * d).to(q.dtype)
