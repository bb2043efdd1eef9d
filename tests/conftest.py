"""Shared fixtures: small random-weight models of each supported family, and the real default model.

Random models are built with transformers from a config (so transformers is the reference), saved
as safetensors with the default model's tokenizer, and loaded through our own loader.
"""

from __future__ import annotations

import json
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

@pytest.fixture(autouse=True)
def _document_cache_in_a_temporary_folder(tmp_path_factory, monkeypatch):
    """`ask` and the app save prefilled documents by default: never into the user's cache, and
    each test starts with an empty one (no test restores what another one saved)."""
    monkeypatch.setenv("TRIFORCE_KV_CACHE_DIR", str(tmp_path_factory.mktemp("kv-cache")))


@pytest.fixture(autouse=True)
def _heap_not_settled(monkeypatch):
    """`open_model` freezes what is alive (app/runtime.py, settle_heap): in the test process that would
    be every fixture so far, for good, after a full collection per in-process `ask`. Tests of it call
    the functions themselves (tests/test_runtime.py)."""
    from triforce_chat.app import runtime

    monkeypatch.setattr(runtime, "settle_heap", lambda: None)
    monkeypatch.setattr(runtime, "release_frozen", lambda: None)


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


def copy_tokenizer(source: Path | None, folder: Path) -> Path:
    """Give a saved random model a real tokenizer (the files of `source`, when given)."""
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copy(source / name, folder / name)
    return folder


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
    return copy_tokenizer(tokenizer_from, folder)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file (Q4_1 / Q8_0 blocks)."""
    from triforce_chat.decoding.models import catalog

    return catalog.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory, smollm2_path) -> Path:
    """A folder with SmolLM2's tokenizer files (converted once from its GGUF, then cached), for
    the random models that borrow a real tokenizer."""
    from triforce_chat.decoding.models.loading import gguf_tokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    gguf_tokenizer(smollm2_path, log=lambda m: None).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_model(smollm2_path):
    """The real SmolLM2 GGUF, computed as shipped (the model CI always has)."""
    from triforce_chat.decoding.models.loading import load_model

    return load_model("smollm2-135m", log=lambda m: None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_from=default_model_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """A 2-layer random Llama with SmolLM2's tokenizer (vocab 49152): fast, real text I/O."""
    from triforce_chat.decoding.models.loading import load_model

    return load_model(str(tiny_model_dir), log=lambda m: None)


def save_bigram_model(folder: Path, edges: dict[tuple[int, int], float], vocab_size: int = 64, seed: int = 0,
                      tokenizer_from: Path | None = None, mix: float = 0.0) -> Path:
    """A Llama built by hand, not trained, whose next-token logits follow a table of bigrams: after
    token a, the logit of b is about 8 * edges[(a, b)] (b without an edge from a: about 0).

    The attention and MLP outputs are zero (mix = 0), so the residual stream is the token's
    embedding, a random unit vector; the output row of b is the sum of w * embedding(a) over its
    edges (a, b, w), every other row small noise; the final norm scales by sqrt(64) = 8. Random
    unit vectors are nearly orthogonal, so a logit strays from 8 * w by about w. `mix` > 0 gives
    the attention and MLP outputs random weights of that scale, so the logits also depend a little
    on the context."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=vocab_size), dtype=torch.float32)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(torch.randn(vocab_size, 64), dim=1)
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            for p in layer.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)
            for p in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                p.normal_(0, mix) if mix else p.zero_()
        head = torch.randn(vocab_size, 64) * 0.02
        for b in {b for _, b in edges}:
            head[b] = sum(w * emb[a] for (a, b2), w in edges.items() if b2 == b)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    return copy_tokenizer(tokenizer_from, folder)


def save_looping_model(folder: Path, successor: dict[int, int], vocab_size: int = 64, seed: int = 0,
                       tokenizer_from: Path | None = None) -> Path:
    """A model whose greedy next token is successor[token] for the ids in `successor`, by a margin
    no rounding moves (a logit of about 64 against at most about 20): a chain that ends in a cycle
    makes a model that loops for certain. Tokens outside `successor` lead to whichever successor
    their embedding leans to."""
    return save_bigram_model(folder, {(a, b): 8.0 for a, b in successor.items()}, vocab_size, seed,
                             tokenizer_from)


# the sampling settings Qwen2.5-Coder's generation_config.json recommends
QWEN_LIKE = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}


@pytest.fixture(scope="session")
def looping_chat_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A model that loops for certain (after a few tokens, 1003..1006 for ever), with the default
    model's tokenizer and Qwen's recommended sampling settings in its generation_config.json."""
    folder = tmp_path_factory.mktemp("looping-chat")
    successor = {1000 + i: 1001 + i for i in range(6)} | {1006: 1003}
    save_looping_model(folder, successor, vocab_size=49152, tokenizer_from=default_model_dir)
    (folder / "generation_config.json").write_text(json.dumps({**QWEN_LIKE, "eos_token_id": 2}))
    return folder
