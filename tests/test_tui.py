"""Pilot tests of the chat app with the real Session and a small random-weight model."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from textual import events
from textual.widgets import Static

from triforce_chat.app.settings import Settings
from triforce_chat.app.ui.app import TriforceApp
from triforce_chat.app.ui.compute import compute_thread
from triforce_chat.app.ui.history import History
from triforce_chat.app.ui.widgets import AnswerMessage, ChatInput, UserMessage

SIZE = (160, 48)
DOC_TEXT = "\n".join(
    f"Section {i}. The lighthouse keeper on island {i} logs the weather at dawn, "
    f"and the ferry leaves at {i % 12 + 1}."
    for i in range(40)
)


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(DOC_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def history(tmp_path, monkeypatch) -> History:
    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    return History(tmp_path / "data")


def make_app(tiny_model, history, docs=(), **settings) -> TriforceApp:
    s = Settings(**{"max_new_tokens": 24, "budget": "256", **settings})
    return TriforceApp(s, list(docs), model=tiny_model, history=history)


async def wait_for(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)


def text_of(app, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def notices(app) -> list[str]:
    return [n.message for n in app._notifications]


def before_each_forward(monkeypatch, model, hook):
    """Every forward of `model` calls `hook()` first (a sleep, so that a job lasts long enough to be
    stopped; a record of its thread); returns the original forward. Patched on the class: a patch
    of the instance would leave it a `forward` of its own after the undo (monkeypatch restores what
    getattr saw), and later class-level patches would miss it."""
    forward = type(model).forward

    def hooked(self, *args, **kwargs):
        hook()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", hooked)
    return forward


async def ready(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.session is not None and not app.busy)


async def ask(pilot, question: str) -> AnswerMessage:
    app = pilot.app
    app.query_one(ChatInput).insert(question)
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.job is None and app.answers and app.answers[-1].finished)
    await pilot.pause(0.1)
    return app.answers[-1]


async def test_load_ask_answer_and_panels(tiny_model, history, doc):
    app = make_app(tiny_model, history, [doc], level=1)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        session = app.session
        assert [d.name for d in session.documents] == ["book.txt"]
        n_tokens = session.documents[0].n_tokens
        docs_text = text_of(app, "#documents")
        assert "book.txt" in docs_text and f"{n_tokens:,} tok" in docs_text
        assert f"of {session.max_context:,}" in docs_text
        assert session.cache.length > n_tokens  # the document was prefilled before the question

        answer = await ask(pilot, "When does the ferry leave island 3?")
        turn = session.turns[-1]
        assert turn.question == "When does the ferry leave island 3?"
        assert turn.answer and answer.text == turn.answer
        assert len(app.query(UserMessage)) == 1

        stats = session.stats.to_dict()
        body = text_of(app, "#stats-body")
        assert "Level 1" in body and session.chain_label() in body
        assert f"avg {stats['tokens_per_s']:6.1f}" in body
        assert f"ms/token {stats['ms_per_token']:7.1f}" in body
        assert f"Mean accepted length {stats['mean_accepted_length']:.2f}" in body
        if stats["acceptance"]["mid"] is not None:
            assert f"{100 * stats['acceptance']['mid']:4.0f}%" in body
        counts = stats["origin_counts"]
        assert (
            f"{stats['new_tokens']} tokens: low {counts['low']} mid {counts['mid']} target {counts['target']}"
            in body
        )
        fig = session.cache_figures()
        cache = text_of(app, "#cache")
        assert f"Full KV {fig.full_kv_tokens:,} tok" in cache
        assert (
            f"{fig.retrieval_budget_tokens:,} tok" in cache and f"chunk {fig.retrieval_chunk_size}" in cache
        )

        # multi-turn: the second question only prefills the new tokens
        before = session.cache.length
        await ask(pilot, "And island 4?")
        assert session.stats.prefill_tokens < 80 < before
        assert len(session.turns) == 2

        # the conversation was saved as it happened
        conv = history.load(history.resolve("last"))
        assert [t.question for t in conv.turns] == ["When does the ferry leave island 3?", "And island 4?"]
        assert conv.turns[0].answer == session.turns[0].answer and conv.turns[0].complete
        assert [d.name for d in conv.turns[0].documents] == ["book.txt"]


async def test_ctrl_t_changes_the_level_shown_and_used(tiny_model, history, doc):
    app = make_app(tiny_model, history, [doc], level=1)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await ask(pilot, "Where is the lighthouse?")
        assert "Level 1" in text_of(app, "#stats-body")
        await pilot.press("ctrl+t")  # 1 -> 2
        body = text_of(app, "#stats-body")
        assert "Level 2  (next answer)" in body and "suffix -> retrieval(256) -> target" in body
        await pilot.press("ctrl+t")  # 2 -> 0
        assert "Level 0  (next answer)" in text_of(app, "#stats-body")
        await pilot.press("ctrl+up", "alt+right")  # γ mid +1, budget x2: shown at once
        body = text_of(app, "#stats-body")
        assert "mid -" in body  # level 0 drafts nothing
        assert app.pending.gamma_mid == 7 and app.pending.budget == "512"
        await ask(pilot, "Who logs the weather?")
        assert app.session.stats.level == 0 and app.session.config.budget == "512"
        body = text_of(app, "#stats-body")
        assert "Level 0" in body and "(next answer)" not in body
        assert "target" in body.splitlines()[1]


async def start_a_slow_answer(pilot, monkeypatch, model) -> None:
    """Once the model is ready, ask for up to 400 tokens at 20 ms more a forward (8 s and more), and
    wait for the first 3: an answer underway, long enough to be stopped."""
    app = pilot.app
    await ready(pilot)
    before_each_forward(monkeypatch, model, lambda: time.sleep(0.02))
    app.query_one(ChatInput).insert("Tell me everything.")
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.answers and len(app.answers[-1].token_ids) >= 3)


async def test_escape_stops_generation_and_keeps_the_conversation(tiny_model, history, doc, monkeypatch):
    app = make_app(tiny_model, history, [doc], level=0, max_new_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await start_a_slow_answer(pilot, monkeypatch, tiny_model.model)
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.job is None and app.answers[-1].finished)
        session = app.session
        assert session.stats.stop_reason == "stopped"
        assert 3 <= session.stats.new_tokens < 400
        turn = session.turns[-1]
        assert app.answers[-1].text == turn.answer
        assert session.cache.length == len(session.context) - 1  # as if the answer ended there
        assert "stopped" in text_of(app, "#stats-body")
        # the next question works and builds on the stopped answer
        await ask(pilot, "Short answer please.")
        assert len(session.turns) == 2 and session.turns[0].answer == turn.answer


async def test_escape_cancels_a_slow_prefill(tiny_model, history, doc, monkeypatch):
    app = make_app(tiny_model, history, level=1)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        forward = before_each_forward(monkeypatch, tiny_model.model, lambda: time.sleep(0.5))
        app.session.config.prefill_chunk = 64
        app._start_prefill([doc])
        await wait_for(pilot, lambda: "Prefill book.txt" in text_of(app, "#load-label"))
        label = text_of(app, "#load-label")
        assert "/ " in label and "tokens" in label and "tok/s" in label and "ETA" in label
        assert app.query_one("#loadbar").display
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.job is None)
        assert any("loading cancelled" in m for m in notices(app))
        assert app.session.documents == [] and not app.query_one("#loadbar").display
        monkeypatch.setattr(type(tiny_model.model), "forward", forward)
        await ask(pilot, "Still there?")  # the session is usable after a cancelled load
        assert app.session.turns[-1].answer


async def test_paste_keeps_newlines_and_does_not_send(tiny_model, history):
    app = make_app(tiny_model, history, level=0)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        box = app.query_one(ChatInput)
        assert app.focused is box
        app.post_message(events.Paste("first line\nsecond line\n"))
        await pilot.pause(0.1)
        assert box.text == "first line\nsecond line\n"
        assert not app.query(UserMessage) and not app.session.turns and app.job is None
        await pilot.press("x", "ctrl+j", "y")  # ctrl+j inserts a newline, does not send
        assert box.text == "first line\nsecond line\nx\ny"
        assert not app.session.turns
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.job is None and app.session.turns and app.answers[-1].finished)
        assert app.session.turns[0].question == "first line\nsecond line\nx\ny"
        assert box.text == ""


async def test_bad_inputs_give_notices_not_tracebacks(tiny_model, history, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    app = make_app(
        tiny_model,
        history,
        [tmp_path / "missing.txt", empty, binary],
        level=0,
        theme="no-such",
        keymap={"no-such-binding": "f9"},
    )
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        msgs = " | ".join(notices(app))
        assert "missing.txt: no such file" in msgs
        assert "empty.txt: the document is empty" in msgs
        assert "blob.bin: looks like a binary file" in msgs
        assert "unknown theme 'no-such'" in msgs and app.theme == "triforce-dark"
        assert "unknown binding id no-such-binding" in msgs
        assert app.session.documents == []
        # the document picker: a bad path is a notice, the app keeps going
        await pilot.press("ctrl+o")
        await pilot.pause(0.1)
        await pilot.click("#document-path")
        for ch in str(tmp_path / "nope.txt"):
            await pilot.press(ch)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.job is None and any("nope.txt" in m for m in notices(app)))
        # an empty question does not send
        await pilot.press("space", "enter")
        await pilot.pause(0.1)
        assert not app.session.turns
        # export with nothing to export is a notice
        await pilot.press("ctrl+s")
        assert "nothing to export yet" in notices(app)[-1]
        assert app.is_running


async def test_keymap_from_settings_remaps_bindings(tiny_model, history):
    app = make_app(tiny_model, history, level=2, keymap={"cycle-level": "f9", "toggle-viz": "f8"})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+t")
        assert app.pending.level == 2  # the default key no longer cycles
        await pilot.press("f9")
        assert app.pending.level == 0 and "Level 0" in text_of(app, "#stats-body")
        await pilot.press("f8")
        assert app.viz and app.screen.has_class("-viz")
        await pilot.press("f1")
        await pilot.pause(0.1)
        help_text = str(app.screen.query_one("#help-text", Static).render())
        assert "f9" in help_text and "cycle-level" in help_text and "toggle-viz" in help_text


async def test_viz_export_new_chat_and_resume(tiny_model, history, doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(tiny_model, history, [doc], level=2)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+r")
        answer = await ask(pilot, "What does the keeper log?")
        session = app.session
        assert answer.origins == session.stats.token_origins
        viz = str(answer.query_one(".answer-viz", Static).render())
        assert viz.replace("\ufffd", "").strip() != ""
        rounds = str(answer.query_one(".answer-rounds", Static).render())
        assert rounds.startswith("#") and ("mid" in rounds or "target" in rounds)
        assert answer.query_one(".answer-viz").display and not answer.query_one(".answer-md").display
        await pilot.press("ctrl+s")
        exported = list(tmp_path.glob("triforce-chat-*.md"))
        assert len(exported) == 1
        md = exported[0].read_text()
        assert "What does the keeper log?" in md and session.turns[0].answer.strip()[:20] in md
        first_answer = session.turns[0].answer
        await pilot.press("ctrl+n")
        await pilot.pause(0.1)
        assert not app.query(UserMessage) and session.turns == []
        assert [d.name for d in session.pending_documents] == ["book.txt"]

    app2 = make_app(tiny_model, history, level=0)
    app2.resume = "last"
    async with app2.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app2.session is not None and not app2.busy and app2.answers)
        await wait_for(pilot, lambda: not app2.busy)
        s2 = app2.session
        assert [t.question for t in s2.turns] == ["What does the keeper log?"]
        assert s2.turns[0].answer == first_answer and app2.answers[0].text == first_answer
        assert s2.cache.length == len(s2.context) - 1 > 100  # document and turn prefilled again
        assert any(n.startswith("reopened conversation") and n.endswith("(1 turn)") for n in notices(app2))
        await ask(pilot, "One more?")
        conv = history.load(app2.conv_id)
        assert [t.question for t in conv.turns] == ["What does the keeper log?", "One more?"]


async def test_loading_prefill_and_answers_all_run_on_the_one_compute_thread(tiny_model, history, doc, monkeypatch):
    # torch's OpenMP keeps a pool of threads per thread that runs the model: two such threads on a
    # machine whose cores the pools fill made decoding 16-22% slower (app/ui/compute.py)
    from triforce_chat.app.ui import workers

    ran: dict[str, set[int]] = {}
    for name in ("load_session", "prefill_documents", "answer"):
        original = getattr(workers, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            ran.setdefault(_name, set()).add(threading.get_ident())
            return _original(*args, **kwargs)

        monkeypatch.setattr(workers, name, recorded)
    before_each_forward(monkeypatch, tiny_model.model,
                        lambda: ran.setdefault("forward", set()).add(threading.get_ident()))
    app = make_app(tiny_model, history, [doc], level=2)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await ask(pilot, "When does the ferry leave island 3?")
        await pilot.press("f2", "ctrl+t")  # sources expanded, level 0: what else the UI thread does
        await ask(pilot, "Who logs the weather?")
        await pilot.press("ctrl+n")
        await ask(pilot, "And the ferry?")
    assert set(ran) == {"load_session", "prefill_documents", "answer", "forward"}
    assert set().union(*ran.values()) == {compute_thread().ident}  # the UI's thread never runs the model


def wait_for_compute_idle(timeout: float = 60.0) -> None:
    """Returns once the compute thread has finished the job it runs (a test that hangs would stall
    the whole suite, so it fails after `timeout` instead)."""
    done = threading.Event()
    threading.Thread(target=lambda: (compute_thread().run(lambda: None), done.set()), daemon=True).start()
    assert done.wait(timeout), "the compute thread is still busy"


async def test_quitting_mid_answer_stops_the_answer_instead_of_waiting_for_it(tiny_model, history, doc, monkeypatch):
    app = make_app(tiny_model, history, [doc], level=0, max_new_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await start_a_slow_answer(pilot, monkeypatch, tiny_model.model)
        session = app.session
        await pilot.press("ctrl+q")
    wait_for_compute_idle()  # the answer's job has ended
    assert session.stats.stop_reason == "stopped" and 3 <= session.stats.new_tokens < 400


async def test_quitting_during_a_prefill_cancels_it(tiny_model, history, doc, monkeypatch):
    app = make_app(tiny_model, history, level=1)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        before_each_forward(monkeypatch, tiny_model.model, lambda: time.sleep(0.5))
        app.session.config.prefill_chunk = 64
        app._start_prefill([doc])
        await wait_for(pilot, lambda: "Prefill book.txt" in text_of(app, "#load-label"))
        session, job = app.session, app.job
        await pilot.press("ctrl+q")
    wait_for_compute_idle()  # the prefill's job has ended
    assert job.kind == "prefill" and job.cancel.is_set()
    assert session.documents == []  # a prefill that ran to its end would have added the document
    assert session.cache.length < session.last_sync.target  # stopped partway


async def test_side_panels_leave_a_narrow_terminal_to_the_conversation_and_f5_toggles_them(tiny_model, history):
    app = make_app(tiny_model, history)
    async with app.run_test(size=(80, 24)) as pilot:  # the classic terminal
        await ready(pilot)
        side, chat = app.query_one("#side"), app.query_one("#chat")
        assert not side.display and chat.size.width == 80
        await pilot.press("f5")
        await pilot.pause()
        assert side.display and chat.size.width < 40
        await pilot.press("f5")
        await pilot.pause()
        assert not side.display and chat.size.width == 80
    app = make_app(tiny_model, history)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        side = app.query_one("#side")
        assert side.display
        await pilot.press("f5")
        await pilot.pause()
        assert not side.display and app.query_one("#chat").size.width == SIZE[0]
        await pilot.resize_terminal(80, 24)  # hidden by hand, still hidden when it narrows and widens
        await pilot.pause()
        assert not side.display
        await pilot.resize_terminal(*SIZE)
        await pilot.pause()
        assert not side.display
        await pilot.press("f5")
        await pilot.pause()
        assert side.display


async def test_the_draft_view_shows_a_special_token_as_a_marker_not_its_markup(tiny_model, history):
    app = make_app(tiny_model, history)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        tokenizer = app.session.tokenizer
        eos = tokenizer.eos_token_id
        raw = tokenizer.decode([eos])
        assert raw.startswith("<") and raw.endswith(">")  # what the view showed before
        assert app._decode_one(eos) == "⟨" + raw.strip("<|>") + "⟩"
        word = tokenizer.encode("lighthouse", add_special_tokens=False)[0]
        assert app._decode_one(word) == tokenizer.decode([word])  # ordinary tokens as they are


async def test_a_model_that_cannot_load_keeps_saying_why(history, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(4096))  # the magic, then version 0
    app = TriforceApp(Settings(model=str(bad)), [], history=history)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.job is None and app.sub_title != "loading model …")
        assert app.session is None and app.sub_title == "no model loaded"
        cache = text_of(app, "#cache")  # there after the notice has timed out
        assert "no model loaded" in cache and "bad.gguf" in cache and "version 0" in cache
        app.query_one(ChatInput).insert("Hello?")
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert any(n.startswith("no model is loaded (cannot load the model") and "version 0" in n
                   for n in notices(app))
        assert app.query_one(ChatInput).text == "Hello?"


def test_history_survives_a_crash_mid_answer(history):
    writer = history.open_writer("c1")
    writer.meta("m")
    writer.document("a.txt", history.store_document("hello"), 1)
    writer.question("q?")
    writer.delta("partial ")
    writer.delta("answer")
    # no answer record, and a torn last line: as after a crash
    with history.path_of("c1").open("a") as f:
        f.write('{"type": "delta", "te')
    conv = history.load("c1")
    assert conv.turns[0].answer == "partial answer" and not conv.turns[0].complete
    assert history.document_text(conv.turns[0].documents[0].sha) == "hello"
    assert history.resolve("last") == "c1" and history.resolve("c") == "c1"
    with pytest.raises(KeyError):
        history.resolve("zzz")
    lines = [json.loads(x) for x in history.path_of("c1").read_text().splitlines()[:-1]]
    assert [r["type"] for r in lines] == ["meta", "document", "question", "delta", "delta"]


async def test_documents_panel_says_what_the_document_cache_did(tiny_model, history, doc, tmp_path):
    import itertools

    from triforce_chat.decoding.session import PrefillCancelled, Session
    from triforce_chat.decoding.store.docstore import DocumentStore

    store = DocumentStore(tmp_path / "kv", chunk_tokens=128)
    settings = Settings(max_new_tokens=24, budget="256")
    # an earlier start that was stopped after its first prefill step
    earlier = Session(tiny_model, settings.decode_config(), store=store)
    earlier.add_document(doc.name, doc.read_text())
    calls = itertools.count()
    with pytest.raises(PrefillCancelled):
        earlier.prefill(should_cancel=lambda: next(calls) >= 1)
    saved = earlier.last_sync.saved
    assert saved > 0

    async def start(**kw) -> tuple[str, list[str], int]:
        app = TriforceApp(kw.pop("settings", settings), [doc], model=tiny_model, history=history, **kw)
        labels: list[str] = []
        show = app._show_load
        app._show_load = lambda label, *rest: (labels.append(label), show(label, *rest))
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            return text_of(app, "#documents"), labels, app.session.last_sync.target

    panel, labels, target = await start(store=store)
    assert any(f"resuming at {saved:,} of {target:,} tokens" in label for label in labels)
    assert f"restored {saved:,} + prefilled {target - saved:,} tokens in" in panel
    assert panel.rstrip().endswith("(saved for next time)")

    panel, _, _ = await start(store=store)
    assert f"restored {target:,} tokens in" in panel and "prefilled" not in panel

    panel, _, _ = await start(settings=Settings(max_new_tokens=24, budget="256", doc_cache=False))
    assert f"prefilled {target:,} tokens in" in panel and "saved" not in panel


def test_the_decoding_panel_and_the_session_name_a_draft_model_chain_alike(tiny_model):
    """With `--draft MODEL` the session runs "suffix+MODEL -> ..." (the lookup drafts first): the panel
    names the next answer's chain the same way, so it does not claim a change that is not there."""
    from triforce_chat.app.ui.widgets import Pending, render_stats
    from triforce_chat.decoding.config import DecodeConfig
    from triforce_chat.decoding.session import Session
    from triforce_chat.decoding.stats import Stats

    session = Session(tiny_model, DecodeConfig(level=2, draft="qwen2.5-coder-0.5b", budget="4096"))
    pending = Pending(2, "qwen2.5-coder-0.5b", "4096", 6, 4)
    assert pending.chain == session.chain_label() == "suffix+qwen2.5-coder-0.5b -> retrieval(4096) -> target"
    last = Stats(level=2, chain=session.chain_label()).to_dict()
    assert "(next answer)" not in render_stats(last, pending).plain
    other = Stats(level=2, chain=Session(tiny_model, DecodeConfig(level=2, budget="4096")).chain_label()).to_dict()
    assert "(next answer)" in render_stats(other, pending).plain


