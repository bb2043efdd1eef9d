"""The document cache: a restore is a prefill (the same bits, the same answers at every level),
shared prefixes, resuming an interrupted prefill, damaged files, a kill during a save."""

from __future__ import annotations

import itertools
import os
import pydoc_data.topics
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from triforce_chat.decoding.session import DecodeConfig, PrefillCancelled, Session
from triforce_chat.decoding.store.doccache import (
    SyncReport,
    compute_identity,
    describe,
    model_fingerprint,
    query_state,
    resuming_line,
)
from triforce_chat.decoding.store.docstore import (
    DATA_OFFSET,
    STALE_TEMP_S,
    DocumentStore,
    payload_crc32,
    read_chunk_header,
    write_chunk_file,
)

TOPICS = list(pydoc_data.topics.topics.values())
DOC_A = "\n\n".join(TOPICS[:6])[:5000]  # ~1,180 tokens
DOC_B = "\n\n".join(TOPICS[10:14])[:1500]
QUESTION = "What is it about?"
STEP, CHUNK = 64, 128  # prefill step and store chunk, small enough for many chunks per document


def config(level: int = 2, **kw) -> DecodeConfig:
    # adaptive=False: the route of every round is fixed, so that the drafts themselves (which
    # depend on the retrieval level's chunk means) can be compared, not only the output
    return DecodeConfig(level=level, max_new_tokens=16, budget="64", prefill_chunk=STEP, adaptive=False, **kw)


def store_at(path: Path, **kw) -> DocumentStore:
    return DocumentStore(path, chunk_tokens=CHUNK, **kw)


def opened(lm, store, docs, level: int = 2, **kw) -> Session:
    s = Session(lm, config(level, **kw), store=store)
    for name, text in docs:
        s.add_document(name, text)
    return s


def answer(s: Session) -> list[tuple]:
    """Every round: tokens, their origins and what each level proposed."""
    return [(ev.tokens, ev.origins, ev.mid_proposed, [(r.proposed, r.accepted) for r in ev.low_rounds])
            for ev in s.generate(QUESTION)]


def state(s: Session) -> list[torch.Tensor]:
    n = s.cache.length
    means = s.view.chunks
    return [s.cache.k[:, :, :n], s.cache.v[:, :, :n], query_state(s.cache),
            torch.stack([means.means(i) for i in range(s.cache.k.shape[0])])]


def assert_same_state(a: Session | Reference, b: Session) -> None:
    assert a.context == b.context and len(a.context) - 1 == b.cache.length
    for x, y in zip(a.state if isinstance(a, Reference) else state(a), state(b), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)  # bitwise


@pytest.fixture
def store(tmp_path) -> DocumentStore:
    return store_at(tmp_path / "kv")


DOCS_A = [("a.txt", DOC_A)]


@dataclass
class Reference:
    """A fresh prefill of DOCS_A (level 2, no store) and a store that saved the same."""

    context: list[int]
    state: list[torch.Tensor]
    answer: list[tuple]
    store_root: Path
    keys: list[str]
    tail: str

    def store_copy(self, folder: Path) -> DocumentStore:
        shutil.copytree(self.store_root, folder)
        return store_at(folder)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Reference:
    fresh = opened(tiny_model, None, DOCS_A)
    fresh.prefill()
    root = tmp_path_factory.mktemp("kv-reference")
    saver = opened(tiny_model, store_at(root), DOCS_A)
    saver.prefill()
    assert saver.last_sync.saved == saver.last_sync.target
    ref = Reference(list(fresh.context), [t.clone() for t in state(fresh)], [], root, saver.doc_cache._keys,
                    saver.doc_cache._tail_key)
    ref.answer = answer(fresh)
    return ref


@pytest.mark.parametrize("level", [0, 1, 2])
def test_a_restore_is_bitwise_a_prefill_and_answers_the_same(tiny_model, store, level):
    docs = [("a.txt", DOC_A)]
    fresh = opened(tiny_model, None, docs, level)
    fresh.prefill()
    saver = opened(tiny_model, store, docs, level)
    saver.prefill()
    assert saver.last_sync.saved == saver.last_sync.target == fresh.last_sync.target
    assert describe(saver.last_sync).endswith("(saved for next time)")

    restored = opened(tiny_model, store, docs, level)
    n, _ = restored.prefill()
    r = restored.last_sync
    assert (n, r.restored, r.computed) == (0, r.target, 0)  # the whole document set, nothing computed
    assert describe(r).startswith(f"restored {r.target:,} tokens in ")
    assert_same_state(fresh, restored)

    want = answer(fresh)
    assert answer(restored) == want
    assert restored.stats.restored_tokens == r.target
    assert restored.stats.prefill_tokens == len(restored.last_prompt_ids) - 1 == fresh.stats.prefill_tokens
    if level >= 1:  # the middle level really drafted from a selection of chunks
        assert restored.view.n_selected_chunks > 0 and any(rnd[2] for rnd in want)


