"""Finding and loading models: catalogue names, GGUF files, local Hugging Face folders.

A GGUF file is loaded as shipped: its quantized blocks become the model's weights (views of the
memory-mapped file) and the native kernels compute with them. Its tokenizer is converted once by
transformers (tens of seconds for a 152K vocabulary) and cached under the user's cache directory.
A Hugging Face folder (config.json + safetensors) loads its dense weights as stored.

After loading, `self_check` runs a short random window through the whole forward and compares it
bitwise with single-token steps on the weights, activation mode and threads in use; a failure of
the int8-activation mode falls back to the fp32 mode (checked again), a failure there switches the
full cache to token-by-token verification (exact), and a notice says so.

Activations (`activations=` or TRIFORCE_ACTIVATIONS): "auto" (the default) takes the int8 mode
where this build has it (AVX2 or AVX512-VNNI) and the weights are GGUF blocks, else fp32; "fp32" and
"int8" ask for one (int8 where it cannot run: fp32 and a notice). Attention products
(`attention=` or TRIFORCE_ATTENTION): "auto", with the int8 activations, takes int8 products where the
build has them (AVX512-VNNI, AVX-VNNI or AVX2), else bf16 where it has AVX512-BF16, else fp32; "fp32",
"bf16" and "int8" ask for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from triforce_chat.decoding.memory.allocator import keep_freed_memory
from triforce_chat.decoding.model import (
    MAX_WINDOW,
    ModelArgs,
    Transformer,
    UnsupportedArchitecture,
    quant_summary,
)
from triforce_chat.decoding.models import catalog
from triforce_chat.decoding.models.gguf_file import GGUFError, GGUFFile
from triforce_chat.kernels import native
from triforce_chat.kernels.quant import UnsupportedQuantType

Log = Callable[[str], None]


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message is one line meant for the user."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object
    model_id: str
    path: Path
    load_s: float
    notices: list[str] = field(default_factory=list)  # things the user should see once (self-check, fallbacks)
    # the model's recommended sampling settings (temperature, top_p, top_k, repetition_penalty)
    generation_defaults: dict = field(default_factory=dict)
    weights_sha256: str | None = None  # known for catalogue files (the document cache keys on it)

    @property
    def eos_ids(self) -> set[int]:
        return eos_token_ids(self.tokenizer, self.path if self.path.is_dir() else None)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: bfloat16 matrix products run several times faster than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def default_kv_dtype(device: str | torch.device) -> torch.dtype:
    """16-bit keys/values where a kernel reads them natively (half the bytes per step), else fp32."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.float16 if native.available() else torch.float32


def cache_root() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("TRIFORCE_CHAT_CACHE") or user_cache_dir("triforce-chat"))


# -- where a model spec points -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    model_id: str
    path: Path  # a .gguf file or a Hugging Face folder
    generation_defaults: tuple = ()  # (key, value) pairs
    sha256: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def sampling_defaults(entry) -> tuple:
    """A catalogue entry's recommended sampling as (key, value) pairs, leaving out what is off."""
    sm = entry.sampling
    pairs = [("temperature", sm.temperature), ("top_p", sm.top_p)]
    if sm.top_k:
        pairs.append(("top_k", sm.top_k))
    if sm.repetition_penalty != 1.0:
        pairs.append(("repetition_penalty", sm.repetition_penalty))
    return tuple(pairs)


