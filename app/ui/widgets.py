"""Widgets of the chat screen. Pure rendering: they are fed data, they never touch the decoder.

Rendering helpers (`render_stats`, `render_cache`, `render_rounds`, `render_tokens`) are plain
functions of the numbers the decoder reported, so they can be tested and snapshotted with recorded
data.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from textual import events
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.reactive import reactive
from textual.style import Style
from textual.widgets import Markdown, ProgressBar, Sparkline, Static, TextArea

from triforce_chat.app.safe_text import one_line, terminal_text
from triforce_chat.decoding.config import chain_label, drafter_label
from triforce_chat.decoding.events import CacheFigures, RoundEvent
from triforce_chat.decoding.sources import Source, names_shown, quoted_lines

ORIGIN_STYLE = {
    "low": "$origin-low",
    "mid": "italic $origin-mid",
    "target": "underline $origin-target",
}
REJECT_STYLE = "strike $origin-reject"
UNVERIFIED_STYLE = "strike dim"
BLOCKS = " ▁▂▃▄▅▆▇█"
MIB = 1024 * 1024
GIB = 1024 * MIB
QUESTION_SHOWN = 4000  # characters of a question shown in the transcript (all of it is sent and saved)
LARGE_PASTE = 100_000  # characters: a paste this long gets a notice suggesting ctrl+o


# -- small formatting helpers -----------------------------------------------------------------------
def bar(fraction: float | None, width: int = 16) -> str:
    """A fixed-width bar: full blocks, one partial block, light shade for the rest."""
    if fraction is None:
        return "·" * width
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (BLOCKS[part] if part and full < width else "")
    return text + "░" * (width - len(text))


def pct(value: float | None) -> str:
    return "  -  " if value is None else f"{100 * value:4.0f}%"


def mb(nbytes: int) -> str:
    """Bytes in binary megabytes, labelled as such (MiB, not the 5% smaller MB)."""
    return f"{nbytes / MIB:,.1f} MiB"


def token_label(text: str) -> str:
    """A token's text made visible in one short cell group (controls shown, never sent raw)."""
    if text == "":
        return "∅"
    if not text.strip():
        return one_line(text.replace("\n", "⏎").replace(" ", "␣").replace("\t", "⇥"))
    return one_line(text.strip())


# -- the input ------------------------------------------------------------------------------------------
class ChatInput(TextArea):
    """A multi-line input: enter sends, ctrl+j (or shift/alt+enter where the terminal reports them)
    inserts a newline, and a bracketed paste keeps its newlines without sending."""

    BINDINGS = [
        Binding("enter", "submit", "Send", id="send", priority=True),
        Binding(
            "ctrl+j,shift+enter,alt+enter",
            "newline",
            "Newline",
            id="newline",
            priority=True,
            key_display="ctrl+j",
        ),
    ]

    class Submitted(Message):
        def __init__(self, chat_input: ChatInput, text: str) -> None:
            super().__init__()
            self.chat_input = chat_input
            self.text = text

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault(
            "placeholder", "Ask about your documents · enter sends · ctrl+j newline · ctrl+o loads a file"
        )
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    def action_submit(self) -> None:
        # A priority binding runs as soon as the app sees the key, possibly before this widget has
        # handled the characters typed just before it (a script, or a fast burst): queue the send
        # behind them, so the question is the whole text.
        self.call_later(self._submit_now)

    def _submit_now(self) -> None:
        if self.text.strip():
            self.post_message(self.Submitted(self, self.text))

    def action_newline(self) -> None:
        self.insert("\n")

    async def _on_paste(self, event: events.Paste) -> None:
        """Pasted control characters and escape sequences are inserted as their visible pictures
        (a pasted ESC[31m reads ␛[31m), so the input never sends them to the terminal; a very
        long paste is kept whole, with a notice."""
        event.prevent_default()  # TextArea's own handler would insert the raw text as well
        text = terminal_text(event.text.replace("\r\n", "\n").replace("\r", "\n"))  # terminals paste CR lines
        if len(text) >= LARGE_PASTE:
            self.notify(
                f"pasted {len(text):,} characters; long text works best as a document (ctrl+o), "
                "which is prefilled once and kept across questions",
                timeout=6,
            )
        await super()._on_paste(events.Paste(text))


