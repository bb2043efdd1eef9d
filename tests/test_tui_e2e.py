"""End to end: the real CLI in tmux with SmolLM2 (bundled) on a real document (Python's own docs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

TMUX = shutil.which("tmux") or "/usr/bin/tmux"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(TMUX).exists(), reason="needs tmux"),
]
QUESTION = "What does the else clause of a for loop do?"


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(f"## {k}\n\n{topics[k]}" for k in ("if", "while", "for", "try"))


SOCKET = f"triforce-e2e-{uuid.uuid4().hex[:8]}"  # a private tmux server: its own window size


def tmux(*args: str) -> str:
    return subprocess.run([TMUX, "-L", SOCKET, *args], capture_output=True, text=True, check=False).stdout


def wait_pane(name: str, condition, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        pane = tmux("capture-pane", "-p", "-t", name)
        if condition(pane):
            return pane
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; the screen was:\n{pane}")
        time.sleep(0.5)


def answers(data: Path) -> list[dict]:
    recs = []
    for f in (data / "conversations").glob("*.jsonl") if (data / "conversations").exists() else []:
        recs += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in recs if r["type"] == "answer"]


def test_chat_in_tmux_with_smollm2(tmp_path, default_model_dir):
    doc = tmp_path / "python-docs.txt"
    doc.write_text(pydoc_text(), encoding="utf-8")
    data = tmp_path / "data"
    exe = Path(sys.executable).with_name("triforce-chat")
    name = f"tf-e2e-{uuid.uuid4().hex[:6]}"
    # tmux sizes the pane just after starting it: wait, or the app may start at 80x24 and miss the resize
    cmd = (
        "sleep 1; "
        f"TRIFORCE_CHAT_DATA={data} TRIFORCE_CHAT_CONFIG={tmp_path / 'none.toml'} "
        f"{exe} --model smollm2-135m --doc {doc} --max-new-tokens 40 --threads 2; sleep 10"
    )
    tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "48", cmd)
    try:
        ready = wait_pane(
            name,
            lambda p: (
                "context 8,192" in p
                and "python-docs.txt" in p
                and not any(w in p for w in ("Prefill", "Loading", "Tokenizing"))
            ),
            420,
        )
        assert "Level 2" in ready and "suffix -> retrieval(4096) -> target" in ready
        assert "Full KV" in ready and "of 8,192" in ready
        tmux("send-keys", "-t", name, "-l", QUESTION)
        tmux("send-keys", "-t", name, "Enter")
        deadline = time.monotonic() + 300
        while not answers(data):
            assert time.monotonic() < deadline, tmux("capture-pane", "-p", "-t", name)
            time.sleep(0.5)
        record = answers(data)[0]
        stats = record["stats"]
        # the panels' last lines sit under the notices' toasts until these time out (Textual's 5 s)
        screen = wait_pane(name, lambda p: f"{stats['new_tokens']} tokens · " in p and "Drafter suffix" in p, 30)
        words = [w for w in record["text"].split() if len(w) > 3][:3]
        assert words and all(w in screen for w in words), screen  # the streamed answer is on screen
        # the question went through the input as typed (it may have scrolled out of view by now)
        files = (data / "conversations").glob("*.jsonl")
        saved = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
        asked = [r.get("text") for r in saved if r["type"] == "question"]
        assert QUESTION in asked, asked
        assert f"avg {stats['tokens_per_s']:6.1f}" in screen
        assert f"Mean accepted length {stats['mean_accepted_length']:.2f}" in screen
        assert "Acceptance" in screen and "Retrieval" in screen and "Drafter suffix" in screen
        tmux("send-keys", "-t", name, "C-r")  # the draft/accept view
        viz = wait_pane(name, lambda p: "✓ accepted" in p, 10)
        assert "#" in viz and ("→" in viz)
        tmux("send-keys", "-t", name, "C-q")
        time.sleep(1)
    finally:
        tmux("kill-server")
