"""Our forward pass and KV cache against transformers, the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_random_model
from gguf_models import load as load_gguf
from gguf_models import random_ids, resident_pages, write_gguf
from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.model import MAX_WINDOW, ModelArgs, UnsupportedArchitecture
from triforce_chat.decoding.models.loading import load_weights_only

ARCHS = [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}}),
    ("qwen2", {}),
    ("qwen3", {}),
]


def reference_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits; a .gguf file is dequantized by its GGUF loader."""
    where = {"pretrained_model_name_or_path": path}
    if str(path).endswith(".gguf"):
        where = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    hf = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0]


@pytest.mark.parametrize("arch,extra", ARCHS, ids=["llama", "llama3-rope", "yarn", "qwen2", "qwen3"])
def test_forward_matches_transformers(tmp_path, arch, extra):
    folder = save_random_model(tmp_path, arch, vocab_size=512, **extra)
    ours = load_weights_only(folder)
    ids = torch.randint(0, 512, (700,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(folder, ids)

    # prefill in uneven chunks, then incremental decode (a float32 cache: transformers' precision)
    cache = KVCache.for_model(ours, dtype=torch.float32)
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
def test_default_model_matches_transformers(smollm2_path):
    """SmolLM2's GGUF computed as shipped against transformers' dequantization of the same file:
    logits within rounding, and the same greedy answer (float32 KV, transformers' precision; fp32
    activations, since the int8 mode rounds them on purpose)."""
    from triforce_chat.decoding.models.loading import load_model
    from triforce_chat.decoding.session import DecodeConfig, Session

    lm = load_model("smollm2-135m", kv_dtype=torch.float32, log=lambda m: None, activations="fp32")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                              dtype=torch.float32).eval()
    text = "The lighthouse keeper on Farrow Island is named Amelia Stroud. " * 8
    ids = torch.tensor(lm.tokenizer(text).input_ids)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    cache = KVCache.for_model(lm.model)
    head = lm.model(ids[:-4], cache)
    steps = [lm.model(ids[i : i + 1], cache) for i in range(len(ids) - 4, len(ids))]
    got = torch.cat([head, *steps])
    assert (got - ref).abs().max().item() < 1e-3

    session = Session(lm, DecodeConfig(level=0, max_new_tokens=24))
    session.add_document("facts.txt", "The boat on Farrow Island is called the Kestrel and it is painted green.")
    ours = [t for ev in session.generate("What colour is the boat?") for t in ev.tokens]
    prompt = torch.tensor([session.last_prompt_ids])
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                      eos_token_id=sorted(lm.eos_ids))
    theirs = out[0, prompt.shape[1] :].tolist()
    assert ours == theirs
    assert len(ours) > 5


# A random model with SmolLM2's widths (2 layers, a small vocabulary).
DEFAULT_MODEL_WIDTHS = dict(
    vocab_size=512, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
)

# Random GGUF models with the quant types of the real files: SmolLM2 (Q4_1, Q8_0 embeddings),
# Qwen2.5-Coder 0.5B (Q5_0, Q8_0, Q4_K/Q6_K down projections, GQA 7) and 1.5B (Q4_K/Q6_K, head_dim
# 128, GQA 6), and a GQA-8 Llama with Q5_K / Q4_0.
GGUF_CASES = {  # dim = heads * head_dim: transformers' GGUF loader, the reference, assumes it
    "llama-q4_1-gqa1": ("llama", dict(dim=256, n_heads=4, n_kv_heads=4, qtype="Q4_1",
                                      qtypes={"token_embd": "Q8_0"}, tied=True)),
    "qwen2-q5_0-gqa7": ("qwen2", dict(dim=896, n_heads=14, n_kv_heads=2, qtype="Q5_0",
                                      qtypes={"attn_v": "Q8_0", "ffn_down": "Q6_K", "output": "Q8_0"})),
    "qwen2-q4_k-d128-gqa6": ("qwen2", dict(dim=1536, n_heads=12, n_kv_heads=2, head_dim=128, qtype="Q4_K",
                                           qtypes={"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"})),
    "llama-q5_k-gqa8": ("llama", dict(dim=512, n_heads=8, n_kv_heads=1, qtype="Q5_K", qtypes={"ffn_down": "Q4_0"})),
}