# -- the transcript -------------------------------------------------------------------------------------
def question_preview(question: str, limit: int = QUESTION_SHOWN) -> str:
    """A question as the transcript shows it: safe for the terminal, and cut after `limit`
    characters (a megabyte of pasted text would take seconds to lay out)."""
    text = terminal_text(question.rstrip())
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… ({len(text) - limit:,} more characters, sent and saved in full)"


class UserMessage(Static):
    def __init__(self, question: str, documents: Sequence[str] = ()) -> None:
        text = Content.assemble(("You", "bold $primary"), "\n", question_preview(question))
        if documents:
            names = ", ".join(one_line(d, 60) for d in documents)
            text = text + Content.assemble("\n", ("📄 " + names, "dim"))
        super().__init__(text, classes="user-message")


def render_tokens(pieces: Sequence[str], origins: Sequence[str]) -> Content:
    """The answer with every token styled by its origin (colour plus italic/underline, so colour is
    not the only cue)."""
    parts: list[tuple[str, str] | str] = []
    for text, origin in zip(pieces, origins, strict=False):
        parts.append((terminal_text(text), ORIGIN_STYLE.get(origin, "")))
    return Content.assemble(*parts) if parts else Content("")


def legend() -> Content:
    return Content.assemble(
        ("low", ORIGIN_STYLE["low"]),
        " drafter  ",
        ("mid", ORIGIN_STYLE["mid"]),
        " retrieval  ",
        ("target", ORIGIN_STYLE["target"]),
        " target   ",
        "✓ accepted  ",
        ("✗", "$origin-reject"),
        " rejected  ",
        ("·", "dim"),
        " unverified",
    )


def _window(
    label: str,
    proposed: Sequence[int],
    accepted: int,
    final: int | None,
    final_kind: str,
    kept_origins: Sequence[str],
    decode: Callable[[int], str],
    final_origin: str | None = None,
    match: int = 0,
    branches: int = 0,
    tried: bool = True,
) -> Content:
    parts: list[tuple[str, str] | str] = [(f"{label:<6}", "bold")]
    for i, tok in enumerate(proposed):
        text = token_label(decode(tok))
        if not tried:
            parts += [(" ·", "dim"), (text, UNVERIFIED_STYLE)]
        elif i < accepted:
            style = ORIGIN_STYLE.get(kept_origins[i] if i < len(kept_origins) else "low", "")
            parts += [" ✓", (text, style)]
        elif i == accepted:
            parts += [(" ✗", "$origin-reject"), (text, REJECT_STYLE)]
        else:
            parts += [(" ·", "dim"), (text, UNVERIFIED_STYLE)]
    if final is not None:
        parts += [
            " → ",
            (token_label(decode(final)), ORIGIN_STYLE[final_origin or ("target" if label == "mid" else "mid")]),
            (f" {final_kind}", "dim"),
        ]
    parts.append(("  " + (f"{accepted}/{len(proposed)}" if tried else "not tried"), "dim"))
    if match:  # what backed a lookup proposal: the match's length and the tokens that followed it before
        parts.append((f"  match {match}" + (f" · {branches} ways" if branches > 1 else ""), "dim"))
    return Content.assemble(*parts)


