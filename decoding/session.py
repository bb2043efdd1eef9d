"""A conversation about documents: token bookkeeping, prefill with progress, one decoder per answer.

The conversation is rendered with the model's own chat template and tokenized; the KV cache is then
synchronised with those ids by keeping the longest common prefix and prefilling the rest. The same
mechanism serves the first document load (prefilled before any question is asked), every new turn
(only the new tokens are prefilled), a stopped answer (the cache ends up exactly as in a fresh
session given the same transcript) and a document added mid-conversation.

With a document store (`Session(..., store=DocumentStore(...))`, see decoding/store/doccache.py), a sync
first restores the saved keys/values of the longest saved prefix of the ids and prefills only the
rest, saving chunks as the prefill passes their ends; without one it behaves exactly as before.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.config import DecodeConfig, chain_label, drafter_label, parse_budget
from triforce_chat.decoding.draft_head import DraftHead
from triforce_chat.decoding.events import CacheFigures, RoundEvent, process_rss_bytes
from triforce_chat.decoding.models.loading import LoadedModel
from triforce_chat.decoding.retrieval import RetrievalView
from triforce_chat.decoding.route import CostModel, WindowCosts
from triforce_chat.decoding.sampling import Sampler
from triforce_chat.decoding.sources import (
    DocumentRuns,
    Placement,
    PositionMap,
    Source,
    SourceTracker,
    TextPiece,
    build_position_map,
    cut_pieces,
    document_evidence,
    rank_sources,
    whole_text,
)
from triforce_chat.decoding.speculative import SpecConfig, SpeculativeDecoder
from triforce_chat.decoding.stats import Stats
from triforce_chat.decoding.store.doccache import DocCache, SyncReport
from triforce_chat.decoding.store.docstore import DocumentStore

_SENTINEL = "\u2063QUESTION\u2063"
# --truncate on a document of megabytes first keeps this many characters per context token from
# each end, far more than real text's 3-5 characters per token, before the exact cut at token
# boundaries: tokenizing 50 MB with its offsets took 6 minutes and 9 GB of memory.
PRECUT_CHARS_PER_TOKEN = 32
_SURROGATES = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """`text` with lone surrogates as U+FFFD. Bytes that are not UTF-8 reach Python from argv, stdin
    and file names as surrogate escapes, and the tokenizer refuses those with a TypeError: a file
    named caf\\xe9.txt, or `printf '\\xff' | triforce-chat ask -`, ended in a traceback."""
    return _SURROGATES.sub("\ufffd", text)


Progress = Callable[[int, int], None]
OnRestore = Callable[[SyncReport], None]


class DocumentError(ValueError):
    """A document cannot be used (empty, too long, ...); the message is one line for the user."""


class ContextOverflow(ValueError):
    def __init__(self, total: int, limit: int):
        self.total, self.limit, self.over = total, limit, total - limit
        super().__init__(
            f"documents plus question need {total} tokens, {total - limit} over the model's context of {limit}"
            " (use --truncate to keep the head and tail of the documents, or --context to extend it)"
        )


class PrefillCancelled(RuntimeError):
    pass


@dataclass
class Document:
    """A document as the prompt holds it. `text` is what is prefilled; with --truncate it is cut to
    head + marker + tail, and `original` keeps the text as loaded, so that sources cite the lines of
    the file the user knows (`pieces`: which runs of `text` come from where in `original`)."""

    name: str
    text: str
    n_tokens: int
    original: str = ""
    pieces: list[TextPiece] = field(default_factory=list)
    precut_chars: int = 0  # characters of `original` cut before any tokenization (huge documents)

    def __post_init__(self) -> None:
        if not self.original:
            self.original = self.text
            self.pieces = whole_text(self.text)


@dataclass
class Turn:
    question: str
    documents: list[Document] = field(default_factory=list)
    answer: str = ""
    token_ids: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)  # the passages the answer drew on, best first


class Session:
    def __init__(
        self, lm: LoadedModel, config: DecodeConfig | None = None, drafter=None, store: DocumentStore | None = None
    ):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.config = config or DecodeConfig()
        self.config.validate()
        self.cache = KVCache.for_model(self.model)
        self.view = RetrievalView(self.cache, self.config.budget, self.config.chunk_size)
        self._drafter = drafter
        self._drafter_spec = drafter_label(self.config.draft) if drafter is None else getattr(drafter, "name", "custom")
        # the route's estimates: the machine's window costs are shared by the levels, the rest is per level
        self._windows = WindowCosts()
        self._costs: dict[int, CostModel] = {}
        self.eos_ids = lm.eos_ids
        self.pending_documents: list[Document] = []
        self.turns: list[Turn] = []
        self.context: list[int] = []  # the cache holds context[:-1]
        self.stats = Stats()
        self.last_prompt_ids: list[int] = []
        self._stop = threading.Event()
        # what the syncs since the last answer did (an answer's stats count its documents' prefill)
        self.last_sync = SyncReport()
        self._since_answer = SyncReport()
        self._answer_base = 0  # cache tokens kept from before this answer's syncs
        self.doc_cache: DocCache | None = None
        if store is not None:
            try:
                self.doc_cache = DocCache(store, lm, self.cache, self.config.prefill_chunk)
            except OSError as exc:  # the weights cannot be identified: run without the store
                self._since_answer.notices.append(f"document cache off: {exc}")

    # -- settings that can change between answers ---------------------------------------------------
    def set_level(self, level: int) -> None:
        if level not in (0, 1, 2):
            raise ValueError(f"level must be 0, 1 or 2, not {level}")
        self.config.level = level

    def set_seed(self, seed: int | None) -> None:
        """The sampler's seed for the next answers (None: a fresh one each answer)."""
        if seed is not None and not 0 <= seed < 2**63:
            raise ValueError(f"seed must be between 0 and 2**63 - 1, not {seed}")
        self.config.seed = seed

    def set_gammas(self, gamma_mid: int | None = None, gamma_low: int | None = None) -> None:
        cfg = DecodeConfig(**{**self.config.__dict__})
        cfg.gamma_mid = gamma_mid if gamma_mid is not None else cfg.gamma_mid
        cfg.gamma_low = gamma_low if gamma_low is not None else cfg.gamma_low
        cfg.validate()
        self.config.gamma_mid, self.config.gamma_low = cfg.gamma_mid, cfg.gamma_low

    def set_budget(self, budget: str) -> None:
        tokens, frac = parse_budget(budget)
        if tokens and tokens < 2 * self.config.chunk_size:
            raise ValueError(f"budget must be at least two chunks ({2 * self.config.chunk_size} tokens)")
        self.config.budget = str(budget)
        self.view.budget_tokens, self.view.budget_fraction = tokens, frac
        self.view.stale = True

    @property
    def drafter(self):
        if self._drafter is None:
            from triforce_chat.decoding.drafters import make_drafter

            self._drafter = make_drafter(self.config.draft, self.lm, restrict_head=self.config.restrict_draft_heads)
        return self._drafter

    def chain_label(self, level: int | None = None) -> str:
        return chain_label(self.config.level if level is None else level, self._drafter_spec, self.config.budget)

    @property
    def max_context(self) -> int:
        return self.cache.max_len

    @property
    def context_tokens(self) -> int:
        return len(self.context)

    # -- documents and prompts -------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def add_document(self, name: str, text: str) -> Document:
        name, text = valid_text(name), valid_text(text)
        if not text.strip():
            raise DocumentError(f"{name}: the document is empty")
        span = self.max_context * PRECUT_CHARS_PER_TOKEN
        if not self.config.truncate:  # no need to tokenize megabytes to know that they do not fit
            at_least = len(text) // self._longest_token
            if at_least < self.max_context and len(text) > span:  # a head that does not fit says enough
                at_least = self.count_tokens(text[:span]) - 1  # (the whole text may merge the head's last word on)
            if at_least >= self.max_context:
                raise DocumentError(
                    f"{name}: {len(text):,} characters, at least {at_least:,} tokens: over the model's context of "
                    f"{self.max_context} (use --truncate to keep head and tail)"
                )
        if self.config.truncate and len(text) > 2 * span:
            doc = Document(name, text, 0)
            doc.precut_chars = len(text) - 2 * span
            marker = f"\n\n[... {doc.precut_chars} characters omitted ...]\n\n"  # (cut again by _fit_documents)
            doc.pieces = cut_pieces(doc.pieces, [(0, span, 0), (len(text) - span, len(text), span + len(marker))])
            doc.text = text[:span] + marker + text[-span:]
            doc.n_tokens = self.count_tokens(doc.text)
        else:
            doc = Document(name, text, self.count_tokens(text))
        if doc.n_tokens >= self.max_context and not self.config.truncate:
            raise DocumentError(
                f"{name}: {doc.n_tokens} tokens, {doc.n_tokens - self.max_context + 1} over the model's context of "
                f"{self.max_context} (use --truncate to keep head and tail)"
            )
        self.pending_documents.append(doc)
        return doc

    @functools.cached_property
    def _longest_token(self) -> int:
        """Characters in the tokenizer's longest token, times 4: a text of n characters has at least
        n / this many tokens. (A token's vocabulary string is never shorter than the text it stands
        for; the 4 covers a normalizer composing characters, such as NFKC turning Hangul jamo or
        a letter and its accent into one character.)"""
        return 4 * max(1, max((len(t) for t in self.tokenizer.get_vocab()), default=1))

    @property
    def documents(self) -> list[Document]:
        return [d for t in self.turns for d in t.documents] + self.pending_documents

    @staticmethod
    def _user_content(documents: list[Document], question: str) -> str:
        if not documents:
            return question
        blocks = [f'Document "{d.name}":\n\n{d.text.strip()}\n\n' for d in documents]
        return "".join(blocks) + f"Question: {question}"

    def _messages(self, question: str | None) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        for t in self.turns:
            msgs.append({"role": "user", "content": self._user_content(t.documents, t.question)})
            msgs.append({"role": "assistant", "content": t.answer})
        if question is not None:
            msgs.append({"role": "user", "content": self._user_content(self.pending_documents, question)})
        return msgs

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_ids(self, question: str) -> list[int]:
        return self._tokenize(self._render(self._messages(question), True))

    def _placements(self, rendered: str, question: str) -> list[Placement]:
        """Where each document's text sits in `rendered` (the prompt for `question`, as prefilled).
        Each user message is found whole, in order, so a document's text is never confused with a
        quote of it in a question or an answer; a template that changed a message (trimmed it, say)
        falls back to finding each document's block. A document not found has no placement (and no
        sources): better none than a wrong line."""
        out: list[Placement] = []
        cursor, index = 0, 0
        messages = [(t.documents, t.question) for t in self.turns] + [(self.pending_documents, question)]
        for docs, q in messages:
            content = self._user_content(docs, q)
            at = rendered.find(content, cursor) if docs else -1
            for d in docs:
                header, body = f'Document "{d.name}":\n\n', d.text.strip()
                block = at if at >= 0 else rendered.find(header + body, cursor)
                if block >= 0:
                    start = block + len(header)
                    out.append(Placement(index, start, start + len(body), len(d.text) - len(d.text.lstrip()),
                                         d.pieces))
                    cursor = start + len(body)
                    if at >= 0:
                        at = cursor + 2  # the blank line after the block
                index += 1
        return out

    def _track_sources(self) -> SourceTracker | None:
        """A tracker for the answer about to start (None when sources are off), with its first
        reading taken now: the query of the prompt's last token."""
        if self.config.sources_every <= 0:
            return None
        tracker = SourceTracker(self.cache, self.view.chunk_size, self.config.sources_every)
        tracker.start()
        self.view.rebuild_listeners.append(tracker.on_rebuild)
        return tracker

    def position_map(self, question: str) -> PositionMap | None:
        """Which document text each token of the prompt for `question` stands for (as the next answer
        would prefill it, --truncate applied): the map an answer's sources are made with. None for
        a tokenizer without character offsets."""
        if self.config.truncate:
            self._fit_documents(question)
        rendered = self._render(self._messages(question), True)
        _, offsets = self._encode(rendered)
        return None if offsets is None else build_position_map(offsets, self._placements(rendered, question))

    def _finish_sources(
        self, tracker: SourceTracker, layout: tuple[list[Placement], list[tuple[str, str]]],
        offsets: list[tuple[int, int]] | None, prompt_ids: list[int], answer_ids: list[int], question: str,
    ) -> list[Source]:
        """The answer's passages: its tracker's attention, the runs it copied and the runs its question
        quoted, per chunk of the prompt, mapped to documents. Never fails an answer: a problem here means
        no sources, with a notice."""
        if tracker.on_rebuild in self.view.rebuild_listeners:
            self.view.rebuild_listeners.remove(tracker.on_rebuild)
        try:
            tracker.finish()
            placements, documents = layout
            if not placements or not tracker.readings:
                return []
            if offsets is None:
                self._since_answer.notices.append("sources: this tokenizer gives no character offsets")
                return []
            n_prompt = len(prompt_ids)
            posmap = build_position_map(offsets, placements)
            c = self.view.chunk_size
            runs = DocumentRuns(prompt_ids, posmap, c)
            copied, quoted = runs.chunks_of(answer_ids), runs.chunks_of(self._tokenize(question))
            scores = document_evidence(tracker.scores[: n_prompt // c].tolist(), [copied, quoted], posmap, c)
            return rank_sources(scores, c, posmap, documents, self.config.sources_top)
        except Exception as exc:  # sources are never worth a failed answer
            self._since_answer.notices.append(f"sources: {type(exc).__name__}: {exc}")
            return []

    def _documents_only_ids(self) -> list[int]:
        """Tokens of the conversation up to where the next question will go (documents included)."""
        text = self._render(self._messages(_SENTINEL), False)
        return self._tokenize(text[: text.index(_SENTINEL)])

    # -- the cache ---------------------------------------------------------------------------------------
    def _sync(
        self, ids: list[int], progress: Progress | None, should_cancel: Callable[[], bool] | None,
        on_restore: OnRestore | None = None,
    ) -> SyncReport:
        """Make the cache hold ids[:-1] (restoring what the document store has, prefilling the rest);
        returns what was done (also `self.last_sync`)."""
        if len(ids) + 1 > self.max_context:
            raise ContextOverflow(len(ids) + 1, self.max_context)
        t0 = time.perf_counter()
        n, limit = 0, min(len(self.context), len(ids), self.cache.length)
        while n < limit and self.context[n] == ids[n]:
            n += 1
        self.cache.truncate(min(n, len(ids) - 1))
        self.context = list(ids)
        target = len(ids) - 1
        report = self.last_sync = SyncReport(target=target, kept=self.cache.length)
        dc = self.doc_cache
        if dc is not None and dc.step != self.config.prefill_chunk:  # other steps, other bits: other keys
            dc.detach()
            dc = self.doc_cache = DocCache(dc.store, self.lm, self.cache, self.config.prefill_chunk)
        try:
            if dc is not None:
                dc.begin(ids, target, [d.name for d in self.documents], report)
                dc.restore()
                report.kept = self.cache.length - report.restored
                if report.restored and on_restore:
                    on_restore(report)
            todo = ids[self.cache.length : target]
            total = len(todo)
            step = self.config.prefill_chunk
            for done in range(0, total, step):
                if should_cancel and should_cancel():
                    # what is prefilled stays valid: the next sync continues from there
                    self.context = ids[: self.cache.length + 1]
                    raise PrefillCancelled("prefill cancelled")
                start = self.cache.length
                chunk = torch.tensor(todo[done : done + step], device=self.model.device)
                self.model(chunk, self.cache, logits="none")
                report.computed += self.cache.length - start
                if dc is not None:
                    dc.prefilled(start, self.cache.length)  # saves the chunks this step completed
                if progress:
                    progress(min(done + step, total), total)
            if progress and total == 0:
                progress(0, 0)
        finally:
            if dc is not None:
                dc.finish()
            report.seconds = time.perf_counter() - t0
            self._account(report)
        return report

    def _account(self, report: SyncReport) -> None:
        acc = self._since_answer
        acc.restored += report.restored
        acc.computed += report.computed
        acc.seconds += report.seconds
        acc.restore_s += report.restore_s
        acc.saved += report.saved
        acc.save_s += report.save_s
        acc.write_s += report.write_s
        acc.notices += report.notices
        self._answer_base = min(self._answer_base, report.kept)

    def take_notices(self) -> list[str]:
        """Document-cache notices (damaged files, a full cache) not shown yet."""
        out, self._since_answer.notices = self._since_answer.notices, []
        return out

    def prefill(
        self, progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None,
        on_restore: OnRestore | None = None, drafter_progress: Progress | None = None,
    ) -> tuple[int, float]:
        """Bring the cache up to date with the documents loaded so far (before any question).
        Returns (tokens prefilled by the model, seconds); `self.last_sync` has the details.
        `drafter_progress` follows a draft model's own reading of the documents (level 2), which
        comes after the target's; without it, `progress` does."""
        t0 = time.perf_counter()
        ids = self._documents_only_ids()
        if len(ids) + 1 > self.max_context:
            raise ContextOverflow(len(ids) + 1, self.max_context)
        self.check_memory(len(ids))
        report = self._sync(ids, progress, should_cancel, on_restore)
        t1 = time.perf_counter()
        if self.config.level == 2:
            self._prefill_drafter(ids, drafter_progress or progress, should_cancel)
        self._calibrate_if_due()  # at every level: a key switches levels at any time
        self._prepare_mid_head(ids)
        self._since_answer.seconds += time.perf_counter() - t1  # the next answer's prefill_s counts it
        return report.computed, time.perf_counter() - t0

    def _calibrate_if_due(self) -> float:
        """Time the target's windows at the cache's depth where the session has no such figures
        (decoding/route.py: the route starts from this machine's costs): after a document's prefill,
        and before an answer whose context grew or shrank past twice the depth last measured. Part
        of bringing the prompt in, not of the answer (at 29K tokens it takes ~0.4 s). Returns the
        seconds it took (0.0 when not due)."""
        if not self.config.adaptive or not self._windows.needs_calibration(len(self.context)):
            return 0.0
        return self._decoder(self.config.level).calibrate(self.context)

    def _prepare_mid_head(self, ids: list[int]) -> None:
        """At levels 1 and 2, where the retrieval view selects part of the context (else there is no
        middle level), the middle level's head covering `ids` and copied now, as part of bringing the
        prompt in: ~20 ms the first time, well under 1 ms for the tokens a question adds."""
        cfg = self.config
        if cfg.level and cfg.restrict_draft_heads and self.view.selects(len(ids)):
            self.mid_head.cover(ids)
            self.mid_head.prepare()

    def _prefill_drafter(
        self, ids: list[int], progress: Progress | None, should_cancel: Callable[[], bool] | None
    ) -> None:
        """Bring the bottom drafter up to `ids` now, in chunks with progress: a draft model reads the
        documents' last window (drafters.ModelDrafter._skip_ahead: seconds, where reading a whole
        book took minutes), which belongs to the prefill, not to the first answer's first round. A
        cancel leaves it consistent (the rest follows at its next proposal)."""
        from triforce_chat.decoding.drafters import sync_context

        if not sync_context(self.drafter, ids, self.config.prefill_chunk, progress, should_cancel):
            raise PrefillCancelled("prefill cancelled")

    def _fit_documents(self, question: str) -> None:
        """--truncate: cut the middle out of the longest pending documents until the prompt and the
        answer fit, keeping head and tail."""
        reserve = min(self.config.max_new_tokens, self.max_context // 4)
        cut: dict[int, tuple[int, bool]] = {}  # per document: the tokens omitted so far, whether estimated
        for _ in range(8):
            over = len(self.prompt_ids(question)) + reserve + 1 - self.max_context
            if over <= 0 or not self.pending_documents:
                return
            doc = max(self.pending_documents, key=lambda d: d.n_tokens)
            ids, offsets = self._encode(doc.text)
            ends = None if offsets is None else [e for _, e in offsets]
            keep = max(0, len(ids) - over - 32)
            n_head, n_tail = keep // 2, keep - keep // 2 if keep else 0
            earlier, estimated = cut.get(id(doc), (0, False))
            omitted = earlier + len(ids) - n_head - n_tail
            if doc.precut_chars:  # the characters cut before tokenizing, at this text's tokens per character
                omitted += round(doc.precut_chars * len(ids) / len(doc.text))
                doc.precut_chars, estimated = 0, True
            cut[id(doc)] = omitted, estimated
            marker = f"\n\n[... {'about ' if estimated else ''}{omitted} tokens omitted ...]\n\n"
            if ends is not None:  # cut the text itself at token boundaries: the kept text is the original's
                head_end = ends[n_head - 1] if n_head else 0
                tail_start = ends[len(ids) - n_tail - 1] if n_tail else len(doc.text)
                head, tail = doc.text[:head_end], doc.text[tail_start:] if n_tail else ""
            else:
                head = self.tokenizer.decode(ids[:n_head])
                tail = self.tokenizer.decode(ids[len(ids) - n_tail :]) if n_tail else ""
                head_end, tail_start = len(head), len(doc.text) - len(tail)
                if not doc.text.startswith(head):
                    head_end = -1
                if not doc.text.endswith(tail):
                    tail_start = -1
            text = head + marker + tail
            keep_parts = [(0, head_end, 0)] if head_end >= 0 else []
            if tail_start >= 0:
                keep_parts.append((tail_start, len(doc.text), len(head) + len(marker)))
            doc.pieces = cut_pieces(doc.pieces, keep_parts)
            doc.text, doc.n_tokens = text, self.count_tokens(text)

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        """The ids of `text` and the characters [start, end) each stands for (None without a fast
        tokenizer's offsets): the same ids as _tokenize."""
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return enc.input_ids, [tuple(o) for o in enc.offset_mapping]
        except (NotImplementedError, ValueError, TypeError):
            return self._tokenize(text), None

    # -- answering -----------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def check_memory(self, tokens: int) -> None:
        """Raise MemoryShortage (a ValueError) if growing to `tokens` of context would not fit in the
        memory available; the conversation is untouched (decoding/memory/guard.py)."""
        from triforce_chat.decoding.memory.guard import check_session

        check_session(self, tokens)

    def new_chat(self) -> None:
        """Forget the turns; documents of earlier turns are kept for the next question."""
        docs = self.documents
        self.turns = []
        self.pending_documents = docs

    def generate(
        self, question: str, progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None,
        on_restore: OnRestore | None = None,
    ) -> Iterator[RoundEvent]:
        """Answer `question`, yielding one RoundEvent per decoding round. `self.stats` is live.

        stats.prefill_tokens: prompt tokens this answer put into the cache (its documents' prefill
        included; for a first answer, the whole prompt in context), restored or computed;
        stats.restored_tokens: those that came from the document store; stats.prefill_s: the wall
        time of both."""
        cfg = self.config
        cfg.validate()
        self._stop.clear()
        question = valid_text(question)
        if not question.strip():
            raise ValueError("the question is empty")
        if cfg.truncate:
            self._fit_documents(question)
        t0 = time.perf_counter()
        rendered = self._render(self._messages(question), True)
        # with sources on, the character offsets of the prompt's tokens come with them (one tokenization)
        ids, offsets = self._encode(rendered) if cfg.sources_every > 0 else (self._tokenize(rendered), None)
        if len(ids) + 1 <= self.max_context:  # (a prompt that does not fit is ContextOverflow, below)
            self.check_memory(min(len(ids) + cfg.max_new_tokens, self.max_context))
        report = self._sync(ids, progress, should_cancel, on_restore)
        if cfg.level == 2:
            self._prefill_drafter(ids, progress, should_cancel)
        calibrate_s = self._calibrate_if_due() if cfg.level else 0.0
        self._prepare_mid_head(ids)
        acc = self._since_answer
        prefill_tokens = len(ids) - 1 - self._answer_base
        prefill_s = time.perf_counter() - t0 + acc.seconds - report.seconds  # + the documents' prefill
        self.last_prompt_ids = list(ids)
        level = cfg.level
        self.stats = Stats(level=level, chain=self.chain_label(level), gamma_mid=cfg.gamma_mid if level else 0,
                           gamma_low=cfg.gamma_low if level == 2 else 0, prefill_tokens=prefill_tokens,
                           prefill_s=prefill_s, restored_tokens=min(acc.restored, prefill_tokens),
                           restore_s=acc.restore_s, saved_tokens=acc.saved, save_s=acc.save_s,
                           calibrate_s=calibrate_s)
        self._since_answer = SyncReport(notices=acc.notices)
        tracker = self._track_sources()
        layout = (self._placements(rendered, question), [(d.name, d.original) for d in self.documents]) \
            if tracker is not None else None
        turn = Turn(question=question, documents=self.pending_documents)
        self.pending_documents = []
        self.turns.append(turn)
        self.view.stale = True  # a new question brings a new query: re-select chunks
        decoder = self._decoder(level)
        answer_ids: list[int] = []
        shown = ""
        def should_stop() -> bool:  # a cancel asked for before this answer cleared the stop flag counts too
            return self._stop.is_set() or (should_cancel is not None and should_cancel())

        try:
            for ev in decoder.generate(self.context, cfg.max_new_tokens, should_stop):
                if tracker is not None:  # between rounds: it reads the query the round left in the cache
                    t_read = time.perf_counter()
                    tracker.after_round(len(ev.tokens), ev.wall_s)
                    ev.timings["sources"] = time.perf_counter() - t_read
                    ev.wall_s += ev.timings["sources"]
                answer_ids.extend(ev.tokens)
                text = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
                    ev.text, shown = text[len(shown):], text
                turn.answer, turn.token_ids = shown, list(answer_ids)
                self.stats.add(ev)
                self.stats.level0_step_s = decoder.level0_step_s
                yield ev
        finally:
            self._answer_base = self.cache.length  # the next answer counts what it adds after this
            final = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
            turn.answer, turn.token_ids = final, list(answer_ids)
            self.stats.stop_reason = self.stats.stop_reason or "stopped"  # a consumer that stopped reading
            if tracker is not None:
                t_rank = time.perf_counter()
                turn.sources = self._finish_sources(tracker, layout, offsets, ids, answer_ids, question)
                self.stats.sources_rank_s = time.perf_counter() - t_rank
            turn.stats = self.stats.to_dict()

    def _decoder(self, level: int) -> SpeculativeDecoder:
        """A decoder for the next answer, on the session's caches, drafter and cost model."""
        cfg = self.config
        return SpeculativeDecoder(
            self.model, self.cache,
            Sampler(cfg.temperature, cfg.top_p, cfg.seed, top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty,
                    repetition_window=cfg.repetition_window),
            self.eos_ids,
            SpecConfig(level=level, gamma_mid=cfg.gamma_mid, gamma_low=cfg.gamma_low, adaptive=cfg.adaptive,
                       loop=cfg.loop_rule(), tree=cfg.tree),
            view=self.view, drafter=self.drafter if level == 2 else None,
            costs=self._costs.setdefault(level, CostModel(self._windows)),
            mid_head=self.mid_head if level >= 1 and cfg.restrict_draft_heads else None,
        )

    @functools.cached_property
    def mid_head(self) -> DraftHead:
        """The middle level's head (decoding/draft_head.py): made once, it covers the context's tokens as
        the conversation grows."""
        return DraftHead(self.model.output, always=self.eos_ids)

    # -- figures -------------------------------------------------------------------------------------------
    def cache_figures(self) -> CacheFigures:
        v, c = self.view, self.cache
        fig = CacheFigures(
            full_kv_tokens=c.length,
            full_kv_bytes=c.used_bytes,
            full_kv_allocated_bytes=c.allocated_bytes,
            attention_blocks_bytes=c.blocks_bytes,
            attention_blocks_kind=c.blocks.kind if c.blocks is not None else "",
            attention_scratch_bytes=c.scratch_bytes,
            context_limit=c.max_len,
            retrieval_budget_tokens=v.budget_for(c.length),
            retrieval_budget_fraction=(v.budget_for(c.length) / c.length) if c.length else 0.0,
            retrieval_chunk_size=v.chunk_size,
            retrieval_chunks_selected=v.n_selected_chunks,
            retrieval_recent_tokens=max(0, v.recent_tokens) if v.n_selected_chunks and not v.stale else 0,
            retrieval_rebuilds=v.rebuilds,
            retrieval_buffer_bytes=v.buffer_bytes,
            model=self.lm.model_id,
            weights=getattr(self.model, "weights_label", ""),
            weight_bytes=getattr(self.model, "weight_bytes", 0),
            kv_dtype=str(c.k.dtype).removeprefix("torch."),
            kernels=kernels_label(self.model.device, getattr(self.model, "activations", "fp32"),
                                  getattr(self.model, "attention", "fp32"),
                                  getattr(self.model, "packed_weights", False)),
            drafter=self._drafter_spec,
            process_rss_bytes=process_rss_bytes(),
        )
        if self.config.restrict_draft_heads and "mid_head" in self.__dict__ and v.selects(c.length):
            fig.mid_head_tokens, fig.vocab_size = self.mid_head.size, self.mid_head.vocab_size  # (a middle level ran)
        self._memory_figures(fig)
        if self._drafter is not None:
            for key, value in self._drafter.figures().items():
                if hasattr(fig, key):
                    setattr(fig, key, value)
        return fig

    def _memory_figures(self, fig: CacheFigures) -> None:
        """The memory guard's estimate at the full context and the memory available, for the panel."""
        from triforce_chat.decoding.memory.footprint import session_estimate
        from triforce_chat.decoding.memory.guard import available_memory

        try:
            fig.memory_estimate_bytes = session_estimate(self).total
            avail = available_memory()
            fig.memory_available_bytes = avail.bytes if avail is not None else 0
        except Exception:  # figures are never worth a failed answer
            pass


def kernels_label(device, activations: str = "fp32", attention: str = "fp32", packed: bool = False) -> str:
    """Which kernels the target runs on, for the Cache panel: "native avx512, int8 activations
    (avx512-vnni), packed weights, int8 attention", "native avx2, fp32 activations", "PyTorch (why)"."""
    from triforce_chat.kernels import native

    if getattr(device, "type", str(device)) == "cuda":
        return "cuda"
    st = native.status()
    if not st.available:
        return f"PyTorch ({st.reason})"
    mode = f"int8 activations ({st.int8})" if activations == "int8" else "fp32 activations"
    if packed:
        mode += ", packed weights"
    if attention in ("bf16", "int8"):
        mode += f", {attention} attention"
    return f"native {st.isa}, {mode}"
