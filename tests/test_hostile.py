"""Hostile documents, names, model output and pastes: each is handled with a clear notice or shown
safely (no raw control character or escape sequence reaches the terminal), and nothing is lost
(the model and the history get the text as it was)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from textual import events
from textual.widgets import Markdown, Static

from triforce_chat.app.safe_text import file_name, json_text, one_line, terminal_text
from triforce_chat.app.ui.history import History, transcript_markdown
from triforce_chat.app.ui.widgets import ChatInput, UserMessage
from triforce_chat.decoding.session import DecodeConfig, Session

ESCAPES = "\x1b]0;pwned\x07\x1b[31mred\x1b[0m\x9b2J\x1bP+q\x1b\\\r"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
RTL_EMOJI = "שלום עולם مرحبا 👩‍👩‍👧 e\u0301 Z\u0336\u0337 ﷽"


def raw_controls(text: str) -> list[str]:
    return RAW.findall(text)


# -- the sanitizer ---------------------------------------------------------------------------------------
def test_terminal_text_shows_every_control_and_keeps_text():
    shown = terminal_text("a\tb\nc" + ESCAPES + "\u202eevil\u2066x\u2069" + RTL_EMOJI)
    assert raw_controls(shown) == []
    assert "a\tb\nc" in shown and "␛]0;pwned␇␛[31mred␛[0m<U+009B>2J␛P+q␛\\␍" in shown
    assert "<U+202E>evil<U+2066>x<U+2069>" in shown
    assert shown.endswith(RTL_EMOJI)  # right-to-left letters, emoji and combining marks are text
    assert terminal_text("line\r\nnext") == "line\nnext"
    assert terminal_text(shown) == shown  # idempotent
    assert terminal_text("plain text") == "plain text"


def test_one_line_names_and_json():
    assert one_line("a\nb\x1b[2Jc\t") == "a⏎b␛[2Jc "
    assert one_line("x" * 50, 11) == "xxxxx…xxxxx"
    name = os.fsdecode(b"caf\xe9-\x1b[31m.txt")  # a name that is not UTF-8, with an escape in it
    assert file_name(Path("/tmp") / name) == "caf\\xe9-␛[31m.txt"
    obj = {"text": "\x1b[31m\x7f\x9b\u202e\udcff", "n": 1}
    text = json_text(obj)
    assert raw_controls(text) == [] and json.loads(text) == obj  # same data, escaped


# -- documents --------------------------------------------------------------------------------------------
def test_nul_bytes_and_invalid_utf8_get_a_warning_and_the_rest_is_kept(tmp_path):
    from triforce_chat.app.runtime import read_document
    from triforce_chat.decoding.session import DocumentError

    body = b"ok text " * 2000  # 16 KB: a NUL past the binary sniff is a stray byte in a text file
    path = tmp_path / "stray.txt"
    path.write_bytes(body + b"\x00\x00 tail \xff\xfe end")
    warnings: list[str] = []
    name, text = read_document(path, warn=warnings.append)
    assert "\x00" not in text and text.endswith("\ufffd\ufffd tail \ufffd\ufffd end")
    assert text.startswith(body.decode())
    assert any("not valid UTF-8" in w for w in warnings) and any("2 NUL bytes" in w for w in warnings)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(DocumentError, match="looks like a binary file"):
        read_document(binary)
    # a PDF or a zipped document (no NUL needed early on) is named, with the way to its text
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(b"%PDF-1.7\n%text-like header\n1 0 obj << /Type /Catalog >> endobj\n" * 50)
    with pytest.raises(DocumentError, match=r"paper.pdf: is a PDF, not text; .*pdftotext"):
        read_document(pdf)
    book = tmp_path / "book.epub"
    book.write_bytes(b"PK\x03\x04mimetypeapplication/epub+zip" + b"x" * 100)
    with pytest.raises(DocumentError, match=r"book.epub: is a zip archive .*pandoc"):
        read_document(book)


def test_a_device_or_an_endless_pipe_is_refused_without_filling_the_memory(tmp_path, monkeypatch):
    """`--doc /dev/zero` once read until the kernel killed the process; now its first bytes say
    binary, and text past MAX_DOCUMENT_BYTES (an endless `yes |`) stops the read there."""
    import threading

    from triforce_chat.app import runtime
    from triforce_chat.decoding.session import DocumentError

    with pytest.raises(DocumentError, match="/dev/zero: looks like a binary file"):
        runtime.read_document(Path("/dev/zero"))
    monkeypatch.setattr(runtime, "MAX_DOCUMENT_BYTES", 2 << 20)
    fifo = tmp_path / "endless"
    os.mkfifo(fifo)
    stop = threading.Event()

    def endless() -> None:  # a writer that never ends on its own
        try:
            with open(fifo, "wb") as f:
                while not stop.is_set():
                    f.write(b"all work and no play\n" * 100)
        except BrokenPipeError:  # the reader gave up: what a shell's `yes` sees too
            pass

    writer = threading.Thread(target=endless, daemon=True)
    writer.start()
    with pytest.raises(DocumentError, match="endless: over 2 MiB, far more than a model's context holds"):
        runtime.read_document(fifo)
    stop.set()
    writer.join(5)
    exact = tmp_path / "exact.txt"
    exact.write_bytes(b"x" * (2 << 20))  # the limit itself is read
    assert len(runtime.read_document(exact)[1]) == 2 << 20


def test_a_named_pipe_that_nothing_writes_to_is_refused_after_a_wait_said_out_loud(tmp_path, monkeypatch):
    """`mkfifo p; triforce-chat --doc p` once blocked forever at open. Now the wait is said and ends."""
    from triforce_chat.app import runtime
    from triforce_chat.decoding.session import DocumentError

    monkeypatch.setattr(runtime, "FIFO_WAIT_S", 0.6)
    monkeypatch.setattr(runtime, "FIFO_NOTICE_S", 0.1)
    fifo = tmp_path / "nobody"
    os.mkfifo(fifo)
    said: list[str] = []
    start = time.monotonic()
    with pytest.raises(DocumentError, match="nobody: a named pipe that nothing writes to"):
        runtime.read_document(fifo, warn=said.append)
    assert time.monotonic() - start < 10
    assert len(said) == 1 and "waiting for something to write to" in said[0]
    # the chat's esc ends the wait at once, whatever FIFO_WAIT_S says
    monkeypatch.setattr(runtime, "FIFO_WAIT_S", 600.0)
    start = time.monotonic()
    with pytest.raises(DocumentError, match="nobody: stopped waiting for something to write to it"):
        runtime.read_document(fifo, warn=said.append, should_cancel=lambda: time.monotonic() - start > 0.3)
    assert time.monotonic() - start < 5


def test_esc_stops_reading_a_pipe_whose_writer_is_there_but_silent(tmp_path):
    """A writer that opened the pipe and writes nothing (`sleep 999 > p`) once blocked the chat's
    loading worker for good: esc only set a flag that the blocked read never looked at."""
    import threading

    from triforce_chat.app import runtime
    from triforce_chat.decoding.session import DocumentError

    fifo = tmp_path / "silent"
    os.mkfifo(fifo)
    done = threading.Event()

    def silent_writer() -> None:
        with open(fifo, "wb") as f:
            f.write(b"a first line, then nothing\n")
            f.flush()
            done.wait(20)

    thread = threading.Thread(target=silent_writer, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(DocumentError, match="silent: stopped reading it"):
            runtime.read_document(fifo, should_cancel=lambda: time.monotonic() - start > 1.0)
        assert time.monotonic() - start < 10
    finally:
        done.set()
        thread.join(5)


@pytest.mark.parametrize("case", ["writer comes late", "writer there, first bytes late", "writer closes empty"])
def test_a_named_pipe_is_read_whenever_its_writer_comes_and_however_slow_it_is(tmp_path, monkeypatch, case):
    """A writer that opens the pipe after a while is waited for; one that is there but slow to write
    (`--doc <(slow_command)`) is waited for as long as it takes, past FIFO_WAIT_S: only a pipe that
    nothing opens is refused."""
    import threading

    from triforce_chat.app import runtime
    from triforce_chat.decoding.session import DocumentError

    monkeypatch.setattr(runtime, "FIFO_WAIT_S", 2.0 if case == "writer there, first bytes late" else 20.0)
    fifo = tmp_path / "slow"
    os.mkfifo(fifo)
    body = b"The ferry leaves at noon.\n" * 400

    def writer() -> None:
        if case == "writer comes late":
            time.sleep(0.4)
        with open(fifo, "wb") as f:
            if case == "writer there, first bytes late":
                time.sleep(3.0)  # longer than the wait for a writer: it is there, so it is waited for
            if case != "writer closes empty":
                f.write(body[:100])
                f.flush()
                time.sleep(0.1)
                f.write(body[100:])

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    if case == "writer closes empty":
        with pytest.raises(DocumentError, match="slow: the document is empty"):
            runtime.read_document(fifo)
    else:
        assert runtime.read_document(fifo) == ("slow", body.decode())
    thread.join(5)


def test_the_chat_gets_the_text_the_command_line_read_so_a_pipe_is_read_once(monkeypatch, capsys, tmp_path):
    """`triforce-chat --doc <(cmd)`: the command line reads the pipe to check it; the chat once read
    the path again, found it drained, and said "the document is empty"."""
    from cli_run import run_main
    from triforce_chat.app.runtime import DocumentText
    from triforce_chat.app.ui import app as ui_app

    got: list = []
    monkeypatch.setattr(ui_app, "run_tui", lambda settings, docs, resume, notices: got.extend(docs) or 0)
    r, w = os.pipe()
    os.write(w, b"The secret word is banana.\n")
    os.close(w)
    try:
        code = run_main(monkeypatch, "--doc", f"/dev/fd/{r}")
    finally:
        os.close(r)
    assert code == 0, capsys.readouterr().err
    assert got == [DocumentText(Path(f"/dev/fd/{r}"), "The secret word is banana.\n")]
    assert got[0].name == f"pipe {r}"  # what the panels, the prompt and the sources call it


def test_the_chat_shows_the_warnings_of_reading_its_documents(monkeypatch, tmp_path):
    """The chat reads its --doc files on the command line now: their warnings (bad UTF-8 here) must
    still reach the chat's notices, since the screen covers whatever went to stderr."""
    from cli_run import run_main
    from triforce_chat.app.ui import app as ui_app

    shown: list[str] = []
    monkeypatch.setattr(ui_app, "run_tui", lambda settings, docs, resume, notices: shown.extend(notices) or 0)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait, cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 20)
    assert run_main(monkeypatch, "--doc", str(latin)) == 0
    assert [n for n in shown if "latin.txt is not valid UTF-8" in n]