def render_round(ev: RoundEvent, decode: Callable[[int], str]) -> Content:
    """One outer round: per level, the proposed window with accepted (✓), the rejected token (✗,
    struck) and the unverified rest (·, struck and dim), then what the verifier put in its place.
    A level-2 round whose bottom drafts went straight to the target (route "direct") shows them
    on one line verified by the target; a tree round (route "tree") one line per way, the kept one
    with the target's token after it."""
    header = Content.styled(f"#{ev.index:<3}", "dim")
    if ev.route == "tree" and ev.low_rounds:
        final = ev.tokens[-1] if ev.tokens else None
        lines = []
        for i, lr in enumerate(ev.low_rounds):
            kept = i == ev.tree_branch
            lines.append(_window("tree" if not i else "", lr.proposed, lr.accepted, final if kept else None,
                                 f"{ev.final_kind}, target-verified", ev.origins if kept else [], decode, "target",
                                 lr.match, lr.branches, lr.tried))
        return header + Content("\n    ").join(lines)
    if ev.route == "direct" and ev.low_rounds:
        lr = ev.low_rounds[-1]
        final = ev.tokens[-1] if ev.tokens else None
        kind = f"{ev.final_kind}, target-verified"
        return header + _window("low", lr.proposed, lr.accepted, final, kind, ev.origins, decode, "target",
                                lr.match, lr.branches)
    if not ev.mid_proposed:  # a plain target step (level 0, or the route the decoder chose)
        tok = ev.tokens[-1] if ev.tokens else None
        body = Content.assemble(
            ("target", "bold"),
            "  → ",
            (token_label(decode(tok)) if tok is not None else "∅", ORIGIN_STYLE["target"]),
            (" step", "dim"),
        )
        return header + body
    lines: list[Content] = []
    for lr in ev.low_rounds:
        low_origins = ["low"] * lr.accepted
        lines.append(_window("low", lr.proposed, lr.accepted, lr.next_token, "next", low_origins, decode,
                             match=lr.match, branches=lr.branches))
    final = ev.tokens[-1] if ev.tokens else None
    lines.append(_window("mid", ev.mid_proposed, ev.mid_accepted, final, ev.final_kind, ev.origins, decode))
    indent = Content("    ")
    out = header + lines[0]
    for line in lines[1:]:
        out = out + Content("\n") + indent + line
    return out


def render_rounds(events: Sequence[RoundEvent], decode: Callable[[int], str]) -> Content:
    if not events:
        return Content.styled("(no rounds yet)", "dim")
    return Content("\n").join(render_round(ev, decode) for ev in events)


# -- sources of an answer ------------------------------------------------------------------------------
def _clickable(content: Content, start: int, end: int, index: int) -> Content:
    """`content` with characters [start, end) opening source `index` when clicked (SourcesLine.action_open)."""
    return content.stylize(Style.from_meta({"@click": f"open({index})"}), start, end)


def render_sources_line(sources: Sequence[Source]) -> Content:
    """"Sources: book.txt 120-134 · 410-418 · notes.md 3-9": each document named once, before its
    passages; a click on a passage opens it in its document."""
    out = Content.styled("Sources: ", "bold")
    for i, (s, named) in enumerate(zip(sources, names_shown(sources), strict=True)):
        if i:
            out = out + Content.styled(" · ", "dim")
        if named:
            out = out + Content(one_line(s.document, 60) + " ")
        start = len(out.plain)
        out = out + Content.styled(s.span, "underline $accent")
        out = _clickable(out, start, len(out.plain), i)
    return out


def render_sources_detail(sources: Sequence[Source], answer: str) -> Content:
    """Every passage's text under a heading naming its document, lines and share of attention; the
    lines the answer quotes verbatim marked ┃ and bold, the others │ and dim."""
    blocks: list[Content] = []
    any_quoted = False
    for i, s in enumerate(sources):
        head = Content.assemble((f"{i + 1}. ", "bold"), (one_line(s.document, 60), "bold"),
                                f" lines {s.span}", (f"  {s.score:.0%} of the attention", "dim"))
        head = _clickable(head, 0, len(head.plain), i)
        lines = [head]
        quoted = quoted_lines(s.text, answer)
        any_quoted = any_quoted or any(quoted)
        for line, q in zip(s.text.split("\n"), quoted, strict=True):
            if q:
                lines.append(Content.assemble(("┃ ", "$success"), (terminal_text(line), "bold")))
            else:
                lines.append(Content.assemble(("│ ", "dim"), (terminal_text(line), "$text-muted")))
        blocks.append(Content("\n").join(lines))
    if any_quoted:
        blocks.append(Content.styled("┃ lines the answer quotes", "dim"))
    return Content("\n").join(blocks)


