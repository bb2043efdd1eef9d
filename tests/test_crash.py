"""Crash safety: a kill -9 mid-answer leaves a valid history that reopens; damaged history and
config files are reported with their path and line and never silently overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triforce_chat.app.settings import Settings, load_settings
from triforce_chat.app.ui.history import History, drop_torn_tail

QUESTION = "Tell me about the lighthouse, at length."
DRIVER = Path(__file__).with_name("crash_driver.py")


def records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), data[-200:]  # no record was cut in half
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def conversation_files(data: Path) -> list[Path]:
    return sorted((data / "conversations").glob("*.jsonl")) if (data / "conversations").exists() else []


async def test_kill_9_mid_answer_keeps_a_valid_history_that_reopens(tiny_model, tiny_model_dir, tmp_path, monkeypatch):
    from test_tui import ask, make_app, wait_for

    data = tmp_path / "data"
    doc = tmp_path / "lighthouse.txt"
    doc.write_text("The lighthouse keeper on Farrow Island is Amelia Stroud. The boat is green.\n" * 20)
    env = {**os.environ, "TRIFORCE_CHAT_DATA": str(data), "TRIFORCE_CHAT_CONFIG": str(tmp_path / "none.toml")}
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(tiny_model_dir), str(doc), QUESTION], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while True:  # until the answer has streamed a few batches into the history
            files = conversation_files(data)
            deltas = [r for r in records(files[0]) if r["type"] == "delta"] if files else []
            if len(deltas) >= 3:
                break
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the driver never answered"
            time.sleep(0.1)
        proc.kill()  # SIGKILL: no handler, no flush, no atexit
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9
    [path] = conversation_files(data)
    saved = records(path)  # every line a whole JSON record
    kinds = [r["type"] for r in saved]
    assert kinds[:3] == ["meta", "document", "question"] and "answer" not in kinds
    partial = "".join(r["text"] for r in saved if r["type"] == "delta")
    assert partial.strip()

    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(data))
    history = History(data)
    conv = history.load(history.resolve("last"))
    assert [t.question for t in conv.turns] == [QUESTION]
    assert conv.turns[0].answer == partial and not conv.turns[0].complete  # only the answer in flight is cut

    app = make_app(tiny_model, history, level=2)
    app.resume = "last"
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_for(pilot, lambda: app.session is not None and not app.busy and app.answers)
        await wait_for(pilot, lambda: not app.busy)
        s = app.session
        assert [t.question for t in s.turns] == [QUESTION] and s.turns[0].answer == partial
        assert app.answers[0].text == partial
        assert [d.name for d in s.turns[0].documents] == ["lighthouse.txt"]
        assert s.cache.length == len(s.context) - 1
        await ask(pilot, "And the boat?")
        assert len(s.turns) == 2 and s.turns[1].answer
    after = records(path)
    assert after[: len(saved)] == saved  # appended to, never rewritten
    assert [t.question for t in history.load(conv.id).turns] == [QUESTION, "And the boat?"]
    assert not list(path.parent.glob("*.damaged-*"))


def test_a_torn_last_record_is_dropped_before_appending(tmp_path):
    history = History(tmp_path)
    writer = history.open_writer("c1")
    writer.meta("m")
    writer.question("q?")
    writer.delta("partial")
    writer.close()
    path = history.path_of("c1")
    with path.open("ab") as f:
        f.write(b'{"type": "delta", "te')  # the write a kill cut short
    assert history.load("c1").turns[0].answer == "partial"  # skipped when reading
    assert not history.take_problems()  # a torn tail is what a crash leaves, not damage
    writer = history.open_writer("c1")
    writer.delta(" more")
    writer.close()
    assert [r["type"] for r in records(path)] == ["meta", "question", "delta", "delta"]
    assert history.load("c1").turns[0].answer == "partial more"
    assert drop_torn_tail(path) == 0


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"{not json at all\n", "not valid JSON"),
        (b'{"type": "question"}\n', "a question record without a valid 'text'"),
        (b'["a", "list"]\n', "not a history record"),
        (b'{"type": "document", "name": "x", "sha": "../../etc/passwd"}\n', "a document record without a valid 'sha'"),
        (b"\xff\xfe broken bytes\n", "not valid JSON"),
    ],
)
def test_a_damaged_history_file_is_reported_and_set_aside(tmp_path, garbage, reason):
    history = History(tmp_path)
    writer = history.open_writer("c2")
    writer.meta("m")
    writer.question("first?")
    writer.answer("one", {})
    writer.close()
    path = history.path_of("c2")
    original = path.read_bytes() + garbage
    with path.open("ab") as f:
        f.write(garbage)
        f.write(b'{"type": "question", "text": "second?"}\n{"type": "answer", "text": "two"}\n')
    damaged = path.read_bytes()
    conv = history.load("c2")
    [problem] = history.take_problems()
    assert f"{path}, line 4: {reason}" in problem and "set aside" in problem
    aside = list(tmp_path.glob("conversations/c2.jsonl.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged  # kept as it was, not overwritten
    assert damaged.startswith(original)
    assert [(t.question, t.answer) for t in conv.turns] == [("first?", "one"), ("second?", "two")]
    assert history.load("c2").turns == conv.turns and not history.take_problems()  # the kept copy is clean
    assert history.resolve("last") == "c2"


def test_a_damaged_config_file_is_reported_with_its_line_and_left_alone(tmp_path):
    path = tmp_path / "config.toml"
    text = 'level = 1\nbudget = "4096\ntheme = "triforce-light"\n'
    path.write_text(text)
    warnings: list[str] = []
    settings = load_settings(path, warn=warnings.append)
    assert settings == Settings()  # a file that cannot be parsed: defaults, and the app starts
    [warning] = warnings
    assert str(path) in warning and "line 2" in warning and "using the defaults" in warning
    assert path.read_text() == text and list(tmp_path.iterdir()) == [path]  # the user's file is untouched
