"""The questions of `triforce-chat bench-sources`, each with the lines of its document that hold the answer.

Why these: a source is right when it points at the passage the answer comes from, so every question
needs that passage located in the document, by the document's own text rather than by hand-typed
line numbers (which would go stale with the next Python's documentation).

- The generated report (app/bench/corpus.py): its quote and fact questions carry the paragraph that
  holds the answer (`Question.source`), found in the text as it is.
- Python's documentation (app/bench/qa_set.py): for each question, a few words of the sentence that
  answers it (`PYDOC_ANSWERS`); the answer's lines are that sentence's lines, within its paragraph.
  Every snippet occurs exactly once in its document (tests/test_sources_bench.py checks it on the
  Python that runs the tests).
- The QA set's own small report: each question's answer (a name, a number) found in the section
  of the site it asks about.

Contexts put several documents side by side, so that a source must also name the right document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from triforce_chat.app.bench.qa_set import PYDOC_SETS, DocSet, pydoc_sets, report_set

# a few words of the sentence that answers each question of qa_set.PYDOC_SETS, in the same order
PYDOC_ANSWERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "python-simple-statements.txt": (
        ("when it is executed, nothing happens",),
        ("if not expression: raise AssertionError\n", 'These equivalences assume that "__debug__"'),
        ('If the name is unbound, a "NameError" exception will be raised',),
        ('will cause "StopAsyncIteration" to be raised',),
        ('a "RuntimeError" exception is raised indicating',),
        ('"__cause__" attribute (which is writable)',),
        ('"None" is now permitted as "Y"',),
        ("the loop control target keeps its current value",),
        ('for a variable named "__all__"',),
    ),
    "python-compound-statements.txt": (
        ("skips the rest of the suite and goes back to testing the expression",),
        ("represents immutable arithmetic sequences of integers",),
        ('by calling "sys.exception()"',),
        ('it is cleared at the end of the "except" clause',),
        ("the saved exception is discarded",),
        ('Prior to Python 3.8, a "continue" statement was illegal',),
        ('"__exit__()" method is invoked',),
        ("If the return value was true, the exception is suppressed",),
        ("Changed in version 3.10: Support for using grouping parentheses",),
    ),
    "python-literals.txt": (
        ("Underscores are ignored for determining the numeric value",),
        ("apart from what can be stored in available memory",),
        ("which Python used before version 3.0",),
        ("yields a complex number with a real part of 0.0",),
        ("ASCII Vertical Tab (VT)",),
        ('letter "\'r\'" or "\'R\'"; such',),  # the raw strings' line in 3.11-3.13 (3.13 says "constructs")
        ("bytes with a numeric value of 128 or greater",),
        ("Exactly eight hex", '"\\U*xxxxxxxx*"'),
        ('or a "__len__()" method that returns zero',),
    ),
}
AROUND = 2  # lines of the snippet's paragraph around it that also count as the answer's passage


@dataclass(frozen=True)
class Target:
    """Lines (1-based, inclusive) of one document of a context that hold an answer."""

    document: int  # index among the context's documents
    first: int
    last: int


@dataclass(frozen=True)
class SourceItem:
    question: str
    kind: str  # "quote" | "fact" (report), "doc" (Python documentation), "qa-report" (the QA set's report)
    targets: tuple[Target, ...]  # any of them holds the answer


@dataclass
class SourceContext:
    """Documents prefilled once, side by side, and the questions asked over them."""

    name: str
    documents: list[tuple[str, str]]  # (name, text)
    items: list[SourceItem]


class SnippetError(ValueError):
    """A snippet is not in its document exactly once (a Python whose documentation changed)."""


def line_of(text: str, char: int) -> int:
    """1-based line of character `char`."""
    return text.count("\n", 0, char) + 1


def snippet_lines(text: str, snippet: str, around: int = AROUND) -> tuple[int, int]:
    """The lines holding `snippet` (which must occur once), widened by `around` lines within its
    paragraph (blank lines bound a paragraph)."""
    pattern = re.compile(r"\s+".join(re.escape(w) for w in snippet.split()))  # the text wraps lines anywhere
    found = list(pattern.finditer(text))
    if len(found) != 1:
        raise SnippetError(f"{snippet!r} occurs {len(found)} times, not once")
    lines = text.split("\n")
    first, last = line_of(text, found[0].start()), line_of(text, found[0].end() - 1)
    lo, hi = first, last
    while lo > 1 and first - lo < around and lines[lo - 2].strip():
        lo -= 1
    while hi < len(lines) and hi - last < around and lines[hi].strip():
        hi += 1
    return lo, hi


def pydoc_items(doc: DocSet, index: int) -> list[SourceItem]:
    answers = PYDOC_ANSWERS[doc.name]
    if len(answers) != len(doc.items):
        raise SnippetError(f"{doc.name}: {len(answers)} answer snippets for {len(doc.items)} questions")
    out = []
    for item, snippets in zip(doc.items, answers, strict=True):
        targets = tuple(Target(index, *snippet_lines(doc.text, s, around=AROUND)) for s in snippets)
        out.append(SourceItem(item.question, "doc", targets))
    return out


def qa_report_items(doc: DocSet, index: int) -> list[SourceItem]:
    """The QA set's report questions: each answer's line within the section of its site (or, for the
    organisation's name, the report's opening paragraph)."""
    from triforce_chat.app.bench.corpus import build_report
    from triforce_chat.app.bench.qa_set import REPORT_SEED, REPORT_TOKENS

    report = build_report(REPORT_TOKENS, REPORT_SEED)
    text = doc.text
    sections = [text.index(f"## Section {s.section}: ") for s in report.sites] + [len(text)]
    out = []
    for item in doc.items:
        site = next((k for k, s in enumerate(report.sites) if s.title in item.question
                     or f"project at {s.place}," in item.question), None)
        if site is None:  # the organisation: the opening paragraph names it
            first, last = 1, line_of(text, sections[0]) - 1
        else:
            a, b = sections[site], sections[site + 1]
            answer = item.accepted[0]
            at = text.find(answer, a, b)
            if at < 0:
                raise SnippetError(f"{answer!r} is not in the section of {report.sites[site].title}")
            first = last = line_of(text, at)
        out.append(SourceItem(item.question, "qa-report", (Target(index, first, last),)))
    return out


def report_items(text: str, questions, index: int, n: int) -> list[SourceItem]:
    """`n` quote and fact questions of a generated report, alternating, from `n` sections spread
    evenly from its first to its last (a question about every depth)."""
    qs = [q for q in questions if q.kind in ("quote", "fact") and q.source in text]
    sections = sorted({q.section for q in qs})
    out = []
    for i in range(min(n, len(sections))):
        section = sections[min(len(sections) - 1, int((i + 0.5) * len(sections) / n))]
        kind = ("quote", "fact")[i % 2]
        q = next(q for q in qs if q.section == section and q.kind == kind)
        at = text.index(q.source)
        target = Target(index, line_of(text, at), line_of(text, at + len(q.source) - 1))
        out.append(SourceItem(q.text, q.kind, (target,)))
    return out


def generated_report(tokens: int, seed: int = 0):
    """The corpus report sized for about `tokens` tokens of the default model's tokenizer."""
    from triforce_chat.app.bench.corpus import build_report

    return build_report(int(tokens * 1.06), seed)


