"""The memory guard: how many bytes a model and its caches will take, against what is available.

Why: the kernel's OOM killer ends the process without a word, and a 32K-position model with its
preallocated cache, a retrieval buffer and a draft model outgrows a laptop quickly. Everything here
is arithmetic over shapes that are known before a byte is allocated (file headers, config.json,
the requested context), so the CLI and the TUI can refuse before loading, and the Session before
each prefill, with one line saying what would fit instead.

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
- scratch: the exact attention kernel's workspace, RoPE tables, the n-gram index, prefill
  activations, and a fixed allowance for the allocator;
- runtime (before loading only): the tokenizer and the libraries loading pulls in.

Available memory: the cgroup's limit minus its usage (v2 `memory.max`/`memory.current`, v1
`memory.limit_in_bytes`/`memory.usage_in_bytes`, reclaimable file cache not counted as used) where a
limit is set, bounded by MemAvailable from /proc/meminfo. TRIFORCE_CHAT_MEMORY_GUARD=off turns the
refusals off (the estimate is still shown).

No UI and no torch at import: the CLI checks before torch loads a model.
"""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
MIB = 1024**2
BLOCK = 256  # the full cache is allocated in whole blocks of the exact kernel (kernels/exact.py BLOCK)
MAX_WINDOW = 32  # longest verification window (decoding/cache.py MAX_WINDOW)
NGRAM_BYTES_PER_TOKEN = 400  # measured ~350 for an index of 8K distinct tokens (NGramDrafter.index_bytes)
FIXED_OVERHEAD = 96 * MIB  # allocator slack, logits of a window, Python objects
# loading a model the first time in a process: the tokenizer and the loader's libraries (measured
# with SmolLM2's tokenizer: ~100 MiB for the tokenizer, ~60 MiB for the config and weight loaders)
RUNTIME_BYTES = 160 * MIB
PREFILL_CHUNK = 512  # tokens per prefill forward (DecodeConfig.prefill_chunk)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class MemoryShortage(ValueError):
    """The estimate does not fit in the available memory; the message is one line for the user."""

    def __init__(self, message: str, estimate: MemoryEstimate, available: Available):
        super().__init__(message)
        self.estimate, self.available = estimate, available


def guard_enabled() -> bool:
    return os.environ.get("TRIFORCE_CHAT_MEMORY_GUARD", "on").strip().lower() not in ("off", "0", "false", "no")


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