def test_a_pipe_or_standard_input_is_named_for_what_it_is():
    from triforce_chat.app.runtime import document_name

    assert document_name(Path("/dev/fd/63")) == "pipe 63"
    assert document_name(Path("/proc/self/fd/12")) == "pipe 12"
    assert document_name(Path("/proc/4242/fd/11")) == "pipe 11"
    assert document_name(Path("/dev/stdin")) == "stdin" == document_name(Path("/dev/fd/0"))
    assert document_name(Path("/proc/4242/fd/0")) == "stdin"
    assert document_name(Path("/home/me/fd/63")) == "63"  # a folder that happens to be called fd
    assert document_name(Path("book.txt")) == "book.txt"


async def test_a_document_read_by_the_command_line_loads_from_its_text(tiny_model, tmp_path, monkeypatch):
    from triforce_chat.app.runtime import DocumentText
    from triforce_chat.app.settings import Settings
    from triforce_chat.app.ui.app import TriforceApp

    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    gone = tmp_path / "drained-pipe"  # nothing at the path: the text must come from the DocumentText
    text = "The lighthouse keeper is Amelia Stroud.\n" * 10
    app = TriforceApp(Settings(max_new_tokens=4, budget="256", history=False), [DocumentText(gone, text)],
                      model=tiny_model)
    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + 60
        while not (app.session is not None and not app.busy and app.session.documents):
            assert time.monotonic() < deadline, "the document never loaded"
            await pilot.pause(0.05)
        assert [(d.name, d.original) for d in app.session.documents] == [("drained-pipe", text)]
        assert not [n for n in app._notifications if n.severity == "error"]


