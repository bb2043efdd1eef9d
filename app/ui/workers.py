"""The chat's three jobs (load the model, read and prefill documents, answer), as plain functions.

The app runs each from a `@work(thread=True)` worker on its compute thread (app/ui/compute.py); they
talk to it only through `post(message)` (app/ui/messages.py). Every exception becomes a message the
app shows (a notice, a failed load, an answer with an error), never a traceback on the screen.
Nothing here touches a widget, so tests call these functions directly with a list's `append` as
`post`.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.message import Message

from triforce_chat.app.settings import Settings, data_dir
from triforce_chat.app.ui.messages import (
    AnswerBatch,
    AnswerDone,
    CacheStatus,
    DocumentAdded,
    LoadDone,
    LoadProgress,
    ModelReady,
    Notice,
)
from triforce_chat.decoding.events import RoundEvent

if TYPE_CHECKING:
    from triforce_chat.app.runtime import DocumentText
    from triforce_chat.app.ui.history import History
    from triforce_chat.app.ui.widgets import AnswerMessage
    from triforce_chat.decoding.session import Session

Post = Callable[[Message], None]

UI_INTERVAL_S = 0.5  # the most often the answering worker posts streamed text to the UI (see README)
FIGURES_INTERVAL_S = 1.0  # cache figures (they read process memory) while answering
PROGRESS_INTERVAL_S = 0.1  # prefill progress


@dataclass
class Job:
    """The one job running (the app runs one at a time); `cancel` asks it to stop between steps."""

    kind: str  # "model" | "prefill" | "answer"
    cancel: threading.Event = field(default_factory=threading.Event)


def error_log(exc: BaseException) -> str:
    """Keep the traceback in a file and return one line for the user."""
    try:
        path = data_dir() / "error.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + "".join(traceback.format_exception(exc)) + "\n")
        where = f" (details in {path})"
    except OSError:
        where = ""
    return f"{type(exc).__name__}: {exc}{where}"


def rate_tracker(label: str | Callable[[], str], post: Post) -> Callable[[int, int], None]:
    """Progress posted at most every PROGRESS_INTERVAL_S; `label` may change (a callable)."""
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if total and (now - last[0] >= PROGRESS_INTERVAL_S or done >= total):
            last[0] = now
            rate = done / (now - t0) if now > t0 else None
            post(LoadProgress(label() if callable(label) else label, done, total, rate))

    return progress


# -- loading the model --------------------------------------------------------------------------------------
def load_session(settings: Settings, post: Post, model: Any = None, store: Any = None) -> None:
    """Open the session (app/runtime.py); posts ModelReady, or LoadDone(False) with the reason."""
    try:
        from triforce_chat.app import runtime

        t0 = time.perf_counter()
        try:
            session = runtime.open_session(
                settings, lm=model, store=store if store is not None else runtime.store_for(settings),
                log=lambda msg: post(LoadProgress(msg, 0, None, None)),
            )
        except runtime.StartupError as exc:
            post(LoadDone(False, f"cannot load the model: {exc}", "error"))
            return
        for notice in [*session.lm.notices, *session.take_notices()]:
            post(Notice(notice, "warning"))
        post(ModelReady(session, time.perf_counter() - t0))
    except Exception as exc:
        post(LoadDone(False, "cannot start the decoder: " + error_log(exc), "error"))


# -- documents ----------------------------------------------------------------------------------------------
def prefill_documents(
    session: Session, paths: list[Path | DocumentText], job: Job, post: Post, restore: Any = None,
    history: History | None = None,
) -> None:
    """Read and add documents (or restore a saved conversation), then prefill with progress; posts
    LoadDone with the outcome. A document that cannot be read is a notice; the others still load.
    Documents the command line read already come with their text (a pipe cannot be read twice)."""
    from triforce_chat.app.runtime import DocumentText, document_name, read_document
    from triforce_chat.decoding.memory.guard import MemoryShortage
    from triforce_chat.decoding.session import ContextOverflow, DocumentError, PrefillCancelled
    from triforce_chat.decoding.store.doccache import describe, resuming_line

    added = []
    try:
        if restore is not None:
            restore_conversation(session, restore, history, post)
        for item in paths:
            path, text = item if isinstance(item, DocumentText) else (item, None)
            name = document_name(path)
            if text is None:
                try:
                    name, text = read_document(path, warn=lambda m: post(Notice(m, "warning")),
                                               should_cancel=job.cancel.is_set)
                except DocumentError as exc:
                    post(Notice(str(exc), "error"))
                    continue
            post(LoadProgress(f"Tokenizing {name}", 0, None, None))
            try:
                doc = session.add_document(name, text)
            except DocumentError as exc:
                post(Notice(str(exc), "error"))
                continue
            added.append(doc)
            post(DocumentAdded(doc.name, text, doc.n_tokens, str(path)))
        names = ", ".join(d.name for d in added) if added else "conversation"
        label = ["Prefill " + names]

        def restored(report) -> None:  # the document cache had part or all of it
            if report.kept + report.restored < report.target:
                label[0] = f"Prefill {names}: {resuming_line(report)}"
                post(CacheStatus(resuming_line(report)))
                post(LoadProgress(label[0], 0, None, None))

        def forget_added() -> None:
            for doc in added:
                if doc in session.pending_documents:
                    session.pending_documents.remove(doc)

        try:
            n, _ = session.prefill(
                progress=rate_tracker(lambda: label[0], post), should_cancel=job.cancel.is_set,
                on_restore=restored, drafter_progress=rate_tracker(f"Draft model reading {names}", post),
            )
        except PrefillCancelled:
            report = session.last_sync
            kept = " (the saved part resumes next time)" if report.saved or report.restored else ""
            post(CacheStatus(f"stopped at {session.cache.length:,} of {report.target:,} tokens{kept}"))
            for notice in session.take_notices():
                post(Notice(notice, "warning"))
            forget_added()
            removed = f": {', '.join(d.name for d in added)} removed" if added else ""
            post(LoadDone(False, "loading cancelled" + removed, "warning"))
            return
        except (ContextOverflow, MemoryShortage) as exc:
            forget_added()
            post(LoadDone(False, str(exc), "error"))
            return
        report = session.last_sync
        line = describe(report)
        for notice in session.take_notices():
            post(Notice(notice, "warning"))
        if line:
            post(CacheStatus(line))
        post(LoadDone(True, line + (f" ({n / report.seconds:,.0f} tok/s)" if report.seconds > 0 and n else "")))
    except Exception as exc:
        post(LoadDone(False, error_log(exc), "error"))


def restore_conversation(session: Session, conv: Any, history: History | None, post: Post) -> None:
    """Put a saved conversation's documents and turns into the session."""
    from triforce_chat.decoding.session import Document, Turn

    session.turns, session.pending_documents = [], []

    def docs(saved) -> list:
        out = []
        for d in saved:
            try:
                text = history.document_text(d.sha) if history is not None else None
            except (OSError, ValueError):  # missing, or not UTF-8 any more
                text = None
            if text is None:
                post(Notice(f"{d.name}: the saved copy is missing; skipped", "warning"))
                continue
            out.append(Document(d.name, text, d.n_tokens or session.count_tokens(text)))
        return out

    for t in conv.turns:
        session.turns.append(Turn(question=t.question, documents=docs(t.documents), answer=t.answer, stats=t.stats,
                                  sources=list(t.sources)))
    session.pending_documents = docs(conv.pending_documents)


