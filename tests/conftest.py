"""Shared fixtures: small random-weight models of each supported family, and the real default model.

Random models are built with transformers from a config (so transformers is the reference), saved
as safetensors with the default model's tokenizer, and loaded through our own loader.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the small models of most tests run faster without OpenMP hand-offs, and a shared
# machine's other load does not make every matmul wait for a busy core.
torch.set_num_threads(1)

try:  # property-based tests: reproducible in CI (derandomized: the same examples every run)
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", derandomize=True, deadline=None, max_examples=60, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("dev", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
except ImportError:  # pragma: no cover - hypothesis is in the dev extra
    pass


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"{n}-threads")
def threads(request):
    """Run the test at 1, 2 and 4 torch threads (`ask` and the app use every core, and the
    libraries split work between threads by shape), then restore the single thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tiny_config(arch: str = "llama", vocab_size: int = 49152, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    if arch == "qwen3":
        common.setdefault("head_dim", 16)
    return cls(**common)


def save_random_model(folder: Path, arch: str = "llama", seed: int = 0, tokenizer_from: Path | None = None,
                      **overrides) -> Path:
    """A random-weight model of `arch` saved as safetensors (+ tokenizer files when given)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init default so that logits are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).exists():
                shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from triforce_chat.decoding.loading import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    from triforce_chat.decoding.loading import load_model

    return load_model(None, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_from=default_model_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """A 2-layer random Llama with the default model's tokenizer (vocab 49152): fast, real text I/O."""
    from triforce_chat.decoding.loading import load_model

    return load_model(str(tiny_model_dir), dtype=torch.float32)


@pytest.fixture(scope="session")
def default_model_auto(default_model_dir):
    """The default model in the dtype users get by default on this machine (bf16 with AMX)."""
    from triforce_chat.decoding.loading import default_dtype, load_model

    return load_model(None, dtype=default_dtype("cpu"))