def test_right_to_left_emoji_and_combining_marks_reach_the_model_unchanged(tiny_model):
    s = Session(tiny_model, DecodeConfig(level=2, max_new_tokens=4, budget="64"))
    s.add_document(RTL_EMOJI + ".txt", (RTL_EMOJI + ESCAPES + "\n") * 20)
    prompt = tiny_model.tokenizer.decode(s.prompt_ids("מה?"))
    assert (RTL_EMOJI + ESCAPES) in prompt and "מה?" in prompt  # the model reads the text as it is
    tokens = [t for ev in s.generate("מה?") for t in ev.tokens]
    assert len(tokens) == 4


def test_a_5mb_single_line_is_refused_with_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path):
    from test_cli import run_cli

    path = tmp_path / "one-line.txt"
    path.write_bytes(b"word," * (5 * 1024 * 1024 // 5))  # 5 MiB, no newline at all
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), "--dtype", "float32",
                             "-d", str(path), "What?")
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert "one-line.txt: 5,242,880 characters, at least" in line and "over the model's context of 2048" in line
    assert "--truncate" in line


def test_bytes_that_are_not_utf8_in_a_file_name_or_a_question_reach_the_model_as_u_fffd(
    monkeypatch, capsys, tiny_model, tiny_model_dir, tmp_path
):
    """Python hands such bytes over as surrogate escapes, which the tokenizer refuses (a TypeError
    traceback, for a file named caf\\xe9.txt or `printf '\\xff' | ask -`)."""
    import io

    from test_cli import run_cli

    path = tmp_path / os.fsdecode(b"caf\xe9.txt")
    path.write_text("The lighthouse keeper is Amelia Stroud.\n" * 5)
    question = os.fsdecode(b"Who keeps \xff the lighthouse?")
    monkeypatch.setattr("sys.stdin", io.StringIO(question))
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), "--dtype", "float32",
                             "-n", "3", "--json", "-d", str(path), "-")
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 3
    s = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=2))
    doc = s.add_document(path.name, path.read_text())
    assert doc.name == "caf\ufffd.txt"
    assert len([t for ev in s.generate(question) for t in ev.tokens]) == 2
    assert s.turns[-1].question == "Who keeps \ufffd the lighthouse?"


