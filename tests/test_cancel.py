"""Cancel at any token: a stop at any moment of an answer (mid-prefill, mid-draft, mid-verification,
mid-retrieval-rebuild) leaves the session exactly as if the answer had ended at its last token.

The check is behavioural: after the stop, the next answer must be token-identical to the one a
fresh session fed the same transcript gives, and to the one a session that stopped cleanly at the
same length (max_new_tokens) gives. Greedy decoding, so that every route the adaptive decoder may
take gives the same tokens (losslessness), and any difference is the session's state.
"""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from triforce_chat.decoding.retrieval import RetrievalView
from triforce_chat.decoding.session import DecodeConfig, PrefillCancelled, Session, Turn

DOC = "\n\n".join(list(pydoc_data.topics.topics.values())[:2])[:2500]
QUESTION = "Tell me everything about it."
FOLLOW_UP = "And then?"


def new_session(lm, level: int, max_new: int = 40) -> Session:
    s = Session(lm, DecodeConfig(level=level, max_new_tokens=max_new, budget="64"))
    s.add_document("doc.txt", DOC)
    return s


def tokens(session: Session, question: str, **kwargs) -> list[int]:
    return [t for ev in session.generate(question, **kwargs) for t in ev.tokens]


def follow_up_of_fresh_session(lm, level: int, turns: list[Turn], max_new: int = 12) -> list[int]:
    fresh = Session(lm, DecodeConfig(level=level, max_new_tokens=max_new, budget="64"))
    fresh.turns = [Turn(t.question, t.documents, t.answer) for t in turns]
    return tokens(fresh, FOLLOW_UP)


def follow_up_of_clean_stop(lm, level: int, n: int, max_new: int = 12) -> tuple[list[int], list[int]]:
    """A session whose first answer ended cleanly after n tokens (max_new_tokens), then the follow-up."""
    clean = new_session(lm, level, max_new=max(1, n))
    first = tokens(clean, QUESTION) if n else []
    if not n:  # a stop before the first token: an empty answer
        clean.turns.append(Turn(QUESTION, clean.pending_documents, ""))
        clean.pending_documents = []
    clean.config.max_new_tokens = max_new
    return first, tokens(clean, FOLLOW_UP)


def assert_as_if_ended_there(lm, level: int, stopped: Session, full: list[int]) -> None:
    turn = stopped.turns[-1]
    n = len(turn.token_ids)
    assert turn.token_ids == full[:n]  # the answer so far is exactly the uninterrupted one's prefix
    assert stopped.cache.length == len(stopped.context) - 1
    stopped.config.max_new_tokens = 12
    after = tokens(stopped, FOLLOW_UP)
    assert after == follow_up_of_fresh_session(lm, level, stopped.turns[:1])
    first, clean_after = follow_up_of_clean_stop(lm, level, n)
    assert first == turn.token_ids and after == clean_after


class CallCounter:
    """Calls `stop` on the n-th call of the wrapped function (then calls it through)."""

    def __init__(self, fn, n: int, stop):
        self.fn, self.n, self.stop, self.calls = fn, n, stop, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            self.stop()
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("level", [1, 2])
def test_stop_injected_inside_the_decoder_at_random_points(tiny_model, monkeypatch, level):
    """The stop lands inside a forward pass (a prefill chunk, a middle-level draft step, a
    verification window) or inside a retrieval rebuild, at seeded random points."""
    full = tokens(new_session(tiny_model, level), QUESTION)
    assert len(full) == 40
    rng = random.Random(1400 + level)
    forward = type(tiny_model.model).forward
    rebuild = RetrievalView.rebuild
    points = [("forward", k) for k in sorted(rng.sample(range(1, 40), 3))] + [("rebuild", rng.randint(1, 2))]
    for where, k in points:
        s = new_session(tiny_model, level)
        s.prefill()
        with monkeypatch.context() as patch:  # (undoes only these patches, not the fixtures' environment)
            if where == "forward":
                counter = CallCounter(forward, k, s.stop)
                patch.setattr(type(tiny_model.model), "forward", lambda self, *a, c=counter, **kw: c(self, *a, **kw))
            else:
                counter = CallCounter(rebuild, k, s.stop)
                patch.setattr(RetrievalView, "rebuild", lambda self, c=counter: c(self))
            answer = tokens(s, QUESTION)
        if counter.calls >= k:  # the stop happened: the answer ended at the end of that round
            assert s.stats.stop_reason == "stopped" and len(answer) < 40, (where, k)
        assert_as_if_ended_there(tiny_model, level, s, full)


