"""`triforce-chat bench-sources`: do an answer's sources point at the passage that holds the answer?

How it runs: each context's documents (app/bench/source_set.py) are prefilled once, side by side, in
one Session at the default level; every question is asked in a new chat (`Session.new_chat()`: the
documents stay in the KV cache, only the question is prefilled), greedily, and the answer's top
sources (decoding/sources.py) are compared with the lines that hold its answer. The baseline ranks
passages of the same documents by BM25 over the question's words (`bm25_passages`), and is scored
the same way.

What is reported:
- hit rate: the share of questions where one of the top 3 sources overlaps the lines that hold the
  answer (in the right document), ours and BM25's, per context and per kind of question; the mean
  size of the passages each returns, in lines and characters (a longer passage hits more easily).
- the cost of sources (`--overhead N`): the first N questions of each context answered twice, with
  and without sources, side by side (the order alternating), on the same cache: decode tok/s of each
  (new tokens / (wall time of the answer - its prefill)), the time spent reading the attention, the
  time mapping it to passages after the last token, and whether the tokens were identical (sources
  only read the cache: they must be).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from triforce_chat.app.bench.common import (
    BenchError,
    Log,
    fmt,
    load_average,
    machine_info,
    machine_line,
    parse_int_list,
    ratio,
)
from triforce_chat.app.bench.qa_set import ASK_SUFFIX
from triforce_chat.app.bench.source_set import SourceContext, SourceItem, Target, contexts_at
from triforce_chat.decoding.config import DecodeConfig

TOP = 3
_WORD = re.compile(r"\w+")
STOPWORDS = frozenset(
    "a an and are as at be by does did do for from how in is it its of on or the this that to was what when "
    "which who whose with word answer briefly document".split()
)


# -- the baseline ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Passage:
    document: int
    first: int  # lines, 1-based inclusive
    last: int
    text: str


def line_passages(documents: Sequence[tuple[str, str]], min_chars: int = 200, max_lines: int = 6) -> list[Passage]:
    """Every document cut into overlapping windows of whole lines: one starting at each non-blank
    line, taking lines until it holds `min_chars` characters or `max_lines` lines. A window of
    about the size of our passages, at every offset, so BM25 is not held back by where it cuts."""
    out = []
    for d, (_, text) in enumerate(documents):
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            j, size = i, 0
            while j < len(lines) and j - i < max_lines and size < min_chars:
                size += len(lines[j]) + 1
                j += 1
            out.append(Passage(d, i + 1, j, "\n".join(lines[i:j])))
    return out


def words(text: str) -> list[str]:
    return [w for w in (m.group().casefold() for m in _WORD.finditer(text)) if w not in STOPWORDS]


def bm25_passages(
    question: str, passages: Sequence[Passage], top: int = TOP, k1: float = 1.5, b: float = 0.75
) -> list[Passage]:
    """The `top` passages with the highest BM25 score for the question's words (Okapi BM25 with the
    usual k1 and b, IDF over the passages), best first, skipping any that overlaps one already taken."""
    docs = [Counter(words(p.text)) for p in passages]
    n = len(docs)
    if not n:
        return []
    avg = sum(sum(d.values()) for d in docs) / n or 1.0
    df = Counter(w for d in docs for w in d)
    query = set(words(question))
    scored = []
    for p, d in zip(passages, docs, strict=True):
        length = sum(d.values())
        s = 0.0
        for w in query:
            f = d.get(w, 0)
            if f:
                idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                s += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * length / avg))
        scored.append((s, p))
    scored.sort(key=lambda sp: -sp[0])
    out: list[Passage] = []
    for s, p in scored:
        if s <= 0 or len(out) >= top:
            break
        if not any(q.document == p.document and q.first <= p.last and p.first <= q.last for q in out):
            out.append(p)
    return out


def hits(found: Sequence[tuple[int, int, int]], targets: Sequence[Target]) -> bool:
    """Whether any (document, first line, last line) overlaps any target."""
    return any(d == t.document and a <= t.last and b >= t.first for d, a, b in found for t in targets)


# -- one context ----------------------------------------------------------------------------------------------
def answer_item(session, item: SourceItem, sources_every: int) -> dict[str, Any]:
    """Ask `item` in a new chat with sources read every `sources_every` tokens (0: none)."""
    session.new_chat()
    session.config.sources_every = sources_every
    ids: list[int] = []
    t0 = time.perf_counter()
    for ev in session.generate(item.question + ASK_SUFFIX):
        ids.extend(ev.tokens)
    wall = time.perf_counter() - t0
    st = session.stats
    turn = session.turns[-1]
    return {
        "token_ids": ids,
        "text": turn.answer,
        "sources": [s.to_dict() for s in turn.sources],
        "new_tokens": st.new_tokens,
        "decode_s": wall - st.prefill_s,  # the answer's wall time after its prefill, sources included
        "sources_s": st.timings.get("sources", 0.0),
        "sources_rank_s": st.sources_rank_s,
    }


def run_context(lm, cfg, ctx: SourceContext, overhead: int, every: int, limit: int | None,
                log: Log = lambda m: None, store=None) -> dict[str, Any]:
    """Every question of one context; its record. `store`: a DocumentStore (--doc-cache), so that a
    rerun restores the documents' prefill instead of computing it."""
    from triforce_chat.decoding.session import ContextOverflow, DocumentError, Session

    session = Session(lm, cfg, store=store)
    try:
        for name, text in ctx.documents:
            session.add_document(name, text)
        t0 = time.perf_counter()
        n, _ = session.prefill()
    except (ContextOverflow, DocumentError) as exc:
        raise BenchError(f"{ctx.name}: {exc}") from None
    prompt_tokens = session.cache.length
    log(f"{ctx.name}: {len(ctx.documents)} documents, {prompt_tokens:,} tokens in context "
        f"({n:,} prefilled in {time.perf_counter() - t0:.1f} s)")
    passages = line_passages(ctx.documents)
    items = ctx.items[:limit] if limit else ctx.items
    questions, pairs = [], []
    for i, item in enumerate(items):
        r = answer_item(session, item, every)
        ours = [(s["document_index"], *s["lines"]) for s in r["sources"][:TOP]]
        base = bm25_passages(item.question, passages)
        q = {
            "context": ctx.name, "index": i, "kind": item.kind, "question": item.question,
            "targets": [[t.document, t.first, t.last] for t in item.targets],
            "answer": r["text"], "sources": r["sources"],
            "hit": hits(ours, item.targets),
            "bm25": [[p.document, p.first, p.last] for p in base],
            "bm25_hit": hits([(p.document, p.first, p.last) for p in base], item.targets),
            "bm25_chars": [len(p.text) for p in base],
            "new_tokens": r["new_tokens"],
        }
        questions.append(q)
        log(f"{ctx.name} #{i} ({item.kind}): ours {'hit' if q['hit'] else 'miss'}, "
            f"bm25 {'hit' if q['bm25_hit'] else 'miss'}; {r['new_tokens']} tokens")
        if i < overhead:  # the same question without sources, and again with, the order alternating
            runs = [(every, r)]
            order = (0, every) if i % 2 == 0 else (every, 0)
            for e in order:
                runs.append((e, answer_item(session, item, e)))
            with_ = [x for e, x in runs if e][-1]
            without = next(x for e, x in runs if not e)
            pairs.append({
                "context": ctx.name, "index": i, "prompt_tokens": prompt_tokens,
                "identical": all(x["token_ids"] == without["token_ids"] for _, x in runs),
                "with": {k: with_[k] for k in ("new_tokens", "decode_s", "sources_s", "sources_rank_s")},
                "without": {k: without[k] for k in ("new_tokens", "decode_s")},
            })
    return {"name": ctx.name, "documents": [{"name": n, "characters": len(t)} for n, t in ctx.documents],
            "prompt_tokens": prompt_tokens, "questions": questions, "overhead": pairs}