def test_an_endless_question_on_stdin_is_refused_with_one_line(monkeypatch, capsys, tiny_model_dir, tmp_path):
    import io

    from test_cli import run_cli
    from triforce_chat.app.cli import main as cli_main

    monkeypatch.setattr(cli_main, "MAX_STDIN_QUESTION", 1000)
    monkeypatch.setattr("sys.stdin", io.StringIO("why " * 1000))
    doc = tmp_path / "notes.txt"
    doc.write_text("The boat is green.\n")
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), "-d", str(doc), "-")
    assert code == 2 and out == ""
    assert err.strip() == "error: the question on standard input is over 1,000 characters; long text belongs in a --doc"


def test_escape_sequences_in_names_never_reach_stderr_raw(monkeypatch, capsys, tiny_model_dir, tmp_path):
    from test_cli import run_cli

    path = tmp_path / "\x1b]0;pwned\x07\x1b[2J.txt"
    path.write_text("   \n")  # empty: the error message names the file
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), "-d", str(path), "q")
    assert code == 2 and raw_controls(err) == []
    assert "␛]0;pwned␇␛[2J.txt: the document is empty" in err


def hostile_decode(tokenizer, monkeypatch):
    """Make the model's text full of escape sequences, as a document quoted back would be."""
    decode = tokenizer.decode

    def decode_with_escapes(ids, *args, **kwargs):
        text = decode(ids, *args, **kwargs)
        return "".join(ESCAPES[i % len(ESCAPES)] + ch for i, ch in enumerate(text)) if text else text

    monkeypatch.setattr(tokenizer, "decode", decode_with_escapes)


def test_model_output_with_escapes_is_shown_safely_by_ask(monkeypatch, capsys, tiny_model, tmp_path):
    from test_cli import run_cli
    from triforce_chat.app import runtime

    monkeypatch.setattr(runtime, "open_model", lambda *a, **k: tiny_model)
    hostile_decode(tiny_model.tokenizer, monkeypatch)
    doc = tmp_path / "doc.txt"
    doc.write_text(("Escapes: " + ESCAPES + "\n") * 20)
    code, out, err = run_cli(monkeypatch, capsys, "ask", "-d", str(doc), "-n", "12", "Quote it.")
    assert code == 0, err
    assert raw_controls(out.removesuffix("\n")) == [] and "␛" in out
    code, out, err = run_cli(monkeypatch, capsys, "ask", "-d", str(doc), "-n", "12", "--json", "Quote it.")
    assert code == 0 and raw_controls(out.removesuffix("\n")) == []
    text = json.loads(out)["text"]
    assert "\x1b" in text and "\x9b" in text  # the JSON carries the exact text, escaped