@pytest.fixture(scope="module", params=sorted(GGUF_CASES))
def gguf_model(request, tmp_path_factory):
    arch, kwargs = GGUF_CASES[request.param]
    path = write_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", arch, **kwargs)
    return path, load_gguf(path)


def assert_windows_equal_steps(model, ids, starts=(250, 254, 512)):
    """Windows of 2..32 tokens at `starts` (inside, across and at the 32-key block and 256-key
    segment edges of the attention kernel) give bitwise the logits of single-token steps."""
    cache = KVCache.for_model(model, max_len=600)
    for start in starts:
        cache.truncate(min(cache.length, start))
        if cache.length < start:
            model(ids[cache.length : start], cache, logits="none")
        singles = torch.cat([model(ids[i : i + 1], cache) for i in range(start, start + MAX_WINDOW)])
        for t in (2, 9, 17, MAX_WINDOW):
            cache.truncate(start)
            assert torch.equal(model(ids[start : start + t], cache), singles[:t]), (start, t)
        cache.truncate(start)


def test_gguf_verification_windows_are_bitwise_equal_to_single_steps(gguf_model, threads):
    """Greedy losslessness needs the target's logits for a token to be the same whether it is
    verified inside a window or decoded alone: bitwise, since a near-tie can flip on the last bit.
    Also at 2 and 4 threads (`ask` and the app use all cores)."""
    _, model = gguf_model
    assert_windows_equal_steps(model, random_ids(600, model.args.vocab_size, seed=5))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_dense_verification_windows_are_bitwise_equal_to_single_steps(tmp_path, dtype, threads):
    folder = save_random_model(tmp_path, "llama", **DEFAULT_MODEL_WIDTHS)
    model = load_weights_only(folder, dtype=dtype)
    assert_windows_equal_steps(model, random_ids(600, 512, seed=6), starts=(250, 257))


def test_gguf_forward_matches_transformers_on_the_same_file(gguf_model):
    """Our mapping of GGUF tensors (Llama's permuted q/k, Qwen2's biases, tied heads) against
    transformers' own GGUF loader, which dequantizes the same file."""
    path, model = gguf_model
    ids = random_ids(80, model.args.vocab_size, seed=7)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    cache = KVCache.for_model(model, max_len=128, dtype=torch.float32)
    got = torch.cat([model(ids[:70], cache), *[model(ids[i : i + 1], cache) for i in range(70, 80)]])
    assert (got - ref).abs().max() < 2e-4 * max(1.0, ref.abs().max().item())


def test_dequantized_weights_give_nearly_the_same_logits(gguf_model):
    path, model = gguf_model
    dense = load_gguf(path, dtype=torch.float32)
    assert all(t == 0 for lin in dense.linears() for t in lin.types)
    ids = random_ids(50, model.args.vocab_size, seed=8)
    a = model(ids, KVCache.for_model(model, max_len=64))
    b = dense(ids, KVCache.for_model(dense, max_len=64))
    assert (a - b).abs().max() < 1e-4 * a.abs().max()