def contexts_at(tokens: int, report_questions: int = 16) -> list[SourceContext]:
    """The contexts for a target length. About 7K (tokens < 16K): three contexts of about 7K tokens: the
    generated report alone; the simple and compound statements; the literals and the QA set's report.
    Longer: one context holding every document, the generated report filling it up to `tokens`."""
    pydocs = pydoc_sets()
    qa_report = report_set()
    if tokens < 16_000:
        report = generated_report(tokens)
        return [
            SourceContext("report", [("report.md", report.text)],
                          report_items(report.text, report.questions, 0, report_questions)),
            SourceContext("python-statements", [(d.name, d.text) for d in pydocs[:2]],
                          pydoc_items(pydocs[0], 0) + pydoc_items(pydocs[1], 1)),
            SourceContext("literals+qa-report", [(pydocs[2].name, pydocs[2].text), (qa_report.name, qa_report.text)],
                          pydoc_items(pydocs[2], 0) + qa_report_items(qa_report, 1)),
        ]
    fixed = sum(len(d.text) for d in pydocs) + len(qa_report.text)
    report = generated_report(max(2000, tokens - int(fixed / 3.4)))
    docs = [(d.name, d.text) for d in pydocs] + [(qa_report.name, qa_report.text), ("report.md", report.text)]
    items = [it for i, d in enumerate(pydocs) for it in pydoc_items(d, i)]
    items += qa_report_items(qa_report, 3) + report_items(report.text, report.questions, 4, report_questions)
    return [SourceContext("all-documents", docs, items)]


__all__ = ["PYDOC_ANSWERS", "PYDOC_SETS", "SnippetError", "SourceContext", "SourceItem", "Target", "contexts_at",
           "snippet_lines"]
