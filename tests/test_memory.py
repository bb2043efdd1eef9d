"""The memory guard: available memory from cgroups or /proc/meminfo, the estimate
(decoding/memory/footprint.py) against what a model really allocates, and refusals that say what would
fit (ask: exit 2; the app: a notice)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from triforce_chat.decoding.memory import guard as memory
from triforce_chat.decoding.memory.footprint import MIB, ModelShape, view_buffer_bytes, weight_files
from triforce_chat.decoding.memory.guard import (
    Available,
    MemoryShortage,
    available_memory,
    cgroup_available,
    check_before_load,
    meminfo_available,
)
from triforce_chat.decoding.session import DecodeConfig, Session

DOC = "The lighthouse keeper on Farrow Island is Amelia Stroud. The boat is green.\n" * 30


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cgroup_v2_limit_minus_usage(tmp_path):
    root = tmp_path / "cg"
    proc = write(tmp_path / "cgroup", "0::/user.slice/app.scope\n")
    write(root / "cgroup.controllers", "memory\n")
    write(root / "user.slice" / "memory.max", "max\n")  # a parent without a limit
    leaf = root / "user.slice" / "app.scope"
    write(leaf / "memory.max", str(2048 * MIB))
    write(leaf / "memory.current", str(1000 * MIB))
    write(leaf / "memory.stat", f"anon 1\ninactive_file {200 * MIB}\n")  # reclaimable cache is not "used"
    got = cgroup_available(root, proc)
    assert got == Available(1248 * MIB, "cgroup v2 limit")


def test_cgroup_v1_tightest_ancestor_wins_and_no_limit_is_none(tmp_path):
    root = tmp_path / "cg"
    proc = write(tmp_path / "cgroup", "4:memory:/outer/inner\n1:cpu:/\n")
    write(root / "memory" / "outer" / "memory.limit_in_bytes", str(1024 * MIB))
    write(root / "memory" / "outer" / "memory.usage_in_bytes", str(900 * MIB))
    write(root / "memory" / "outer" / "inner" / "memory.limit_in_bytes", "9223372036854771712")  # v1's "none"
    write(root / "memory" / "outer" / "inner" / "memory.usage_in_bytes", str(500 * MIB))
    assert cgroup_available(root, proc) == Available(124 * MIB, "cgroup v1 limit")
    write(root / "memory" / "outer" / "memory.limit_in_bytes", "9223372036854771712")
    assert cgroup_available(root, proc) is None


def test_meminfo_and_the_tighter_of_both(tmp_path, monkeypatch):
    info = write(tmp_path / "meminfo", "MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable:   4096 kB\n")
    assert meminfo_available(info) == 4 * MIB
    assert meminfo_available(tmp_path / "missing") is None
    monkeypatch.setattr(memory, "meminfo_available", lambda: 8 * MIB)
    monkeypatch.setattr(memory, "cgroup_available", lambda: Available(2 * MIB, "cgroup v2 limit"))
    assert available_memory() == Available(2 * MIB, "cgroup v2 limit")
    monkeypatch.setattr(memory, "cgroup_available", lambda: Available(64 * MIB, "cgroup v2 limit"))
    assert available_memory() == Available(8 * MIB, "MemAvailable")
    monkeypatch.setattr(memory, "cgroup_available", lambda: None)
    assert available_memory() == Available(8 * MIB, "MemAvailable")


def test_weights_from_safetensors_headers(tiny_model_dir, tiny_model):
    f32 = weight_files(tiny_model_dir, "float32")
    bf16 = weight_files(tiny_model_dir, "bfloat16")
    norms = sum(n.weight.numel() for n in tiny_model.model.norms())
    params = tiny_model.model.weight_bytes // 4 + norms  # the file's float32 tensors, norms included
    assert f32.loaded_bytes == 4 * params  # untied head: exactly the parameters, at the load dtype
    assert bf16.loaded_bytes == 2 * params
    assert f32.transient_bytes == 0  # the file's float32 tensors are the weights: nothing converted
    assert bf16.transient_bytes == sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert f32.shape == ModelShape.from_args(tiny_model.model.args)


def test_view_buffer_estimate_bounds_the_real_buffer(tiny_model):
    s = Session(tiny_model, DecodeConfig(level=1, max_new_tokens=30, budget="64", adaptive=False))
    s.add_document("doc.txt", DOC)
    list(s.generate("Who keeps the light?"))
    assert s.view.n_selected_chunks > 0  # the view was built over a context longer than its budget
    shape = ModelShape.from_args(tiny_model.model.args)
    estimated = view_buffer_bytes(shape, s.cache.length, "64", 8, 4)
    assert s.view.buffer_bytes <= estimated <= s.view.buffer_bytes + 512 * shape.kv_bytes_per_token(4)
    assert view_buffer_bytes(shape, 60, "64", 8, 4) == 0  # a budget covering the context: no buffer


@pytest.mark.parametrize("lookup", ["suffix", "ngram"])
def test_the_lookup_estimate_covers_what_its_index_takes(lookup):
    """The guard's bytes per context token for a lookup's index against what the index allocates
    (tracemalloc) over 20K tokens of a small and of a large vocabulary."""
    import random
    import tracemalloc

    from triforce_chat.decoding.drafters import NGramDrafter, SuffixDrafter
    from triforce_chat.decoding.memory.footprint import LOOKUP_BYTES_PER_TOKEN

    for vocab in (64, 150_000):
        rng = random.Random(vocab)
        ids = [rng.randrange(vocab) for _ in range(20_000)]
        tracemalloc.start()
        try:
            index = SuffixDrafter() if lookup == "suffix" else NGramDrafter(vocab_size=vocab)
            index.extend(ids)
            taken = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert taken <= LOOKUP_BYTES_PER_TOKEN[lookup] * len(ids), (vocab, taken / len(ids))


def test_the_estimate_is_close_to_what_a_model_really_allocates(tmp_path, default_model_dir):
    """In a fresh process: resident memory grown by loading a model, starting a session, prefilling
    and answering, against the estimate made before loading (a 100 MB model, so that the model
    and its cache dominate the libraries' own allocations)."""
    from conftest import save_random_model

    folder = save_random_model(tmp_path / "m", "llama", tokenizer_from=default_model_dir, hidden_size=256,
                               intermediate_size=512, max_position_embeddings=8192)
    script = textwrap.dedent(f"""
        import gc, json, psutil, torch
        torch.set_num_threads(1)
        import transformers, safetensors.torch  # the libraries every process has loaded before
        from triforce_chat.decoding.config import DecodeConfig
        from triforce_chat.decoding.models.loading import load_model
        from triforce_chat.decoding.memory.guard import check_before_load
        from triforce_chat.decoding.session import Session
        cfg = DecodeConfig(level=2, budget="256", max_new_tokens=16)
        gc.collect()
        before = psutil.Process().memory_info().rss
        est = check_before_load({str(folder)!r}, dtype=torch.float32, device="cpu", context=None, config=cfg)
        session = Session(load_model({str(folder)!r}, dtype=torch.float32), cfg)
        session.add_document("d.txt", {DOC!r})
        list(session.generate("Who keeps the light?"))
        gc.collect()
        grown = psutil.Process().memory_info().rss - before
        print(json.dumps({{"estimate": est.total, "parts": est.parts, "grown": grown}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["grown"] / result["estimate"]
    assert 0.5 <= ratio <= 1.5, result
    from triforce_chat.decoding.models.loading import default_kv_dtype

    kv_size = torch.empty(0, dtype=default_kv_dtype("cpu")).element_size()  # 16-bit with the native kernels
    assert result["parts"]["weights"] > 90 * MIB and result["parts"]["kv_cache"] == 2 * 2 * 2 * 8192 * 64 * kv_size


@pytest.fixture
def short_memory(monkeypatch):
    def set_available(nbytes: int, source: str = "cgroup v2 limit") -> None:
        monkeypatch.setattr(memory, "available_memory", lambda: Available(nbytes, source))

    return set_available


def test_ask_refuses_a_model_that_does_not_fit(monkeypatch, capsys, tiny_model_dir, short_memory, tmp_path):
    from test_cli import run_cli

    doc = write(tmp_path / "doc.txt", DOC)
    loaded = []
    monkeypatch.setattr("triforce_chat.decoding.models.loading.load_model", lambda *a, **k: loaded.append(1))
    short_memory(48 * MIB)
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), "--dtype", "float32",
                             "--kv-dtype", "float32", "-d", str(doc), "Who?")
    assert code == 2 and not loaded and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("error: not enough memory for") and "48 MiB is available (cgroup v2 limit)" in line
    assert "weights" in line and "KV cache" in line and "a smaller model" in line
    # a context that does not fit, where a smaller --context would
    short_memory(700 * MIB)
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), "--dtype", "float32",
                             "--kv-dtype", "float32", "--context", "1000000", "-d", str(doc), "Who?")
    assert code == 2 and not loaded
    line = err.strip()
    assert "at 1,000,000 tokens" in line and "700 MiB is available" in line
    suggested = int(line.split("--context ")[1].split()[0])
    fits = check_before_load(str(tiny_model_dir), dtype="float32", device="cpu", context=suggested,
                             config=DecodeConfig(), available=Available(700 * MIB, "test"), kv_dtype="float32")
    assert 512 <= suggested < 1_000_000 and fits.total <= 700 * MIB and fits.context == suggested
    assert "KV cache 488 MiB" in line  # 1M tokens x 2 layers x 2 KV heads x 16 x 2 (K and V) x 4 bytes


def test_memory_guard_can_be_turned_off(monkeypatch, tiny_model_dir, short_memory):
    short_memory(1 * MIB)
    with pytest.raises(MemoryShortage):
        check_before_load(str(tiny_model_dir), dtype="float32", device="cpu", context=None, config=DecodeConfig())
    monkeypatch.setenv("TRIFORCE_CHAT_MEMORY_GUARD", "off")
    assert check_before_load(str(tiny_model_dir), dtype="float32", device="cpu", context=None,
                             config=DecodeConfig()).total > 1 * MIB


def test_session_refuses_a_prefill_that_does_not_fit_and_keeps_the_conversation(tiny_model, short_memory):
    s = Session(tiny_model, DecodeConfig(level=1, max_new_tokens=8, budget="0.5"))
    s.add_document("doc.txt", DOC)
    list(s.generate("Who keeps the light?"))
    turns, context, length = list(s.turns), list(s.context), s.cache.length
    s.add_document("more.txt", DOC.replace("green", "red") * 2)
    short_memory(256 * 1024)
    with pytest.raises(MemoryShortage) as refused:
        list(s.generate("And the boat?"))
    assert re.fullmatch(
        r"not enough memory to continue to [\d,]+ tokens: it needs about \d+ MiB more \(.+\) but 0 MiB is "
        r"available \(cgroup v2 limit\); it would fit with .*fewer or shorter documents",
        str(refused.value),
    ), str(refused.value)
    assert s.turns == turns and s.context == context and s.cache.length == length
    assert [d.name for d in s.pending_documents] == ["more.txt"]  # nothing was consumed
    short_memory(1 << 40)
    list(s.generate("And the boat?"))  # with the memory back, the same question goes through
    assert [t.question for t in s.turns] == ["Who keeps the light?", "And the boat?"]


async def test_the_app_shows_a_notice_and_keeps_the_question(tiny_model, tmp_path, monkeypatch, short_memory):
    from test_tui import ask, make_app, ready, wait_for
    from triforce_chat.app.ui.history import History
    from triforce_chat.app.ui.widgets import ChatInput

    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    doc = write(tmp_path / "doc.txt", DOC)
    history = History(tmp_path / "data")
    app = make_app(tiny_model, history, [doc], level=1, budget="0.5", max_new_tokens=8)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        await ask(pilot, "Who keeps the light?")
        cache = str(app.query_one("#cache").render())
        assert "estimate" in cache and "available" in cache and "RSS" in cache
        short_memory(1 * MIB)
        app.query_one(ChatInput).insert("And the boat?")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.job is None and any("not enough memory" in n.message
                                                              for n in app._notifications))
        await pilot.pause(0.1)
        assert app.query_one(ChatInput).text == "And the boat?"  # back in the input
        assert [t.question for t in app.session.turns] == ["Who keeps the light?"] and len(app.answers) == 1
        short_memory(1 << 40)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.job is None and len(app.session.turns) == 2 and app.answers[-1].finished)
    conv = history.load(history.resolve("last"))
    assert [t.question for t in conv.turns] == ["Who keeps the light?", "And the boat?"]


def test_a_smaller_budget_is_suggested_when_the_retrieval_buffer_is_what_does_not_fit(tiny_model_dir):
    def est(budget: str, available: Available | None = None):
        return check_before_load(str(tiny_model_dir), dtype="float32", device="cpu", context=200_000,
                                 config=DecodeConfig(level=1, budget=budget), available=available, kv_dtype="float32")

    big, small = est("0.5").total, est("256").total
    assert big - small > 50 * MIB  # half of 200K tokens, plus headroom, in the view's own buffer
    available = Available(int((big + small) / 2 / (1 - memory.HEADROOM)), "MemAvailable")
    with pytest.raises(MemoryShortage) as refused:
        est("0.5", available)
    suggested = str(refused.value).split("--budget ")[1].split(")")[0]
    assert est(suggested, available).total <= available.bytes  # the suggestion does fit
    assert "--context" in str(refused.value) and "(MemAvailable)" in str(refused.value)


def test_the_guard_counts_the_prepared_blocks_exactly_where_the_cache_keeps_them(smollm2_path):
    """The bf16 or int8 attention's prepared blocks (decoding/cache.py) are a second copy of the
    cache: the estimate before loading expects them where the loaded model's cache keeps them, and
    counts them as the cache's 16-bit bytes per token (the retrieval view's own, too); a session's
    estimate counts its cache's own blocks (int8 blocks: about half that)."""
    from triforce_chat.decoding.cache import KVCache
    from triforce_chat.decoding.memory.footprint import estimate, session_estimate
    from triforce_chat.decoding.models.loading import expects_prepared_blocks, load_model

    lm = load_model("smollm2-135m", log=lambda m: None)
    cache = KVCache.for_model(lm.model, max_len=512)
    expected = expects_prepared_blocks(lm.model.args.head_dim, None, "cpu")
    assert expected == (cache.blocks is not None) == (lm.model.attention in ("bf16", "int8"))
    assert not expects_prepared_blocks(lm.model.args.head_dim, torch.float32, "cpu")  # dense weights: fp32
    shape = ModelShape.from_args(lm.model.args)
    plain = estimate(shape, weights_bytes=1, context=4096, kv_dtype=torch.float16, budget="512")
    both = estimate(shape, weights_bytes=1, context=4096, kv_dtype=torch.float16, budget="512", prepared_blocks=True)
    assert both.parts["attention_blocks"] == plain.parts["kv_cache"] == 4096 * shape.kv_bytes_per_token(2)
    assert both.parts["retrieval_view"] == 2 * plain.parts["retrieval_view"] > 0
    s = Session(lm, DecodeConfig(level=0, max_new_tokens=4))
    s.add_document("doc.txt", DOC)
    list(s.generate("Who keeps the light?"))
    est = session_estimate(s, 4096)
    if expected:
        assert est.parts["attention_blocks"] == 4096 * s.cache.blocks_bytes_per_token <= both.parts["attention_blocks"]
        d = lm.model.args.head_dim  # an int8 block: d + 8 bytes per key, against 2 d in the 16-bit cache
        int8 = lm.model.attention == "int8"
        assert s.cache.blocks_bytes == (s.cache.used_bytes * (d + 8) // (2 * d) if int8 else s.cache.used_bytes) > 0
        assert max(s.cache.blocks.ready) > 0
    else:
        assert "attention_blocks" not in est.parts and s.cache.blocks_bytes == 0


def test_freed_memory_is_kept_for_the_next_step_where_the_c_library_is_glibc():
    """glibc takes the thresholds (decoding/memory/allocator.py); elsewhere the call says it did not."""
    import platform
    import sys

    from triforce_chat.decoding.memory.allocator import keep_freed_memory

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    assert keep_freed_memory() is glibc  # once per process; again is the same answer


def test_a_session_s_estimate_counts_the_drafters_heads_at_levels_1_and_2(tiny_model):
    """The middle level's head over part of the vocabulary (decoding/draft_head.py) holds its rows
    twice (as shipped, and packed in the int8 mode); level 0 has none."""
    from triforce_chat.decoding.memory.footprint import session_estimate

    for level in (0, 1):
        s = Session(tiny_model, DecodeConfig(level=level, max_new_tokens=4, budget="64"))
        s.add_document("doc.txt", DOC)
        list(s.generate("Who keeps the light?"))
        est = session_estimate(s, 4096)
        if level == 0:
            assert "draft_heads" not in est.parts
        else:
            rows = s.mid_head.size
            row_bytes = tiny_model.model.output.nbytes // tiny_model.model.args.vocab_size
            assert est.parts["draft_heads"] >= 2 * rows * row_bytes > 0


def test_the_cache_takes_memory_only_where_it_is_written():
    """The cache is reserved for the model's whole context (the 1.5B's 32K positions: 0.9 GB), and a
    chat over a few pages used to hold all of it resident from the start; now its pages come as rows
    are written, and rows never written read as zeros."""
    import psutil

    from triforce_chat.decoding.cache import KVCache

    process = psutil.Process()
    before = process.memory_info().rss
    cache = KVCache(2, 2, 64, 262_144, 0.125, dtype=torch.float16)  # 128 MiB each for keys and values
    assert cache.allocated_bytes == 256 * MIB
    assert process.memory_info().rss - before < 32 * MIB
    assert cache.k.dtype == torch.float16 and cache.k.shape == (2, 2, 262_144, 64)
    assert not cache.k[:, :, -4096:].any() and not cache.v[:, :, :4096].any()
    rows = torch.ones(65_536, 2, 64, dtype=torch.float16)
    before = process.memory_info().rss
    for layer in range(2):
        cache.write(layer, 0, rows, rows)  # a quarter of every layer: 64 MiB in all
    grown = process.memory_info().rss - before
    assert 48 * MIB < grown < 96 * MIB, grown / MIB
    assert cache.k[1, 1, 65_535].eq(1).all() and not cache.k[1, 1, 65_536].any()


def test_a_session_s_check_counts_the_cache_rows_a_prefill_will_write(tiny_model, monkeypatch):
    """The guard before a prefill counts the cache's rows it will write (and their prepared blocks),
    not only the parts that are allocated as they grow: the cache itself is now resident as it fills."""
    from triforce_chat.decoding.memory.guard import check_session

    s = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=4))
    s.add_document("doc.txt", DOC)
    list(s.generate("Who keeps the light?"))
    needs = []
    monkeypatch.setattr(memory, "fits", lambda need, available: needs.append(need) or True)
    at = s.cache.length
    for tokens in (at + 100, at + 1100):
        check_session(s, tokens, available=Available(1 << 40, "MemAvailable"))
    per_token = s.cache.bytes_per_token + s.cache.blocks_bytes_per_token
    assert needs[1] - needs[0] >= 1000 * per_token > 0  # (the other parts grow too: the lookup, the view)