# -- available memory --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Available:
    bytes: int
    source: str  # "cgroup v2 limit", "cgroup v1 limit" or "MemAvailable"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes (None where /proc/meminfo does not say)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[tuple[str, Path]]:
    """(version, directory) of this process's memory cgroup and its ancestors, innermost first."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[str, Path]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if parts[0] == "0" and controllers == "":
            version, base = "v2", root if (root / "cgroup.controllers").exists() else root / "unified"
        elif "memory" in controllers.split(","):
            version, base = "v1", root / "memory"
        else:
            continue
        path = base / rel.lstrip("/")
        while True:  # a limit may sit on any ancestor
            out.append((version, path))
            if path == base or base not in path.parents:
                break
            path = path.parent
    return out


def cgroup_available(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> Available | None:
    """The tightest cgroup limit minus its usage (file cache that can be reclaimed not counted)."""
    best: Available | None = None
    for version, d in _cgroup_dirs(root, proc_cgroup):
        if version == "v2":
            limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
            reclaimable = _stat_value(d / "memory.stat", "inactive_file")
        else:
            limit, used = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
            reclaimable = _stat_value(d / "memory.stat", "total_inactive_file")
        if limit is None or used is None or limit >= 1 << 60:  # no limit ("max", or v1's page-rounded 2^63)
            continue
        free = max(0, limit - max(0, used - reclaimable))
        if best is None or free < best.bytes:
            best = Available(free, f"cgroup {version} limit")
    return best


def available_memory() -> Available | None:
    """Memory this process can still take: the cgroup's room where a limit is set, bounded by
    MemAvailable; None where neither can be read (then nothing is refused)."""
    cg = cgroup_available()
    host = meminfo_available()
    if cg is not None and (host is None or cg.bytes <= host):
        return cg
    return Available(host, "MemAvailable") if host is not None else None


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
        from gguf import GGUFReader

        reader = GGUFReader(str(path))

        def value(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            if f is None:
                return default
            return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]

        arch = value("general.architecture", "llama")
        heads = int(value(f"{arch}.attention.head_count"))
        dim = int(value(f"{arch}.embedding_length"))
        vocab = value(f"{arch}.vocab_size")
        if vocab is None:
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else 32000
        return cls(
            n_layers=int(value(f"{arch}.block_count")),
            n_heads=heads,
            n_kv_heads=int(value(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(value(f"{arch}.attention.key_length", dim // heads)),
            dim=dim,
            vocab_size=int(vocab),
            intermediate_size=int(value(f"{arch}.feed_forward_length", 4 * dim)),
            max_positions=int(value(f"{arch}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
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
        shape = ModelShape.from_gguf(path)
        return WeightFiles(path.stat().st_size, 0, _with_context(shape, context), path)
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
    size = dtype_bytes(dtype)
    tensors: dict[str, tuple[int, int]] = {}
    for f in files:
        tensors.update(_safetensors_numel(f))
    numel = sum(n for n, _ in tensors.values())
    if shape is not None and shape.tie_word_embeddings and device == "cpu":
        # the head is stored transposed (fp32) or pre-packed (bf16): a copy of the embedding table
        if not any(k.endswith("lm_head.weight") for k in tensors):
            numel += shape.vocab_size * shape.dim
    transient = sum(f.stat().st_size for f in files)  # the file's tensors, held until they are converted
    return WeightFiles(numel * size, transient, shape, path)


def _with_context(shape: ModelShape, context: int | None) -> ModelShape:
    if context and context != shape.max_positions:
        from dataclasses import replace

        return replace(shape, max_positions=context)
    return shape


def locate_model_files(spec: str | None) -> Path | None:
    """The folder or .gguf file a --model value will load, without converting or downloading
    anything; None when that cannot be known yet (then the check waits until after loading)."""
    try:
        from triforce_chat.decoding import loading
    except ImportError:  # pragma: no cover
        return None
    try:
        if spec is None or spec in getattr(loading, "DEFAULT_MODEL_ALIASES", ()):
            folder = loading.default_model_dir()
            if (folder / "config.json").exists():
                return folder
            return Path(loading._find_default_gguf())
        path = Path(spec).expanduser()
        if path.exists():
            return path
        if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "config.json")
            if isinstance(cached, str):
                return Path(cached).parent
    except Exception:  # any surprise here only means "estimate after loading"
        return None
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
                 "scratch": "scratch"}
        shown = [f"{names.get(k, k)} {fmt_bytes(v)}" for k, v in self.parts.items() if v >= MIB]
        return ", ".join(shown)


def budget_tokens_at(context: int, budget: str | int | float, chunk_size: int) -> int:
    from triforce_chat.decoding.config import parse_budget

    tokens, frac = parse_budget(budget)
    return max(chunk_size * 2, int(frac * context)) if frac else tokens


def view_buffer_bytes(shape: ModelShape, context: int, budget: str | int | float, chunk_size: int,
                      kv_dtype_bytes: int, scratch: int = 256) -> int:
    """The retrieval view's buffer at its largest for this context (0 when the budget covers it)."""
    from triforce_chat.decoding.retrieval import view_buffer_tokens

    tokens = view_buffer_tokens(context, budget_tokens_at(context, budget, chunk_size), chunk_size, scratch)
    return tokens * shape.kv_bytes_per_token(kv_dtype_bytes)


