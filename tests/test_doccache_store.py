"""The document cache's space and commands: least-recently-used eviction under the cap, the cap
during a real prefill, `cache ls / rm / clear`, and `ask --json` restoring its documents."""

from __future__ import annotations

import json
import os

import pytest
import torch

from test_cli import run_cli
from triforce_chat.decoding.store.docstore import DATA_OFFSET, DocumentStore, Entry, write_chunk_file

PAYLOAD = 1000
FILE = DATA_OFFSET + PAYLOAD  # the size of every chunk file here


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def key(i: int) -> str:
    return f"{i:040x}"


def put_chunk(store: DocumentStore, k: str, mtime: float | None = None) -> None:
    path = store.chunk_path(k)
    write_chunk_file(path, {"key": k}, [bytes(PAYLOAD)])
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def put_entry(store: DocumentStore, clock: Clock, eid: str, chunks: list[str], at: float, docs=("d.txt",)) -> Entry:
    for k in chunks:
        if not store.has_chunk(k):
            put_chunk(store, k)
    clock.now = at
    return store.touch_entry(Entry(id=eid, model="tiny", documents=list(docs), tokens=4 * len(chunks),
                                   chunk_tokens=4, chunks=chunks))


def ids(store: DocumentStore) -> list[str]:
    return [e.id for e in store.entries()[0]]


def test_eviction_takes_orphans_then_the_least_recently_used_entries(tmp_path):
    clock = Clock()
    store = DocumentStore(tmp_path, max_bytes=6 * FILE, chunk_tokens=4, clock=clock)
    e1, e2, e3 = (f"{i:016x}" for i in (1, 2, 3))
    put_entry(store, clock, e1, [key(1), key(2)], at=1_000_001)
    put_entry(store, clock, e2, [key(3), key(4)], at=1_000_002)
    put_entry(store, clock, e3, [key(3), key(5)], at=1_000_003)  # shares a chunk with e2
    put_entry(store, clock, e1, [key(1), key(2)], at=1_000_004)  # e1 used again: now the most recent
    put_chunk(store, key(6), mtime=100.0)  # a chunk no entry refers to
    assert store.usage() == 6 * FILE and ids(store) == [e1, e3, e2]

    assert store.reserve(FILE)  # the orphan goes first
    assert not store.has_chunk(key(6)) and ids(store) == [e1, e3, e2]

    assert store.reserve(2 * FILE, protect=e2)  # then the least recently used entry, never `protect`
    assert ids(store) == [e1, e2]
    assert not store.has_chunk(key(5)) and store.has_chunk(key(3))  # e2 still uses the shared chunk
    assert store.usage() == 4 * FILE

    assert not store.reserve(10 * FILE, protect=e2)  # impossible: everything else goes, e2 stays
    assert ids(store) == [e2] and store.has_chunk(key(3)) and store.has_chunk(key(4))


def test_a_restore_marks_its_entry_used(tiny_model, tmp_path):
    from triforce_chat.decoding.session import DecodeConfig, Session

    clock = Clock()
    store = DocumentStore(tmp_path, chunk_tokens=64, clock=clock)

    def load(name: str, text: str, at: float) -> None:
        clock.now = at
        s = Session(tiny_model, DecodeConfig(prefill_chunk=64), store=store)
        s.add_document(name, text)
        s.prefill()

    load("x.txt", "The keeper logs the weather at dawn. " * 20, 1_000_001)
    load("y.txt", "The ferry leaves island three at four. " * 20, 1_000_002)
    assert [e.documents for e in store.entries()[0]] == [["y.txt"], ["x.txt"]]
    load("x.txt", "The keeper logs the weather at dawn. " * 20, 1_000_003)  # restored: used now
    entries = store.entries()[0]
    assert [e.documents for e in entries] == [["x.txt"], ["y.txt"]]
    assert entries[0].last_used == 1_000_003 and entries[0].created == 1_000_001


def test_a_chat_without_documents_saves_nothing(tiny_model, tmp_path):
    from triforce_chat.decoding.session import DecodeConfig, Session

    store = DocumentStore(tmp_path, chunk_tokens=64)
    s = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=4, prefill_chunk=64), store=store)
    list(s.generate("Tell me a long story about a lighthouse keeper and the weather at dawn. " * 8))
    assert s.last_sync.computed > 64 and s.last_sync.saved == 0
    assert store.usage() == 0 and store.entries() == ([], [])