def test_a_shared_prefix_is_restored_and_only_the_rest_prefilled(tiny_model, store):
    first = opened(tiny_model, store, [("a.txt", DOC_A)])
    first.prefill()
    both = [("a.txt", DOC_A), ("b.txt", DOC_B)]
    second = opened(tiny_model, store, both)
    second.prefill()
    r = second.last_sync
    ids_a, ids_ab = first.context, second.context
    common = next(i for i, (x, y) in enumerate(zip(ids_a, ids_ab, strict=False)) if x != y)
    assert r.restored == common // CHUNK * CHUNK > 0
    assert r.computed == r.target - r.restored and r.resumed
    fresh = opened(tiny_model, None, both)
    fresh.prefill()
    assert_same_state(fresh, second)
    assert answer(second) == answer(fresh)

    third = opened(tiny_model, store, both)  # the second session saved the rest
    third.prefill()
    assert (third.last_sync.restored, third.last_sync.computed) == (third.last_sync.target, 0)


@pytest.mark.parametrize("steps", [1, 4, 9])
def test_an_interrupted_prefill_resumes_from_its_last_chunk(tiny_model, store, reference, steps):
    docs = DOCS_A
    calls = itertools.count()
    first = opened(tiny_model, store, docs)
    with pytest.raises(PrefillCancelled):
        first.prefill(should_cancel=lambda: next(calls) >= steps)
    assert first.cache.length == steps * STEP
    saved = steps * STEP // CHUNK * CHUNK
    assert first.last_sync.saved == saved

    seen: list[SyncReport] = []
    resumed = opened(tiny_model, store, docs)
    resumed.prefill(on_restore=seen.append)
    r = resumed.last_sync
    assert (r.restored, r.computed) == (saved, r.target - saved)
    if saved:
        assert seen == [r] and resuming_line(r) == f"resuming at {saved:,} of {r.target:,} tokens"
    else:
        assert seen == []
    assert_same_state(reference, resumed)
    if steps == 4:  # the interrupted session itself carries on (the rest now comes from the store)
        first.prefill()
        done = first.last_sync
        assert done.kept == steps * STEP and done.restored == r.target - steps * STEP and done.computed == 0
        assert_same_state(reference, first)
    assert answer(resumed) == reference.answer


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGES = {
    "flipped payload byte": (lambda p, other: _flip(p, DATA_OFFSET + 1000), "payload checksum mismatch"),
    "flipped header byte": (lambda p, other: _flip(p, 40), "header checksum mismatch"),
    "truncated": (lambda p, other: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
    "other version": (
        lambda p, other: p.write_bytes(p.read_bytes()[:8] + struct.pack("<I", 99) + p.read_bytes()[12:]),
        "format version 99",
    ),
    "another chunk's file": (lambda p, other: shutil.copy(other, p), "key mismatch"),
    "empty": (lambda p, other: p.write_bytes(b""), "empty file"),
    "foreign": (lambda p, other: p.write_bytes(os.urandom(9000)), "not a document-cache file"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_chunk_is_discarded_with_a_notice_and_prefilled_again(tiny_model, reference, tmp_path, damage):
    store = reference.store_copy(tmp_path / "kv")
    keys = reference.keys
    spoil, reason = DAMAGES[damage]
    path = store.chunk_path(keys[2])
    spoil(path, store.chunk_path(keys[0]))

    s = opened(tiny_model, store, DOCS_A)
    s.prefill()
    r = s.last_sync
    assert (r.restored, r.computed) == (2 * CHUNK, r.target - 2 * CHUNK)
    [notice] = s.take_notices()
    assert reason in notice and f"{2 * CHUNK:,}-{3 * CHUNK:,}" in notice
    header, _ = read_chunk_header(path)  # the prefill saved it again, whole
    assert header["key"] == keys[2]
    assert_same_state(reference, s)
    assert answer(s) == reference.answer


def test_a_damaged_tail_costs_only_the_tail(tiny_model, reference, tmp_path):
    store = reference.store_copy(tmp_path / "kv")
    _flip(store.chunk_path(reference.tail), DATA_OFFSET + 10)
    s = opened(tiny_model, store, DOCS_A)
    s.prefill()
    r = s.last_sync
    assert r.restored == (r.target - 1) // CHUNK * CHUNK and r.computed == r.target - r.restored
    assert "payload checksum mismatch" in s.take_notices()[0]
    assert_same_state(reference, s)


def test_a_store_of_other_settings_is_not_served(tiny_model, reference, tmp_path):
    """Another prefill step rounds differently: its chunks have other names."""
    store = reference.store_copy(tmp_path / "kv")
    other = Session(tiny_model, DecodeConfig(prefill_chunk=32), store=store)
    other.add_document("a.txt", DOC_A)
    other.prefill()
    assert other.last_sync.restored == 0 and other.last_sync.computed == other.last_sync.target

    store = reference.store_copy(tmp_path / "kv2")
    changed = opened(tiny_model, store, DOCS_A)  # made with the saved step, changed before prefilling
    changed.config.prefill_chunk = 32
    changed.prefill()
    assert changed.last_sync.restored == 0
    assert_same_state(other, changed)


def test_the_fingerprint_covers_what_determines_the_bytes(tiny_model, tiny_model_dir, tmp_path):
    from triforce_chat.decoding.cache import KVCache
    from triforce_chat.decoding.models.loading import load_model

    cache = KVCache.for_model(tiny_model.model)

    def fp(lm=tiny_model, c=cache, step=512, chunk=1024):
        return model_fingerprint(lm, c, prefill_chunk=step, chunk_tokens=chunk).hex

    base = fp()
    assert fp() == base  # stable
    assert fp(step=256) != base and fp(chunk=2048) != base
    a = tiny_model.model.args
    half = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, tiny_model.model.max_len, 1.0, dtype=torch.bfloat16)
    assert fp(c=half) != base  # the KV dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert fp() != base  # the prefill GEMMs split their sums by thread count
    finally:
        torch.set_num_threads(threads)
    longer = load_model(str(tiny_model_dir), context=4096)  # YaRN: other positions and RoPE tables
    assert fp(lm=longer, c=KVCache.for_model(longer.model)) != base
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    moved = load_model(str(copy))
    first = fp(lm=moved)
    assert first != base  # another file
    weights = next(Path(copy).glob("*.safetensors"))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert fp(lm=moved) != first  # the file was rewritten


def test_a_thread_invariant_model_s_cache_is_the_same_at_any_thread_count():
    """Where every operation of a forward is a native kernel at any length (the int8 mode:
    Transformer.thread_invariant, checked against real prefills in tests/test_native_int8.py), a
    document cached at one thread count is restored at another; elsewhere the thread count is part
    of the key, since a vendor GEMM splits its sums by it."""
    from types import SimpleNamespace

    def identity(invariant: bool, threads: int) -> dict:
        model = SimpleNamespace(device=torch.device("cpu"), numerics="native-test", thread_invariant=invariant)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return compute_identity(model)
        finally:
            torch.set_num_threads(previous)

    assert identity(True, 1) == identity(True, 2)
    assert identity(False, 1) != identity(False, 2)


def test_a_writer_killed_during_a_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "chunks" / "ab" / ("ab" * 20 + ".kv")
    write_chunk_file(path, {"key": "old"}, [b"\x01" * 20000])
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from triforce_chat.decoding.store.docstore import write_chunk_file

        def blocks():
            yield b"\\x02" * 1_000_000
            Path({str(marker)!r}).touch()
            time.sleep(60)
            yield b"\\x02"

        write_chunk_file(Path({str(path)!r}), {{"key": "new"}}, blocks())
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
    finally:
        child.kill()  # SIGKILL: no cleanup runs
        child.wait()
    header, size = read_chunk_header(path)
    assert header["key"] == "old" and size == DATA_OFFSET + 20000
    assert payload_crc32(path.read_bytes()[DATA_OFFSET:]) == header["payload_crc32"]
    [temp] = list(path.parent.glob(".tmp-*"))  # the killed writer's part, never under the real name
    later = DocumentStore(tmp_path, clock=lambda: time.time() + 2 * STALE_TEMP_S)
    assert later.usage() == size and not temp.exists()  # left-overs are cleaned up