class SourcesLine(Static):
    """The compact sources line under an answer; a click on a passage asks the app to open it."""

    class Open(Message):
        def __init__(self, sources: list[Source], index: int) -> None:
            super().__init__()
            self.sources, self.index = sources, index

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.sources: list[Source] = []

    def show(self, sources: Sequence[Source]) -> None:
        self.sources = list(sources)
        self.display = bool(self.sources)
        self.update(render_sources_line(self.sources) if self.sources else "")

    def action_open(self, index: int) -> None:
        if 0 <= int(index) < len(self.sources):
            self.post_message(self.Open(self.sources, int(index)))


class SourcesDetail(SourcesLine):
    """The passages' text (shown while the sources are expanded)."""

    def show(self, sources: Sequence[Source], answer: str = "") -> None:
        """`answer`: the text whose verbatim quotes are marked in the passages."""
        self.sources = list(sources)
        self.set_class(not self.sources, "-empty")
        self.update(render_sources_detail(self.sources, answer) if self.sources else "")


class AnswerMessage(Vertical):
    """The streamed answer: Markdown (batched with MarkdownStream) or, with the visualisation on,
    the tokens coloured by origin plus a strip of the latest rounds."""

    ROUNDS_SHOWN = 6

    def __init__(
        self, decode: Callable[[int], str], text: str = "", viz: bool = False, sources: Sequence[Source] = (),
    ) -> None:
        super().__init__(classes="answer-message")
        self.decode = decode
        self._initial = text
        self.text = text
        self.sources: list[Source] = list(sources)
        self.token_ids: list[int] = []
        self.origins: list[str] = []
        self.rounds: deque[RoundEvent] = deque(maxlen=self.ROUNDS_SHOWN)
        self._pieces: dict[int, str] = {}
        self._stream = None
        self.viz = viz
        self.finished = bool(text)

    def compose(self):
        yield Static(Content.styled("Assistant", "bold $secondary"), classes="answer-title")
        yield Markdown(terminal_text(self._initial), classes="answer-md")
        yield Static(legend(), classes="answer-legend viz")
        yield Static("", classes="answer-viz viz")
        yield Static("", classes="answer-rounds viz")
        yield Static("", classes="answer-meta")
        yield SourcesLine(classes="answer-sources")
        yield SourcesDetail(classes="answer-sources-detail")

    def on_mount(self) -> None:
        self.show_sources(self.sources)

    def show_sources(self, sources: Sequence[Source]) -> None:
        """The sources line under the answer (none: no line) and the passages for the expanded view."""
        self.sources = list(sources)
        self.query_one(SourcesLine).show(self.sources)
        self.query_one(SourcesDetail).show(self.sources, self.text)

    def _piece(self, tok: int) -> str:
        if tok not in self._pieces:
            self._pieces[tok] = self.decode(tok)
        return self._pieces[tok]

    async def add_events(self, events: Sequence[RoundEvent]) -> str:
        """Append a batch of rounds; returns the text added."""
        delta = "".join(ev.text for ev in events)
        for ev in events:
            self.token_ids.extend(ev.tokens)
            self.origins.extend(ev.origins)
            self.rounds.append(ev)
        if delta:
            self.text += delta
            if self._stream is None:
                self._stream = Markdown.get_stream(self.query_one(".answer-md", Markdown))
            await self._stream.write(terminal_text(delta))
        if self.viz:
            self.refresh_viz()
        return delta

    def refresh_viz(self) -> None:
        if not self.token_ids:
            self.query_one(".answer-viz", Static).update(
                Content.styled(
                    "(token origins are not kept for restored answers)" if self.finished else "", "dim"
                )
            )
            return
        pieces = [self._piece(t) for t in self.token_ids]
        self.query_one(".answer-viz", Static).update(render_tokens(pieces, self.origins))
        self.query_one(".answer-rounds", Static).update(render_rounds(list(self.rounds), self.decode))

    def set_viz(self, on: bool) -> None:
        self.viz = on
        if on:
            self.refresh_viz()

    async def finish(self, meta: str, text: str | None = None, sources: Sequence[Source] = ()) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if text is not None and text != self.text:  # the decoder's final text (a held-back character)
            self.text = text
            await self.query_one(".answer-md", Markdown).update(terminal_text(text))
        self.finished = True
        self.query_one(".answer-meta", Static).update(Content.styled(meta, "dim"))
        self.show_sources(sources)
        if self.viz:
            self.refresh_viz()


