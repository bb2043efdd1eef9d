"""The document-QA set of `triforce-chat bench-qa`: four documents of 3K-5K tokens, 38 questions with
short answers that can be checked (app/bench/qa_score.py says how).

- Three documents are Python's own reference documentation, read at run time from the standard
  library's `pydoc_data.topics` (real prose and code, on every machine, nothing shipped): the
  simple statements, the compound statements, and the literals. The questions ask for details a
  code model may not know by heart (which exception an empty `return` raises in an asynchronous
  generator, the version that allowed `from None`) or for the documentation's own words ("nothing
  happens", "testing the expression").
- The fourth is the benchmark's generated operations report (app/bench/corpus.py, fixed seed): every
  name and number in it is invented, so a right answer can only come from reading the document.

Every accepted answer occurs in its document (the tests check it on the Python that runs them).
The documentation text is whatever this Python ships, so results name the Python version. Each
question is asked as written plus `ASK_SUFFIX`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

REPORT_TOKENS, REPORT_SEED = 3500, 12  # about 3.3K tokens with either tokenizer
ASK_SUFFIX = " Answer briefly, from the document."


@dataclass(frozen=True)
class QAItem:
    question: str
    accepted: tuple[str, ...]  # any of these, as words of the answer, makes it right


@dataclass(frozen=True)
class DocSet:
    """One document and the questions asked over it (one prefill serves them all)."""

    name: str  # also the document's name in the prompt
    source: str
    text: str
    items: tuple[QAItem, ...]


def _q(question: str, *accepted: str) -> QAItem:
    return QAItem(question, accepted)


# -- Python's documentation ---------------------------------------------------------------------------------
PYDOC_SETS: tuple[tuple[str, tuple[str, ...], tuple[QAItem, ...]], ...] = (
    (
        "python-simple-statements.txt",
        ("assert", "pass", "del", "return", "yield", "raise", "break", "continue", "global", "nonlocal", "import"),
        (
            _q("According to the document, what happens when a pass statement is executed?", "nothing happens"),
            _q("Which built-in variable do the equivalent forms of an assert statement test first?", "__debug__"),
            _q("Which exception is raised when del is applied to a name that is unbound?", "NameError"),
            _q("In an asynchronous generator function, which exception does an empty return statement cause "
               "to be raised?", "StopAsyncIteration"),
            _q("When raise is used without an expression and there is no active exception, which exception "
               "is raised?", "RuntimeError"),
            _q("When the from clause of a raise statement gives an exception instance, which attribute of "
               "the raised exception is it attached to?", "__cause__"),
            _q("In which Python version was None first permitted as Y in 'raise X from Y'?", "3.3"),
            _q("When a for loop is terminated by break, what value does the loop control target keep?",
               "its current value", "current value"),
            _q("Which module variable, if defined, lists the public names that 'from module import *' binds?",
               "__all__"),
        ),
    ),
    (
        "python-compound-statements.txt",
        ("if", "while", "for", "try", "with"),
        (
            _q("In a while loop, a continue statement skips the rest of the suite and goes back to what?",
               "testing the expression"),
            _q("In the document's words, what does the built-in type range() represent?",
               "immutable arithmetic sequences of integers", "immutable arithmetic sequences"),
            _q("Inside an except clause, which function call gives the exception being handled?",
               "sys.exception"),
            _q("What happens at the end of an except clause to an exception that was assigned with 'as target'?",
               "cleared"),
            _q("If a finally clause executes a return, break or continue statement, what happens to the "
               "exception saved from the try clause?", "discarded"),
            _q("Prior to which Python version was a continue statement illegal in the finally clause?", "3.8"),
            _q("Which method of the context manager does a with statement call after its suite has run?",
               "__exit__"),
            _q("If the suite of a with statement was exited by an exception and __exit__ returned a true "
               "value, what happens to the exception?", "suppressed"),
            _q("In which Python version did the with statement gain support for grouping parentheses to "
               "break it over multiple lines?", "3.10"),
        ),
    ),
    (
        "python-literals.txt",
        ("numbers", "integers", "floating", "imaginary", "strings", "booleans", "truth"),
        (
            _q("In integer literals, what are underscores ignored for?", "determining the numeric value"),
            _q("Apart from what, is there no limit for the length of integer literals?",
               "available memory", "memory"),
            _q("Before which version did Python use C-style octal literals?", "3.0"),
            _q("What is the real part of the complex number that an imaginary literal yields?", "0.0", "zero"),
            _q("Which ASCII character does the escape sequence \\v stand for?", "vertical tab"),
            _q("What are string literals prefixed with the letter r or R called?", "raw strings", "raw string"),
            _q("In a bytes literal, bytes with a numeric value of how much or greater must be expressed with "
               "escapes?", "128"),
            _q("How many hex digits does the \\U escape sequence require?", "8"),
            _q("Besides a __bool__() method that returns False, which method makes an object considered "
               "false when it returns zero?", "__len__"),
        ),
    ),
)


def pydoc_sets() -> list[DocSet]:
    """The documentation documents: each a group of `pydoc_data.topics` entries, in the order listed."""
    from pydoc_data.topics import topics

    version = ".".join(map(str, sys.version_info[:3]))
    return [
        DocSet(name, f"pydoc_data.topics of Python {version}: {', '.join(keys)}",
               "\n\n".join(topics[k].strip() for k in keys) + "\n", items)
        for name, keys, items in PYDOC_SETS
    ]


# -- the generated report --------------------------------------------------------------------------------------
def _report_items(report) -> tuple[QAItem, ...]:
    """Eleven questions over the report's sites, spread from its first section to its last; the
    answers are the facts the generator drew."""
    sites = report.sites
    n = len(sites)

    def site(i: int):  # the i-th of 10 picks, spread evenly over the sections
        return sites[min(n - 1, i * n // 10)]

    org = report.organisation.removeprefix("the ")
    s = [site(i) for i in range(10)]
    item, qty, _ = s[8].stock[0]
    item2, _, unit2 = s[9].stock[-1]
    return (
        _q(f"Who leads the {s[0].title}?", s[0].lead),
        _q(f"How many staff does the {s[1].title} employ?", str(s[1].staff)),
        _q(f"How many shipments did the {s[2].title} handle in the reporting period?", f"{s[2].shipments:,}"),
        _q(f"In which year did the head of the {s[3].title} join the cooperative?", str(s[3].joined)),
        _q(f"Who is the deputy at the {s[4].title}?", s[4].deputy),
        _q(f"What was the budget of the {s[5].project} project at {s[5].place}, in crowns?", f"{s[5].budget:,}"),
        _q(f"In which month did the {s[6].title} start the {s[6].project} project?", s[6].month),
        _q(f"By how many percent did the shipments of the {s[7].title} grow over the year before?",
           str(s[7].growth)),
        _q(f"What quantity of {item} does the stock table of the {s[8].title} list?", str(qty)),
        _q(f"What is the unit cost of {item2} at the {s[9].title}?", str(unit2)),
        _q("What is the name of the organisation whose sites this report describes?", org),
    )


def report_set() -> DocSet:
    from triforce_chat.app.bench.corpus import build_report

    report = build_report(REPORT_TOKENS, REPORT_SEED)
    return DocSet("operations-report.md", f"app/bench/corpus.py build_report({REPORT_TOKENS}, seed={REPORT_SEED})",
                  report.text, _report_items(report))


def qa_set() -> list[DocSet]:
    """The whole set, documentation first."""
    return [*pydoc_sets(), report_set()]