def test_the_cap_stops_saving_with_a_notice_and_the_answer_is_unchanged(tiny_model, tmp_path):
    from triforce_chat.decoding.session import DecodeConfig, Session

    text = "Section {i}. The lighthouse keeper on island {i} logs the weather at dawn.\n"
    doc = "".join(text.format(i=i) for i in range(60))
    per_chunk = DATA_OFFSET + 128 * tiny_model.model.args.n_layers * 2 * tiny_model.model.args.n_kv_heads * \
        tiny_model.model.args.head_dim * torch.empty(0, dtype=tiny_model.model.kv_dtype).element_size()
    store = DocumentStore(tmp_path, max_bytes=int(3.5 * per_chunk), chunk_tokens=128)

    def session(with_store: bool) -> Session:
        s = Session(tiny_model, DecodeConfig(level=2, max_new_tokens=12, prefill_chunk=64, budget="64"),
                    store=store if with_store else None)
        s.add_document("book.txt", doc)
        s.prefill()
        return s

    capped = session(True)
    assert capped.last_sync.saved == 3 * 128 < capped.last_sync.target
    [notice] = capped.take_notices()
    assert "cap of" in notice and "cache.max_gb" in notice
    assert store.usage() <= store.max_bytes
    again = session(True)
    assert again.last_sync.restored == 3 * 128
    fresh = session(False)
    want = [t for ev in fresh.generate("Who logs the weather?") for t in ev.tokens]
    assert [t for ev in again.generate("Who logs the weather?") for t in ev.tokens] == want


# -- the commands ------------------------------------------------------------------------------------------
@pytest.fixture
def kv_dir(tmp_path, monkeypatch):
    folder = tmp_path / "kv"
    monkeypatch.setenv("TRIFORCE_KV_CACHE_DIR", str(folder))
    monkeypatch.setenv("TRIFORCE_CHAT_CONFIG", str(tmp_path / "none.toml"))
    return folder


def test_cache_ls_rm_clear(kv_dir, monkeypatch, capsys):
    clock = Clock()
    store = DocumentStore(kv_dir, chunk_tokens=4, clock=clock)
    a, b, c = "aaaa000000000001", "aaaa000000000002", "bbbb000000000003"
    put_entry(store, clock, a, [key(1), key(2)], at=1_700_000_000, docs=["book.txt", "notes.txt"])
    put_entry(store, clock, b, [key(1), key(3)], at=1_700_000_100, docs=["evil\x1b[31m.txt"])
    put_entry(store, clock, c, [key(4), key(5)], at=1_700_000_200, docs=["other.txt"])
    store.chunk_path(key(5)).unlink()  # c is partial: its second chunk is not saved (yet)

    code, out, err = run_cli(monkeypatch, capsys, "cache", "ls")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TOKENS", "SIZE", "LAST", "USED", "MODEL", "DOCUMENTS"]
    assert [line.split()[0] for line in lines[1:4]] == [c, b, a]  # most recently used first
    row_a = lines[3]
    assert "8" in row_a.split() and "book.txt, notes.txt" in row_a and "tiny" in row_a and "MiB" in row_a
    assert "4 of 8 (partial)" in lines[1]
    assert "\x1b" not in out and "evil?[31m.txt" in out  # no terminal escape from a file name
    assert lines[-1].startswith("3 entries, ") and "cache.max_gb" in lines[-1] and str(kv_dir) in lines[-1]

    code, out, _ = run_cli(monkeypatch, capsys, "cache", "ls", "--json")
    data = json.loads(out)
    assert code == 0 and [e["id"] for e in data["entries"]] == [c, b, a]
    assert data["entries"][2]["saved_tokens"] == 8 and data["used_bytes"] == 4 * FILE

    code, out, err = run_cli(monkeypatch, capsys, "cache", "rm", "aaaa")
    assert code == 2 and out == "" and err.count("\n") == 1 and "matches several entries" in err
    code, out, err = run_cli(monkeypatch, capsys, "cache", "rm", "cccc")
    assert code == 2 and err.startswith("error: no document cache entry matches 'cccc'")

    code, out, err = run_cli(monkeypatch, capsys, "cache", "rm", "aaaa0000000000010")  # too long: no match
    assert code == 2
    code, out, err = run_cli(monkeypatch, capsys, "cache", "rm", a)
    assert code == 0 and out.startswith(f"removed {a} (book.txt, notes.txt;")
    assert not store.has_chunk(key(2)) and store.has_chunk(key(1))  # b still uses chunk 1
    assert ids(store) == [c, b]

    code, out, err = run_cli(monkeypatch, capsys, "cache", "clear")
    assert code == 0 and out.startswith("removed 2 entries (") and store.usage() == 0 and ids(store) == []
    code, out, _ = run_cli(monkeypatch, capsys, "cache", "clear")
    assert code == 0 and out.startswith("the document cache is already empty")
    code, out, _ = run_cli(monkeypatch, capsys, "cache", "ls")
    assert code == 0 and out.startswith("the document cache is empty")
    code, out, _ = run_cli(monkeypatch, capsys, "cache")
    assert code == 0 and all(cmd in out for cmd in ("ls", "rm", "clear"))