async def test_the_app_shows_hostile_names_output_and_export_safely(tiny_model, tmp_path, monkeypatch):
    from test_tui import ask, make_app, ready

    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    name = "\x1b]0;pwned\x07" + RTL_EMOJI + "\u202e.txt"
    doc = tmp_path / name
    doc.write_text(("The keeper logs " + ESCAPES + " at dawn.\n") * 30)
    empty = tmp_path / "\x1b[31mempty.txt"
    empty.write_text(" ")
    history = History(tmp_path / "data")
    app = make_app(tiny_model, history, [doc, empty], level=2, max_new_tokens=12)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        hostile_decode(tiny_model.tokenizer, monkeypatch)
        answer = await ask(pilot, "Quote the log " + ESCAPES)
        await pilot.press("ctrl+r")  # the draft view renders every token
        await pilot.pause(0.2)
        session = app.session
        assert "\x1b" in session.turns[0].answer  # what the session and the history keep is exact
        shown = [
            answer.query_one(Markdown).source,
            *(str(w.render()) for w in app.query(Static)),
            *(n.message for n in app._notifications),
            app.sub_title,
        ]
        for text in shown:
            assert raw_controls(text) == [], text
        docs_panel = str(app.query_one("#documents").render())
        assert "<U+202E>.txt" in docs_panel  # (the panel shows the end of a long name)
        assert any("␛[31mempty.txt: the document is empty" in n.message for n in app._notifications)
        assert raw_controls(app.export_screenshot()) == []
        await pilot.press("ctrl+s")
        [exported] = list(tmp_path.glob("triforce-chat-*.md"))
        md = exported.read_text()
        assert raw_controls(md) == [] and "␛" in md and RTL_EMOJI in md
    conv = history.load(history.resolve("last"))
    assert conv.turns[0].documents[0].name == name and conv.turns[0].answer == session.turns[0].answer


async def test_a_1mb_paste_is_kept_whole_and_an_overlong_question_comes_back(tiny_model, tmp_path, monkeypatch):
    from test_tui import make_app, ready, wait_for

    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    app = make_app(tiny_model, History(tmp_path / "data"), level=2)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        box = app.query_one(ChatInput)
        paste = ("lorem ipsum dolor sit amet " * 40 + "\n") * 930 + "\x1b[2Jend"
        app.post_message(events.Paste(paste))
        await wait_for(pilot, lambda: box.text.endswith("end"))
        assert box.text == paste.replace("\x1b", "␛")  # all of it, controls shown as pictures
        assert any(f"pasted {len(paste):,} characters" in n.message for n in app._notifications)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.job is None and any("over the model's context" in n.message
                                                              for n in app._notifications), timeout=120)
        await pilot.pause(0.2)
        assert box.text == paste.replace("\x1b", "␛")  # the question is back in the input: nothing lost
        assert not app.session.turns and not app.answers and not app.query(UserMessage)
        assert app.query_one("#welcome").display


def test_long_questions_are_previewed_in_the_transcript():
    from triforce_chat.app.ui.widgets import QUESTION_SHOWN, question_preview

    text = "x" * (QUESTION_SHOWN + 5000)
    shown = question_preview(text)
    assert shown.startswith("x" * QUESTION_SHOWN) and "5,000 more characters, sent and saved in full" in shown
    assert question_preview("short \x1b[2J") == "short ␛[2J"


def test_markdown_export_is_safe_and_keeps_the_text():
    md = transcript_markdown([("q " + ESCAPES, "a " + RTL_EMOJI + ESCAPES)], ["\x1b]0;x\x07.txt"], title="t\x1b")
    assert raw_controls(md) == [] and RTL_EMOJI in md and "␛]0;x␇.txt" in md
