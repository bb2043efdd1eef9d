"""Conversations saved as they happen: one JSON-lines file per conversation in the data dir.

Every record is appended and flushed when it happens, the streamed answer included (one "delta"
record per UI batch), so a crash mid-answer loses nothing already shown. Documents are stored once
by content hash next to the conversations so a conversation can be reopened without its files.

Crash safety: a record is one `write` of a whole line to a file opened for appending, so a kill
leaves at most the record being written cut off at the end of the file. Reading skips such a torn
last line, and the writer removes it before appending (else the next record would be glued to it).
Any other line that is not a valid record means the file was damaged: it is reported with its path
and line, moved aside as `<name>.damaged-<time>` (never overwritten), and its readable records are
kept under the original name so the conversation still opens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triforce_chat.app.safe_text import json_text, one_line, terminal_text
from triforce_chat.app.settings import data_dir
from triforce_chat.decoding.sources import Source

# the fields each record type needs, and their types (a record without them is damage)
_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "meta": {},
    "document": {"name": str, "sha": str},
    "question": {"text": str},
    "delta": {"text": str},
    "answer": {"text": str},
    "failed": {},
}


_SHA = re.compile(r"[0-9a-f]{16,64}")


class DamagedRecord(ValueError):
    pass


def _check_record(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
        raise DamagedRecord("not a history record")
    for key, kind in _REQUIRED.get(rec["type"], {}).items():
        if not isinstance(rec.get(key), kind):
            raise DamagedRecord(f"a {rec['type']} record without a valid {key!r}")
    if rec["type"] == "document" and not _SHA.fullmatch(rec["sha"]):  # it names a file: never a path
        raise DamagedRecord("a document record without a valid 'sha'")
    return rec


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]], bool]:
    """(records, damaged lines as (line number, reason), whether the last line is torn)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = bool(lines and lines[-1])  # no newline at the end: the last write was cut off
    if not lines[-1]:
        lines.pop()
    records, damaged = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            records.append(_check_record(json.loads(raw.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError, DamagedRecord) as exc:
            if torn and number == len(lines):
                continue  # the record in flight when the process died
            reason = str(exc) if isinstance(exc, DamagedRecord) else "not valid JSON"
            damaged.append((number, reason))
    return records, damaged, torn


@dataclass
class SavedDocument:
    name: str
    sha: str
    n_tokens: int = 0
    path: str = ""


@dataclass
class SavedTurn:
    question: str
    documents: list[SavedDocument] = field(default_factory=list)
    answer: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    sources: list[Source] = field(default_factory=list)


@dataclass
class Conversation:
    id: str
    created: float
    model: str = ""
    turns: list[SavedTurn] = field(default_factory=list)
    pending_documents: list[SavedDocument] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.turns:
            return self.turns[0].question.strip().splitlines()[0][:60]
        if self.pending_documents:
            return "documents: " + ", ".join(d.name for d in self.pending_documents)
        return "(empty)"

    @property
    def documents(self) -> list[SavedDocument]:
        return [d for t in self.turns for d in t.documents] + self.pending_documents


class History:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else data_dir()
        self.conversations_dir = self.root / "conversations"
        self.documents_dir = self.root / "documents"
        self.problems: list[str] = []  # one line per damaged file found (the app shows them)

    def take_problems(self) -> list[str]:
        out, self.problems = self.problems, []
        return out

    # -- writing ----------------------------------------------------------------------------------
    def new_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]

    def path_of(self, conv_id: str) -> Path:
        return self.conversations_dir / f"{conv_id}.jsonl"

    def store_document(self, text: str) -> str:
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
        self.documents_dir.mkdir(parents=True, exist_ok=True)
        target = self.documents_dir / f"{sha}.txt"
        if not target.exists():
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
        return sha

    def document_text(self, sha: str) -> str:
        return (self.documents_dir / f"{sha}.txt").read_text(encoding="utf-8")

    def open_writer(self, conv_id: str) -> Writer:
        self.conversations_dir.mkdir(parents=True, exist_ok=True)
        path = self.path_of(conv_id)
        if path.exists():
            self._check_file(path)  # a damaged file is set aside before anything is appended to it
            drop_torn_tail(path)
        return Writer(path)

    # -- reading ----------------------------------------------------------------------------------
    def list(self) -> list[Conversation]:
        if not self.conversations_dir.exists():
            return []
        convs = []
        for path in sorted(self.conversations_dir.glob("*.jsonl")):
            try:
                conv = self.load(path.stem)
            except (OSError, ValueError):
                continue
            if conv.turns or conv.pending_documents:
                convs.append(conv)
        return sorted(convs, key=lambda c: (c.created, c.id), reverse=True)

    def resolve(self, ref: str) -> str:
        """'last' or an id (or a unique prefix of one) -> the id. Raises KeyError with a message."""
        convs = self.list()
        if ref == "last":
            if not convs:
                raise KeyError("no saved conversations yet")
            with_turns = [c for c in convs if c.turns]  # a new chat holding only documents comes second
            return (with_turns or convs)[0].id
        matches = [c.id for c in convs if c.id == ref] or [c.id for c in convs if c.id.startswith(ref)]
        if len(matches) != 1:
            raise KeyError(f"no saved conversation {ref!r}" if not matches else f"{ref!r} is ambiguous")
        return matches[0]

    def _check_file(self, path: Path) -> list[dict[str, Any]]:
        """The file's records; a damaged file is reported, set aside and replaced by its readable
        records."""
        records, damaged, _ = read_records(path)
        if damaged:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = path.with_name(f"{path.name}.damaged-{stamp}")
            n = 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
            path.rename(aside)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(json_text(r) + "\n" for r in records), encoding="utf-8")
            tmp.replace(path)
            line, reason = damaged[0]
            more = f" (and {len(damaged) - 1} more lines)" if len(damaged) > 1 else ""
            self.problems.append(
                f"history: {path}, line {line}: {reason}{more}; the file was set aside as {aside.name} "
                f"and its {len(records)} readable records kept"
            )
        return records

    def load(self, conv_id: str) -> Conversation:
        path = self.path_of(conv_id)
        conv = Conversation(id=conv_id, created=path.stat().st_mtime)
        turn: SavedTurn | None = None
        for rec in self._check_file(path):
            kind = rec.get("type")
            if kind == "meta":
                created, model = rec.get("created"), rec.get("model")
                conv.created = created if isinstance(created, (int, float)) else conv.created
                conv.model = model if isinstance(model, str) else ""
            elif kind == "document":
                conv.pending_documents.append(
                    SavedDocument(rec["name"], rec["sha"], _int(rec.get("n_tokens")), _str(rec.get("path")))
                )
            elif kind == "question":
                turn = SavedTurn(rec["text"], documents=conv.pending_documents)
                conv.pending_documents = []
                conv.turns.append(turn)
            elif kind == "delta" and turn is not None:
                turn.answer += rec["text"]
            elif kind == "failed" and turn is not None and not turn.answer:
                conv.turns.pop()  # the question never reached the model: as in the live session
                conv.pending_documents = turn.documents + conv.pending_documents
                turn = conv.turns[-1] if conv.turns else None
            elif kind == "answer" and turn is not None:
                turn.answer, turn.complete = rec["text"], True
                turn.stats = rec["stats"] if isinstance(rec.get("stats"), dict) else {}
                turn.sources = saved_sources(rec.get("sources"))
        return conv