# -- side panels -----------------------------------------------------------------------------------------
@dataclass
class Pending:
    """Decoder settings chosen in the UI; they apply from the next answer."""

    level: int
    draft: str
    budget: str
    gamma_mid: int
    gamma_low: int

    @property
    def chain(self) -> str:
        return chain_label(self.level, drafter_label(self.draft), self.budget)


def _hist(values: Sequence[float]) -> str:
    return " ".join(BLOCKS[max(1, round(v * 8))] if v > 0 else "_" for v in values)


def stop_label(reason: str | None) -> str:
    """How the end of an answer reads: an answer cut short because it looped says so plainly."""
    if not reason:
        return "error"
    return "stopped: repetition" if reason == "repetition" else reason


def render_stats(stats: dict[str, Any] | None, pending: Pending, rate_now: float | None = None) -> Content:
    """The decoding panel: settings for the next answer, then the figures of the current/last one."""
    lines: list[Content] = []
    s = stats or {}
    changed = bool(s) and (s.get("level") != pending.level or s.get("chain") != pending.chain)
    lines.append(
        Content.assemble(
            ("Level ", "bold"),
            (str(pending.level), "bold $accent"),
            ("  (next answer)" if changed else "", "italic $warning"),
        )
    )
    lines.append(Content(one_line(pending.chain)))
    lines.append(
        Content.assemble(
            ("γ ", "bold"),
            f"mid {pending.gamma_mid if pending.level else '-'}  "
            f"low {pending.gamma_low if pending.level == 2 else '-'}",
        )
    )
    if not s:
        lines.append(Content.styled("no answer yet", "dim"))
        return Content("\n").join(lines)
    if changed:
        lines.append(Content.styled(one_line(f"last answer: level {s.get('level')}  {s.get('chain')}"), "dim"))
    acc = s.get("acceptance") or {}
    lines.append(Content.assemble(("Acceptance", "bold")))
    for lvl in ("mid", "low"):
        lines.append(Content(f" {lvl:<4}{bar(acc.get(lvl), 14)} {pct(acc.get(lvl))}"))
    lines.append(Content(f"Mean accepted length {s.get('mean_accepted_length', 0):.2f}"))
    lookup = s.get("lookup") or {}
    if lookup.get("proposals"):  # what backed the lookup's drafts: long matches, one continuation
        # and the tree windows (two ways of a branching match at once, decoding/tree.py) on the same
        # line: the right column has no line to spare at 48 rows
        trees = s.get("trees") or {}
        tree = f" · trees {trees['rounds']}×2, 2nd {trees['second_way_kept']}" if trees.get("rounds") else ""
        lines.append(Content.assemble(("Lookup ", "bold"), f"{lookup['proposals']} drafts{tree}"))
        one_way = f"  one way {pct(lookup['unique_share'])}" if lookup.get("unique_share") is not None else ""
        lines.append(Content(f" match {lookup['mean_match']:.1f} tok{one_way}"))
    hist = s.get("position_histogram") or {}
    if any(hist.get(k) for k in ("mid", "low")):
        n = max(len(hist.get("mid") or []), len(hist.get("low") or []))
        lines.append(
            Content.assemble(
                ("Per position ", "bold"), ("pos " + " ".join(str((i + 1) % 10) for i in range(n)), "dim")
            )
        )
        for lvl in ("mid", "low"):
            if hist.get(lvl):
                lines.append(Content(f"             {lvl:<4}{_hist(hist[lvl])}"))
    now = f"{rate_now:6.1f}" if rate_now is not None else "   -  "
    lines.append(Content.assemble(("Tokens/s ", "bold"), f"now {now}  avg {s.get('tokens_per_s', 0):6.1f}"))
    speed = s.get("speedup_vs_level0")
    # (a level-0 answer saved before its ratio was dropped may still carry one)
    versus = "(level 0)" if s.get("level") == 0 else (f"×{speed:.2f} vs level 0" if speed else "- vs level 0")
    lines.append(Content(f"ms/token {s.get('ms_per_token', 0):7.1f}  {versus}"))
    counts = s.get("origin_counts") or {}
    lines.append(
        Content.assemble(
            f"{s.get('new_tokens', 0)} tokens: ",
            (f"low {counts.get('low', 0)}", ORIGIN_STYLE["low"]),
            " ",
            (f"mid {counts.get('mid', 0)}", ORIGIN_STYLE["mid"]),
            " ",
            (f"target {counts.get('target', 0)}", ORIGIN_STYLE["target"]),
        )
    )
    if s.get("stop_reason"):
        reason = s["stop_reason"]
        lines.append(Content.styled(stop_label(reason) if reason == "repetition" else f"ended: {reason}", "dim"))
    return Content("\n").join(lines)


