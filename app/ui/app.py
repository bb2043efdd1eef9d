"""The Textual chat app: `triforce-chat [--doc PATH]...`.

Threads: model loading, document prefill and answering run in `@work(thread=True)` workers (one at
a time, group "session") over the UI-free jobs of app/ui/workers.py, each handed to the process's one
compute thread (app/ui/compute.py); they talk to the UI only by posting messages
(app/ui/messages.py), throttled so the UI never slows decoding. The screens are in
app/ui/screens.py, the widgets in app/ui/widgets.py. Every Binding has an id, so keys can be remapped from the
config file's [keymap] table.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Static

from triforce_chat.app.runtime import DocumentText, document_name
from triforce_chat.app.safe_text import one_line
from triforce_chat.app.settings import Settings
from triforce_chat.app.ui import workers
from triforce_chat.app.ui.compute import compute_thread
from triforce_chat.app.ui.history import History, Writer, transcript_markdown
from triforce_chat.app.ui.keymap import check_keymap
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
from triforce_chat.app.ui.screens import (
    PANELS_MIN_WIDTH,
    ChatScreen,
    DocumentScreen,
    HelpScreen,
    HistoryScreen,
    SourceScreen,
)
from triforce_chat.app.ui.widgets import (
    AnswerMessage,
    ChatInput,
    LoadBar,
    Pending,
    SourcesLine,
    StatsPanel,
    UserMessage,
    render_cache,
    render_documents,
    stop_label,
)
from triforce_chat.app.ui.workers import Job
from triforce_chat.decoding.config import parse_budget
from triforce_chat.decoding.events import CacheFigures
from triforce_chat.decoding.models.catalog import DEFAULT_MODEL_NAME
from triforce_chat.themes.palette import ORIGIN_DEFAULTS, STYLESHEET, THEMES

PANEL_INTERVAL_S = 1.0  # the most often the side panels are redrawn while answering


MODAL_SAFE_ACTIONS = ("quit", "help", "command_palette")  # actions that also work over a modal screen


def turns_label(n: int) -> str:
    return "1 turn" if n == 1 else f"{n} turns"


class TriforceApp(App[int]):
    TITLE = "triforce-chat"
    CSS_PATH = STYLESHEET
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
        Binding("escape", "stop", "Stop", id="stop"),
        Binding(
            "ctrl+t",
            "cycle_level",
            "Level",
            id="cycle-level",
            tooltip="Cycle the speculation level 0 -> 1 -> 2",
            priority=True,
        ),
        Binding("alt+0", "set_level(0)", "Level 0", id="level-0", show=False, priority=True),
        Binding("alt+1", "set_level(1)", "Level 1", id="level-1", show=False, priority=True),
        Binding("alt+2", "set_level(2)", "Level 2", id="level-2", show=False, priority=True),
        Binding("ctrl+up", "gamma(1, 0)", "γ mid +1", id="gamma-up", show=False, priority=True),
        Binding("ctrl+down", "gamma(-1, 0)", "γ mid -1", id="gamma-down", show=False, priority=True),
        Binding("alt+up", "gamma(0, 1)", "γ low +1", id="gamma-low-up", show=False, priority=True),
        Binding("alt+down", "gamma(0, -1)", "γ low -1", id="gamma-low-down", show=False, priority=True),
        Binding("alt+right", "budget(2)", "Budget ×2", id="budget-up", show=False, priority=True),
        Binding("alt+left", "budget(0.5)", "Budget ÷2", id="budget-down", show=False, priority=True),
        Binding("ctrl+r", "toggle_viz", "Draft view", id="toggle-viz", priority=True),
        Binding("ctrl+o", "load_document", "Load doc", id="load-document", priority=True),
        Binding("ctrl+n", "new_chat", "New chat", id="new-chat", priority=True),
        Binding("ctrl+s", "export", "Export", id="export", priority=True),
        Binding("f4", "history", "History", id="history"),
        Binding("f5", "toggle_panels", "Panels", id="toggle-panels", show=False, priority=True,
                tooltip=f"Show or hide the side panels (hidden at first below {PANELS_MIN_WIDTH} columns)"),
        Binding("ctrl+l", "cycle_theme", "Theme", id="theme", show=False, priority=True),
        Binding("f2", "toggle_sources", "Sources", id="toggle-sources", show=False, priority=True,
                tooltip="Show or hide the text of the passages each answer drew on"),
        Binding("f3", "open_source", "Open source", id="open-source", show=False, priority=True,
                tooltip="Open the latest answer's first source in its document"),
        Binding("f1", "help", "Help", id="help"),
    ]

    def __init__(
        self,
        settings: Settings | None = None,
        docs: Iterable[Path | DocumentText] = (),
        resume: str | None = None,
        model: Any = None,
        history: History | None = None,
        store: Any = None,
        notices: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.startup_notices = list(notices)  # e.g. config file problems found by the CLI
        self.settings = settings or Settings()
        self.initial_docs = [d if isinstance(d, DocumentText) else Path(d) for d in docs]
        self.resume = resume
        self.preloaded_model = model
        self.store = store  # a DocumentStore; None: the settings' ([cache], --no-doc-cache)
        self.doc_cache_status = ""
        self.history = history if history is not None else (History() if self.settings.history else None)
        s = self.settings
        self.pending = Pending(s.level, s.draft, s.budget, s.gamma_mid, s.gamma_low)
        self.session: Any = None
        self.special_ids: frozenset[int] = frozenset()  # the tokenizer's, for the draft view (_decode_one)
        self.load_error = ""  # why the model did not load, shown until one does
        self.job: Job | None = None
        self.viz = False
        self.sources_expanded = False
        self.answers: list[AnswerMessage] = []
        self.queued: tuple[str, UserMessage, Static] | None = None  # (question, its message, its note)
        self.conv_id: str | None = None
        self.writer: Writer | None = None
        self.last_figures: CacheFigures | None = None
        self._panels_at = 0.0
        # per answer: tokens, wall and decode seconds (the latest ones: a week-long session stays flat)
        self.answer_timings: deque[dict[str, float]] = deque(maxlen=256)
        self.answers_done = 0
        for theme in THEMES:
            self.register_theme(theme)
        self.keymap_problems: list[str] = []
        if self.settings.keymap:
            origin = self.settings.origin
            keymap, self.keymap_problems = check_keymap(
                dict(self.settings.keymap), self._binding_scopes(), lambda bid: origin.get(f"keymap.{bid}", "keymap")
            )
            self.set_keymap(keymap)

    # -- setup ------------------------------------------------------------------------------------------
    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(ORIGIN_DEFAULTS)

    def get_default_screen(self) -> Screen:
        return ChatScreen(self.pending)

    def on_mount(self) -> None:
        if self.get_theme(self.settings.theme) is None:
            self.notify(
                f"unknown theme {self.settings.theme!r}; using triforce-dark "
                f"(themes: {', '.join(sorted(self.available_themes))})",
                severity="warning",
            )
            self.theme = "triforce-dark"
        else:
            self.theme = self.settings.theme

    def start(self) -> None:
        """Once the chat screen is up: report config and keymap problems, and load the model."""
        for problem in [*self.startup_notices, *self.keymap_problems]:
            self.notify(problem, severity="warning", timeout=12)
        self.query_one("#loadbar").display = False
        self.sub_title = "loading model …"
        self._show_load("Loading model " + (self.settings.model or DEFAULT_MODEL_NAME), 0, None, None)
        self.job = Job("model")
        self.load_model()

    def _all_bindings(self) -> list[Binding]:
        out: list[Binding] = []
        for group in (
            self.BINDINGS,
            ChatInput.BINDINGS,
            HelpScreen.BINDINGS,
            DocumentScreen.BINDINGS,
            HistoryScreen.BINDINGS,
            SourceScreen.BINDINGS,
        ):
            out += [b for b in group if isinstance(b, Binding)]
        return out

    def _binding_scopes(self) -> list[list[Binding]]:
        """Bindings active at the same time: the chat screen (the app's and the input's), and each
        modal screen with the app's bindings that stay active over it (see check_action)."""
        over_modals = [b for b in self.BINDINGS if isinstance(b, Binding) and b.action in MODAL_SAFE_ACTIONS]
        scopes = [[*self.BINDINGS, *ChatInput.BINDINGS]]
        for screen in (HelpScreen, DocumentScreen, HistoryScreen, SourceScreen):
            scopes.append([*screen.BINDINGS, *over_modals])
        return scopes

    def notify(self, message: str, *, title: str = "", severity: str = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Every notice shown safely: file names, model output and config values may hold escape
        sequences or [markup]; they are shown as text (app/safe_text.py)."""
        super().notify(one_line(message, 2000), title=one_line(title, 200), severity=severity,
                       timeout=timeout, markup=markup)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Chat actions only act on the chat screen, not under a modal (help, picker, history)."""
        if action in MODAL_SAFE_ACTIONS or isinstance(self.screen, ChatScreen):
            return True
        return False

    # -- helpers ----------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.job is not None

    def _post(self, message: Message) -> None:
        """From a worker thread: hand a message to the UI without waiting."""
        self.post_message(message)

    def _show_load(self, label: str, done: int, total: int | None, rate: float | None) -> None:
        bar = self.query_one("#loadbar", LoadBar)
        bar.display = True
        bar.show(label, done, total, rate)

    def _refresh_panels(self, stats: dict | None = None, rates: list[float] | None = None) -> None:
        panel = self.query_one("#stats", StatsPanel)
        panel.pending = self.pending
        panel.show(stats, rates)
        if self.session is not None:
            docs = [(d.name, d.n_tokens) for d in self.session.documents]
            self.query_one("#documents", Static).update(
                render_documents(docs, self.session.context_tokens, self.session.max_context, self.doc_cache_status)
            )
        self.query_one("#cache", Static).update(render_cache(self.last_figures, self.load_error))

    # -- workers (app/ui/workers.py does the work; these only run it in a thread) -------------------
    # (each hands its job to the process's one compute thread, app/ui/compute.py says why, and waits)
    @work(thread=True, exclusive=True, group="session")
    def load_model(self) -> None:
        compute_thread().run(
            workers.load_session, self.settings, self._post, model=self.preloaded_model, store=self.store
        )

    @work(thread=True, exclusive=True, group="session")
    def prefill_worker(self, job: Job, paths: list[Path | DocumentText], restore: Any = None) -> None:
        """Read and add documents (or restore a saved conversation), then prefill with progress."""
        compute_thread().run(
            workers.prefill_documents, self.session, paths, job, self._post, restore=restore, history=self.history
        )

    @work(thread=True, exclusive=True, group="session")
    def answer_worker(self, job: Job, answer: AnswerMessage, question: str) -> None:
        compute_thread().run(workers.answer, self.session, question, job, self._post, answer)

    # -- worker messages --------------------------------------------------------------------------------
    def on_model_ready(self, message: ModelReady) -> None:
        self.session = message.session
        lm = self.session.lm
        self.special_ids = frozenset(self.session.tokenizer.all_special_ids)
        self.sub_title = one_line(f"{lm.model_id} · context {self.session.max_context:,}", 120)
        self.last_figures = self.session.cache_figures()
        self.job = None
        self.query_one("#loadbar").display = False
        self._refresh_panels()
        if self.resume:
            self._resume(self.resume)
        elif self.initial_docs:
            self._start_prefill(self.initial_docs)
        self._send_queued()

    def on_load_progress(self, message: LoadProgress) -> None:
        self._show_load(message.label, message.done, message.total, message.rate)

    def on_load_done(self, message: LoadDone) -> None:
        self.job = None
        self.query_one("#loadbar").display = False
        if message.message:
            self.notify(message.message, severity=message.severity, timeout=8 if not message.ok else 4)
        if not message.ok and self.session is None:  # the model failed: say so after the notice is gone
            self.load_error = message.message
            self.sub_title = "no model loaded"
        if self.session is not None:
            self.last_figures = self.session.cache_figures()
        self._refresh_panels()
        self._send_queued()

    def on_cache_status(self, message: CacheStatus) -> None:
        self.doc_cache_status = message.text
        self._refresh_panels()

    def on_notice(self, message: Notice) -> None:
        self.notify(message.message, severity=message.severity, timeout=8)

    def on_document_added(self, message: DocumentAdded) -> None:
        if self.history is not None:
            try:
                writer = self._writer()
                sha = self.history.store_document(message.text)
                writer.document(message.name, sha, message.n_tokens, message.path)
            except OSError as exc:
                self.notify(f"history: cannot save ({exc})", severity="warning")
        self._refresh_panels()

    async def on_answer_batch(self, message: AnswerBatch) -> None:
        delta = await message.answer.add_events(message.events)
        if self.writer is not None and delta:
            try:
                self.writer.delta(delta)
            except OSError:
                pass
        if message.figures is not None:
            self.last_figures = message.figures
        now = time.monotonic()
        if now - self._panels_at >= PANEL_INTERVAL_S:
            self._panels_at = now
            loadbar = self.query_one("#loadbar")
            if loadbar.display:  # the question's prefill is over once tokens arrive
                loadbar.display = False
            self._refresh_panels(message.stats, message.rates)
        transcript = self.query_one("#transcript", VerticalScroll)
        if transcript.max_scroll_y - transcript.scroll_y < 6:
            transcript.scroll_end(animate=False)

    async def on_answer_done(self, message: AnswerDone) -> None:
        self.job = None
        self.query_one("#loadbar").display = False
        s = message.stats
        if not message.started:
            await self._unsend(message)
            return
        if message.error:
            self.notify(message.error, severity="error", timeout=10)
        meta = (
            f"{s.get('new_tokens', 0)} tokens · {s.get('tokens_per_s', 0):.1f} tok/s · level {s.get('level')}"
            f" · {stop_label(s.get('stop_reason'))}"
        )
        await message.answer.finish(meta, message.text if not message.error or message.text else None,
                                    message.sources)
        if self.writer is not None:
            try:
                if not message.error:
                    self.writer.answer(message.text, {**s, "ui_wall_s": round(message.wall_s, 4)}, message.sources)
                elif not message.text:
                    self.writer.write({"type": "failed", "error": message.error})
            except OSError:
                pass
        if s.get("new_tokens"):
            self.answer_timings.append(
                {"tokens": s["new_tokens"], "decode_s": s.get("decode_s", 0.0), "wall_s": message.wall_s}
            )
            self.answers_done += 1
        if message.figures is not None:
            self.last_figures = message.figures
        self._refresh_panels(s, message.rates)
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    async def _unsend(self, message: AnswerDone) -> None:
        """The question never reached the model (stopped during its prefill, too long, not enough
        memory): the transcript and the history forget it, as the session did, and it goes back to
        the input so nothing typed is lost."""
        if message.error:
            severity = "warning" if message.error.startswith("stopped") else "error"
            self.notify(f"{message.error}; your question is back in the input", severity=severity, timeout=10)
        if message.answer in self.answers:
            self.answers.remove(message.answer)
        users = self.query(UserMessage)
        if users:
            await users.last().remove()
        await message.answer.remove()
        if not self.answers:
            self.query_one("#welcome").display = True
        box = self.query_one(ChatInput)
        if not box.text.strip():
            box.load_text(message.question)
            box.move_cursor(box.document.end)
        if self.writer is not None:
            try:
                self.writer.write({"type": "failed", "error": message.error or "stopped"})
            except OSError:
                pass
        self._refresh_panels()

    # -- history ----------------------------------------------------------------------------------------
    def _writer(self) -> Writer:
        assert self.history is not None
        if self.writer is None:
            self.conv_id = self.conv_id or self.history.new_id()
            self.writer = self.history.open_writer(self.conv_id)
            self.writer.meta(self.session.lm.model_id if self.session else "")
        return self.writer

    def _history_problems(self) -> None:
        """Damaged history files found while reading: each one reported (path, line, where it went)."""
        if self.history is not None:
            for problem in self.history.take_problems():
                self.notify(problem, severity="warning", timeout=15)

    def _close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer, self.conv_id = None, None

    def _resume(self, ref: str) -> None:
        if self.history is None:
            self.notify("history is turned off (history = false)", severity="warning")
            return
        try:
            conv = self.history.load(self.history.resolve(ref))
        except (KeyError, OSError, ValueError) as exc:
            self._history_problems()
            self.notify(f"cannot resume {ref!r}: {exc.args[0] if exc.args else exc}", severity="error")
            return
        self._close_writer()
        self.conv_id = conv.id
        self.writer = self.history.open_writer(conv.id)
        self._history_problems()
        self._clear_transcript()
        transcript = self.query_one("#transcript", VerticalScroll)
        for t in conv.turns:
            transcript.mount(UserMessage(t.question, [d.name for d in t.documents]))
            answer = AnswerMessage(self._decode_one, text=t.answer, viz=self.viz, sources=t.sources)
            self.answers.append(answer)
            transcript.mount(answer)
        self.notify(f"reopened conversation {conv.id} ({turns_label(len(conv.turns))})")
        self._start_prefill([], restore=conv)

    # -- actions ----------------------------------------------------------------------------------------
    def _start_prefill(self, paths: list[Path | DocumentText], restore: Any = None) -> None:
        self.job = Job("prefill")
        names = [p.name if isinstance(p, DocumentText) else document_name(p) for p in paths]
        self._show_load("Loading " + (", ".join(names) or "conversation"), 0, None, None)
        self.prefill_worker(self.job, paths, restore)

    def _decode_one(self, tok: int) -> str:
        """A token's text for the draft view; a special token (the end of an answer) as a marker,
        ⟨im_end⟩, not as its raw markup <|im_end|>."""
        if self.session is None:
            return str(tok)
        tokenizer = self.session.tokenizer
        if tok in self.special_ids:
            return "⟨" + tokenizer.convert_ids_to_tokens(tok).strip("<|>") + "⟩"
        return tokenizer.decode([tok])

    def _apply_pending(self) -> str | None:
        """Hand the UI's settings to the session before an answer; returns an error line or None."""
        p = self.pending
        try:
            self.session.set_level(p.level)
            self.session.set_gammas(p.gamma_mid, p.gamma_low)
            if str(self.session.config.budget) != str(p.budget):
                self.session.set_budget(p.budget)
        except ValueError as exc:
            return str(exc)
        return None

    @on(ChatInput.Submitted)
    def _send(self, event: ChatInput.Submitted) -> None:
        question = event.text.strip()
        loading = self.session is None or (self.busy and self.job.kind in ("model", "prefill"))
        if loading and self.job is not None:  # chat apps queue it: sent when the document is ready
            if self.queued is not None:
                self.notify("a question is queued already; esc cancels it", severity="warning")
                return
            event.chat_input.clear()
            self._queue(question)
            return
        if self.session is None:
            self.notify(f"no model is loaded ({self.load_error or 'see the Cache panel'}); your question stays "
                        "in the input", severity="error")
            return
        if self.busy:
            self.notify("still answering; press esc to stop, your question stays in the input", severity="warning")
            return
        err = self._apply_pending()
        if err:
            self.notify(err, severity="error")
            return
        event.chat_input.clear()
        self._submit(question)

    def _submit(self, question: str, shown: UserMessage | None = None) -> None:
        """Send a question to the model (`shown`: its message, already in the transcript)."""
        self.query_one("#welcome").display = False
        transcript = self.query_one("#transcript", VerticalScroll)
        if shown is None:
            transcript.mount(UserMessage(question, [d.name for d in self.session.pending_documents]))
        answer = AnswerMessage(self._decode_one, viz=self.viz)
        self.answers.append(answer)
        transcript.mount(answer)
        transcript.scroll_end(animate=False)
        if self.history is not None:
            try:
                self._writer().question(question)
            except OSError as exc:
                self.notify(f"history: cannot save ({exc})", severity="warning")
        self.job = Job("answer")
        self.answer_worker(self.job, answer, question)

    # -- a question asked while the model or a document is loading -----------------------------------
    def _queue(self, question: str) -> None:
        self.query_one("#welcome").display = False
        transcript = self.query_one("#transcript", VerticalScroll)
        docs = [d.name for d in self.session.pending_documents] if self.session is not None else []
        shown = UserMessage(question, docs)
        note = Static("queued: sent when loading is done · esc cancels", classes="queued-note")
        transcript.mount(shown)
        transcript.mount(note)
        transcript.scroll_end(animate=False)
        self.queued = (question, shown, note)

    def _unqueue(self, why: str, severity: str = "information") -> None:
        """Take the queued question back into the input (nothing typed is lost)."""
        question, shown, note = self.queued
        self.queued = None
        shown.remove()
        note.remove()
        if not self.answers:
            self.query_one("#welcome").display = True
        box = self.query_one(ChatInput)
        if not box.text.strip():
            box.load_text(question)
            box.move_cursor(box.document.end)
        self.notify(f"{why}; your question is back in the input", severity=severity, timeout=6)

    def _send_queued(self) -> None:
        """Loading is over: send the queued question, or give it back when there is no model."""
        if self.queued is None or self.busy:
            return
        if self.session is None:
            self._unqueue("the model did not load", "error")
            return
        err = self._apply_pending()
        if err:
            self._unqueue(err, "error")
            return
        question, shown, note = self.queued
        self.queued = None
        note.remove()
        self._submit(question, shown=shown)

    def action_stop(self) -> None:
        if self.queued is not None:  # first the queued question, then (esc again) the load itself
            self._unqueue("queued question cancelled")
            return
        if self._stop_job():
            self.notify("stopping after this round" if self.job.kind == "answer" else "cancelling the load", timeout=2)

    def _stop_job(self) -> bool:
        """Ask the running answer or prefill to stop at its next step; False when there is none that
        can (no job, or the model still loading)."""
        if self.job is None or self.job.kind not in ("answer", "prefill"):
            return False
        if self.job.kind == "answer":
            self.session.stop()
        self.job.cancel.set()
        return True

    def on_unmount(self) -> None:
        """The app is closing (ctrl+q, the palette, an error): stop the running answer or prefill at
        its next step. Textual's own cancel only marks a thread worker, and the process would wait
        at exit for the job to run to its end (15 s for a long answer, minutes for a book's
        prefill). A model still loading is waited for (seconds; it cannot be stopped midway)."""
        self._stop_job()

    def _set_pending(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self.pending, k, v)
        self._refresh_panels()
        note = " (from the next answer)" if self.job is not None and self.job.kind == "answer" else ""
        p = self.pending
        self.notify(f"level {p.level}: {p.chain}  γ mid {p.gamma_mid} low {p.gamma_low}{note}", timeout=2)

    def action_cycle_level(self) -> None:
        self._set_pending(level=(self.pending.level + 1) % 3)

    def action_set_level(self, level: int) -> None:
        self._set_pending(level=int(level))

    def action_gamma(self, d_mid: int, d_low: int) -> None:
        mid = min(64, max(1, self.pending.gamma_mid + int(d_mid)))
        low = min(64, max(1, self.pending.gamma_low + int(d_low)))
        self._set_pending(gamma_mid=mid, gamma_low=low)

    def action_budget(self, factor: float) -> None:
        tokens, frac = parse_budget(self.pending.budget)
        chunk = self.settings.chunk_size
        if tokens:
            limit = self.session.max_context if self.session else 1 << 20
            new = str(int(min(limit, max(2 * chunk, round(tokens * float(factor) / chunk) * chunk))))
        else:
            new = f"{min(0.9, max(0.01, frac * float(factor))):.3g}"
        self._set_pending(budget=new)

    def action_toggle_viz(self) -> None:
        self.viz = not self.viz
        self.screen.set_class(self.viz, "-viz")
        for answer in self.answers:
            answer.set_viz(self.viz)
        self.notify("draft/accept view " + ("on" if self.viz else "off"), timeout=2)

    def action_toggle_panels(self) -> None:
        """Show or hide the Documents, Decoding and Cache panels, whatever the width made them."""
        shown = self.query_one("#side").display
        self.screen.set_class(shown, "-panels-off")
        self.screen.set_class(not shown, "-panels-on")

    def action_toggle_sources(self) -> None:
        """Expand every answer's sources into the passages' text (the lines it quotes marked), or fold them."""
        self.sources_expanded = not self.sources_expanded
        self.screen.set_class(self.sources_expanded, "-sources")
        if self.sources_expanded and not any(a.sources for a in self.answers):
            self.notify("no answer has sources yet (they come with answers about documents)", timeout=4)
        else:
            self.notify("sources " + ("expanded" if self.sources_expanded else "folded"), timeout=2)

    def action_open_source(self) -> None:
        """The latest answer's first source, in its document."""
        answer = next((a for a in reversed(self.answers) if a.sources), None)
        if answer is None:
            self.notify("no answer has sources yet", severity="warning")
            return
        self.open_source(answer.sources, 0)

    def on_sources_line_open(self, message: SourcesLine.Open) -> None:
        self.open_source(message.sources, message.index)

    def open_source(self, sources: list, index: int) -> None:
        """A document view scrolled to `sources[index]`; the text is the session's copy of the document
        (what was prefilled and cited, not the file as it may be now)."""
        if not isinstance(self.screen, ChatScreen):
            return
        self.push_screen(SourceScreen(list(sources), index, [self._document_text(s) for s in sources]))

    def _document_text(self, source) -> str | None:
        """The loaded text of the document a source cites (None when it is no longer loaded)."""
        docs = self.session.documents if self.session is not None else []
        if 0 <= source.document_index < len(docs) and docs[source.document_index].name == source.document:
            return docs[source.document_index].original
        named = [d for d in docs if d.name == source.document]
        return named[-1].original if named else None

    def action_load_document(self) -> None:
        if self.session is None:
            self.notify("the model is still loading", severity="warning")
            return
        if self.busy:
            self.notify("busy: wait for the answer or press esc", severity="warning")
            return

        def loaded(path: Path | None) -> None:
            if path is not None:
                if self.busy:
                    self.notify("busy: wait for the answer or press esc", severity="warning")
                    return
                self._start_prefill([path])

        self.push_screen(DocumentScreen(), loaded)

    def _clear_transcript(self) -> None:
        for answer in self.answers:
            answer.remove()
        self.answers = []
        self.query(UserMessage).remove()
        self.query_one("#welcome").display = True

    def action_new_chat(self) -> None:
        if self.busy:
            self.notify("busy: press esc first", severity="warning")
            return
        if self.session is not None:
            self.session.new_chat()
        self._close_writer()
        self._clear_transcript()
        if self.session is not None and self.history is not None and self.session.pending_documents:
            for d in self.session.pending_documents:
                try:
                    self._writer().document(d.name, self.history.store_document(d.text), d.n_tokens)
                except OSError:
                    pass
        self._refresh_panels({}, [])
        self.notify("new chat (documents kept)", timeout=2)

    def transcript_pairs(self) -> list[tuple[str, str]]:
        if self.session is not None:
            return [(t.question, t.answer) for t in self.session.turns]
        return []

    def transcript_sources(self) -> list[list]:
        """Each turn's sources, in the order of transcript_pairs."""
        return [list(t.sources) for t in self.session.turns] if self.session is not None else []

    def action_export(self) -> None:
        pairs = self.transcript_pairs()
        if not pairs:
            self.notify("nothing to export yet", severity="warning")
            return
        name = f"triforce-chat-{self.conv_id or time.strftime('%Y%m%d-%H%M%S')}.md"
        path = Path.cwd() / name
        docs = [d.name for d in self.session.documents] if self.session else []
        try:
            path.write_text(
                transcript_markdown(pairs, docs, title=f"triforce-chat {self.conv_id or ''}".strip(),
                                    sources=self.transcript_sources()),
                encoding="utf-8",
            )
        except OSError as exc:
            self.notify(f"cannot export: {exc}", severity="error")
            return
        self.notify(f"exported to {path}")

    def action_history(self) -> None:
        if self.history is None:
            self.notify("history is turned off", severity="warning")
            return
        items = [(c.id, f"{c.id}  {turns_label(len(c.turns))}  {c.title}") for c in self.history.list()]
        self._history_problems()

        def picked(conv_id: str | None) -> None:
            if conv_id is None:
                return
            if self.busy or self.session is None:
                self.notify("busy: try again when idle", severity="warning")
                return
            self.session.new_chat()
            self._resume(conv_id)

        self.push_screen(HistoryScreen(items), picked)

    def action_cycle_theme(self) -> None:
        names = [t.name for t in THEMES]
        nxt = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0]
        self.theme = nxt
        self.notify(f"theme {nxt}", timeout=2)

    def action_help(self) -> None:
        keymap = self.settings.keymap
        rows = []
        for b in self._all_bindings():
            keys = keymap.get(b.id, b.key) if b.id else b.key
            rows.append((keys, b.description or b.action, b.id or ""))
        self.push_screen(HelpScreen(rows))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Load a document", "Open a text file and prefill it", self.action_load_document)
        yield SystemCommand("Conversations", "Reopen a saved conversation", self.action_history)
        yield SystemCommand("Export transcript", "Write the conversation as Markdown", self.action_export)
        yield SystemCommand("New chat", "Forget the turns, keep the documents", self.action_new_chat)
        yield SystemCommand("Toggle draft/accept view", "Colour tokens by origin", self.action_toggle_viz)
        yield SystemCommand("Toggle sources", "The passages each answer drew on", self.action_toggle_sources)
        yield SystemCommand("Keys", "All key bindings", self.action_help)


def run_tui(
    settings: Settings, docs: list[Path | DocumentText], resume: str | None = None, notices: Sequence[str] = ()
) -> int:
    """Entry point for `triforce-chat` (the CLI validated the options and read the documents already)."""
    app = TriforceApp(settings, docs, resume, notices=notices)
    result = app.run()
    return int(result or 0)
