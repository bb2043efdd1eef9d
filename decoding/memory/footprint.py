"""What a model and its caches take in memory, in bytes: the memory guard's estimate.

Everything here is arithmetic over shapes known before a byte is allocated (file headers,
config.json or GGUF metadata, the requested context), so a model can be refused before it is
loaded (decoding/memory/guard.py decides; this module only counts).

What is counted (each part is named in `MemoryEstimate.parts`):
- weights as loaded: safetensors tensors at the dtype they are loaded in (an untied copy of a tied
  output head on CPU, where the head is stored transposed or pre-packed); a .gguf file is
  memory-mapped and computed as shipped, so it costs its size.
- loading: safetensors files are read whole before their tensors are fused and converted; the
  allocator keeps most of those pages after they are freed (measured with the default model in
  fp32: the resident set after loading exceeded the weights by about the file's size), so they
  are counted as held, not as a passing peak.
- the full KV cache at the context, in its own dtype (a parameter: the cache may be 16-bit while the
  weights are not), preallocated in whole blocks of the exact kernel;
- the retrieval view's buffer, whose size follows the budget (decoding/retrieval.py);
- a draft model's weights and its StreamingCache;
- scratch: the exact attention kernel's workspace, RoPE tables, the lookup's index, prefill
  activations, and a fixed allowance for the allocator;
- runtime (before loading only): the tokenizer and the libraries loading pulls in.
"""

from __future__ import annotations

import json
import math
import struct
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from triforce_chat.decoding.config import LOOKUPS, parse_budget
from triforce_chat.decoding.retrieval import view_buffer_tokens

GIB = 1024**3
MIB = 1024**2
# a lookup's index per context token: the suffix automaton (traced ~610 over 38K tokens of English and
# Python docs: two states a token, their transition dicts, the undo records), the n-gram index (~350
# for 8K distinct tokens, NGramDrafter.index_bytes)
LOOKUP_BYTES_PER_TOKEN = {"suffix": 640, "ngram": 400}
FIXED_OVERHEAD = 96 * MIB  # allocator slack, logits of a window, Python objects
# loading a model the first time in a process: the tokenizer and the loader's libraries (measured
# with SmolLM2's tokenizer: ~100 MiB for the tokenizer, ~60 MiB for the config and weight loaders)
RUNTIME_BYTES = 160 * MIB
PREFILL_CHUNK = 512  # tokens per prefill forward (DecodeConfig.prefill_chunk)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def dtype_bytes(dtype: Any) -> int:
    """Element size of a torch dtype or of its name ("bfloat16", "torch.float32")."""
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return DTYPE_BYTES[name]


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / MIB:.0f} MiB"


