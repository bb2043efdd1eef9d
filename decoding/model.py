"""A compact Llama / Mistral / Qwen2 / Qwen3 forward pass over our own KV stores.

One file, plain tensors, batch size one (a chat has one conversation). The model never owns a
cache: every forward is given a *KV store* (the full cache, the retrieval view of it, or a
StreamingLLM cache) which decides where the new keys/values are written and what the queries
attend to. That is what lets the same weights serve as target and as middle-level draft.

Shapes in comments: T new tokens, D head_dim, Hq query heads, Hkv key/value heads, V vocab.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triforce_chat.decoding.cache import MAX_WINDOW

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}


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

    `attend` writes the T new keys/values of `layer` and returns attention of the T queries over
    everything the store exposes, causal among the new tokens. `advance(T)` is called once after
    all layers, making the T tokens part of the store.
    """

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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [H, T, D] with the rotate-half convention; cos/sin [T, D/2] fp32."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


# float32 GEMMs (MKL) stay row-invariant under the scheme below with up to 4 threads; measured with
# 8 and 16 they split some reductions by row count (`load_model` caps the threads for float32).
FP32_MAX_THREADS = 4


@functools.cache
def onednn_packing_available() -> bool:
    """Whether this torch build can pre-pack bf16 linear weights for oneDNN (and run them)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        w = torch.ones(4, 8, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
        return bool((y == 8).all())
    except (AttributeError, RuntimeError):
        return False


class Linear(nn.Linear):
    """nn.Linear whose rows are batch-invariant: a token's output is bitwise the same whether it is
    computed alone or inside a verification window (see kernels/exact.py for why that matters).

    A stock GEMM is not: its library picks a kernel, and with several threads a split of the
    reduction, from the row count (measured here: fp32 one row goes to a GEMV; fp32 at 2+ threads
    splits the 1536-long reduction from 17 rows up; bf16 at 16 threads from 5 rows up). So every
    input of up to MAX_WINDOW rows goes through GEMMs of one fixed shape: pieces of ROWS rows, the
    last one padded. That costs little in bf16 (AMX computes 16 rows for about the price of one;
    about 7% of a step when measured, before the weights were pre-packed). fp32 cannot afford
    computing 16 rows per token (2.8x a step): there the weight is kept transposed ([in, out]:
    x @ W^T, whose rows are invariant from two rows up at 1-8 threads), pieces are 2..ROWS rows
    and only a single row is padded (to two).

    bf16 weights on CPU are stored pre-packed in oneDNN's blocked layout (`packed`): the stock path
    re-packs the whole weight on every call, so a decode step read the weights at ~6.9 GB/s; packed
    once, at ~9.9 (measured with the default model's shapes, 1 thread: 39 -> 27 ms per step for all
    linear layers). Same kernel, same results bitwise (checked by `rows_are_invariant` and the tests).

    Measured is not guaranteed on another CPU or library build, so `load_model` probes every shape
    once (`rows_are_invariant`); a shape that fails runs windows row by row (`row_by_row`): exact,
    at the cost of reading the weights once per row.
    """

    ROWS = 16
    transposed = False
    packed = False
    row_by_row = False

    def relayout(self) -> None:
        """Store the weight in the layout its CPU GEMM reads fastest (once, after loading)."""
        w = self.weight
        if w.device.type != "cpu" or self.transposed or self.packed:
            return
        if w.dtype == torch.float32:
            self.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=False)
            self.transposed = True
        elif w.dtype == torch.bfloat16 and onednn_packing_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.ROWS)
            self.weight = nn.Parameter(packed, requires_grad=False)
            self.packed = True

    def _matmul(self, x: Tensor) -> Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, None, "none", [], "")
        return x @ self.weight if self.transposed else F.linear(x, self.weight)

    def forward(self, x: Tensor) -> Tensor:  # x [T, in] -> [T, out]
        n = x.shape[0]
        if n > MAX_WINDOW:  # prefill chunks: every level prefills alike, so the fastest GEMM is fine
            y = self._matmul(x)
        elif self.row_by_row and n > 1:
            y = torch.cat([self._piece(x[i : i + 1]) for i in range(n)])
        elif n <= self.ROWS:
            y = self._piece(x)
        else:
            y = torch.cat([self._piece(x[i : i + self.ROWS]) for i in range(0, n, self.ROWS)])
        return y if self.bias is None else y + self.bias

    def _piece(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        rows = (2 if n == 1 else n) if self.transposed else self.ROWS
        padded = torch.cat([x, x[:1].expand(rows - n, -1)]) if rows > n else x
        y = self._matmul(padded)
        return y[:n]

    @torch.no_grad()
    def rows_are_invariant(self, seed: int = 0) -> bool:
        """Random rows through windows of every piece shape (2..ROWS+1 rows, and MAX_WINDOW: every
        row position of a full piece) equal the same rows done one by one."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(MAX_WINDOW, self.in_features, generator=g).to(self.weight.device, self.weight.dtype)
        singles = torch.cat([self(x[i : i + 1]) for i in range(MAX_WINDOW)])
        sizes = sorted({*range(2, min(self.ROWS + 2, MAX_WINDOW + 1)), MAX_WINDOW})
        return all(torch.equal(self(x[:m]), singles[:m]) for m in sizes)