def saved_sources(value: Any) -> list[Source]:
    """An answer record's sources; entries that are not sources (an older or damaged file) are left
    out rather than failing the conversation."""
    if not isinstance(value, list):
        return []
    return [s for s in map(Source.from_dict, value) if s is not None]


def drop_torn_tail(path: Path) -> int:
    """Cut a last line that has no newline (a record cut off by a crash); returns bytes removed."""
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        step, pos = 65536, size
        while pos > 0:  # find the last newline, reading backwards
            start = max(0, pos - step)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


class Writer:
    """Appends records to one conversation file: each record is one write of a whole line to a
    file opened for appending, so a crash loses nothing shown and never leaves half a record in
    the middle of the file."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        data = (json_text(record) + "\n").encode("utf-8")  # json_text escapes lone surrogates
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def meta(self, model: str) -> None:
        self.write({"type": "meta", "created": time.time(), "model": model})

    def document(self, name: str, sha: str, n_tokens: int, path: str = "") -> None:
        self.write({"type": "document", "name": name, "sha": sha, "n_tokens": n_tokens, "path": path})

    def question(self, text: str) -> None:
        self.write({"type": "question", "text": text, "time": time.time()})

    def delta(self, text: str) -> None:
        if text:
            self.write({"type": "delta", "text": text})

    def answer(self, text: str, stats: dict[str, Any], sources: Sequence[Source] = ()) -> None:
        record: dict[str, Any] = {"type": "answer", "text": text, "stats": stats}
        if sources:
            record["sources"] = [s.to_dict() for s in sources]
        self.write(record)
        try:
            os.fsync(self._fd)
        except OSError:
            pass

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # a writer dropped without close() does not leak its descriptor
        self.close()


def transcript_markdown(
    turns: list[tuple[str, str]], documents: list[str], title: str = "Conversation",
    sources: Sequence[Sequence[Source]] | None = None,
) -> str:
    """Export a conversation as Markdown, safe to `cat` in a terminal (control characters and escape
    sequences from documents or the model are written as their visible pictures). `sources[i]` are
    turn i's sources: listed under its answer, each passage quoted."""
    lines = [f"# {one_line(title)}", ""]
    if documents:
        lines += ["Documents: " + ", ".join(f"`{one_line(d)}`" for d in documents), ""]
    for i, (question, answer) in enumerate(turns):
        lines += ["## Question", "", terminal_text(question.strip()), "", "## Answer", "",
                  terminal_text(answer.strip()), ""]
        cited = sources[i] if sources is not None and i < len(sources) else ()
        if cited:
            lines += ["### Sources", ""]
            for s in cited:
                lines.append(f"- `{one_line(s.document)}`, {s.lines_label} ({s.score:.0%} of the attention):")
                lines += ["", *(f"  > {terminal_text(t)}".rstrip() for t in s.text.split("\n")), ""]
    return "\n".join(lines)