# -- model shapes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dim: int
    vocab_size: int
    intermediate_size: int
    max_positions: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        """From a Hugging Face config.json."""
        heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        return cls(
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or dim // heads),
            dim=dim,
            vocab_size=int(cfg["vocab_size"]),
            intermediate_size=int(cfg.get("intermediate_size") or 4 * dim),
            max_positions=int(cfg.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_args(cls, args: Any, max_len: int | None = None) -> ModelShape:
        """From a loaded model's ModelArgs (decoding/model.py)."""
        return cls(args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.dim, args.vocab_size,
                   args.intermediate_size, max_len or args.max_position_embeddings, args.tie_word_embeddings)

    @classmethod
    def from_gguf(cls, path: Path) -> ModelShape:
        """From a GGUF file's metadata (llama.block_count, llama.embedding_length, ...)."""
        from triforce_chat.decoding.models.gguf_file import GGUFFile

        gf = GGUFFile(path)
        arch = gf.architecture

        def value(key: str, default: Any = None) -> Any:
            return gf.get(f"{arch}.{key}", default)

        heads = int(value("attention.head_count"))
        dim = int(value("embedding_length"))
        emb = gf.tensors.get("token_embd.weight")
        vocab = emb.dims[1] if emb is not None else value("vocab_size") or gf.array_length("tokenizer.ggml.tokens")
        return cls(
            n_layers=int(value("block_count")),
            n_heads=heads,
            n_kv_heads=int(value("attention.head_count_kv", heads)),
            head_dim=int(value("attention.key_length", dim // heads)),
            dim=dim,
            vocab_size=int(vocab or 32000),
            intermediate_size=int(value("feed_forward_length", 4 * dim)),
            max_positions=int(value("context_length", 2048)),
            tie_word_embeddings="output.weight" not in gf.tensors,
        )

    def kv_bytes_per_token(self, kv_dtype_bytes: int) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * kv_dtype_bytes


# -- weights ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFiles:
    """What loading a model's files costs: steady bytes, and the extra held while loading."""

    loaded_bytes: int
    transient_bytes: int
    shape: ModelShape | None
    path: Path


def _safetensors_numel(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (elements, bytes per element as stored), from the file's JSON header alone."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * MIB:
            raise ValueError(f"{path}: implausible safetensors header")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = (math.prod(info["shape"]), _SAFETENSORS_BYTES.get(info["dtype"], 4))
    return out


def weight_files(path: Path, dtype: Any, device: str = "cpu", context: int | None = None) -> WeightFiles | None:
    """Estimate a model folder's (or .gguf file's) weights at `dtype`; None if it has neither."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        shape = _with_context(ModelShape.from_gguf(path), context)
        if dtype is None:  # computed as shipped: the blocks are views of the mapped file
            return WeightFiles(path.stat().st_size, 0, shape, path)
        # dequantized at load: every matrix in `dtype` (the tied head once)
        a = shape
        per_layer = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
        per_layer += 3 * a.dim * a.intermediate_size
        numel = a.n_layers * per_layer + a.vocab_size * a.dim * (1 if a.tie_word_embeddings else 2)
        return WeightFiles(numel * dtype_bytes(dtype), 0, shape, path)
    if not path.is_dir():
        return None
    shape = None
    if (path / "config.json").exists():
        shape = _with_context(ModelShape.from_config(json.loads((path / "config.json").read_text())), context)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            found = weight_files(ggufs[0], dtype, device, context)
            return WeightFiles(found.loaded_bytes, 0, shape or found.shape, path) if found else None
        return None
    tensors: dict[str, tuple[int, int]] = {}
    for f in files:
        tensors.update(_safetensors_numel(f))
    if dtype is None or all(b == dtype_bytes(dtype) for _, b in tensors.values()):
        # as stored: the tensors read from the files are the weights (no conversion, no second copy)
        return WeightFiles(sum(n * b for n, b in tensors.values()), 0, shape, path)
    loaded = sum(n for n, _ in tensors.values()) * dtype_bytes(dtype)
    transient = sum(f.stat().st_size for f in files)  # the file's tensors, held until they are converted
    return WeightFiles(loaded, transient, shape, path)


def _with_context(shape: ModelShape, context: int | None) -> ModelShape:
    if context and context != shape.max_positions:
        return replace(shape, max_positions=context)
    return shape


def locate_model_files(spec: str | None) -> Path | None:
    """The folder or .gguf file a --model value will load, without converting or downloading
    anything; None when that cannot be known yet (then the check waits until after loading)."""
    try:
        from triforce_chat.decoding.models import loading
    except ImportError:  # pragma: no cover
        return None
    try:
        return loading.resolve_model(spec).path
    except Exception:  # not installed, not downloaded yet, ...: "estimate after loading"
        return None


# -- the estimate ------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    parts: dict[str, int] = field(default_factory=dict)  # bytes by part
    context: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        names = {"weights": "weights", "loading": "loading", "runtime": "tokenizer and libraries",
                 "kv_cache": "KV cache", "retrieval_view": "retrieval view", "draft": "draft model",
                 "scratch": "scratch", "draft_heads": "drafters' heads"}
        shown = [f"{names.get(k, k)} {fmt_bytes(v)}" for k, v in self.parts.items() if v >= MIB]
        return ", ".join(shown)


def budget_tokens_at(context: int, budget: str | int | float, chunk_size: int) -> int:
    tokens, frac = parse_budget(budget)
    return max(chunk_size * 2, int(frac * context)) if frac else tokens


def view_buffer_bytes(shape: ModelShape, context: int, budget: str | int | float, chunk_size: int,
                      kv_dtype_bytes: int, scratch: int = 256) -> int:
    """The retrieval view's buffer at its largest for this context (0 when the budget covers it)."""
    tokens = view_buffer_tokens(context, budget_tokens_at(context, budget, chunk_size), chunk_size, scratch)
    return tokens * shape.kv_bytes_per_token(kv_dtype_bytes)


def scratch_bytes(shape: ModelShape, context: int, dtype_size: int, gamma_mid: int = 6, gamma_low: int = 4,
                  lookup: str | None = "suffix") -> int:
    """The attention kernel's partials at this context (kernels/cpu/attention.cpp: per KV head and
    256-key segment, one row per query head of up to 64 queries), the float32 copy of the largest
    matrix a prefill chunk dequantizes, RoPE tables, prefill activations, the lookup's index (None:
    no lookup) and a fixed allowance. (`dtype_size`, the KV element size, no longer changes the kernel's scratch.)"""
    g = max(1, shape.n_heads // shape.n_kv_heads)
    segments = -(-context // 256)
    partials = shape.n_kv_heads * segments * g * 64 * (shape.head_dim + 17) * 4  # (the int8 kernel's, the widest)
    widest = max(2 * shape.intermediate_size, (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim)
    dequantized = widest * shape.dim * 4
    rope = 2 * shape.max_positions * (shape.head_dim // 2) * 4
    qkv = (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim
    activations = PREFILL_CHUNK * (4 * shape.dim + qkv + 3 * shape.intermediate_size) * 4
    index = LOOKUP_BYTES_PER_TOKEN[lookup] * context if lookup else 0
    return partials + dequantized + rope + activations + index + FIXED_OVERHEAD


def streaming_cache_bytes(shape: ModelShape, dtype_size: int, sink: int = 4, window: int = 1024,
                          slack: int = 256) -> int:
    """A draft model's StreamingCache (decoding/streaming.py) with make_drafter's defaults."""
    capacity = sink + window + slack + max(256, window // 2)
    return capacity * shape.kv_bytes_per_token(dtype_size)


def estimate(
    shape: ModelShape,
    *,
    weights_bytes: int,
    context: int | None = None,
    dtype: Any = "float32",
    kv_dtype: Any = None,
    level: int = 2,
    budget: str | int | float = "4096",
    chunk_size: int = 8,
    gamma_mid: int = 6,
    gamma_low: int = 4,
    draft: str = "suffix",
    draft_weights_bytes: int = 0,
    draft_shape: ModelShape | None = None,
    transient_bytes: int = 0,
    runtime_bytes: int = 0,
    prepared_blocks: bool = False,
    blocks_bytes_per_token: int = 0,
) -> MemoryEstimate:
    """Bytes for one Session of this model at `context` tokens (the model's positions by default).
    `prepared_blocks`: the cache also keeps its blocks as the bf16 or int8 attention reads them
    (decoding/cache.py: PreparedBlocks), counted at `blocks_bytes_per_token` where the cache is
    there to say, else as bf16 blocks (as many bytes again as a 16-bit cache; int8 blocks are about
    half that: the estimate before loading errs high)."""
    context = context or shape.max_positions
    size = dtype_bytes(dtype) if dtype is not None else 4  # activations (and a draft's cache) are float32
    kv_size = dtype_bytes(kv_dtype if kv_dtype is not None else (dtype or "float32"))
    kv = context * shape.kv_bytes_per_token(kv_size)
    parts = {"weights": weights_bytes, "loading": transient_bytes, "kv_cache": kv}
    blocks = blocks_bytes_per_token or (shape.kv_bytes_per_token(2) if prepared_blocks else 0)
    if blocks:
        parts["attention_blocks"] = context * blocks
    view = view_buffer_bytes(shape, context, budget, chunk_size, kv_size) if level >= 1 else 0
    parts["retrieval_view"] = view + view // shape.kv_bytes_per_token(kv_size) * blocks  # its own blocks too
    if level == 2 and draft not in LOOKUPS:
        cache = streaming_cache_bytes(draft_shape, size) if draft_shape is not None else 0
        parts["draft"] = draft_weights_bytes + cache
    # a draft model drafts behind the suffix lookup (drafters.LookupFirstDrafter): it has one too
    lookup = (draft if draft in LOOKUPS else "suffix") if level == 2 else None
    parts["scratch"] = scratch_bytes(shape, context, kv_size, gamma_mid, gamma_low, lookup=lookup)
    if runtime_bytes:
        parts["runtime"] = runtime_bytes
    return MemoryEstimate(parts, context=context)


# -- a live Session ----------------------------------------------------------------------------------
def tensor_bytes(module: Any) -> int:
    """Bytes of a model's parameters and buffers (shared tensors once) plus its RoPE tables."""
    seen: set[int] = set()
    total = 0
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [t for t in (getattr(module, "rope_cos", None), getattr(module, "rope_sin", None)) if t is not None]
    for t in tensors:
        try:
            key = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # opaque layouts: count the elements
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


_weights_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> tensor_bytes(model)


def session_estimate(session: Any, context: int | None = None) -> MemoryEstimate:
    """The Session's footprint at `context` tokens (its cache's full length by default): what it
    holds now (weights) plus what grows with the context (the cache's rows, which are resident as
    they are written, view buffer, kernel workspace, lookup index) and a draft model not loaded yet."""
    model, cache, cfg = session.model, session.cache, session.config
    context = min(context or cache.max_len, cache.max_len)
    shape = ModelShape.from_args(model.args, cache.max_len)
    if model not in _weights_of:
        _weights_of[model] = getattr(model, "weight_bytes", None) or tensor_bytes(model)
    weights = _weights_of[model]
    level = cfg.level
    draft_bytes, draft_shape = 0, None
    from triforce_chat.decoding.drafters import draft_model_of

    drafter = draft_model_of(getattr(session, "_drafter", None))
    if level == 2 and cfg.draft not in LOOKUPS:
        if drafter is not None:
            dm = drafter.model
            draft_bytes = getattr(dm, "weight_bytes", None) or tensor_bytes(dm)
            draft_shape = ModelShape.from_args(dm.args)
        else:
            path = locate_model_files(cfg.draft)
            files = weight_files(path, None, str(model.device.type)) if path is not None else None
            if files is not None:
                draft_bytes, draft_shape = files.loaded_bytes + files.transient_bytes, files.shape
    est = estimate(
        shape, weights_bytes=weights, context=context, dtype=model.dtype, kv_dtype=cache.k.dtype, level=level,
        budget=cfg.budget, chunk_size=cfg.chunk_size, gamma_mid=cfg.gamma_mid, gamma_low=cfg.gamma_low,
        draft=cfg.draft, draft_weights_bytes=draft_bytes, draft_shape=draft_shape,
        prepared_blocks=getattr(cache, "blocks", None) is not None,
        blocks_bytes_per_token=getattr(cache, "blocks_bytes_per_token", 0),
    )
    if level and cfg.restrict_draft_heads:  # the middle level's head, and a draft model's
        from triforce_chat.decoding.draft_head import copy_bytes

        heads = [model.output] + ([drafter.model.output] if drafter is not None and level == 2 else [])
        est.parts["draft_heads"] = sum(copy_bytes(h, context) for h in heads if hasattr(h, "nbytes"))
    return est
