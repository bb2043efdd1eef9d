"""Messages from the worker threads to the UI: the only way a worker talks to the app (posted, never
awaited, so decoding never waits for the screen)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.message import Message

from triforce_chat.decoding.events import CacheFigures, RoundEvent
from triforce_chat.decoding.sources import Source

if TYPE_CHECKING:
    from triforce_chat.app.ui.widgets import AnswerMessage


class ModelReady(Message):
    def __init__(self, session: Any, load_s: float) -> None:
        super().__init__()
        self.session, self.load_s = session, load_s


class LoadProgress(Message):
    def __init__(self, label: str, done: int, total: int | None, rate: float | None) -> None:
        super().__init__()
        self.label, self.done, self.total, self.rate = label, done, total, rate


class LoadDone(Message):
    def __init__(self, ok: bool, message: str = "", severity: str = "information") -> None:
        super().__init__()
        self.ok, self.message, self.severity = ok, message, severity


class DocumentAdded(Message):
    def __init__(self, name: str, text: str, n_tokens: int, path: str) -> None:
        super().__init__()
        self.name, self.text, self.n_tokens, self.path = name, text, n_tokens, path


class AnswerBatch(Message):
    def __init__(
        self,
        answer: AnswerMessage,
        events: list[RoundEvent],
        stats: dict,
        rates: list[float],
        figures: CacheFigures | None,
    ) -> None:
        super().__init__()
        self.answer, self.events, self.stats, self.rates, self.figures = answer, events, stats, rates, figures


class AnswerDone(Message):
    def __init__(
        self,
        answer: AnswerMessage,
        text: str,
        stats: dict,
        rates: list[float],
        figures: CacheFigures | None,
        error: str = "",
        wall_s: float = 0.0,
        started: bool = True,
        question: str = "",
        sources: list[Source] | None = None,
    ) -> None:
        super().__init__()
        self.answer, self.text, self.stats, self.rates = answer, text, stats, rates
        self.sources = list(sources or [])  # the passages the answer drew on (decoding/sources.py)
        self.figures, self.error, self.wall_s = figures, error, wall_s
        # started: the question reached the model (a turn exists); if not, the question goes back
        # to the input and the transcript forgets it, as the session did
        self.started, self.question = started, question


class CacheStatus(Message):
    """The document cache's line for the Documents panel (restored / prefilled / resuming)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class Notice(Message):
    def __init__(self, message: str, severity: str = "information") -> None:
        super().__init__()
        self.message, self.severity = message, severity