def test_stop_from_another_thread_at_random_times(tiny_model, monkeypatch):
    """As the TUI does it: Escape sets a flag from the UI thread while the worker decodes."""
    level = 2
    forward = type(tiny_model.model).forward

    def slow_forward(self, *args, **kwargs):  # a few milliseconds a forward: stops land anywhere
        time.sleep(0.003)
        return forward(self, *args, **kwargs)

    s = new_session(tiny_model, level)
    s.prefill()
    with monkeypatch.context() as patch:
        patch.setattr(type(tiny_model.model), "forward", slow_forward)
        t0 = time.perf_counter()
        full = tokens(s, QUESTION)
        duration = time.perf_counter() - t0
    rng = random.Random(14)
    stopped_early = 0
    for _ in range(4):
        s = new_session(tiny_model, level)
        s.prefill()
        cancel = threading.Event()
        timer = threading.Timer(rng.uniform(0.0, duration), cancel.set)
        with monkeypatch.context() as patch:
            patch.setattr(type(tiny_model.model), "forward", slow_forward)
            timer.start()  # may fire before the answer starts, during the question's prefill or while decoding
            try:
                try:
                    tokens(s, QUESTION, should_cancel=cancel.is_set)
                except PrefillCancelled:
                    pass
            finally:
                timer.cancel()
        if not s.turns:  # stopped during the question's prefill: the question never reached the model
            assert s.cache.length == len(s.context) - 1 and [d.name for d in s.pending_documents] == ["doc.txt"]
            assert tokens(s, QUESTION) == full  # and asking again is as if nothing had happened
            continue
        stopped_early += len(s.turns[-1].token_ids) < 40
        assert_as_if_ended_there(tiny_model, level, s, full)
    assert stopped_early >= 1


async def test_escape_in_the_app_at_random_points(tiny_model, tmp_path, monkeypatch):
    from test_tui import ask, make_app, ready, wait_for
    from triforce_chat.app.ui.history import History
    from triforce_chat.app.ui.widgets import ChatInput

    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC, encoding="utf-8")
    from triforce_chat.decoding.speculative import SpeculativeDecoder

    run_route = SpeculativeDecoder._run_route

    def slow_round(self, *args, **kwargs):  # long enough that no answer ends before the escape
        time.sleep(0.01)
        return run_route(self, *args, **kwargs)

    rng = random.Random(7)
    for _ in range(2):
        app = make_app(tiny_model, History(tmp_path / "data"), [doc], level=2, max_new_tokens=200, budget="64")
        async with app.run_test(size=(160, 48)) as pilot:
            await ready(pilot)
            monkeypatch.setattr(SpeculativeDecoder, "_run_route", slow_round)
            app.query_one(ChatInput).insert(QUESTION)
            await pilot.press("enter")
            await pilot.pause(rng.uniform(0.05, 0.6))
            await pilot.press("escape")
            await wait_for(pilot, lambda app=app: app.job is None and app.answers and app.answers[-1].finished)
            # (not monkeypatch.undo(): that would also undo the fixtures' environment, and the next app
            # would save its prefill into the user's real document cache)
            monkeypatch.setattr(SpeculativeDecoder, "_run_route", run_route)
            s = app.session
            if not s.turns:  # stopped while the question was prefilled: it is back in the input
                assert app.query_one(ChatInput).text == QUESTION and not app.answers
                continue
            turn = s.turns[-1]
            assert s.stats.stop_reason == "stopped" and len(turn.token_ids) < 200
            assert app.answers[-1].text == turn.answer  # what is shown is what the session holds
            assert s.cache.length == len(s.context) - 1
            app.session.config.max_new_tokens = 12
            app.pending.level = 2
            await ask(pilot, FOLLOW_UP)
            assert s.turns[-1].token_ids == follow_up_of_fresh_session(tiny_model, 2, s.turns[:1])


