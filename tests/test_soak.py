"""Long sessions: a hundred scripted turns on a small random model, and many turns in the app.

What must hold after warm-up: resident memory flat, nothing that grows per answer (events, stats,
cost tables, drafter state, kernel scratch), no leaked threads or open files, and the KV cache
holding exactly the conversation but its pending token at every turn. Session.turns grows by
design (it is the transcript), but the transcript is re-rendered into every prompt, so it is
bounded by the context: the test checks that bound too.
"""

from __future__ import annotations

import gc
import pydoc_data.topics
import threading
import time

import psutil
import pytest

from triforce_chat.decoding.session import DecodeConfig, Session

pytestmark = pytest.mark.slow  # ~20-40 s on a 2-core machine; runs in CI with everything else

TOPICS = [text for text in pydoc_data.topics.topics.values() if len(text) > 1500]
MIB = 1024 * 1024


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def open_files() -> int:
    return len(psutil.Process().open_files())


def check_invariants(s: Session) -> None:
    """The accounting every turn must keep exactly."""
    assert s.cache.length == len(s.context) - 1
    assert s.context[: len(s.last_prompt_ids)] == s.last_prompt_ids
    assert s.context[len(s.last_prompt_ids) :] == s.turns[-1].token_ids
    if s._drafter is not None:
        held = list(s._drafter.tokens)
        assert len(held) == s._drafter.length <= s.max_context
        if s.stats.level == 2:  # synced lazily, by the next answer at level 2
            assert held == s.context[: len(held)]
    if not s.view.stale:  # (a stale view is rebuilt before its next use)
        assert s.view.sel_end <= s.view.copied_end <= s.cache.length
    assert 0 <= s.cache_figures().retrieval_recent_tokens <= s.cache.length


def growth_sizes(s: Session) -> dict[str, int]:
    """Sizes of everything that could grow with the number of answers."""
    return {
        "cost_tables": len(s._windows.verify) + len(s._costs),
        "view_buffer": s.view.buffer_bytes,
        "drafter_ctx": s._drafter.length if s._drafter is not None else 0,
        "token_origins": len(s.stats.token_origins),
        "rates": len(s.stats.recent_tokens_per_s),
        "listeners": len(s.cache.listeners),
    }


def test_a_hundred_turns_stay_flat(tiny_model):
    s = Session(tiny_model, DecodeConfig(level=2, max_new_tokens=8, budget="64"))
    threads0 = {t.ident for t in threading.enumerate()}
    files0 = open_files()
    sizes: dict[int, dict[str, int]] = {}
    memory: dict[int, int] = {}
    for turn in range(100):
        if turn % 10 == 0:  # documents removed and others added: a new chat over new documents
            s.new_chat()
            s.pending_documents = []
            for k in range(1 + turn % 3):
                s.add_document(f"doc{turn}-{k}.txt", TOPICS[(turn + k) % len(TOPICS)][:1200])
        s.set_level(turn % 3)
        tokens = [t for ev in s.generate(f"Question {turn}: what does it say?") for t in ev.tokens]
        assert len(tokens) == 8 or s.stats.stop_reason == "eos"
        check_invariants(s)
        assert s.stats.rounds <= 8 and len(s.stats.token_origins) == len(tokens)
        assert len(s.turns) == turn % 10 + 1  # only the current chat's turns are kept
        assert len(s.context) <= s.max_context
        if turn in (9, 99):
            memory[turn] = rss()
            sizes[turn] = growth_sizes(s)
    growth = memory[99] - memory[9]
    assert growth < 0.05 * memory[9] + 8 * MIB, f"RSS grew {growth / MIB:.1f} MiB from turn 10 to 100"
    # nothing per answer accumulates: the tables are as large at turn 100 as at turn 10 (cost
    # tables hold one entry per window length, scratch and buffers grow with the context only)
    for key in ("cost_tables", "listeners"):
        assert sizes[99][key] <= sizes[9][key] + 3, (key, sizes)
    for key in ("token_origins", "rates"):
        assert sizes[99][key] <= 8, (key, sizes)
    assert sizes[99]["view_buffer"] <= max(sizes[9]["view_buffer"], 2 * MIB)
    assert {t.ident for t in threading.enumerate()} <= threads0
    assert open_files() <= files0


async def test_many_turns_in_the_app_keep_widgets_threads_and_files_bounded(tiny_model, tmp_path, monkeypatch):
    from test_tui import ask, make_app, ready
    from triforce_chat.app.ui.history import History

    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    doc = tmp_path / "doc.txt"
    doc.write_text(TOPICS[0][:1500], encoding="utf-8")
    app = make_app(tiny_model, History(tmp_path / "data"), [doc], level=2, max_new_tokens=6)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        counts: dict[int, tuple[int, int, int]] = {}
        for turn in range(24):
            if turn and turn % 8 == 0:
                await pilot.press("ctrl+n")  # new chat: the transcript's widgets go
                await pilot.pause(0.05)
            if turn % 3 == 2:
                await pilot.press("ctrl+t")
            await ask(pilot, f"Question {turn}?")
            session = app.session
            check_invariants(session)
            if turn in (7, 15, 23):
                await pilot.pause(0.2)
                counts[turn] = (len(list(app.query("*"))), threading.active_count(), open_files())
        assert app.answers_done == 24 and len(app.answer_timings) == 24
        assert len(app.answers) == 8 and len(session.turns) == 8
        widgets0, threads0, files0 = counts[7]
        for turn in (15, 23):
            widgets, threads, files = counts[turn]
            assert widgets <= widgets0 + 5, counts  # each chat of 8 turns needs the same widgets
            assert threads <= threads0 + 1, counts  # workers end with their answer
            assert files <= files0, counts  # one history file open at a time
        deadline = time.monotonic() + 10
        while len(app._notifications) > 20 and time.monotonic() < deadline:
            await pilot.pause(0.2)
        assert len(app._notifications) <= 20  # notices expire
