"""Conversations saved as they happen: one JSON-lines file per conversation in the data dir.

Every record is appended and flushed when it happens, the streamed answer included (one "delta"
record per UI batch), so a crash mid-answer loses nothing already shown. Documents are stored once
by content hash next to the conversations so a conversation can be reopened without its files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triforce_chat.app.settings import data_dir


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
        return Writer(self.path_of(conv_id))

    # -- reading ----------------------------------------------------------------------------------
    def list(self) -> list[Conversation]:
        if not self.conversations_dir.exists():
            return []
        convs = []
        for path in self.conversations_dir.glob("*.jsonl"):
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

    def load(self, conv_id: str) -> Conversation:
        path = self.path_of(conv_id)
        conv = Conversation(id=conv_id, created=path.stat().st_mtime)
        turn: SavedTurn | None = None
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line after a crash
                kind = rec.get("type")
                if kind == "meta":
                    conv.created, conv.model = rec.get("created", conv.created), rec.get("model", "")
                elif kind == "document":
                    conv.pending_documents.append(
                        SavedDocument(rec["name"], rec["sha"], rec.get("n_tokens", 0), rec.get("path", ""))
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
                    turn.answer, turn.stats, turn.complete = rec["text"], rec.get("stats", {}), True
        return conv


class Writer:
    """Appends records to one conversation file, flushing each so a crash loses nothing shown."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def meta(self, model: str) -> None:
        self.write({"type": "meta", "created": time.time(), "model": model})

    def document(self, name: str, sha: str, n_tokens: int, path: str = "") -> None:
        self.write({"type": "document", "name": name, "sha": sha, "n_tokens": n_tokens, "path": path})

    def question(self, text: str) -> None:
        self.write({"type": "question", "text": text, "time": time.time()})

    def delta(self, text: str) -> None:
        if text:
            self.write({"type": "delta", "text": text})

    def answer(self, text: str, stats: dict[str, Any]) -> None:
        self.write({"type": "answer", "text": text, "stats": stats})
        try:
            os.fsync(self._file.fileno())
        except OSError:
            pass

    def close(self) -> None:
        self._file.close()


def transcript_markdown(
    turns: list[tuple[str, str]], documents: list[str], title: str = "Conversation"
) -> str:
    """Export a conversation as Markdown."""
    lines = [f"# {title}", ""]
    if documents:
        lines += ["Documents: " + ", ".join(f"`{d}`" for d in documents), ""]
    for question, answer in turns:
        lines += ["## Question", "", question.strip(), "", "## Answer", "", answer.strip(), ""]
    return "\n".join(lines)