def render_cache(fig: CacheFigures | None, load_error: str = "", width: int = 18) -> Content:
    if fig is None:
        if load_error:
            return Content.assemble(("no model loaded", "dim"), "\n", (one_line(load_error, 400), "$error"))
        return Content.styled("no model loaded", "dim")
    lines: list[Content] = []
    limit = fig.context_limit or 1
    if fig.model:
        lines.append(Content.assemble(("Model ", "bold"), one_line(fig.model)))
        lines.append(Content(one_line(f" {fig.weights}  {mb(fig.weight_bytes)}")))
        lines.append(Content.styled(one_line(f" {fig.kernels}"), "dim"))
    lines.append(
        Content.assemble(("Full KV ", "bold"), f"{fig.full_kv_tokens:,} tok  {mb(fig.full_kv_bytes)}"
                         + (f"  {fig.kv_dtype}" if fig.kv_dtype else ""))
    )
    lines.append(
        Content(
            f" {bar(fig.full_kv_tokens / limit, width)} {fig.full_kv_tokens / limit:4.0%}"
            f" of {fig.context_limit:,}"
        )
    )
    if fig.attention_blocks_bytes:
        lines.append(Content(f" + {fig.attention_blocks_kind or 'prepared'} blocks {mb(fig.attention_blocks_bytes)}"))
    if fig.attention_scratch_bytes:
        lines.append(Content(f" attention scratch {mb(fig.attention_scratch_bytes)}"))
    frac = fig.retrieval_budget_fraction
    share = "all of ctx" if frac >= 1 else f"{frac:.0%} of ctx"
    lines.append(Content.assemble(("Retrieval ", "bold"), f"{fig.retrieval_budget_tokens:,} tok  {share}"))
    lines.append(Content(f" {bar(fig.retrieval_budget_fraction, width)} chunk {fig.retrieval_chunk_size}"))
    lines.append(
        Content(
            f" {fig.retrieval_chunks_selected:,} chunks selected  +{fig.retrieval_recent_tokens:,} recent"
        )
    )
    if fig.retrieval_buffer_bytes:
        lines.append(Content(f" view buffer {mb(fig.retrieval_buffer_bytes)}"))
    if fig.mid_head_tokens:
        lines.append(Content(f" head {fig.mid_head_tokens:,} of {fig.vocab_size:,} tokens"))
    lookup = (f"{fig.suffix_states:,} states" if fig.suffix_states
              else f"index {fig.ngram_index_entries:,} entries" if fig.drafter == "ngram" or fig.ngram_index_entries
              else "")
    window = (f"sink {fig.drafter_sink_tokens} + recent {fig.drafter_recent_tokens:,}"
              if fig.drafter_sink_tokens or fig.drafter_recent_tokens else "")
    if lookup and window:  # suffix+model: the lookup's index, the model's window, who drafted how often
        lines.append(Content.assemble(("Drafter ", "bold"), one_line(fig.drafter)))
        lines.append(Content(f" lookup {lookup}"))
        lines.append(Content(f" model {window}"))
        lines.append(Content(f" drafted by lookup {fig.drafter_lookup_rounds:,}, model {fig.drafter_model_rounds:,}"))
    else:
        detail = lookup or window
        label = f"{fig.drafter}: {detail}" if detail else fig.drafter
        lines.append(Content.assemble(("Drafter ", "bold"), one_line(label)))
    if fig.drafter_cache_bytes or fig.drafter_weight_bytes:
        lines.append(Content(f" weights {mb(fig.drafter_weight_bytes)}  cache {mb(fig.drafter_cache_bytes)}"))
    lines.append(Content.assemble(("Process ", "bold"), f"RSS {mb(fig.process_rss_bytes)}"))
    if fig.memory_estimate_bytes:  # the memory guard's figure, next to what is measured
        lines.append(Content(f" estimate {mb(fig.memory_estimate_bytes)} at full context"))
    if fig.memory_available_bytes:
        lines.append(Content(f" available {fig.memory_available_bytes / GIB:,.1f} GiB"))
    return Content("\n").join(lines)


