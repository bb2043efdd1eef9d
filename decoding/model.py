"""A compact Llama / Mistral / Qwen2 / Qwen3 forward pass over our own KV stores.

One file, plain tensors, batch size one (a chat has one conversation). The model never owns a
cache: every forward is given a *KV store* (the full cache, the retrieval view of it, or a
StreamingLLM cache) which decides where the new keys/values are written and what the queries
attend to. That is what lets the same weights serve as target and as middle-level draft.

Weights are kept as shipped: GGUF blocks (Q4_0 ... Q6_K) or dense float tensors, multiplied by
the native CPU kernels (kernels/cpu) for decode steps and verification windows. Activations are
float32. Those kernels give each token's logits the same arithmetic whether it runs alone or
inside a window, at any thread count: greedy speculation is lossless by construction. Prefill
chunks (more than MAX_WINDOW tokens) are the same for every level and take the fastest path
(dequantized GEMMs). Without the native extension (no compiler), every operation is PyTorch's and
the full cache verifies windows one token at a time (`sequential_windows`): still exact.

Activations: in the "fp32" mode the kernels multiply float32 activations by the decoded weights; in
the "int8" mode (`set_activations`, AVX2 and AVX512-VNNI builds) each row of activations is rounded to
int8 per block of 32 first and multiplied by the weights' integer codes (kernels/cpu/linear_int8.h),
for every forward length, prefill included. Both are row-invariant; they differ from each other by
more than rounding (a different model numerically, measured within 1% perplexity of fp32).
Attention (`set_attention`): fp32 products, or bf16 products accumulated in fp32 (AVX512-BF16
builds, head_dim 64 or 128; kernels/cpu/attention_bf16.h), equally row-invariant.

Shapes in comments: T new tokens, D head_dim, Hq query heads, Hkv key/value heads, V vocab.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triforce_chat.kernels import native
from triforce_chat.kernels.backends import attention_products
from triforce_chat.kernels.quant import DENSE_IDS, TORCH_DTYPE_IDS, TYPES, reference_dequantize

if TYPE_CHECKING:
    from triforce_chat.decoding.draft_head import DraftHead

# Forwards of up to this many tokens (decode steps and verification windows) use the exact
# kernels; longer ones (prefill chunks) the fastest. The speculative engine never verifies more.
MAX_WINDOW = 32

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}

ACTIVATION_MODES = ("fp32", "int8")
ATTENTION_MODES = ("fp32", "bf16", "int8")


class UnsupportedArchitecture(ValueError):
    pass


@dataclass
class ModelArgs:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    # GGUF files of Llama models store q/k rows permuted for RoPE on adjacent pairs; applying RoPE
    # that way gives the same attention as rotate-half on the original layout.
    rope_interleaved: bool = False
    hf_config: Any = field(default=None, repr=False)  # kept for RoPE initialisation

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelArgs:
        arch = getattr(cfg, "model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(f"unsupported architecture: {arch}")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            arch=arch,
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            qk_norm=arch == "qwen3",
            hf_config=cfg,
        )


class KVStore(Protocol):
    """Where a forward pass writes its new keys/values and what its queries read.

    `attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq * D]` writes the T new
    keys/values of `layer` and returns attention of the T queries over everything the store
    exposes, causal among the new tokens. `advance(T)` is called once after all layers.
    `exact_windows`: the store is the target's full cache, whose windows must equal single steps.
    """

    exact_windows: bool

    def positions(self, n: int) -> Tensor: ...  # [n] absolute positions of the next n tokens

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...

    def advance(self, n: int) -> None: ...


def rope_tables(args: ModelArgs, max_len: int) -> tuple[Tensor, Tensor]:
    """cos/sin tables [max_len, D/2] (fp32), using transformers' RoPE initialisers so that Llama 3
    scaling, YaRN and linear scaling match the reference exactly."""
    cfg = args.hf_config
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float64, device="cpu") / args.head_dim
        inv_freq = 1.0 / (base**exponents)
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
            raise UnsupportedArchitecture(f"unsupported rope scaling: {rope_type}")
        with torch.device("cpu"):
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
        inv_freq = inv_freq.double()
    t = torch.arange(max_len, dtype=torch.float64, device="cpu")
    freqs = torch.outer(t, inv_freq)  # [max_len, D/2]
    return (freqs.cos() * scaling).float(), (freqs.sin() * scaling).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """x [T, H, D] fp32; cos/sin [T, D/2]. Rotate-half pairs (i, i + D/2), or adjacent pairs
    (2i, 2i + 1) when `interleaved`. Element-wise IEEE operations only: a token's result is the same
    in any batch. The native op does these very operations in one call (a dozen fewer per layer)."""
    if x.dtype == torch.float32 and uses_native(x):
        return native.ops().rope(x, cos.contiguous(), sin.contiguous(), interleaved)
    return rope_reference(x, cos, sin, interleaved)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """apply_rope in torch operations (any device and dtype)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D/2]
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


