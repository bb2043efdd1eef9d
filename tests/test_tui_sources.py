"""The sources of an answer in the chat app, `ask` and the saved history: the line under each answer,
the expanded passages, the document view at a passage (the text as loaded, not as the file is now),
the Markdown export, and a resumed conversation."""

from __future__ import annotations

import json
import re

import pytest
from textual.widgets import Static, TextArea

from test_cli import run_cli
from test_tui import SIZE, ask, make_app, ready, wait_for
from triforce_chat.app.ui.history import History, transcript_markdown
from triforce_chat.app.ui.screens import SourceScreen
from triforce_chat.app.ui.widgets import SourcesDetail, SourcesLine, render_sources_line
from triforce_chat.decoding.sources import Source

DOC_TEXT = "\n".join(
    f"Section {i}. The lighthouse keeper on island {i} logs the weather at dawn, and the ferry leaves at {i % 12 + 1}."
    for i in range(60)
)


@pytest.fixture
def history(tmp_path, monkeypatch) -> History:
    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    return History(tmp_path / "data")


def test_the_sources_line_names_each_document_once():
    sources = [Source("book.txt", (120, 134), "a", 0.5, 0), Source("book.txt", (410, 410), "b", 0.2, 0),
               Source("notes.md", (3, 9), "c", 0.1, 1)]
    assert render_sources_line(sources).plain == "Sources: book.txt 120-134 · 410 · notes.md 3-9"


async def test_sources_under_the_answer_expand_and_open_the_document_as_loaded(tiny_model, history, tmp_path,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = tmp_path / "book.txt"
    doc.write_text(DOC_TEXT, encoding="utf-8")
    app = make_app(tiny_model, history, [doc], level=2, budget="64")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        answer = await ask(pilot, "When does the ferry leave island 3?")
        sources = app.session.turns[-1].sources
        assert sources and answer.sources == sources
        line = answer.query_one(SourcesLine)
        assert line.display and str(line.render()) == render_sources_line(sources).plain
        detail = answer.query_one(SourcesDetail)
        assert not detail.display or not detail.region.height  # folded until f2
        await pilot.press("f2")
        await wait_for(pilot, lambda: detail.region.height > len(sources), timeout=20)
        shown = str(detail.render())
        assert all(s.text.split("\n")[0][:40] in shown for s in sources)

        # the file changes on disk after it was loaded: the view shows what was prefilled and cited
        doc.write_text("rewritten\n" * 200, encoding="utf-8")
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, SourceScreen) and app.screen.query("#source-text")
                       and app.screen.query_one("#source-text", TextArea).text, timeout=20)
        area = app.screen.query_one("#source-text", TextArea)
        assert area.text == DOC_TEXT
        first = sources[0]
        assert area.selection.end[0] == first.lines[0] - 1  # the cursor on the passage's first line
        title = str(app.screen.query_one("#source-title", Static).render())
        assert f"lines {first.lines[0]}-{first.lines[1]}" in title and f"passage 1 of {len(sources)}" in title
        if len(sources) > 1:
            await pilot.press("n")
            assert area.selection.end[0] == sources[1].lines[0] - 1
        await pilot.press("escape")
        assert not isinstance(app.screen, SourceScreen)

        await pilot.press("ctrl+s")
        [exported] = list(tmp_path.glob("triforce-chat-*.md"))
        md = exported.read_text()
        a, b = first.lines
        assert "### Sources" in md and f"`book.txt`, lines {a}-{b}" in md

    # saved with the answer, and shown again when the conversation is reopened
    conv = history.load(history.resolve("last"))
    saved = [s.to_dict() for s in sources]  # (scores are saved to 4 places)
    assert [s.to_dict() for s in conv.turns[0].sources] == saved
    app2 = make_app(tiny_model, history, level=0)
    app2.resume = "last"
    async with app2.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app2.session is not None and not app2.busy and app2.answers)
        assert [s.to_dict() for s in app2.answers[0].sources] == saved
        assert str(app2.answers[0].query_one(SourcesLine).render()) == render_sources_line(sources).plain


def test_markdown_export_quotes_each_passage():
    src = Source("a.txt", (2, 3), "line two\nline three", 0.4, 0, (9, 28))
    md = transcript_markdown([("q?", "answer")], ["a.txt"], sources=[[src]])
    assert "### Sources" in md and "- `a.txt`, lines 2-3 (40% of the attention):" in md
    assert "  > line two\n  > line three" in md
    assert "### Sources" not in transcript_markdown([("q?", "answer")], ["a.txt"], sources=[[]])


def test_ask_json_and_sources_flag(monkeypatch, capsys, tiny_model, tiny_model_dir, tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text(DOC_TEXT, encoding="utf-8")
    common = ["ask", "--doc", str(doc), "--model", str(tiny_model_dir), "--max-new-tokens", "9", "--dtype", "float32"]
    code, out, err = run_cli(monkeypatch, capsys, *common, "--json", "When does the ferry leave island 3?")
    assert code == 0, err
    sources = json.loads(out)["sources"]
    assert 1 <= len(sources) <= 3
    lines = DOC_TEXT.split("\n")
    for s in sources:
        assert s["document"] == "notes.txt" and {"lines", "text", "score", "chars"} <= s.keys()
        a, b = s["lines"]
        assert s["text"].removeprefix("…").removesuffix("…") in "\n".join(lines[a - 1 : b])  # (clipped at most)
    code, out, err = run_cli(monkeypatch, capsys, *common, "--sources", "When does the ferry leave island 3?")
    assert code == 0, err
    printed = out.splitlines()
    at = printed.index("sources:")
    listed = printed[at + 1 :]
    # (which passages: the readings of the attention are timed, so two runs may differ in a passage)
    assert 1 <= len(listed) <= 3
    for i, line in enumerate(listed, 1):
        assert re.fullmatch(rf"  \[{i}\] notes\.txt lines? \d+(-\d+)? \(\d+%\): \S.*", line), line