def test_self_check_catches_a_row_count_dependent_kernel(tiny_model_dir):
    """The load-time self-check must catch a kernel whose rows depend on the row count (the native
    linear kernel nudged by one ulp in windows, a test hook) and switch the full cache to
    token-by-token verification, which stays exact; the notice says so."""
    from triforce_chat.decoding.models.loading import load_model, self_check
    from triforce_chat.kernels import native

    if not native.available():
        pytest.skip(f"native kernels: {native.status().reason}")
    assert load_model(str(tiny_model_dir)).model.sequential_windows is False
    native.set_row_skew(True)
    try:
        lm = load_model(str(tiny_model_dir))
        assert lm.model.sequential_windows
        assert lm.notices and "self-check" in lm.notices[-1] and "token by token" in lm.notices[-1]
        model = lm.model
        ids = torch.arange(3, 60)
        cache = KVCache.for_model(model, max_len=128)
        model(ids[:40], cache, logits="none")
        singles = torch.cat([model(ids[i : i + 1], cache) for i in range(40, 49)])
        cache.truncate(40)
        assert torch.equal(model(ids[40:49], cache), singles)  # exact through the fallback
        model.sequential_windows = False
        assert self_check(model)  # and the skew really breaks windows without it
    finally:
        native.set_row_skew(False)


FALLBACK_SCRIPT = """
import sys, torch
from triforce_chat.decoding.models.loading import load_model
from triforce_chat.decoding.session import DecodeConfig, Session
lm = load_model(sys.argv[1], log=lambda m: None)
assert lm.model.sequential_windows and any("native CPU kernels unavailable" in n for n in lm.notices), lm.notices
answers = []
for level in (0, 1, 2):
    s = Session(lm, DecodeConfig(level=level, budget="32", max_new_tokens=24))
    s.add_document("d.txt", "The kestrel is green. " * 40)
    answers.append([t for ev in s.generate("What colour is the kestrel?") for t in ev.tokens])
assert answers[0] == answers[1] == answers[2] and len(answers[0]) == 24, answers
print("ok", lm.notices[0])
"""


def test_without_the_native_extension_every_level_is_still_exact(tiny_model_dir):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRIFORCE_NO_NATIVE": "1"}
    run = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, str(tiny_model_dir)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "TRIFORCE_NO_NATIVE" in run.stdout


def test_released_file_pages_leave_memory_and_read_back_the_same(tmp_path):
    """The int8 mode packs a copy of each weight and releases the mapped file's pages under it
    (else the process holds both); a later read of the view faults the file's bytes back in."""
    from triforce_chat.decoding.models.gguf_file import GGUFFile, release_pages

    path = write_gguf(tmp_path / "m.gguf", "qwen2", dim=896, n_heads=14, n_kv_heads=2, ffn=1024, qtype="Q5_0")
    w, _ = GGUFFile(path).tensor("blk.0.attn_q.weight")  # 896 x 616 bytes: ~135 pages
    copy = w.clone()
    assert resident_pages(w) > 100
    released = release_pages(w)
    assert released > 100 * 4096 and resident_pages(w) == 0
    assert torch.equal(w, copy) and resident_pages(w) > 100
    assert release_pages(copy) == 0  # not a view of a file: left alone


def test_without_madvise_the_pages_are_kept(tmp_path, monkeypatch):
    """Where the platform has no madvise (Windows), packing keeps both copies rather than failing."""
    import mmap

    from triforce_chat.decoding.models.gguf_file import GGUFFile, release_pages

    path = write_gguf(tmp_path / "m.gguf", "qwen2", dim=896, n_heads=14, n_kv_heads=2, ffn=1024, qtype="Q5_0")
    w, _ = GGUFFile(path).tensor("blk.0.attn_q.weight")
    w.sum()
    monkeypatch.delattr(mmap, "MADV_DONTNEED")
    assert release_pages(w) == 0 and resident_pages(w) > 100


def test_a_gguf_tokenizer_that_cannot_be_cached_is_used_uncached_with_a_notice(tmp_path, monkeypatch, smollm2_path):
    from triforce_chat.decoding.models import loading

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(loading, "cache_root", lambda: blocker / "cache")
    said: list[str] = []
    tokenizer = loading.gguf_tokenizer(smollm2_path, log=said.append)
    assert tokenizer("The boat is green.").input_ids
    assert any("could not be cached" in m and "prepared again at every start" in m for m in said)