# -- answering ----------------------------------------------------------------------------------------------
def answer(session: Session, question: str, job: Job, post: Post, message: AnswerMessage) -> None:
    """Answer `question`, posting batches of rounds at most every UI_INTERVAL_S, then AnswerDone
    (with `error` set when it failed; `started` False when the question never reached the model)."""
    from triforce_chat.decoding.session import ContextOverflow, PrefillCancelled

    turns_before = len(session.turns)
    batch: list[RoundEvent] = []
    last = time.perf_counter()
    t_first: float | None = None
    t_last = last
    last_figures = 0.0
    error = ""
    try:
        progress = rate_tracker("Prefill question", post)
        for ev in session.generate(question, progress=progress, should_cancel=job.cancel.is_set):
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last - ev.wall_s  # decoding starts with the first round
            batch.append(ev)
            if t_last - last >= UI_INTERVAL_S:
                last = t_last
                stats = session.stats
                figures = None
                if t_last - last_figures >= FIGURES_INTERVAL_S:
                    figures, last_figures = session.cache_figures(), t_last
                post(AnswerBatch(message, batch, stats.to_dict(), list(stats.recent_tokens_per_s), figures))
                batch = []
    except PrefillCancelled:
        error = "stopped before the answer began"
    except ContextOverflow as exc:
        error = str(exc)
    except ValueError as exc:  # MemoryShortage among others: one line, the conversation kept
        error = str(exc)
    except Exception as exc:
        error = error_log(exc)
    for notice in session.take_notices():
        post(Notice(notice, "warning"))
    wall = t_last - t_first if t_first is not None else 0.0
    if batch:
        stats = session.stats
        post(AnswerBatch(message, batch, stats.to_dict(), list(stats.recent_tokens_per_s), None))
    started = len(session.turns) > turns_before
    turn = session.turns[-1] if started else None
    try:
        figures = session.cache_figures()
    except Exception:
        figures = None
    post(AnswerDone(message, turn.answer if turn else message.text, session.stats.to_dict(),
                    list(session.stats.recent_tokens_per_s), figures, error, wall, started, question,
                    sources=list(turn.sources) if turn else []))
