"""The screens: the chat screen (transcript, input, side panels) and the modal help, document
picker and saved-conversation screens."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen, Screen
from textual.widgets import DirectoryTree, Footer, Header, Input, OptionList, Static, TextArea
from textual.widgets.option_list import Option
from textual.widgets.text_area import Selection

from triforce_chat.app.safe_text import one_line, terminal_text
from triforce_chat.app.ui.widgets import ChatInput, LoadBar, Pending, StatsPanel, render_cache, render_documents
from triforce_chat.decoding.sources import Source


# -- modal screens --------------------------------------------------------------------------------------
class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close", id="close-help")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        lines = [
            Content.styled('Keys (remap in config.toml under [keymap]: id = "keys")', "bold"),
            Content(""),
        ]
        for keys, description, bid in self.rows:
            lines.append(
                Content.assemble((f"{one_line(keys, 30):<30} ", "bold $accent"), f"{description:<22}", (bid, "dim"))
            )
        lines += [
            Content(""),
            Content.styled(
                "Paste keeps newlines; ctrl+p opens the command palette (themes, documents, history).", "dim"
            ),
        ]
        with Vertical(id="help-box"):
            yield Static("Help", classes="modal-title")
            with VerticalScroll():
                yield Static(Content("\n").join(lines), id="help-text")


class DocumentScreen(ModalScreen[Path | None]):
    """A path input with a file tree below it; enter on the input or a file loads it."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel", id="close-document")]

    def compose(self) -> ComposeResult:
        with Vertical(id="document-box"):
            yield Static("Load a document", classes="modal-title")
            yield Input(placeholder="path to a text file (enter loads; or pick below)", id="document-path")
            yield DirectoryTree(Path.cwd(), id="document-tree")

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted, "#document-path")
    def _submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(Path(event.value.strip()).expanduser())

    @on(DirectoryTree.FileSelected)
    def _picked(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(event.path)


class HistoryScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel", id="close-history")]

    def __init__(self, items: list[tuple[str, str]]) -> None:
        super().__init__()
        self.items = items

    def compose(self) -> ComposeResult:
        with Vertical(id="history-box"):
            yield Static("Saved conversations (enter reopens)", classes="modal-title")
            if self.items:
                options = [Option(Content(one_line(label, 120)), id=cid) for cid, label in self.items]
                yield OptionList(*options, id="history-list")
            else:
                yield Static("no saved conversations yet", classes="dim")

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


def viewable_text(text: str) -> str:
    """A document's text for the document view: safe for the terminal (app/safe_text.py) and with the
    same lines as the text ("\n" ends a line; the line and paragraph separators U+2028/U+2029, which
    the view would break lines at, are shown as their names), so line numbers match the sources'."""
    return terminal_text(text).replace("\u2028", "<U+2028>").replace("\u2029", "<U+2029>")


class SourceScreen(ModalScreen[None]):
    """A document, as it was loaded into the conversation, scrolled to one of an answer's passages
    (selected); n / p go to the answer's next and previous passage."""

    BINDINGS = [
        Binding("escape,q", "dismiss", "Close", id="close-source"),
        Binding("n", "step(1)", "Next passage", id="source-next"),
        Binding("p", "step(-1)", "Previous passage", id="source-previous"),
    ]

    def __init__(self, sources: list[Source], index: int, texts: list[str | None]) -> None:
        """`texts[i]`: the text of the document of `sources[i]` (None: no longer loaded)."""
        super().__init__()
        self.sources, self.index, self.texts = sources, index, texts
        self._shown: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="source-box"):
            yield Static("", classes="modal-title", id="source-title")
            yield TextArea("", read_only=True, show_line_numbers=True, soft_wrap=True, id="source-text")
            yield Static(Content.styled("n next passage · p previous · esc closes", "dim"), id="source-keys")

    def on_mount(self) -> None:
        self.show(self.index)

    def show(self, index: int) -> None:
        self.index = index % len(self.sources)
        s, text = self.sources[self.index], self.texts[self.index]
        title = Content.assemble((one_line(s.document, 60), "bold"), f" · lines {s.lines[0]}-{s.lines[1]}",
                                 (f" · passage {self.index + 1} of {len(self.sources)}", "dim"))
        self.query_one("#source-title", Static).update(title)
        area = self.query_one("#source-text", TextArea)
        if text is None:
            area.load_text(viewable_text(f"({s.document} is no longer loaded; the passage as saved:)\n\n{s.text}"))
            self._shown = None
            return
        if self._shown is not text:
            area.load_text(viewable_text(text))
            self._shown = text
        last = min(s.lines[1], area.document.line_count)
        first = min(s.lines[0], last)
        # selected from its end back to its start: the cursor, which the view scrolls to, is on the first line
        area.selection = Selection((last - 1, len(area.document.get_line(last - 1))), (first - 1, 0))
        self.call_after_refresh(area.scroll_cursor_visible, center=True)

    def action_step(self, delta: int) -> None:
        self.show(self.index + int(delta))


# -- the main screen ------------------------------------------------------------------------------------
PANELS_MIN_WIDTH = 100  # columns: below it the side panels (46 wide) start hidden


class ChatScreen(Screen):
    AUTO_FOCUS = "#input"
    # at 80 columns the panels left the conversation 34: narrow screens get the -narrow class, and
    # the stylesheet hides the panels there until f5 (app.action_toggle_panels) shows them
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (PANELS_MIN_WIDTH, "-wide")]

    def __init__(self, pending: Pending) -> None:
        super().__init__()
        self.pending = pending

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                with VerticalScroll(id="transcript"):
                    yield Static(WELCOME, id="welcome")
                yield LoadBar(id="loadbar")
                yield ChatInput(id="input")
            with VerticalScroll(id="side"):
                docs = Static(render_documents([], 0, 0), id="documents")
                docs.border_title = "Documents"
                yield docs
                stats = StatsPanel(self.pending, id="stats")
                stats.border_title = "Decoding"
                yield stats
                cache = Static(render_cache(None), id="cache")
                cache.border_title = "Cache"
                yield cache
        yield Footer()

    def on_mount(self) -> None:
        self.app.call_later(self.app.start)  # type: ignore[attr-defined]


WELCOME = Content.assemble(
    ("triforce-chat", "bold $accent"),
    " — ask questions about long documents.\n",
    *[
        part
        for key, what in [
            ("ctrl+o", "load"),
            ("enter", "send"),
            ("ctrl+j", "newline"),
            ("ctrl+t", "level"),
            ("ctrl+r", "draft view"),
            ("f2", "sources"),
            ("f5", "panels"),
            ("f1", "all keys"),
        ]
        for part in ((key, "bold"), f" {what}   ")
    ],
)