def scratch_bytes(shape: ModelShape, context: int, dtype_size: int, gamma_mid: int = 6, gamma_low: int = 4,
                  ngram: bool = True) -> int:
    """Workspace of the exact attention kernel at this context, RoPE tables, prefill activations,
    the n-gram index and a fixed allowance."""
    t = min(gamma_mid + gamma_low + 1, MAX_WINDOW)
    g = max(1, shape.n_heads // shape.n_kv_heads)
    m = max(g * t, 6)
    nb = -(-context // BLOCK)
    workspace = (shape.n_kv_heads * nb * m * (8 + shape.head_dim * dtype_size)  # block maxima, outputs
                 + nb * BLOCK * m * (dtype_size + 8 + (0 if dtype_size == 4 else dtype_size)))  # scores
    rope = 2 * shape.max_positions * (shape.head_dim // 2) * 4
    qkv = (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim
    activations = PREFILL_CHUNK * (4 * shape.dim + qkv + 3 * shape.intermediate_size) * 4
    index = NGRAM_BYTES_PER_TOKEN * context if ngram else 0
    return workspace + rope + activations + index + FIXED_OVERHEAD


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
    draft: str = "ngram",
    draft_weights_bytes: int = 0,
    draft_shape: ModelShape | None = None,
    transient_bytes: int = 0,
    runtime_bytes: int = 0,
) -> MemoryEstimate:
    """Bytes for one Session of this model at `context` tokens (the model's positions by default)."""
    context = context or shape.max_positions
    size = dtype_bytes(dtype)
    kv_size = dtype_bytes(kv_dtype if kv_dtype is not None else dtype)
    kv = -(-context // BLOCK) * BLOCK * shape.kv_bytes_per_token(kv_size)
    parts = {"weights": weights_bytes, "loading": transient_bytes, "kv_cache": kv}
    parts["retrieval_view"] = view_buffer_bytes(shape, context, budget, chunk_size, kv_size) if level >= 1 else 0
    if level == 2 and draft != "ngram":
        cache = streaming_cache_bytes(draft_shape, size) if draft_shape is not None else 0
        parts["draft"] = draft_weights_bytes + cache
    ngram = level == 2 and draft == "ngram"
    parts["scratch"] = scratch_bytes(shape, context, kv_size, gamma_mid, gamma_low, ngram=ngram)
    if runtime_bytes:
        parts["runtime"] = runtime_bytes
    return MemoryEstimate(parts, context=context)


# -- the check -----------------------------------------------------------------------------------------
HEADROOM = 0.05  # of the available memory, kept free: estimates are estimates


def fits(need: int, available: Available) -> bool:
    return need <= available.bytes * (1 - HEADROOM)


def shortage_message(
    est: MemoryEstimate,
    available: Available,
    what: str,
    need: int | None = None,
    max_context: Callable[[int], int | None] | None = None,
    smaller_budget: str | None = None,
) -> str:
    """One line: the numbers, then what would make it fit."""
    need = est.total if need is None else need
    hints = []
    if max_context is not None:
        ctx = max_context(int(available.bytes * (1 - HEADROOM)))
        if ctx:
            hints.append(f"--context {ctx}")
    if smaller_budget:
        hints.append(f"a smaller budget (--budget {smaller_budget})")
    hints.append("a smaller model")
    return (
        f"not enough memory for {what}: it needs about {fmt_bytes(need)} ({est.describe()}) but "
        f"{fmt_bytes(available.bytes)} is available ({available.source}); it would fit with "
        + " or ".join(hints)
    )


def largest_context(build: Callable[[int], MemoryEstimate], limit: int, room: int, floor: int = 512) -> int | None:
    """The largest context (a multiple of 256, at least `floor`, below `limit`) whose estimate fits
    in `room` bytes; None if none does."""
    lo, hi = floor // 256, (limit - 1) // 256
    if hi < lo or build(lo * 256).total > room:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if build(mid * 256).total <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def smaller_budget_that_fits(
    build: Callable[[str], MemoryEstimate], budget: str, room: int, chunk_size: int
) -> str | None:
    """A budget (halving the current one) whose estimate fits, if the view is what does not fit."""
    from triforce_chat.decoding.config import parse_budget

    tokens, frac = parse_budget(budget)
    for _ in range(16):
        if tokens:
            tokens //= 2
            if tokens < 2 * chunk_size:
                return None
            candidate = str(tokens)
        else:
            frac /= 2
            if frac < 0.005:
                return None
            candidate = f"{frac:.3g}"
        if build(candidate).total <= room:
            return candidate
    return None


def check_before_load(
    spec: str | None,
    *,
    dtype: Any,
    device: str,
    context: int | None,
    config: Any,
    kv_dtype: Any = None,
    available: Available | None = None,
) -> MemoryEstimate | None:
    """Raise MemoryShortage if the model named by `spec`, its cache at `context` and the decoder's
    buffers (DecodeConfig `config`) will not fit; returns the estimate (None if it cannot be made
    before loading: files not there yet). CUDA weights and caches live on the device: not checked."""
    if device != "cpu":
        return None
    path = locate_model_files(spec)
    if path is None:
        return None
    try:
        files = weight_files(path, dtype, device, context)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if files is None or files.shape is None:
        return None
    draft_bytes, draft_shape = 0, None
    if config.level == 2 and config.draft != "ngram":
        draft_path = locate_model_files(config.draft)
        draft_files = weight_files(draft_path, dtype, device) if draft_path is not None else None
        if draft_files is not None:
            draft_bytes, draft_shape = draft_files.loaded_bytes + draft_files.transient_bytes, draft_files.shape

    def build(ctx: int | None = None, budget: str | None = None) -> MemoryEstimate:
        return estimate(
            files.shape, weights_bytes=files.loaded_bytes, context=ctx or files.shape.max_positions, dtype=dtype,
            kv_dtype=kv_dtype, level=config.level, budget=budget or config.budget, chunk_size=config.chunk_size,
            gamma_mid=config.gamma_mid, gamma_low=config.gamma_low, draft=config.draft,
            draft_weights_bytes=draft_bytes, draft_shape=draft_shape, transient_bytes=files.transient_bytes,
            runtime_bytes=RUNTIME_BYTES,
        )

    est = build()
    available = available or available_memory()
    if available is None or not guard_enabled() or fits(est.total, available):
        return est
    room = int(available.bytes * (1 - HEADROOM))
    budget = None
    if config.level >= 1 and est.parts.get("retrieval_view", 0):
        budget = smaller_budget_that_fits(lambda b: build(budget=b), config.budget, room, config.chunk_size)
    message = shortage_message(
        est, available, f"{path.name} at {est.context:,} tokens",
        max_context=lambda r: largest_context(lambda c: build(ctx=c), est.context, r),
        smaller_budget=budget,
    )
    raise MemoryShortage(message, est, available)


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
    holds now (weights, the preallocated cache) plus what grows with the context (view buffer,
    kernel workspace, n-gram index) and a draft model not loaded yet."""
    model, cache, cfg = session.model, session.cache, session.config
    context = min(context or cache.max_len, cache.max_len)
    shape = ModelShape.from_args(model.args, cache.max_len)
    if model not in _weights_of:
        _weights_of[model] = tensor_bytes(model)
    weights = _weights_of[model]
    level = cfg.level
    draft_bytes, draft_shape = 0, None
    drafter = getattr(session, "_drafter", None)
    if level == 2 and cfg.draft != "ngram":
        if drafter is not None and hasattr(drafter, "model"):
            draft_bytes, draft_shape = tensor_bytes(drafter.model), ModelShape.from_args(drafter.model.args)
        else:
            path = locate_model_files(cfg.draft)
            files = weight_files(path, model.dtype, str(model.device.type)) if path is not None else None
            if files is not None:
                draft_bytes, draft_shape = files.loaded_bytes + files.transient_bytes, files.shape
    est = estimate(
        shape, weights_bytes=weights, context=context, dtype=model.dtype, kv_dtype=cache.k.dtype, level=level,
        budget=cfg.budget, chunk_size=cfg.chunk_size, gamma_mid=cfg.gamma_mid, gamma_low=cfg.gamma_low,
        draft=cfg.draft, draft_weights_bytes=draft_bytes, draft_shape=draft_shape,
    )
    est.parts["kv_cache"] = cache.allocated_bytes  # allocated once, for the whole context
    return est


def _held_now(session: Any) -> dict[str, int]:
    """What the parts that grow hold already."""
    held = {"retrieval_view": session.view.buffer_bytes, "scratch": session.cache.scratch_bytes}
    drafter = getattr(session, "_drafter", None)
    if drafter is not None and hasattr(drafter, "model"):
        held["draft"] = tensor_bytes(drafter.model) + drafter.cache.allocated_bytes
    return held


def check_session(session: Any, tokens: int, available: Available | None = None) -> None:
    """Before a prefill that brings the context to `tokens` (the answer's room included): raise
    MemoryShortage if what still has to be allocated does not fit."""
    if session.model.device.type != "cpu" or not guard_enabled():
        return
    est = session_estimate(session, tokens)
    held = _held_now(session)
    grow = {k: max(0, est.parts.get(k, 0) - held.get(k, 0)) for k in ("retrieval_view", "scratch", "draft")}
    if not held["scratch"]:  # nothing allocated yet: the fixed allowance is part of the RSS already
        grow["scratch"] = max(0, grow["scratch"] - FIXED_OVERHEAD)
    need = sum(grow.values())
    available = available or available_memory()
    if available is None or fits(need, available):
        return
    room = int(available.bytes * (1 - HEADROOM))
    cfg = session.config
    budget = None
    if cfg.level >= 1 and grow["retrieval_view"]:
        def with_budget(b: str) -> MemoryEstimate:
            saved = cfg.budget
            cfg.budget = b
            try:
                e = session_estimate(session, tokens)
            finally:
                cfg.budget = saved
            more = sum(max(0, e.parts.get(k, 0) - held.get(k, 0)) for k in grow)
            return MemoryEstimate({"more": more})

        budget = smaller_budget_that_fits(with_budget, cfg.budget, room, cfg.chunk_size)
    shown = MemoryEstimate({k: v for k, v in grow.items() if v})
    hints = ([f"a smaller budget (--budget {budget})"] if budget else []) + (
        ["level 1 or the n-gram drafter"] if grow.get("draft") else []) + ["fewer or shorter documents"]
    raise MemoryShortage(
        f"not enough memory to continue to {tokens:,} tokens: it needs about {fmt_bytes(need)} more "
        f"({shown.describe() or 'scratch'}) but {fmt_bytes(available.bytes)} is available ({available.source}); "
        "it would fit with " + " or ".join(hints),
        est, available,
    )