def summarize(contexts: list[dict[str, Any]]) -> dict[str, Any]:
    """Hit rates over all questions, per kind and per context; the overhead totals."""
    qs = [q for c in contexts for q in c["questions"]]

    def rates(sel: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(sel)
        ours, base = sum(q["hit"] for q in sel), sum(q["bm25_hit"] for q in sel)
        return {"questions": n, "ours": ours, "bm25": base, "ours_rate": ratio(ours, n), "bm25_rate": ratio(base, n)}

    src = [s for q in qs for s in q["sources"][:TOP]]
    pairs = [p for c in contexts for p in c["overhead"]]
    tot = {k: sum(p[side][k] for p in pairs) for side, k in
           (("with", "new_tokens"), ("with", "decode_s"), ("with", "sources_s"), ("with", "sources_rank_s"))}
    without = {k: sum(p["without"][k] for p in pairs) for k in ("new_tokens", "decode_s")}
    with_rate = ratio(tot["new_tokens"], tot["decode_s"])
    without_rate = ratio(without["new_tokens"], without["decode_s"])
    return {
        "all": rates(qs),
        "by_kind": {k: rates([q for q in qs if q["kind"] == k]) for k in dict.fromkeys(q["kind"] for q in qs)},
        "by_context": {c["name"]: rates(c["questions"]) for c in contexts},
        "passage_size": {
            "ours_lines": ratio(sum(s["lines"][1] - s["lines"][0] + 1 for s in src), len(src), 2),
            "ours_chars": ratio(sum(s["chars"][1] - s["chars"][0] for s in src), len(src), 1),
            "bm25_lines": ratio(sum(b[2] - b[1] + 1 for q in qs for b in q["bm25"]),
                                sum(len(q["bm25"]) for q in qs), 2),
            "bm25_chars": ratio(sum(sum(q["bm25_chars"]) for q in qs), sum(len(q["bm25_chars"]) for q in qs), 1),
        },
        "overhead": {
            "answers": len(pairs),
            "identical": all(p["identical"] for p in pairs),
            "tokens_per_s_with": with_rate,
            "tokens_per_s_without": without_rate,
            "slowdown": ratio((without_rate or 0) - (with_rate or 0), without_rate) if pairs else None,
            "reading_share": ratio(tot["sources_s"], tot["decode_s"]),
            "rank_s_per_answer": ratio(tot["sources_rank_s"], len(pairs)),
        },
    }


def run_bench_sources(lm, cfg, tokens: list[int], overhead: int = 0, every: int = DecodeConfig.sources_every,
                      limit: int | None = None, log: Log = lambda m: None, store=None) -> dict[str, Any]:
    """Every context at every length; the `bench-sources --json` object."""
    load_start = load_average()
    runs = []
    for n in tokens:
        for ctx in contexts_at(n):
            c = run_context(lm, cfg, ctx, overhead, every, limit, log, store)
            c["tokens"] = n
            runs.append(c)
    return {"machine": machine_info(load_start), "method": __doc__.split("What is reported:", 1)[1].strip(),
            "settings": {"contexts": tokens, "level": cfg.level, "every": every, "top": TOP, "overhead": overhead,
                         "limit": limit, "max_new_tokens": cfg.max_new_tokens, "budget": cfg.budget,
                         "chunk_size": cfg.chunk_size},
            "contexts": runs, "summary": {str(n): summarize([c for c in runs if c["tokens"] == n]) for n in tokens}}


def render(result: dict[str, Any]):
    """The Rich table: one row per context length and kind of question."""
    from rich.table import Table

    caption = ("ours: attention, runs the answer copied and the question quotes (decoding/sources.py); "
               "BM25: over the question's words, same documents, windows of lines")
    table = Table(title=f"triforce-chat bench-sources — is the passage that holds the answer among the top {TOP} "
                        "sources?", caption=caption)
    for col in ("context", "questions", "ours", "BM25", "ours lines/chars", "BM25 lines/chars"):
        table.add_column(col, justify="left" if col == "context" else "right")
    for n, s in result["summary"].items():
        size = s["passage_size"]
        rows = [("all", s["all"])] + [(k, v) for k, v in s["by_kind"].items()] + \
            [(f"[dim]{k}[/dim]", v) for k, v in s["by_context"].items()]
        for label, r in rows:
            table.add_row(f"{int(n):,} · {label}", str(r["questions"]), f"{r['ours']} ({fmt(r['ours_rate'], '.0%')})",
                          f"{r['bm25']} ({fmt(r['bm25_rate'], '.0%')})",
                          f"{size['ours_lines']}/{size['ours_chars']}" if label == "all" else "",
                          f"{size['bm25_lines']}/{size['bm25_chars']}" if label == "all" else "")
    return table


def overhead_lines(result: dict[str, Any]) -> list[str]:
    out = []
    for n, s in result["summary"].items():
        o = s["overhead"]
        if not o["answers"]:
            continue
        out.append(
            f"{int(n):,} tokens: {o['answers']} answers with and without sources side by side: "
            f"{fmt(o['tokens_per_s_with'])} vs {fmt(o['tokens_per_s_without'])} tok/s "
            f"(slowdown {fmt(o['slowdown'], '.1%')}); reading the attention {fmt(o['reading_share'], '.2%')} "
            "of decode; "
            f"ranking {fmt(o['rank_s_per_answer'], '.3f')} s per answer after the last token; tokens "
            + ("identical" if o["identical"] else "DIFFER"))
    return out


def bench_sources_command(*, contexts: str, overhead: int, every: int, limit: int | None, json_out: bool,
                          doc_cache: bool = False, **options: Any) -> int:
    """`triforce-chat bench-sources`: parse, load, run, print; the exit code (1 if sources changed tokens)."""
    from rich.console import Console
    from rich.markup import escape

    from triforce_chat.app import runtime
    from triforce_chat.app.cli.main import fail, resolve_settings
    from triforce_chat.app.safe_text import json_text

    try:
        tokens = parse_int_list(contexts, "contexts")
    except BenchError as exc:
        fail(str(exc))
    if overhead < 0 or every < 1 or (limit is not None and limit < 1):
        fail("overhead must be >= 0, every >= 1 and limit >= 1")
    settings = resolve_settings(None, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                stop_on_repetition=True, **options)
    cfg = settings.decode_config()
    store = runtime.store_for(dataclasses.replace(settings, doc_cache=True)) if doc_cache else None
    try:
        lm = runtime.open_model(settings, log=(lambda m: None) if json_out else None)
    except runtime.StartupError as exc:
        fail(str(exc))
    err = Console(stderr=True, soft_wrap=True)
    try:
        result = run_bench_sources(lm, cfg, tokens, overhead, every, limit,
                                   log=lambda m: err.print(f"[dim]{escape(m)}[/dim]", highlight=False), store=store)
    except BenchError as exc:
        fail(str(exc))
    if json_out:
        print(json_text(result))
    else:
        console = Console(width=max(120, Console().width))
        console.print(machine_line(result["machine"]), highlight=False, markup=False)
        console.print(render(result))
        for line in overhead_lines(result):
            console.print(line, highlight=False, markup=False)
    same = all(s["overhead"]["identical"] for s in result["summary"].values())
    return 0 if same else 1
