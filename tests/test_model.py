"""Our forward pass and KV cache against transformers, the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_random_model
from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.loading import load_weights_only
from triforce_chat.decoding.model import ModelArgs, UnsupportedArchitecture

ARCHS = [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}}),
    ("qwen2", {}),
    ("qwen3", {}),
]


def reference_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0]


@pytest.mark.parametrize("arch,extra", ARCHS, ids=["llama", "llama3-rope", "yarn", "qwen2", "qwen3"])
def test_forward_matches_transformers(tmp_path, arch, extra):
    folder = save_random_model(tmp_path, arch, vocab_size=512, **extra)
    ours = load_weights_only(folder)
    ids = torch.randint(0, 512, (700,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(folder, ids)

    # prefill in uneven chunks, then incremental decode
    cache = KVCache.for_model(ours)
    parts = [ours(ids[:300], cache), ours(ids[300:650], cache)]
    parts += [ours(ids[i : i + 1], cache) for i in range(650, 700)]
    got = torch.cat(parts)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err < 2e-4 * max(1.0, ref.abs().max().item()), err


def test_rollback_gives_the_same_logits_as_never_going_there(tmp_path):
    model = load_weights_only(save_random_model(tmp_path, "llama", vocab_size=256))
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 256, (120,), generator=g)
    detour = torch.randint(0, 256, (9,), generator=g)
    follow = torch.randint(0, 256, (5,), generator=g)

    clean = KVCache.for_model(model)
    model(prefix, clean)
    want = model(follow, clean)

    cache = KVCache.for_model(model)
    model(prefix, cache)
    model(detour, cache)  # speculative tokens that get rejected ...
    for t in follow[:2]:  # ... and a few single steps, also rejected
        model(t.view(1), cache)
    cache.truncate(len(prefix))
    got = model(follow, cache)
    assert torch.equal(got, want)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture: gpt2"):
        ModelArgs.from_hf_config(GPT2Config())


@pytest.mark.slow
def test_default_model_matches_transformers(default_model):
    lm = default_model
    text = "The lighthouse keeper on Farrow Island is named Amelia Stroud. " * 8
    ids = torch.tensor(lm.tokenizer(text).input_ids)
    ref = reference_logits(lm.path, ids)
    cache = KVCache.for_model(lm.model)
    head = lm.model(ids[:-4], cache)
    steps = [lm.model(ids[i : i + 1], cache) for i in range(len(ids) - 4, len(ids))]
    got = torch.cat([head, *steps])
    assert (got - ref).abs().max().item() < 1e-3


@pytest.mark.slow
def test_default_model_greedy_equals_transformers_generate(default_model):
    from triforce_chat.decoding.session import DecodeConfig, Session

    lm = default_model
    session = Session(lm, DecodeConfig(level=0, max_new_tokens=24))
    session.add_document("facts.txt", "The boat on Farrow Island is called the Kestrel and it is painted green.")
    ours = [t for ev in session.generate("What colour is the boat?") for t in ev.tokens]

    hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    prompt = torch.tensor([session.last_prompt_ids])
    out = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=sorted(lm.eos_ids))
    theirs = out[0, prompt.shape[1] :].tolist()
    assert ours == theirs
    assert len(ours) > 5


# A random model with the default model's widths (2 layers, a small vocabulary): big enough that the
# matrix libraries split work between threads as they do for the real model.
DEFAULT_MODEL_WIDTHS = dict(
    vocab_size=512, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verification_window_is_bitwise_equal_to_single_steps(tmp_path, dtype, threads):
    """Greedy losslessness needs the target's logits for a token to be the same whether it is
    verified inside a window or decoded alone: bitwise, since a near-tie can flip on the last bit.
    Also with 2 and 4 threads (`ask` and the app use all cores): the libraries' work split must not
    change a row's reduction order. The default model's widths (576 hidden, 1536 MLP,
    9 / 3 heads of 64), since tiny matrices are never split between threads."""
    folder = save_random_model(tmp_path, "llama", **DEFAULT_MODEL_WIDTHS)
    model = load_weights_only(folder, dtype=dtype)
    ids = torch.randint(0, 512, (700,), generator=torch.Generator().manual_seed(5))
    cache = KVCache.for_model(model)
    model(ids[:250], cache, logits="none")
    for start in (250, 254, 509, 512, 640):  # windows inside, across and at block boundaries
        if cache.length < start:
            model(ids[cache.length : start], cache, logits="none")
        cache.truncate(start)
        singles = torch.cat([model(ids[i : i + 1], cache) for i in range(start, start + 32)])
        for t in (2, 5, 9, 17, 32):
            cache.truncate(start)
            assert torch.equal(model(ids[start : start + t], cache), singles[:t]), (start, t)


def test_float32_threads_are_capped_where_gemms_stay_row_invariant(tiny_model_dir):
    from triforce_chat.decoding.loading import load_model
    from triforce_chat.decoding.model import FP32_MAX_THREADS

    previous = torch.get_num_threads()
    said: list[str] = []
    try:
        torch.set_num_threads(FP32_MAX_THREADS + 4)
        load_model(str(tiny_model_dir), dtype=torch.bfloat16, log=said.append)
        assert torch.get_num_threads() == FP32_MAX_THREADS + 4 and not said  # bf16 keeps every thread
        load_model(str(tiny_model_dir), dtype=torch.float32, log=said.append)
        assert torch.get_num_threads() == FP32_MAX_THREADS
        assert said and f"using {FP32_MAX_THREADS} threads" in said[0]
    finally:
        torch.set_num_threads(previous)


def test_a_machine_whose_gemms_are_not_row_invariant_falls_back_to_rows(tiny_model_dir, monkeypatch):
    """The probe at load time must catch a GEMM whose rows depend on the row count (simulated here)
    and make those layers exact by going row by row."""
    from triforce_chat.decoding.loading import load_model
    from triforce_chat.decoding.model import Linear

    real_piece = Linear._piece

    def row_count_dependent(self, x):
        return real_piece(self, x) + (x.shape[0] - 1) * 1e-3

    monkeypatch.setattr(Linear, "_piece", row_count_dependent)
    said: list[str] = []
    lm = load_model(str(tiny_model_dir), dtype=torch.float32, log=said.append)
    assert said and "row by row" in said[-1] and "output" in said[-1]
    linears = [m for m in lm.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.row_by_row for m in linears)
    cache = KVCache.for_model(lm.model)
    ids = torch.arange(3, 40)
    lm.model(ids[:20], cache, logits="none")
    singles = torch.cat([lm.model(ids[i : i + 1], cache) for i in range(20, 29)])
    cache.truncate(20)
    assert torch.equal(lm.model(ids[20:29], cache), singles)


def test_row_invariance_probe_passes_here(tmp_path):
    from triforce_chat.decoding.model import ensure_row_invariance

    for dtype in (torch.float32, torch.bfloat16):
        model = load_weights_only(save_random_model(tmp_path / str(dtype), "llama", vocab_size=512), dtype=dtype)
        assert ensure_row_invariance(model) == []  # this CPU needs no fallback (the fast path is exact)


def test_packed_bf16_weights_give_the_stock_gemm_results_bitwise(tmp_path, monkeypatch):
    """bf16 linear weights are pre-packed for oneDNN at load (a speed change only): the logits of
    prefill, single steps and windows must be bitwise those of the stock, unpacked GEMM."""
    from triforce_chat.decoding import model as model_module

    folder = save_random_model(tmp_path, "llama", **DEFAULT_MODEL_WIDTHS)
    packed = load_weights_only(folder, dtype=torch.bfloat16)
    can_pack = model_module.onednn_packing_available()  # True on the x86 CPUs we run on
    monkeypatch.setattr(model_module, "onednn_packing_available", lambda: False)
    stock = load_weights_only(folder, dtype=torch.bfloat16)
    linears = [m for m in packed.modules() if isinstance(m, model_module.Linear)]
    assert linears and all(m.packed == can_pack for m in linears)
    assert not any(m.packed for m in stock.modules() if isinstance(m, model_module.Linear))
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(3))
    results = []
    for model in (packed, stock):
        cache = KVCache.for_model(model)
        head = model(ids[:280], cache)  # prefill: more rows than a window
        steps = [model(ids[i : i + 1], cache) for i in range(280, 285)]
        window = model(ids[285:300], cache)
        results.append(torch.cat([head, *steps, window]))
    assert torch.equal(results[0], results[1])