def ensure_row_invariance(model: nn.Module) -> list[str]:
    """Probe each distinct Linear shape once; shapes that fail go row by row. Returns their names."""
    verdicts: dict[tuple, bool] = {}
    failed: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        shape = (module.in_features, module.out_features, module.bias is not None, module.transposed)
        if shape not in verdicts:
            verdicts[shape] = module.rows_are_invariant()
            if not verdicts[shape]:
                failed.append(f"{name} ({module.in_features}x{module.out_features})")
        module.row_by_row = not verdicts[shape]
    return failed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        # q, k, v fused into one projection: one GEMM instead of three per layer.
        self.wqkv = Linear(args.dim, qkv_out, bias=args.attention_bias)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVStore, layer: int) -> Tensor:
        a = self.args
        T = x.shape[0]
        qkv = self.wqkv(x).view(T, a.n_heads + 2 * a.n_kv_heads, a.head_dim)  # [T, Hq + 2 Hkv, D]
        qk, v = qkv[:, : a.n_heads + a.n_kv_heads], qkv[:, a.n_heads + a.n_kv_heads :]
        if a.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, : a.n_heads]), self.k_norm(qk[:, a.n_heads :])], 1)
        # q and k rotated in one go (half the elementwise calls of a step's RoPE; same values)
        q, k = apply_rope(qk.transpose(0, 1), cos, sin).split([a.n_heads, a.n_kv_heads])  # [Hq | Hkv, T, D]
        v = v.transpose(0, 1)  # [Hkv, T, D]
        out = kv.attend(layer, q, k, v)  # [Hq, T, D]
        return self.wo(out.transpose(0, 1).reshape(T, a.n_heads * a.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


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


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, max_len: int | None = None):
        super().__init__()
        self.args = args
        self.max_len = max_len or args.max_position_embeddings
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        # [max_len, D/2] fp32; plain attributes (not buffers) so that casting the weights to bf16
        # leaves the RoPE tables in fp32.
        self.rope_cos, self.rope_sin = rope_tables(args, self.max_len)

    def place(self, device: torch.device | str, dtype: torch.dtype) -> Transformer:
        """Move weights to `device`/`dtype`; RoPE tables stay fp32."""
        self.to(device=device, dtype=dtype)
        self.rope_cos, self.rope_sin = self.rope_cos.to(device), self.rope_sin.to(device)
        for module in self.modules():
            if isinstance(module, Linear):
                module.relayout()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.args.head_dim)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, kv: KVStore, logits: str = "all") -> Tensor:
        """tokens [T] -> logits [T, V] fp32 (`logits="last"`: [1, V]; `"none"`: no head, for prefill)."""
        T = tokens.shape[0]
        pos = kv.positions(T)  # [T]
        if int(pos[-1]) >= self.max_len:
            raise ValueError(f"position {int(pos[-1])} is past the model's context of {self.max_len} tokens")
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [T, D/2]
        x = self.tok_embeddings(tokens)  # [T, dim]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv, i)
        kv.advance(T)
        if logits == "none":
            return x[:0, :0]
        if logits == "last":
            x = x[-1:]
        return self.output(self.norm(x)).float()

    # -- weights ---------------------------------------------------------------------------------
    def load_hf_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load a transformers-layout state dict (model.layers.N.self_attn.q_proj.weight, ...),
        fusing q/k/v and gate/up as we go."""
        a = self.args
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        own: dict[str, Tensor] = {"tok_embeddings.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"]}
        head = sd.get("lm_head.weight")
        own["output.weight"] = sd["embed_tokens.weight"] if head is None or a.tie_word_embeddings else head
        for i in range(a.n_layers):
            p = f"layers.{i}."
            att = p + "self_attn."
            own[p + "attention.wqkv.weight"] = torch.cat(
                [sd[att + "q_proj.weight"], sd[att + "k_proj.weight"], sd[att + "v_proj.weight"]]
            )
            if a.attention_bias:
                own[p + "attention.wqkv.bias"] = torch.cat(
                    [sd[att + "q_proj.bias"], sd[att + "k_proj.bias"], sd[att + "v_proj.bias"]]
                )
            own[p + "attention.wo.weight"] = sd[att + "o_proj.weight"]
            if a.qk_norm:
                own[p + "attention.q_norm.weight"] = sd[att + "q_norm.weight"]
                own[p + "attention.k_norm.weight"] = sd[att + "k_norm.weight"]
            mlp = p + "mlp."
            own[p + "feed_forward.w13.weight"] = torch.cat([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]])
            own[p + "feed_forward.w2.weight"] = sd[mlp + "down_proj.weight"]
            own[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
            own[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        missing, unexpected = self.load_state_dict(own, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if a.tie_word_embeddings:  # shared until place() transposes the head for fp32
            self.output.weight = self.tok_embeddings.weight
