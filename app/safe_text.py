"""Text from documents, file names, the config file and the model, made safe to show in a terminal.

Why one place: a document full of escape sequences can be quoted back by the model, a file name
can hold an OSC sequence that retitles the window or a bidi override that reorders what the user
reads, and a lone carriage return rewrites the line already shown. Every path from such text to
the screen (the TUI's widgets and notices, `ask`'s stream and messages, the Markdown export) goes
through these functions; what is stored (history, the prompt the model reads) keeps the text as
it was, so nothing is lost.

What is changed, and how it is shown:
- C0 controls (but newline and tab) and DEL: their Unicode "control picture" (ESC -> ␛, NUL -> ␀),
  so `ESC [31m` reads as `␛[31m` and cannot act;
- CR: CRLF becomes LF; a lone CR shows as ␍;
- C1 controls (U+0080..U+009F, which some terminals obey as 8-bit CSI/OSC) and the bidi embedding,
  override and isolate controls (U+202A..U+202E, U+2066..U+2069): `<U+202E>`;
- lone surrogates (a file name that is not UTF-8, decoded with surrogateescape): `\\xNN` for the
  original byte, U+FFFD for any other.
Right-to-left letters, emoji and combining marks are text, not controls: they pass unchanged.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _picture(ch: str) -> str:
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)  # ␀ .. ␟
    if code == 0x7F:
        return "\u2421"  # ␡
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    return f"<U+{code:04X}>"


def _replace(match: re.Match[str]) -> str:
    return _picture(match.group())


def terminal_text(text: str) -> str:
    """Multi-line text (an answer, a question, a quote): newlines and tabs kept, controls shown."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(_replace, text)


def one_line(text: str, limit: int | None = None) -> str:
    """Text for one line (a name, a notice, a title): newlines shown as ⏎, controls shown, and cut
    to `limit` characters with an ellipsis in the middle."""
    text = text.replace("\r\n", "\n").replace("\n", "\u23ce").replace("\t", " ")
    if _UNSAFE_LINE.search(text):
        text = _UNSAFE_LINE.sub(_replace, text)
    if limit is not None and len(text) > limit:
        tail = max(0, limit - 1) // 2
        head = max(0, limit - 1) - tail
        text = text[:head] + "\u2026" + (text[len(text) - tail :] if tail else "")
    return text


def file_name(path: str | os.PathLike[str], limit: int | None = None) -> str:
    """A file's name for display (the bytes of a name that is not UTF-8 as \\xNN)."""
    return one_line(Path(path).name or str(path), limit)


def file_path(path: str | os.PathLike[str], limit: int | None = None) -> str:
    """A whole path for display, as in error messages."""
    return one_line(os.fspath(path), limit)


def json_text(obj: Any) -> str:
    """JSON for a terminal or a pipe: the same data as json.dumps(ensure_ascii=False), but with
    every character the terminal could obey (C1, DEL, bidi controls, lone surrogates) written as a
    \\uXXXX escape, which any JSON reader turns back into the same string."""
    text = json.dumps(obj, ensure_ascii=False)
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