def test_cache_commands_report_a_bad_config_in_one_line(kv_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "cfg.toml").write_text("[cache]\nmax_gb = 0\n")
    code, out, err = run_cli(monkeypatch, capsys, "cache", "ls", "--config", str(tmp_path / "cfg.toml"))
    assert code == 2 and "line 2" in err and "max_gb" in err and err.count("\n") == 1


def test_ask_json_restores_its_documents_the_second_time(kv_dir, monkeypatch, capsys, tiny_model_dir, tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text("The lighthouse keeper on Farrow Island is Amelia Stroud. The boat is green.\n" * 30)
    args = ["ask", "--doc", str(doc), "--model", str(tiny_model_dir), "-n", "9", "--level", "2", "--json",
            "--dtype", "float32", "Who keeps the light?"]
    runs = []
    for extra in ([], [], ["--no-doc-cache"]):
        code, out, err = run_cli(monkeypatch, capsys, *args, *extra)
        assert code == 0, err
        runs.append(json.loads(out))
    first, second, off = (r["stats"] for r in runs)
    prompt = len(runs[0]["prompt_token_ids"]) - 1
    assert first["prefill_tokens"] == second["prefill_tokens"] == off["prefill_tokens"] == prompt
    assert first["restored_tokens"] == 0 and 0 < first["saved_tokens"] < prompt  # the documents
    assert second["restored_tokens"] == first["saved_tokens"] and second["saved_tokens"] == 0
    assert off["restored_tokens"] == off["saved_tokens"] == 0
    assert runs[0]["token_ids"] == runs[1]["token_ids"] == runs[2]["token_ids"]
    assert runs[0]["text"] == runs[1]["text"]

    code, out, err = run_cli(monkeypatch, capsys, "cache", "ls")
    assert code == 0 and "notes.txt" in out and str(tiny_model_dir) in out


def test_the_benchmark_reports_restore_against_prefill(tiny_model, tmp_path):
    """The figures the lead runs the benchmark for (no timing is asserted here)."""
    from triforce_chat.app.bench.doccache import format_report, run
    from triforce_chat.decoding.session import DecodeConfig

    doc = "".join(f"Section {i}. The ferry leaves island {i} at {i % 12 + 1}.\n" for i in range(80))
    cfg = DecodeConfig(level=2, max_new_tokens=8, prefill_chunk=64, budget="64")
    r = run(tiny_model, cfg, "book.txt", doc, tmp_path / "kv", chunk_tokens=128)
    assert r["identical"] and r["answer_tokens"] == 8
    assert r["saved_tokens"] == r["tokens"] == r["restore_warm"]["restored_tokens"] == r["restore_cold"][
        "restored_tokens"]
    assert r["restore_warm"]["computed_tokens"] == 0 and r["chunk_tokens"] == 128
    assert r["file_bytes"] > r["tokens"] * r["bytes_per_token"] and r["files"] == r["tokens"] // 128 + 1
    for key in ("prefill_s", "prefill_with_save_s", "save_overhead_wall", "save_overhead_thread", "writer_s",
                "chunk_means_s", "lookup_index_s"):
        assert isinstance(r[key], float)
    text = format_report(r)
    for words in ("file size", "prefill (no store)", "save overhead", "restore (warm page cache)",
                  "restore (pages dropped)", "GB/s", "identical to the answer after prefill: yes"):
        assert words in text


def test_the_benchmark_command_runs_end_to_end(tiny_model_dir, tmp_path, capsys):
    """`python -m triforce_chat.app.bench.doccache` itself: its options reach Settings and the loader."""
    from triforce_chat.app.bench.doccache import main

    doc = tmp_path / "book.txt"
    doc.write_text("".join(f"Section {i}. The ferry leaves island {i} at {i % 12 + 1}.\n" for i in range(60)))
    code = main(["--model", str(tiny_model_dir), "--doc", str(doc), "--tokens", "400", "--context", "1024",
                 "--weights", "float32", "--kv-dtype", "float32", "--max-new-tokens", "4", "--store",
                 str(tmp_path / "store"), "--no-cold", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["identical"] and r["answer_tokens"] == 4 and r["saved_tokens"] == r["tokens"] > 0