_scratch = threading.local()  # per-thread float32 buffer for prefill's dequantized weights


def uses_native(x: Tensor) -> bool:
    return x.device.type == "cpu" and native.available()


# -- layers ----------------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x W^T (+ b), with W kept as shipped: one or more row blocks ("parts"), each a dense
    tensor [n, in] (float32 / bfloat16 / float16) or GGUF blocks (uint8 [n, row_bytes] of a ggml
    type). Parts let q/k/v (or gate/up) run as one call even when a GGUF file quantized them
    differently, without copying the file's bytes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.has_bias = bias
        self.parts: list[Tensor] = []
        self.types: list[int] = []
        self.bias: Tensor | None = None
        self.int8 = False  # int8 activations (set_int8)
        self._int8_parts: list[Tensor] = []  # what the int8 mode multiplies: parts packed where the build packs
        self._int8_types: list[int] = []

    def set_parts(self, parts: list[tuple[Tensor, int]], bias: Tensor | None = None) -> None:
        """Install weights: [(tensor, ggml type id)]; dense parts of one dtype are concatenated."""
        if parts and all(t in DENSE_IDS for _, t in parts) and len({p.dtype for p, _ in parts}) == 1:
            parts = [(torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0], parts[0][1])]
        rows = sum(p.shape[0] for p, _ in parts)
        if rows != self.out_features:
            raise ValueError(f"weights give {rows} output rows, expected {self.out_features}")
        self.parts = [p.contiguous() for p, _ in parts]
        self.types = [t for _, t in parts]
        self.bias = None if bias is None else bias.float().contiguous()
        self.set_int8(self.int8)  # the int8 mode's copies follow the new weights

    def set_int8(self, on: bool) -> None:
        """Int8 activations on or off. On, the parts this build packs (kernels/cpu/linear_int8.h) are
        copied once into the tiles' order, which a step decodes without transposing: the same codes
        and scales, so the same bits, at ~0.7 of the time; the mapped file's pages under them are
        released. Off, the copies are dropped."""
        self.int8 = on and self.int8_capable
        self._int8_parts, self._int8_types = [], []
        if not self.int8:
            return
        from triforce_chat.decoding.models.gguf_file import release_pages

        ops = native.ops()
        for p, t in zip(self.parts, self.types, strict=True):
            packed = ops.int8_packed_type(t, p.shape[0])
            self._int8_parts.append(p if packed < 0 else ops.pack_int8(p, t, self.in_features))
            self._int8_types.append(t if packed < 0 else packed)
            if packed >= 0:
                release_pages(p)  # the file's copy is read again only if the mode goes back to fp32

    @property
    def int8_types(self) -> list[int]:
        """The types the int8 mode multiplies (1000 + the ggml type for a packed part)."""
        return list(self._int8_types)

    def int8_product(self, x: Tensor) -> Tensor:
        """x [T, in] fp32 -> [T, out] fp32 in the int8-activation mode (at any T)."""
        if not self.int8:
            raise ValueError("the int8 mode is off for this layer (Transformer.set_activations)")
        return native.ops().linear_int8(x.contiguous(), self._int8_parts, self._int8_types, self.bias)

    @property
    def quantized(self) -> bool:
        return any(t not in DENSE_IDS for t in self.types)

    @property
    def int8_capable(self) -> bool:
        """Every part GGUF blocks (the int8 mode multiplies integer codes) and K a multiple of 32."""
        return bool(self.types) and all(t not in DENSE_IDS for t in self.types) and self.in_features % 32 == 0

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    def dense(self, dtype: torch.dtype = torch.float32, rows: tuple[int, int] | None = None) -> Tensor:
        """The weight as one dense [out, in] tensor (dequantized blocks: the values the kernels use);
        `rows` (first, end): only those output rows, dequantizing no others."""
        first, end = rows or (0, self.out_features)
        out, offset = [], 0
        for p, t in zip(self.parts, self.types, strict=True):
            lo, hi = max(first - offset, 0), min(end - offset, p.shape[0])
            offset += p.shape[0]
            if lo >= hi:
                continue
            if t in DENSE_IDS:
                out.append(p[lo:hi].to(dtype))
            elif native.available() and p.device.type == "cpu":
                out.append(native.ops().dequantize(p, t, self.in_features, torch.arange(lo, hi)).to(dtype))
            else:
                out.append(reference_dequantize(p[lo:hi].cpu(), t, self.in_features).to(dtype).to(p.device))
        return out[0] if len(out) == 1 else torch.cat(out)

    def forward(self, x: Tensor) -> Tensor:  # x [T, in] fp32 -> [T, out] fp32
        if self.int8 and uses_native(x):  # any length: its prefill is the window kernel's too
            return self.int8_product(x)
        if x.shape[0] <= MAX_WINDOW and uses_native(x):
            return native.ops().linear(x.contiguous(), self.parts, self.types, self.bias)
        w = self._dense_single()
        if w is None:  # GGUF blocks, prefill: dequantized into a reused buffer for one GEMM
            w = self._dequantized_scratch() if uses_native(x) else self.dense(x.dtype)
        y = F.linear(x.to(w.dtype), w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def _dequantized_scratch(self) -> Tensor:
        """The weight as float32 [out, in], written into a buffer kept per thread: a prefill chunk
        costs one pass over the blocks and no fresh allocation (whose page faults cost more)."""
        buf = _scratch.__dict__.get("buf")
        need = self.out_features * self.in_features
        if buf is None or buf.numel() < need:
            buf = _scratch.buf = torch.empty(need)
        w = buf[:need].view(self.out_features, self.in_features)
        row = 0
        for p, t in zip(self.parts, self.types, strict=True):
            n = p.shape[0]
            if t in DENSE_IDS:
                w[row : row + n].copy_(p)
            else:
                native.ops().dequantize_into(p, t, self.in_features, w[row : row + n])
            row += n
        return w

    def _dense_single(self) -> Tensor | None:
        return self.parts[0] if len(self.parts) == 1 and self.types[0] in DENSE_IDS else None


class Embedding(nn.Module):
    """Token embeddings, dense or GGUF blocks: rows are dequantized on lookup."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.vocab_size, self.dim = vocab_size, dim
        self.weight: Tensor | None = None
        self.type = 0

    def set_weight(self, weight: Tensor, type_id: int) -> None:
        self.weight, self.type = weight.contiguous(), type_id

    def forward(self, ids: Tensor) -> Tensor:  # [T] -> [T, dim] fp32
        if self.type in DENSE_IDS:
            return F.embedding(ids, self.weight).float()
        if native.available() and self.weight.device.type == "cpu":
            return native.ops().dequantize(self.weight, self.type, self.dim, ids.long())
        rows = self.weight[ids.cpu()]
        return reference_dequantize(rows, self.type, self.dim).float().to(ids.device)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.ones(dim)

    def forward(self, x: Tensor) -> Tensor:  # [N, dim] fp32
        if uses_native(x):
            return native.ops().rmsnorm(x.contiguous(), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf


def swiglu(gate_up: Tensor) -> Tensor:  # [T, 2I] -> [T, I]
    if uses_native(gate_up):
        return native.ops().swiglu(gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = Linear(args.dim, qkv_out, bias=args.attention_bias)  # q, k, v in one call
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVStore, layer: int) -> Tensor:
        a = self.args
        T, hq, hkv, d = x.shape[0], a.n_heads, a.n_kv_heads, a.head_dim
        qkv = self.wqkv(x)  # [T, (Hq + 2 Hkv) D]
        q = qkv[:, : hq * d].view(T, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(T, hkv, d)
        if a.qk_norm:
            q = self.q_norm(q.reshape(T * hq, d)).view(T, hq, d)
            k = self.k_norm(k.reshape(T * hkv, d)).view(T, hkv, d)
        q = apply_rope(q, cos, sin, a.rope_interleaved)
        k = apply_rope(k, cos, sin, a.rope_interleaved)
        return self.wo(kv.attend(layer, q, k, v))  # [T, Hq D] -> [T, dim]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.intermediate_size)  # gate and up in one call
        self.w2 = Linear(args.intermediate_size, args.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w13(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVStore, layer: int) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, kv, layer)
        return x + self.feed_forward(self.ffn_norm(x))


def key_smoothing(model: Transformer) -> Tensor:
    """The int8 attention's key smoothing c [n_layers, Hkv, D] (float32, > 0; kernels/cpu/attention_int8.h),
    from the weights alone.

    Keys are divided by c and queries multiplied by it, which leaves every score as it was in exact
    arithmetic. What it changes is what survives quantizing a key per key: Qwen's biased key
    dimensions are tens of times the others, so a key quantized against its largest dimension loses
    the small ones (perplexity +3% against fp32 on Python's documentation, in a simulation of the
    kernel), and c = sqrt(a dimension's magnitude) moves half of that spread into the query, which
    is quantized once per row (SmoothQuant's migration with alpha 1/2, with the magnitudes estimated
    from the weights rather than from calibration data; docs/performance.md has the measurements).

    A dimension's magnitude is that of the key projection of a normalised input with unit-variance
    entries: sqrt(bias^2 + |W_row * attention_norm|^2), or with a key norm, its weight. RoPE turns
    each pair of dimensions together, so a pair takes the larger of its two. Floored at 1/1024 of
    the head's largest: no dimension is divided by (nearly) zero."""
    a = model.args
    hq, hkv, d = a.n_heads, a.n_kv_heads, a.head_dim
    out = torch.ones(a.n_layers, hkv, d)
    for i, layer in enumerate(model.layers):
        att = layer.attention
        if a.qk_norm:
            mag = att.k_norm.weight.float().abs().expand(hkv, d)
        else:
            w = att.wqkv.dense(torch.float32, rows=(hq * d, (hq + hkv) * d))  # [Hkv D, dim]
            sq = (w.cpu() * layer.attention_norm.weight.float().cpu()).square().sum(1)
            if att.wqkv.bias is not None:
                sq = sq + att.wqkv.bias[hq * d : (hq + hkv) * d].float().cpu().square()
            mag = sq.sqrt().view(hkv, d)
        if a.rope_interleaved:  # pairs (2i, 2i + 1)
            pair = mag.reshape(hkv, d // 2, 2).amax(-1).repeat_interleave(2, -1)
        else:  # pairs (i, i + D/2)
            pair = torch.maximum(mag[:, : d // 2], mag[:, d // 2 :]).repeat(1, 2)
        c = pair.sqrt()
        c = torch.maximum(c, c.amax(-1, keepdim=True) / 1024)
        out[i] = torch.where(torch.isfinite(c) & (c > 0), c, torch.ones_like(c))
    return out.contiguous()


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, max_len: int | None = None):
        super().__init__()
        self.args = args
        self.max_len = max_len or args.max_position_embeddings
        self.tok_embeddings = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self.rope_cos, self.rope_sin = rope_tables(args, self.max_len)  # [max_len, D/2] fp32
        self.device = torch.device("cpu")
        # Set at load when the exact kernels are unavailable or failed the self-check: the full
        # cache then verifies a window one token at a time (exact by construction, slower).
        self.sequential_windows = not native.available()
        self.weights_label = "?"  # e.g. "GGUF Q4_K_M" or "float32", for the panels
        self.activations = "fp32"  # one of ACTIVATION_MODES (set_activations)
        self.attention = "fp32"  # one of ATTENTION_MODES (set_attention)
        self.key_smoothing: Tensor | None = None  # [n_layers, Hkv, D] for the int8 attention (key_smoothing)

    # -- placement ----------------------------------------------------------------------------------
    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def norms(self) -> list[RMSNorm]:
        return [m for m in self.modules() if isinstance(m, RMSNorm)]

    def to_device(self, device: torch.device | str) -> Transformer:
        """Move every tensor to `device`. On CUDA, GGUF blocks are dequantized to bfloat16 (the
        native kernels are CPU code)."""
        device = torch.device(device)
        self.device = device
        if device.type != "cpu":
            self.set_activations("fp32")
            self.set_attention("fp32")
        for lin in self.linears():
            if device.type == "cuda" and lin.quantized:
                lin.set_parts([(lin.dense(torch.bfloat16), TORCH_DTYPE_IDS[torch.bfloat16])], lin.bias)
            lin.parts = [p.to(device) for p in lin.parts]
            lin.bias = None if lin.bias is None else lin.bias.to(device)
        emb = self.tok_embeddings
        if device.type == "cuda" and emb.type not in DENSE_IDS:
            emb.set_weight(self._dense_embedding(torch.bfloat16), TORCH_DTYPE_IDS[torch.bfloat16])
        emb.weight = emb.weight.to(device)
        for norm in self.norms():
            norm.weight = norm.weight.to(device)
        self.rope_cos, self.rope_sin = self.rope_cos.to(device), self.rope_sin.to(device)
        return self

    def int8_available(self) -> str:
        """'' when the int8-activation mode can run this model here, else why not (one line)."""
        if self.device.type != "cpu":
            return "int8 activations are a CPU mode"
        st = native.status()
        if not st.available:
            return f"native CPU kernels unavailable ({st.reason})"
        if not st.int8:
            return f"this CPU's kernels ({st.isa}) have no int8-activation path (it needs AVX2 or AVX512-VNNI)"
        if not any(lin.int8_capable for lin in self.linears()):
            return "the weights are dense (the int8 mode multiplies GGUF blocks' integer codes)"
        return ""

    def set_activations(self, mode: str) -> None:
        """Switch every GGUF-block linear to `mode` ("fp32" or "int8"; dense weights stay fp32).
        The two modes give different bits: a KV cache computed in one is not the other's."""
        if mode not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, not {mode!r}")
        if mode == "int8" and (why := self.int8_available()):
            raise ValueError(why)
        for lin in self.linears():
            lin.set_int8(mode == "int8")
        self.activations = mode

    @property
    def packed_weights(self) -> bool:
        """Whether the int8 mode runs on packed tiles here (Linear.set_int8), for the Cache panel."""
        return any(t > 1000 for lin in self.linears() for t in lin.int8_types)

    # the native build's field naming each product's path, and the instructions it needs
    _ATTENTION_PATHS = {"bf16": ("bf16_attention", "AVX512-BF16"), "int8": ("int8_attention", "AVX2 or AVX512-VNNI")}

    def attention_available(self, mode: str) -> str:
        """'' when the attention with `mode` products ("bf16" or "int8") can run this model here, else
        why not (one line). fp32 runs everywhere."""
        if mode == "fp32":
            return ""
        if self.device.type != "cpu":
            return f"{mode} attention is a CPU mode"
        st = native.status()
        if not st.available:
            return f"native CPU kernels unavailable ({st.reason})"
        if mode not in self._ATTENTION_PATHS:
            return f"attention must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}"
        field, needs = self._ATTENTION_PATHS[mode]
        if not getattr(st, field):
            return f"this CPU's kernels ({st.isa}) have no {mode} attention (it needs {needs})"
        if self.args.head_dim not in (64, 128):
            return f"{mode} attention is built for head_dim 64 and 128, not {self.args.head_dim}"
        return ""

    def set_attention(self, mode: str) -> None:
        """Attention products in `mode` ("fp32", "bf16" or "int8"); like the activations, a change of
        numerics."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}")
        if why := self.attention_available(mode):
            raise ValueError(why)
        if mode == "int8" and self.key_smoothing is None:
            self.key_smoothing = key_smoothing(self)
        self.attention = mode

    def _dense_embedding(self, dtype: torch.dtype) -> Tensor:
        emb = self.tok_embeddings
        rows = torch.arange(emb.vocab_size)
        if native.available():
            return native.ops().dequantize(emb.weight, emb.type, emb.dim, rows).to(dtype)
        return reference_dequantize(emb.weight, emb.type, emb.dim).to(dtype)

    def convert_weights(self, dtype: torch.dtype) -> None:
        """Dequantize / convert every matrix to one dense dtype (`--weights float32|bfloat16`)."""
        tid = TORCH_DTYPE_IDS[dtype]
        emb = self.tok_embeddings
        shared = bool(self.output.parts) and self.output.parts[0] is emb.weight
        for lin in self.linears():
            if not (shared and lin is self.output):
                lin.set_parts([(lin.dense(dtype), tid)], lin.bias)
        emb.set_weight(self._dense_embedding(dtype) if emb.type not in DENSE_IDS else emb.weight.to(dtype), tid)
        if shared:
            self.output.set_parts([(emb.weight, tid)])
        self.set_activations("fp32")  # dense weights: the int8 mode has nothing left to multiply

    @property
    def thread_invariant(self) -> bool:
        """Whether a forward of any length, prefill chunks included, gives the same bits at every
        thread count: each operation runs a native kernel whose sums do not depend on how the rows
        are split among threads, which the int8 mode gives every GGUF-block linear (a dense linear's
        prefill chunk goes through a vendor GEMM, which splits its sums by thread count).
        tests/test_native_int8.py checks the prefill at 1, 2 and 4 threads."""
        return self.device.type == "cpu" and native.available() and all(lin.int8 for lin in self.linears())

    @property
    def numerics(self) -> str:
        """What besides the weights fixes the bits this model computes (kernel path and version):
        caches of computed keys/values must not be reused across a change of it."""
        if self.device.type == "cuda":
            return f"cuda-torch{torch.__version__}"
        st = native.status()
        if st.available:
            mode = ("-int8" if self.activations == "int8" else "") + {"bf16": "-bf16att", "int8": "-i8att"}.get(
                self.attention, "")
            return f"native-{st.isa}-{native.build_key()}{mode}"
        return f"torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}"

    @property
    def weight_bytes(self) -> int:
        total = sum(lin.nbytes for lin in self.linears())
        emb = self.tok_embeddings.weight
        if emb is not None and not any(emb is p for p in self.output.parts):
            total += emb.numel() * emb.element_size()
        return total

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (float32 on CPU; the weights' dtype on CUDA)."""
        if self.device.type == "cuda":
            return self.output.parts[0].dtype
        return torch.float32

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.args.head_dim)

    # -- forward --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: Tensor, kv: KVStore, logits: str = "all", head: DraftHead | None = None) -> Tensor:
        """tokens [T] -> logits [T, V] fp32 (`logits="last"`: [1, V]; `"none"`: no head, for prefill).
        `head`: a drafter's head over part of the vocabulary instead of the model's own
        (decoding/draft_head.py; -inf for the tokens it leaves out)."""
        T = tokens.shape[0]
        if self.sequential_windows and 1 < T <= MAX_WINDOW and getattr(kv, "exact_windows", False):
            rows = [self.forward(tokens[i : i + 1], kv, "all" if logits != "none" else "none", head) for i in range(T)]
            if logits == "none":
                return rows[-1]
            return rows[-1] if logits == "last" else torch.cat(rows)
        pos = kv.positions(T)  # [T]
        if int(pos.max()) >= self.max_len:  # (a tree window's rows are not in position order)
            raise ValueError(f"position {int(pos.max())} is past the model's context of {self.max_len} tokens")
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [T, D/2]
        x = self.tok_embeddings(tokens).to(self.dtype)  # [T, dim]
        with attention_products(self.attention):
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, kv, i)
        kv.advance(T)
        if logits == "none":
            return x[:0, :0]
        if logits == "last":
            x = x[-1:]
        if head is not None:
            return head.logits(self.norm(x))
        return self.output(self.norm(x)).float()

    # -- weights from a transformers-layout state dict ----------------------------------------------
    def load_hf_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load a transformers-layout state dict (model.layers.N.self_attn.q_proj.weight, ...)."""
        a = self.args
        sd = {k.removeprefix("model."): v for k, v in sd.items()}

        def dense(*names: str) -> list[tuple[Tensor, int]]:
            return [(sd[n], _dense_id(sd[n], n)) for n in names]

        try:
            emb = sd["embed_tokens.weight"]
            self.tok_embeddings.set_weight(emb, _dense_id(emb, "embed_tokens.weight"))
            head = sd.get("lm_head.weight")
            head = emb if head is None or a.tie_word_embeddings else head
            self.output.set_parts([(head, _dense_id(head, "lm_head.weight"))])
            self.norm.weight = sd["norm.weight"].float()
            for i, layer in enumerate(self.layers):
                p = f"layers.{i}."
                att, mlp = p + "self_attn.", p + "mlp."
                bias = None
                if a.attention_bias:
                    bias = torch.cat([sd[att + "q_proj.bias"], sd[att + "k_proj.bias"], sd[att + "v_proj.bias"]])
                qkv = dense(att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight")
                layer.attention.wqkv.set_parts(qkv, bias)
                layer.attention.wo.set_parts(dense(att + "o_proj.weight"))
                if a.qk_norm:
                    layer.attention.q_norm.weight = sd[att + "q_norm.weight"].float()
                    layer.attention.k_norm.weight = sd[att + "k_norm.weight"].float()
                layer.feed_forward.w13.set_parts(dense(mlp + "gate_proj.weight", mlp + "up_proj.weight"))
                layer.feed_forward.w2.set_parts(dense(mlp + "down_proj.weight"))
                layer.attention_norm.weight = sd[p + "input_layernorm.weight"].float()
                layer.ffn_norm.weight = sd[p + "post_attention_layernorm.weight"].float()
        except KeyError as exc:
            raise ValueError(f"checkpoint does not match the model: missing {exc.args[0]}") from None
        self.weights_label = str(emb.dtype).removeprefix("torch.")


def _dense_id(t: Tensor, name: str) -> int:
    if t.dtype not in TORCH_DTYPE_IDS:
        raise ValueError(f"{name}: unsupported dtype {t.dtype}")
    return TORCH_DTYPE_IDS[t.dtype]


def quant_summary(model: Transformer) -> str:
    """'Q4_K 61%, Q6_K 25%, ...' by bytes of the matrices, for the panels."""
    sizes: dict[str, int] = {}
    for lin in model.linears():
        for p, t in zip(lin.parts, lin.types, strict=True):
            name = TYPES[t].name if t in TYPES else str(t)
            sizes[name] = sizes.get(name, 0) + p.numel() * p.element_size()
    total = sum(sizes.values()) or 1
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]))
