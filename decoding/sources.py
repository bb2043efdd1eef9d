"""Where an answer came from: the document passages the model attended to while it answered.

Why from the cache: the model's own attention says which parts of the context it read while it
answered. The cache holds everything needed to see it (the latest query of every layer, which the
middle level already selects chunks against, and the keys), so reading it now and then during an
answer costs a small share of the decode time and cannot change the answer: it only reads.

The pieces, in the order an answer goes through them:
- `SourceTracker` takes readings of the attention (at the start of an answer, every few answer
  tokens within a time budget, whenever the middle level re-selects its chunks, and at the end):
  the latest query of a few middle layers against every key, summed per chunk of the context
  (`chunk_attention`), added up into one score per chunk.
- `PositionMap` says, for every token position of the prompt, which document it belongs to and
  which characters of the document (as loaded) it stands for; chat-template tokens, the question,
  headers and --truncate's omission marker belong to none. It is built from the tokenizer's offsets
  over the very text that was prefilled, so it is exact for it.
- `copied_chunks` adds the other evidence an answer leaves: the runs of its tokens that it copied
  from a document (each run's weight shared among the places it occurs, so a rare run counts most).
  A small model often attends to an intro or a heading while it copies a number or a name from
  elsewhere. The runs of the question found in a document count the same way: the text it quotes,
  which the model reads while it answers. Measured on bench-sources' 54 questions (captures of one
  run each), attention alone put the answer's passage in the top 3 for 38 at 7K tokens and 17 at
  26K; with the answer's copied runs 50 and 40; with the question's runs too, 51 and 45.
- `rank_sources` turns chunk scores into passages: the best chunks, grown to whole lines of their
  document, adjacent ones merged (never across documents), the top N kept.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

SOURCES_BUDGET = 0.02  # the most a reading may cost, as a share of the decode time of the tokens since the last
TEXT_LIMIT = 320  # characters of a passage's text shown and saved


# -- which text of the prompt is which document --------------------------------------------------------
@dataclass
class TextPiece:
    """A run of a document's prefilled text taken unchanged from the text as loaded: characters
    [start, end) of the prefilled text are characters [origin, origin + end - start) of the original."""

    start: int
    end: int
    origin: int


def whole_text(text: str) -> list[TextPiece]:
    return [TextPiece(0, len(text), 0)]


def cut_pieces(pieces: Sequence[TextPiece], keep: Sequence[tuple[int, int, int]]) -> list[TextPiece]:
    """The pieces of a text rebuilt from parts of an older one: `keep` lists (old start, old end,
    new start) for each part of the old text the new one copies (e.g. --truncate's head and tail);
    everything else in the new text (the omission marker) comes from no piece."""
    out: list[TextPiece] = []
    for old_start, old_end, new_start in keep:
        for p in pieces:
            a, b = max(p.start, old_start), min(p.end, old_end)
            if a < b:
                out.append(TextPiece(new_start + a - old_start, new_start + b - old_start, p.origin + a - p.start))
    return out


@dataclass
class Placement:
    """Where one document's prefilled text (stripped, as the prompt holds it) sits in the rendered prompt."""

    doc_index: int  # among the session's documents, in order
    start: int  # character offsets in the rendered prompt
    end: int
    lead: int  # characters stripped from the front of the document's text
    pieces: list[TextPiece]  # the document's text -> its original text


@dataclass
class PositionMap:
    """Per prompt token position: the document (-1: none) and the characters [start, end) of that
    document's original text the token stands for."""

    doc: list[int]
    start: list[int]
    end: list[int]

    def __len__(self) -> int:
        return len(self.doc)

    @functools.cached_property
    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """doc, start and end as int64 tensors (made once: the ranking reads them several times)."""
        return tuple(torch.tensor(x, dtype=torch.int64) for x in (self.doc, self.start, self.end))


def build_position_map(offsets: Sequence[tuple[int, int]], placements: Sequence[Placement]) -> PositionMap:
    """From the tokenizer's character offsets of each prompt token over the rendered prompt and the
    documents' placements in it. A token counts for a document only if all its characters are
    inside the document's text and come from the original (not the omission marker); a token that
    straddles a document's edge (into a header or the template) counts for none."""
    n = len(offsets)
    if n == 0:
        return PositionMap([], [], [])
    off = torch.tensor(offsets, dtype=torch.int64).view(n, 2)
    s, e = off[:, 0], off[:, 1]
    doc = torch.full((n,), -1, dtype=torch.int64)
    start, end = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    for p in placements:
        inside = (e > s) & (s >= p.start) & (e <= p.end)
        local_s, local_e = s - p.start + p.lead, e - p.start + p.lead
        for piece in p.pieces:
            here = inside & (local_s >= piece.start) & (local_e <= piece.end) & (doc < 0)
            doc[here] = p.doc_index
            start[here] = local_s[here] + piece.origin - piece.start
            end[here] = local_e[here] + piece.origin - piece.start
    posmap = PositionMap(doc.tolist(), start.tolist(), end.tolist())
    posmap.__dict__["tensors"] = (doc, start, end)  # the cached_property's value, already at hand
    return posmap


# -- reading the attention ------------------------------------------------------------------------------
def source_layers(n_layers: int) -> range:
    """The layers whose attention is read: the middle of the upper half (12-19 of 24). Why: measured
    on bench-sources' 54 questions at 7K tokens (Qwen2.5-Coder-0.5B), the early layers spread their
    attention by position and the last ones by what comes next; these point at the passage the
    answer comes from most often."""
    first = min(n_layers // 2, n_layers - 1)
    return range(first, max(first + 1, (5 * n_layers) // 6))


def chunk_attention(query: Tensor, keys: Tensor, length: int, chunk_size: int, scale: float,
                    block: int = 4096) -> Tensor:
    """query [Hq, D] (one token's, every head), keys [Hkv, >= length, D] -> fp32 [length // chunk_size]:
    for each complete chunk, the sum over the query heads of the squared share of that head's
    attention (softmax over all `length` keys, as the model's own) that falls on the chunk.

    Why exact attention and not the middle level's chunk-mean scores: measured on bench-sources'
    questions, chunk means found the answer's passage in about half the questions, exact attention
    in about four of five. Why squared shares: a head that looks at one place (a head that copies or
    looks a fact up) then counts more than one that spreads its attention thinly by position.
    16-bit keys are widened `block` tokens at a time, so no fp32 copy of a whole layer is made."""
    hkv, _, d = keys.shape
    g = query.shape[0] // hkv
    q = query.float().view(hkv, g, d)
    logits = torch.empty(hkv, g, length, dtype=torch.float32, device=keys.device)
    for start in range(0, length, block):
        end = min(length, start + block)
        torch.matmul(q, keys[:, start:end].float().transpose(1, 2), out=logits[:, :, start:end])
    probs = torch.softmax(logits.mul_(scale), dim=-1)
    n = length // chunk_size
    share = probs[:, :, : n * chunk_size].reshape(hkv * g, n, chunk_size).sum(-1)  # [Hq, n]
    return (share * share).sum(0)


class SourceTracker:
    """Adds up, over one answer, where the model's attention went, chunk by chunk of the context.

    Only reads the cache: the query of the latest token the full target read (`last_query`) and
    the keys. Readings: at the start (the prompt's last token), whenever the middle level re-selects
    its chunks (the same query it selects against), and during the answer at most every `every`
    tokens, less often when a reading would cost more than `budget` of the decode time so far
    (a reading reads the keys of a few layers: at 29K tokens it costs a fifth of a decode step)."""

    def __init__(self, cache: Any, chunk_size: int, every: int, budget: float = SOURCES_BUDGET):
        if every < 1:
            raise ValueError("sources: the reading interval must be at least 1 token")
        self.cache, self.chunk_size, self.every, self.budget = cache, chunk_size, every, budget
        self.layers = source_layers(cache.k.shape[0])
        self.scores = torch.zeros(0, dtype=torch.float64)
        self.readings = 0
        self.read_s = 0.0  # time spent reading
        self._since = 0  # answer tokens since the last reading
        self._tokens = 0
        self._decode_s = 0.0

    @property
    def interval(self) -> int:
        """Answer tokens between readings now: `every`, or more where a reading costs more than the
        budget's share of the tokens' decode time."""
        if not self.readings or not self._tokens or self._decode_s <= 0:
            return self.every
        per_reading = self.read_s / self.readings
        per_token = self._decode_s / self._tokens
        return max(self.every, math.ceil(per_reading / (self.budget * per_token)))

    def read(self) -> None:
        """One reading: the latest query of each of `layers` against every key."""
        t0 = time.perf_counter()
        cache = self.cache
        length = cache.length
        n = length // self.chunk_size
        queries = [(layer, cache.last_query[layer]) for layer in self.layers if cache.last_query[layer] is not None]
        if n == 0 or not queries:
            return
        total = torch.zeros(n, dtype=torch.float32, device=cache.k.device)
        for layer, q in queries:
            total += chunk_attention(q, cache.k[layer], length, self.chunk_size, cache.scale)
        if self.scores.numel() < n:
            grown = torch.zeros(n, dtype=torch.float64)
            grown[: self.scores.numel()] = self.scores
            self.scores = grown
        self.scores[:n] += total.double().cpu() / len(queries)
        self.readings += 1
        self._since = 0
        self.read_s += time.perf_counter() - t0

    def start(self) -> None:
        """The answer begins: the query of the prompt's last token is the first reading."""
        self.read()

    def after_round(self, n_tokens: int, seconds: float = 0.0) -> None:
        """A round kept `n_tokens` tokens in `seconds`; read again once `interval` tokens have come."""
        self._since += n_tokens
        self._tokens += n_tokens
        self._decode_s += seconds
        if self._since >= self.interval:
            self.read()

    def on_rebuild(self) -> None:
        """The middle level re-selected its chunks against the latest query: read that query too."""
        self.read()

    def finish(self) -> None:
        """The answer ended: read the tokens since the last reading, if any."""
        if self._since or not self.readings:
            self.read()


# -- what the answer copied ---------------------------------------------------------------------------------
COPY_RUN = 3  # tokens in a copied run: two match too much by chance, four miss short names and numbers


class DocumentRuns:
    """Every run of `run` tokens that lies inside one document of the prompt, indexed once, so that
    what an answer copied and what its question quoted are both looked up in the same index."""

    def __init__(self, prompt_ids: Sequence[int], posmap: PositionMap, chunk_size: int, run: int = COPY_RUN):
        n = len(posmap)
        self.run, self.n_chunks = run, n // chunk_size
        self.found: Tensor | None = None
        if n < run or self.n_chunks == 0:
            return
        doc = posmap.tensors[0]
        places = torch.arange(n - run + 1)
        in_one_doc = (doc[places] >= 0) & (doc[places + run - 1] == doc[places])
        places = places[in_one_doc]
        keys = _run_keys(torch.tensor(prompt_ids[:n], dtype=torch.int64), run)[in_one_doc]
        self.found, self.where, self.occurrences = torch.unique(keys, return_inverse=True, return_counts=True)
        chunk = places // chunk_size
        keep = chunk < self.n_chunks
        self.chunk, self.kept = chunk[keep], keep

    def chunks_of(self, ids: Sequence[int]) -> list[float]:
        """Per chunk of the prompt: how much of `ids` came from it. Every run of `ids` found in the
        index counts 1, shared equally among the places where it occurs."""
        if self.found is None or len(ids) < self.run:
            return [0.0] * self.n_chunks
        said, times = torch.unique(_run_keys(torch.tensor(ids, dtype=torch.int64), self.run), return_counts=True)
        at = torch.searchsorted(said, self.found).clamp_(max=said.numel() - 1)
        copies = torch.where(said[at] == self.found, times[at], 0)  # how often `ids` have each prompt run
        weight = (copies.double() / self.occurrences.double())[self.where]
        out = torch.zeros(self.n_chunks, dtype=torch.float64)
        out.index_add_(0, self.chunk, weight[self.kept])
        return out.tolist()


def copied_chunks(prompt_ids: Sequence[int], answer_ids: Sequence[int], posmap: PositionMap, chunk_size: int,
                  run: int = COPY_RUN) -> list[float]:
    """Per chunk of the prompt: how much of the answer was copied from it (DocumentRuns.chunks_of)."""
    return DocumentRuns(prompt_ids, posmap, chunk_size, run).chunks_of(answer_ids)


def _run_keys(ids: Tensor, run: int) -> Tensor:
    """Each run of `run` ids as one int64 (21 bits an id: vocabularies of up to 2M ids)."""
    key = torch.zeros(ids.numel() - run + 1, dtype=torch.int64)
    for k in range(run):
        key = (key << 21) | (ids[k : ids.numel() - run + 1 + k] & ((1 << 21) - 1))
    return key


def document_evidence(attention: Sequence[float], matched: Sequence[Sequence[float]], posmap: PositionMap,
                      chunk_size: int) -> list[float]:
    """One score per chunk: its share of the attention paid to document chunks plus its share of
    each kind of `matched` runs (what the answer copied, what the question quoted): equal weights,
    a kind with nothing in it adds nothing."""
    n = min([len(attention), *(len(m) for m in matched)])
    doc = posmap.tensors[0][: n * chunk_size]
    in_doc = torch.zeros(n, dtype=torch.bool)
    in_doc[torch.nonzero(doc >= 0).squeeze(1) // chunk_size] = True
    out = torch.zeros(n, dtype=torch.float64)
    for evidence in (torch.tensor(attention[:n], dtype=torch.float64) * in_doc,
                     *(torch.tensor(m[:n], dtype=torch.float64) for m in matched)):
        total = float(evidence.sum())
        if total > 0:
            out += evidence / total
    return out.tolist()


# -- from chunk scores to passages ------------------------------------------------------------------------
@dataclass
class Source:
    """One passage an answer drew on. `lines` are 1-based and inclusive, in the document as it was
    loaded; `chars` are [start, end) character offsets in it; `score` is the passage's share of the
    attention the answer paid to the documents (0..1)."""

    document: str
    lines: tuple[int, int]
    text: str
    score: float
    document_index: int = -1
    chars: tuple[int, int] = (0, 0)

    @property
    def span(self) -> str:
        """"120-134", or "410" for a passage of one line."""
        a, b = self.lines
        return f"{a}" if a == b else f"{a}-{b}"

    @property
    def lines_label(self) -> str:
        """"lines 120-134", or "line 410"."""
        return ("line " if self.lines[0] == self.lines[1] else "lines ") + self.span

    def to_dict(self) -> dict[str, Any]:
        return {"document": self.document, "lines": list(self.lines), "text": self.text,
                "score": round(self.score, 4), "document_index": self.document_index, "chars": list(self.chars)}

    @classmethod
    def from_dict(cls, data: Any) -> Source | None:
        """A saved source (history, JSON); None if it is not one (a damaged record stays readable)."""
        if not isinstance(data, dict):
            return None
        lines, chars = data.get("lines"), data.get("chars", [0, 0])
        if not (isinstance(data.get("document"), str) and isinstance(data.get("text"), str)
                and _int_pair(lines) and _int_pair(chars)):
            return None
        score = data.get("score", 0.0)
        index = data.get("document_index", -1)
        return cls(data["document"], (lines[0], lines[1]), data["text"],
                   float(score) if isinstance(score, int | float) and not isinstance(score, bool) else 0.0,
                   index if isinstance(index, int) and not isinstance(index, bool) else -1, (chars[0], chars[1]))


def _int_pair(value: Any) -> bool:
    return (isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


@dataclass
class _Unit:
    """The part of one chunk that lies in one document."""

    doc: int
    chunk: int
    start: int
    end: int
    score: float


@dataclass
class _Passage:
    doc: int
    first: int  # line indices, 0-based inclusive
    last: int
    score: float
    best: _Unit
    units: list[_Unit] = field(default_factory=list)


class LineIndex:
    """Line numbers of a text's characters (lines end at "\\n", as editors and `wc -l` count them)."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line_of(self, char: int) -> int:
        """0-based line of character `char`."""
        return bisect.bisect_right(self.starts, char) - 1

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Characters [start, end) of lines first..last (0-based, inclusive), without the last newline."""
        end = self.starts[last + 1] - 1 if last + 1 < len(self.starts) else len(self.text)
        return self.starts[first], end

    def is_blank(self, line: int) -> bool:
        a, b = self.span(line, line)
        return not self.text[a:b].strip()


def chunk_units(scores: Sequence[float], chunk_size: int, posmap: PositionMap) -> list[_Unit]:
    """Each scored chunk split by document (chunks rarely straddle two: the header lies between);
    a part holding fewer of the chunk's tokens gets that share of its score."""
    doc, starts, ends = posmap.tensors
    pos = torch.nonzero(doc >= 0).squeeze(1)
    chunk = pos // chunk_size
    keep = chunk < len(scores)
    pos, chunk = pos[keep], chunk[keep]
    if pos.numel() == 0:
        return []
    docs = doc[pos]
    n_docs = int(docs.max()) + 1
    parts, which, counts = torch.unique(chunk * n_docs + docs, return_inverse=True, return_counts=True)
    first = torch.full((parts.numel(),), 1 << 62, dtype=torch.int64).scatter_reduce(
        0, which, starts[pos], "amin")
    last = torch.zeros(parts.numel(), dtype=torch.int64).scatter_reduce(
        0, which, ends[pos], "amax")
    part_chunk = parts // n_docs
    score = torch.tensor(scores, dtype=torch.float64)[part_chunk] * counts / chunk_size
    return [_Unit(d, c, a, b, x) for d, c, a, b, x in zip(
        (parts % n_docs).tolist(), part_chunk.tolist(), first.tolist(), last.tolist(), score.tolist(), strict=True)]


def rank_sources(
    scores: Sequence[float], chunk_size: int, posmap: PositionMap, documents: Sequence[tuple[str, str]],
    top: int = 3, max_lines: int = 6,
) -> list[Source]:
    """The `top` passages with the most attention. `documents` are (name, original text) in the
    session's order. Chunks are taken best first; each becomes the whole lines it touches, and joins
    a passage of the same document it overlaps or touches (a passage grows to at most `max_lines`
    lines; passages never overlap); a passage's score is the attention of its chunks, as a share of
    all the attention the documents got."""
    units = chunk_units(scores, chunk_size, posmap)
    total = sum(u.score for u in units)
    if not units or total <= 0 or top <= 0:
        return []
    index = {d: LineIndex(documents[d][1]) for d in {u.doc for u in units}}
    passages: list[_Passage] = []
    for u in sorted(units, key=lambda u: -u.score):
        if u.score <= 0:  # no attention at all: it neither grows a passage nor makes one
            break
        lines = index[u.doc]
        first, last = lines.line_of(u.start), lines.line_of(max(u.start, u.end - 1))
        near = [p for p in passages if p.doc == u.doc and first <= p.last + 1 and last >= p.first - 1]
        home = next((p for p in near if max(last, p.last) - min(first, p.first) < max_lines
                     and not _overlaps_other(passages, p, min(first, p.first), max(last, p.last))), None)
        if home is not None:  # grows a passage it overlaps or touches
            home.first, home.last = min(first, home.first), max(last, home.last)
        else:  # inside a passage that cannot grow: counts for it; else a passage of its own
            home = next((p for p in near if first <= p.last and last >= p.first), None)
        if home is None:
            if len(passages) >= 4 * top and u.score < passages[top - 1].score:
                continue  # it can no longer make the top: skip the bookkeeping
            passages.append(_Passage(u.doc, first, last, u.score, u, [u]))
        else:
            home.score += u.score
            home.units.append(u)
        passages.sort(key=lambda p: -p.score)
    out = []
    for p in passages[:top]:
        name, text = documents[p.doc]
        lines = index[p.doc]
        first, last = p.first, p.last
        while first < last and lines.is_blank(first):
            first += 1
        while last > first and lines.is_blank(last):
            last -= 1
        a, b = lines.span(first, last)
        out.append(Source(name, (first + 1, last + 1), clip(text[a:b], p.best.start - a, p.best.end - a),
                          p.score / total, p.doc, (a, b)))
    return out


def _overlaps_other(passages: list[_Passage], home: _Passage, first: int, last: int) -> bool:
    return any(p is not home and p.doc == home.doc and first <= p.last and last >= p.first for p in passages)


def clip(text: str, focus_start: int, focus_end: int, limit: int = TEXT_LIMIT) -> str:
    """`text` cut to about `limit` characters around [focus_start, focus_end), at spaces where one is
    near (not inside a word), with "…" where cut."""
    if len(text) <= limit:
        return text
    mid = (max(0, focus_start) + max(0, min(len(text), focus_end))) // 2
    a = max(0, min(len(text) - limit, mid - limit // 2))
    b = a + limit
    if a:
        space = text.find(" ", a, a + 24)
        a = space + 1 if space >= 0 else a
    if b < len(text):
        space = text.rfind(" ", b - 24, b)
        b = space if space > a else b
    return ("…" if a else "") + text[a:b] + ("…" if b < len(text) else "")


# -- what an answer quotes -----------------------------------------------------------------------------------
_WORD = re.compile(r"\w+")


def quoted_lines(passage: str, answer: str, run: int = 6) -> list[bool]:
    """Per line of `passage`: whether the answer quotes it verbatim (case and spacing aside): the whole
    line when it has fewer than `run` words (and at least two), else any `run` consecutive words of it."""
    words = [w.casefold() for w in _WORD.findall(answer)]
    said = " " + " ".join(words) + " "
    grams = {tuple(words[i : i + run]) for i in range(len(words) - run + 1)}
    out = []
    for line in passage.split("\n"):
        lw = [w.casefold() for w in _WORD.findall(line)]
        if len(lw) < run:
            out.append(len(lw) >= 2 and f" {' '.join(lw)} " in said)
        else:
            out.append(any(tuple(lw[i : i + run]) in grams for i in range(len(lw) - run + 1)))
    return out


def names_shown(sources: Sequence[Source]) -> list[bool]:
    """Whether each source's document is named before it in a sources line: at the first of each run
    of passages from one document."""
    keys = [(s.document, s.document_index) for s in sources]
    return [i == 0 or keys[i] != keys[i - 1] for i in range(len(keys))]


def source_label(sources: Sequence[Source]) -> str:
    """"book.txt 120-134 · 410-418 · notes.md 3-9": each document named once, before its passages."""
    return " · ".join((f"{s.document} " if named else "") + s.span
                      for s, named in zip(sources, names_shown(sources), strict=True))


__all__ = [
    "COPY_RUN", "SOURCES_BUDGET", "DocumentRuns", "LineIndex", "Placement", "PositionMap", "Source",
    "SourceTracker", "TextPiece",
    "build_position_map", "chunk_attention", "clip", "copied_chunks", "cut_pieces", "document_evidence",
    "names_shown", "quoted_lines", "rank_sources", "source_label", "source_layers", "whole_text",
]