def render_documents(
    docs: Sequence[tuple[str, int]], context_tokens: int, max_context: int, cache_status: str = ""
) -> Content:
    """Each document against the context, then the context line and what the document cache did
    ("restored 29,009 tokens in 0.4 s", "prefilled ... (saved for next time)", "resuming at ...")."""
    if not docs:
        return Content.styled("none yet: ctrl+o loads one", "dim")
    lines: list[Content] = []
    limit = max_context or 1
    for name, n in docs:
        name = one_line(name)
        short = name if len(name) <= 22 else "…" + name[-21:]
        lines.append(Content.assemble(("📄 ", ""), (f"{short:<22}", "bold"), f" {n:>7,} tok"))
        lines.append(Content(f"   {bar(n / limit, 16)} {n / limit:4.0%} of {max_context:,}"))
    lines.append(Content.styled(f"context {context_tokens:,} / {max_context:,} tokens", "dim"))
    if cache_status:
        lines.append(Content.styled(cache_status, "italic"))
    return Content("\n").join(lines)


class StatsPanel(Vertical):
    stats: reactive[dict | None] = reactive(None, always_update=True)

    def __init__(self, pending: Pending, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pending = pending
        self.rate_now: float | None = None
        self.rates: list[float] = []

    def compose(self):
        yield Static(render_stats(None, self.pending), id="stats-body")
        yield Sparkline([], id="sparkline")

    def show(self, stats: dict | None = None, rates: Sequence[float] | None = None) -> None:
        if stats is not None:
            self.stats = stats
        if rates is not None:
            self.rates = list(rates)
            recent = self.rates[-4:]
            self.rate_now = sum(recent) / len(recent) if recent else None
            self.query_one(Sparkline).data = self.rates[-200:] or [0.0]
        self.query_one("#stats-body", Static).update(render_stats(self.stats, self.pending, self.rate_now))


class LoadBar(Vertical):
    """Prefill / model-load progress: tokens done of total, tokens/s and ETA."""

    def compose(self):
        yield Static("", id="load-label")
        yield ProgressBar(total=None, show_eta=False, id="load-progress")

    def show(self, label: str, done: int, total: int | None, rate: float | None = None) -> None:
        parts = [one_line(label, 200)]
        if total:
            parts.append(f"{done:,} / {total:,} tokens")
            if rate:
                eta = (total - done) / rate if rate > 0 else 0
                parts.append(f"{rate:,.0f} tok/s  ETA {eta:,.0f} s")
        parts.append("esc cancels" if total else "")
        self.query_one("#load-label", Static).update("  ·  ".join(p for p in parts if p))
        self.query_one(ProgressBar).update(total=total or None, progress=done)