# -- ask: ctrl-c --------------------------------------------------------------------------------------
def run_ask_in_process(monkeypatch, capsys, tiny_model, doc_path, *extra: str, sigint_at: int | None = None):
    """`main()` for ask, with the tiny model, raising SIGINT at the n-th forward call."""
    from cli_run import run_main
    from triforce_chat.app import runtime

    monkeypatch.setattr(runtime, "open_model", lambda *a, **k: tiny_model)
    forward = type(tiny_model.model).forward
    calls = [0]

    def forward_with_sigint(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == sigint_at:
            signal.raise_signal(signal.SIGINT)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model.model), "forward", forward_with_sigint)
    code = run_main(monkeypatch, "ask", "-d", str(doc_path), "-n", "30", "--level", "2", "--budget", "64",
                    "--dtype", "float32", *extra, QUESTION)
    monkeypatch.setattr(type(tiny_model.model), "forward", forward)
    out, err = capsys.readouterr()
    return code, out, err


def test_ctrl_c_in_ask_prints_what_was_produced_and_exits_130(tiny_model, tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC, encoding="utf-8")
    code, full_json, err = run_ask_in_process(monkeypatch, capsys, tiny_model, doc, "--json")
    assert code == 0, err
    full = json.loads(full_json)
    assert len(full["token_ids"]) == 30 and full["stats"]["stop_reason"] == "max tokens"
    prefill_calls = -(-len(full["prompt_token_ids"]) // 512)
    for k in (1, prefill_calls + 3, prefill_calls + 9):  # during the prefill, then while decoding
        code, out, err = run_ask_in_process(monkeypatch, capsys, tiny_model, doc, "--json", sigint_at=k)
        assert code == 130, err
        assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
        data = json.loads(out)  # still one valid JSON object
        assert data["stats"]["stop_reason"] == "interrupted"
        n = len(data["token_ids"])
        assert data["token_ids"] == full["token_ids"][:n] and n < 30
        assert data["text"] == tiny_model.tokenizer.decode(data["token_ids"], skip_special_tokens=True)
        if k == 1:
            assert n == 0 and data["text"] == ""
        code, out, err = run_ask_in_process(monkeypatch, capsys, tiny_model, doc, sigint_at=k)
        assert code == 130 and err.strip().splitlines()[-1] == "interrupted"
        # the text printed is an answer so far and nothing more (the stop point may differ from
        # the JSON run's by a round: the adaptive decoder picks routes from measured timings)
        decode = tiny_model.tokenizer.decode
        prefixes = {decode(full["token_ids"][:i], skip_special_tokens=True) + "\n" for i in range(30)}
        assert out in prefixes


def test_ctrl_c_in_a_real_ask_process(tiny_model_dir, tmp_path):
    """The real CLI in a subprocess, interrupted by a real SIGINT while it streams."""
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC, encoding="utf-8")
    env = {**os.environ, "TRIFORCE_CHAT_CONFIG": str(tmp_path / "none.toml"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "triforce_chat", "ask", "-d", str(doc), "--model", str(tiny_model_dir), "-n", "1500",
         "--dtype", "float32", "--threads", "1", "--level", "0", QUESTION],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        first = proc.stdout.read(1)  # the answer has started streaming
        assert first, proc.stderr.read().decode()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines()[-1] == "interrupted" and b"Traceback" not in err
    assert (first + out).endswith(b"\n") and len(first + out) > 1