@pytest.fixture
def held_prefill(monkeypatch):
    """Document prefills wait for `release.set()`: a load that takes as long as the test needs."""
    from triforce_chat.decoding.session import Session

    release = threading.Event()
    original = Session.prefill

    def held(self, *args, **kwargs):
        release.wait(30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Session, "prefill", held)
    yield release
    release.set()  # a test that failed before releasing it must not hold the compute thread for the next


async def queue_during_prefill(pilot, question: str) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.session is not None and app.job is not None and app.job.kind == "prefill")
    app.query_one(ChatInput).insert(question)
    await pilot.press("enter")
    await pilot.pause(0.1)


async def test_enter_during_a_prefill_queues_the_question_and_sends_it_when_the_document_is_ready(
    tiny_model, history, doc, held_prefill
):
    app = make_app(tiny_model, history, [doc], level=0)
    async with app.run_test(size=SIZE) as pilot:
        await queue_during_prefill(pilot, "When does the ferry leave island 3?")
        assert app.queued is not None and app.query_one(ChatInput).text == ""
        assert len(app.query(UserMessage)) == 1 and len(app.query(".queued-note")) == 1
        assert app.session.turns == [] and app.job.kind == "prefill"
        held_prefill.set()
        await wait_for(pilot, lambda: app.job is None and app.answers and app.answers[-1].finished)
        turn = app.session.turns[-1]
        assert turn.question == "When does the ferry leave island 3?" and turn.answer
        assert app.session.cache.length > app.session.documents[0].n_tokens  # answered after the document
        assert len(app.query(UserMessage)) == 1 and len(app.query(".queued-note")) == 0 and app.queued is None


async def test_escape_takes_a_queued_question_back_and_the_load_goes_on(tiny_model, history, doc, held_prefill):
    app = make_app(tiny_model, history, [doc], level=0)
    async with app.run_test(size=SIZE) as pilot:
        await queue_during_prefill(pilot, "Who logs the weather?")
        assert app.queued is not None
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert app.queued is None and app.query_one(ChatInput).text == "Who logs the weather?"
        assert len(app.query(UserMessage)) == 0 and len(app.query(".queued-note")) == 0
        assert app.job is not None and app.job.kind == "prefill" and not app.job.cancel.is_set()
        held_prefill.set()
        await ready(pilot)
        assert app.session.turns == [] and [d.name for d in app.session.documents] == ["book.txt"]
        assert any("queued question cancelled" in n for n in notices(app))