def resolve_model(spec: str | None) -> ModelSource:
    """Map a --model value (catalogue name, .gguf file, folder, Hugging Face id) to a source."""
    spec = spec or catalog.DEFAULT_MODEL_NAME
    entry = catalog.find(spec)
    if entry is not None:
        try:
            path = catalog.resolve(spec)
        except catalog.CatalogError as exc:
            raise ModelLoadError(str(exc)) from None
        return ModelSource(entry.name, Path(path), sampling_defaults(entry), entry.sha256)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{spec}: not a .gguf file or a model folder")
        return ModelSource(path.name, path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec}: not a model folder (no config.json)")
        return ModelSource(str(path), path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(
            f"model not found: {spec} (known models: {catalog.known_names()}; or a .gguf file or model folder)"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
        )
    except Exception as exc:  # offline, unknown repo, gated, ...
        kind = type(exc).__name__
        raise ModelLoadError(
            f"cannot download model {spec} ({kind}); offline? pass a local folder or .gguf file instead"
        ) from None
    return ModelSource(spec, Path(folder))


# -- loading -------------------------------------------------------------------------------------------


def load_model(
    spec: str | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    context: int | None = None,
    log: Log | None = None,
    kv_dtype: torch.dtype | None = None,
    check: bool = True,
    activations: str | None = None,
    attention: str | None = None,
) -> LoadedModel:
    """Weights, tokenizer and the load-time self-check. `dtype` None keeps the weights as shipped
    (GGUF blocks, or the checkpoint's float dtype); a float dtype converts them. `context` beyond
    the model's positions extends them with YaRN. `activations`: "auto" | "fp32" | "int8" (None:
    TRIFORCE_ACTIVATIONS, else "auto"); `attention`: "auto" | "fp32" | "bf16" | "int8" (None:
    TRIFORCE_ATTENTION, else "auto"); see the module's docstring."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    source = resolve_model(spec)
    keep_freed_memory()  # each step's vocabulary-wide tensors reuse memory instead of faulting pages in
    notices: list[str] = []
    st = native.status()
    if not st.available and torch.device(device).type == "cpu":
        notices.append(f"native CPU kernels unavailable ({st.reason}); using PyTorch, windows verified token by token")
    if source.is_gguf:
        model = load_gguf_weights(source.path, dtype, device, context)
        tokenizer = gguf_tokenizer(source.path, log)
    else:
        from transformers import AutoTokenizer

        model = load_weights_only(source.path, dtype, device, context, source.model_id)
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    model.kv_dtype = kv_dtype or default_kv_dtype(device)
    mode, why = choose_activations(model, activations)
    model.set_activations(mode)
    if why:
        notices.append(why)
    mode, why = choose_attention(model, attention)
    model.set_attention(mode)
    if why:
        notices.append(why)
    if check:
        problem = self_check(model)
        if problem and (model.activations, model.attention) != ("fp32", "fp32"):
            what = f"{model.activations} activations, {model.attention} attention"
            model.set_activations("fp32")
            model.set_attention("fp32")
            notices.append(f"self-check of the fast mode ({what}): {problem}; using fp32 activations and attention")
            problem = self_check(model)
        if problem:
            model.sequential_windows = True
            notices.append(
                f"self-check: {problem}; verification windows now run token by token (exact, slower speculation)"
            )
    defaults = dict(source.generation_defaults) or read_generation_defaults(source.path)
    return LoadedModel(model, tokenizer, source.model_id, source.path, time.perf_counter() - t0, notices, defaults,
                       source.sha256)


def read_generation_defaults(path: Path) -> dict:
    """The sampling settings in a folder's generation_config.json ({} when there is none or it
    cannot be read: a model's metadata never stops it from loading)."""
    from triforce_chat.decoding.config import generation_defaults

    if not Path(path).is_dir():
        return {}
    try:
        data = json.loads((Path(path) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return generation_defaults(data) if isinstance(data, dict) else {}


def load_weights_only(
    path: Path, dtype: torch.dtype | None = None, device: str = "cpu", context: int | None = None,
    model_id: str | None = None,
) -> Transformer:
    """Our Transformer with a Hugging Face folder's weights (no tokenizer, no self-check)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    model_id = model_id or str(path)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"{model_id}: cannot read config.json ({exc})") from None
    if getattr(cfg, "model_type", None) not in {"llama", "mistral", "qwen2", "qwen3"}:
        raise ModelLoadError(f"unsupported architecture: {getattr(cfg, 'model_type', None) or cfg.architectures}")
    if context and context > cfg.max_position_embeddings:
        extend_context(cfg, context)
    args = ModelArgs.from_hf_config(cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_id}: no .safetensors weights in {path}")
    # a context below the model's positions makes the KV cache smaller
    model = Transformer(args, max_len=context if context and context < args.max_position_embeddings else None)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    try:
        model.load_hf_state_dict(state)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{model_id}: weights do not match its config ({exc})") from None
    if dtype is not None:
        model.convert_weights(dtype)
        model.weights_label = str(dtype).removeprefix("torch.")
    model.kv_dtype = default_kv_dtype(device)
    return model.to_device(device).eval()


# -- GGUF ----------------------------------------------------------------------------------------------

_GGUF_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def open_gguf(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except GGUFError as exc:
        raise ModelLoadError(str(exc)) from None


def hf_config_from_gguf(gf: GGUFFile, context: int | None = None):
    """A transformers config for a GGUF file's model, from its metadata (for RoPE and references)."""
    import transformers

    arch = gf.architecture
    if arch not in _GGUF_CONFIGS:
        raise ModelLoadError(f"{gf.path.name}: unsupported architecture {arch} (supported: {', '.join(_GGUF_CONFIGS)})")
    p = arch + "."

    def need(key: str):
        value = gf.get(p + key)
        if value is None:
            raise ModelLoadError(f"{gf.path.name}: metadata {p + key} is missing")
        return value

    n_heads = int(need("attention.head_count"))
    dim = int(need("embedding_length"))
    emb = gf.tensors.get("token_embd.weight")
    vocab = emb.dims[1] if emb is not None else gf.get(p + "vocab_size") or gf.array_length("tokenizer.ggml.tokens")
    rope = {"rope_type": "default", "rope_theta": float(gf.get(p + "rope.freq_base", 10000.0))}
    scaling = gf.get(p + "rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=float(gf.get(p + "rope.scaling.factor", 1.0)))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(gf.get(p + "rope.scaling.original_context_length"))
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"{gf.path.name}: unsupported rope scaling {scaling}")
    kwargs = dict(
        vocab_size=int(vocab),
        hidden_size=dim,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(gf.get(p + "attention.head_count_kv", n_heads)),
        head_dim=int(gf.get(p + "attention.key_length") or dim // n_heads),
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=gf.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=gf.get("tokenizer.ggml.eos_token_id"),
    )
    cfg = getattr(transformers, _GGUF_CONFIGS[arch])(**kwargs)
    if context and context > cfg.max_position_embeddings:
        extend_context(cfg, context)
    return cfg


def load_gguf_weights(
    path: Path, dtype: torch.dtype | None = None, device: str = "cpu", context: int | None = None
) -> Transformer:
    """Our Transformer over a GGUF file's tensors, as shipped (views of the mapped file)."""
    gf = open_gguf(path)
    cfg = hf_config_from_gguf(gf, context)
    try:
        args = ModelArgs.from_hf_config(cfg)
    except UnsupportedArchitecture as exc:
        raise ModelLoadError(str(exc)) from None
    args.rope_interleaved = gf.architecture in ("llama", "mistral")  # q/k rows permuted by llama.cpp's converter
    model = Transformer(args, max_len=context if context and context < args.max_position_embeddings else None)
    try:
        _install_gguf_tensors(model, gf)
    except (UnsupportedQuantType, GGUFError) as exc:
        raise ModelLoadError(str(exc)) from None
    except ValueError as exc:
        raise ModelLoadError(f"{path.name}: tensors do not match the model's metadata ({exc})") from None
    model.weights_label = f"GGUF {quant_summary(model)}"
    if dtype is not None:
        model.convert_weights(dtype)
        model.weights_label = f"{str(dtype).removeprefix('torch.')} (dequantized from GGUF)"
    model.kv_dtype = default_kv_dtype(device)
    return model.to_device(device).eval()


def _install_gguf_tensors(model: Transformer, gf: GGUFFile) -> None:
    a = model.args

    def t(name: str):
        return gf.tensor(name)

    def vec(name: str) -> torch.Tensor:
        x, _ = t(name)
        return x.float().reshape(-1)

    emb = t("token_embd.weight")
    model.tok_embeddings.set_weight(*emb)
    model.output.set_parts([t("output.weight") if "output.weight" in gf.tensors else emb])
    model.norm.weight = vec("output_norm.weight")
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        bias = None
        if a.attention_bias:
            bias = torch.cat([vec(p + "attn_q.bias"), vec(p + "attn_k.bias"), vec(p + "attn_v.bias")])
        att = layer.attention
        att.wqkv.set_parts([t(p + "attn_q.weight"), t(p + "attn_k.weight"), t(p + "attn_v.weight")], bias)
        att.wo.set_parts([t(p + "attn_output.weight")])
        if a.qk_norm:
            att.q_norm.weight = vec(p + "attn_q_norm.weight")
            att.k_norm.weight = vec(p + "attn_k_norm.weight")
        layer.feed_forward.w13.set_parts([t(p + "ffn_gate.weight"), t(p + "ffn_up.weight")])
        layer.feed_forward.w2.set_parts([t(p + "ffn_down.weight")])
        layer.attention_norm.weight = vec(p + "attn_norm.weight")
        layer.ffn_norm.weight = vec(p + "ffn_norm.weight")


def gguf_tokenizer(path: Path, log: Log):
    """The GGUF file's tokenizer, converted by transformers once and cached (keyed by the file's
    path, size and modification time)."""
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / "tokenizers" / f"{path.stem}-{key}"
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    log(f"Preparing the tokenizer of {path.name} once (this takes up to a minute) ...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(f"{path.name}: cannot read its tokenizer ({type(exc).__name__}: {exc})") from None
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError as exc:  # a full disk, a read-only or missing cache folder: use it uncached
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"notice: the tokenizer could not be cached in {folder.parent} ({exc.strerror or exc}); "
            "it is prepared again at every start")
    return tokenizer


# -- activations ---------------------------------------------------------------------------------------------

ACTIVATION_CHOICES = ("auto", "fp32", "int8")


def choose_activations(model: Transformer, requested: str | None = None) -> tuple[str, str]:
    """The activation mode to run `model` in, and a notice when a request could not be met ('' else).
    "auto" is int8 wherever it can run: on AVX512-VNNI and on AVX2 (the same bits) it is the faster
    mode (docs/performance.md), and its perplexity stays within 1% of fp32 (README, Kernels); fp32
    everywhere else (the portable build, dense weights)."""
    requested = requested or os.environ.get("TRIFORCE_ACTIVATIONS") or "auto"
    if requested not in ACTIVATION_CHOICES:
        raise ModelLoadError(f"activations must be one of {', '.join(ACTIVATION_CHOICES)}, not {requested!r}")
    why = model.int8_available()
    if requested == "fp32" or (requested == "auto" and why):
        return "fp32", ""
    if why:
        return "fp32", f"int8 activations unavailable: {why}; using fp32 activations"
    return "int8", ""


ATTENTION_CHOICES = ("auto", "fp32", "bf16", "int8")
AUTO_ATTENTION = ("int8", "bf16")  # "auto"'s preference with int8 activations, fastest first (docs/performance.md)


def choose_attention(model: Transformer, requested: str | None = None) -> tuple[str, str]:
    """The attention products for `model` (after its activations are set), and a notice when a
    request could not be met. "auto", with int8 activations, is the first of AUTO_ATTENTION the
    build has (each the faster mode where it runs, its perplexity within 1% of fp32: README),
    fp32 otherwise."""
    requested = requested or os.environ.get("TRIFORCE_ATTENTION") or "auto"
    if requested not in ATTENTION_CHOICES:
        raise ModelLoadError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not {requested!r}")
    if requested == "fp32":
        return "fp32", ""
    if requested == "auto":
        if model.activations == "int8":
            for mode in AUTO_ATTENTION:
                if not model.attention_available(mode):
                    return mode, ""
        return "fp32", ""
    if why := model.attention_available(requested):
        return "fp32", f"{requested} attention unavailable: {why}; using fp32 attention"
    return requested, ""


def expects_prepared_blocks(head_dim: int, dtype: torch.dtype | None, device: str) -> bool:
    """Whether a model loaded with these settings will run the bf16 or int8 attention with prepared
    blocks (its cache's second copy; `choose_attention` on "auto", before the model is there):
    GGUF blocks computed as shipped (int8 activations) and a build with either attention. The
    memory guard's question; it errs towards the copy (an `--attention fp32` run would not make it)."""
    from triforce_chat.kernels.backends import prepared_blocks_available

    if dtype is not None or os.environ.get("TRIFORCE_ATTENTION") == "fp32":
        return False
    blocks = any(prepared_blocks_available(head_dim, device, mode) for mode in AUTO_ATTENTION)
    return blocks and bool(native.status().int8)


# -- the load-time self-check ----------------------------------------------------------------------------


def self_check(model: Transformer, prefix: int = 5, window: int = 6, seed: int = 0) -> str:
    """A random window through the whole forward against the same tokens as single steps, bitwise,
    on the full-cache path the target verifies with. Returns '' when equal, else what differed."""
    if model.device.type != "cpu" or model.sequential_windows:
        return ""
    from triforce_chat.decoding.cache import KVCache

    window = min(window, MAX_WINDOW)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.args.vocab_size, (prefix + window,), generator=g)
    cache = KVCache.for_model(model, max_len=prefix + window + 1)
    model(ids[:prefix], cache, logits="none")
    together = model(ids[prefix:], cache, logits="all")
    cache.truncate(prefix)
    alone = torch.cat([model(ids[i : i + 1], cache, logits="all") for i in range(prefix, prefix + window)])
    if torch.equal(together, alone):
        return ""
    rows = [i for i in range(window) if not torch.equal(together[i], alone[i])]
    return f"a {window}-token window differed from single steps in rows {rows} on this CPU"


# -- context extension and tokenizer facts -------------------------------------------------------------


def extend_context(cfg, context: int) -> None:
    """Extend a config's positions to `context` with YaRN scaling (in place)."""
    original = cfg.max_position_embeddings
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if params.get("rope_type", "default") not in ("default", "yarn", "linear"):
        raise ModelLoadError(f"cannot extend a model with rope type {params.get('rope_type')} to {context} tokens")
    cfg.rope_parameters = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": context / original,
        "original_max_position_embeddings": original,
    }
    cfg.max_position_embeddings = context


def eos_token_ids(tokenizer, path: Path | None = None) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if path is not None and (path / "generation_config.json").exists():
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    # chat models end a turn with their template's end-of-turn token even when eos says otherwise
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in ("<|im_end|>", "<|eot_id|>") if tok in vocab)
    return ids


__all__ = [
    "LoadedModel", "ModelLoadError", "ModelSource", "UnsupportedArchitecture", "load_model", "resolve_model",
    "extend_context", "eos_token_ids", "self_check", "read_generation_defaults", "choose_activations",
    "choose_attention",
]
