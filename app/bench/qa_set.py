"""The document-QA set of `triforce-chat bench-qa`: seven documents of 2K-5K tokens, 74 questions with
short answers that can be checked (app/bench/qa_score.py says how).

- Three documents are Python's own reference documentation, read at run time from the standard
  library's `pydoc_data.topics` (real prose and code, on every machine, nothing shipped): the
  simple statements, the compound statements, and the literals. The questions ask for details a
  code model may not know by heart (which exception an empty `return` raises in an asynchronous
  generator, the version that allowed `from None`) or for the documentation's own words ("nothing
  happens", "testing the expression").
- The fourth is the benchmark's generated operations report (app/bench/corpus.py, fixed seed): every
  name and number in it is invented, so a right answer can only come from reading the document.
- Three more are held out (`HELD_OUT`): prose of the kinds people bring to a chat about a document, a
  short story, an appliance's manual and a tenancy agreement, written for this project (app/bench/
  texts/) with invented names and figures, and questions written before any model was run on them.
  Why: the first four were the only evidence for choosing the default model, and a set that a model
  choice was tuned on says little about documents it has not seen. `--documents held-out` asks
  these alone (`--documents first-four` the original 38, comparable with results from before them).

Every accepted answer occurs in its document (the tests check it on the Python that runs them).
The documentation text is whatever this Python ships, so results name the Python version. Each
question is asked as written plus `ASK_SUFFIX`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources

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


# -- held out: prose written for this project ----------------------------------------------------------------------
HELD_OUT: tuple[tuple[str, tuple[QAItem, ...]], ...] = (
    (
        "the-tide-ledger.md",
        (
            _q("What is the name of the ferry that lost a propeller blade on a sandbar?", "Wren's Promise"),
            _q("Who took Ines across to the island in his trawler?", "Aldo Petrich"),
            _q("What is the name of the only village on Kestrel Holm?", "Saltmoor"),
            _q("What colour is the door of the chandlery?", "yellow"),
            _q("How many steps lead from the end of the road to the tide station?", "212"),
            _q("What colour is the ink Teodor Blum writes with?", "green"),
            _q("Who kept the tide station before Teodor Blum and taught him the work?", "Hester Quayle"),
            _q("What level did the 1962 ledger record by hand for the peak of the storm surge, in metres?", "6.84"),
            _q("According to the correction, what was the real peak of the 1962 surge, in metres?", "7.03"),
            _q("What was hidden under the dust in the tin of cloves, besides a folded sheet of paper?", "key"),
            # "ash pan" added after the first run: the 1.5B answered "behind the ash pan", which the story says
            _q("Where was the keyhole of the hidden cupboard?", "hearth", "ash pan"),
            _q("By how many centimetres did the harbour authority say the wall would be raised?", "40"),
        ),
    ),
    (
        "bread-maker-manual.md",
        (
            _q("What is the rated power of the bread maker, in watts?", "650"),
            _q("What is the longest time the delay timer can be set to, in hours?", "13"),
            _q("Which program number is meant for gluten-free flour mixes?", "9"),
            _q("What does the error code E04 mean?", "lid"),
            _q("Which error code means that the dough is too stiff?", "E05"),
            _q("For how many minutes at most does a short press on START/STOP pause a running program?", "10"),
            _q("How many minutes of power failure does the appliance survive and continue its program?", "8"),
            _q("How many years of warranty does Halden grant on the appliance?", "3"),
            _q("How many kneading paddles are in the box?", "2"),
            _q("What should be put on the drive shaft in the bottom of the pan once a month?", "oil"),
            _q("During which phase does the appliance beep 10 times, so that nuts or fruit can be added?",
               "second kneading phase", "second kneading"),
            _q("What is the customer service telephone number?", "0800 417 2290"),
        ),
    ),
    (
        "tenancy-agreement.md",
        (
            _q("How much is the monthly rent, in pounds?", "1,140"),
            _q("How much deposit have the tenants paid, in pounds?", "1,315"),
            _q("Which scheme protects the tenants' deposit?", "Ashbury Tenancy Deposit Scheme"),
            _q("Which animal may the tenants keep at the property?", "cat"),
            _q("What is the earliest date on which the tenancy can end under the break clause?", "1 March 2027"),
            _q("Which parking space number comes with the flat?", "6"),
            _q("What is the name of the landlord's letting agent?", "Greystone Lettings", "Greystone"),
            _q("By how many percent at most may the rent rise at a review?", "4"),
            _q("Within how many hours must the landlord repair a loss of heating between October and April?",
               "24"),
            _q("Who witnessed the signatures?", "Daniel Achebe"),
            _q("Up to how much are the agent's costs of finding a new tenant capped, in pounds, if the tenants "
               "are released early?", "300"),
            _q("How many sets of keys must the tenants return at the end of the tenancy?", "4"),
        ),
    ),
)


def held_out_sets() -> list[DocSet]:
    """The held-out documents, read from the package (app/bench/texts/)."""
    texts = resources.files("triforce_chat.app.bench") / "texts"
    return [DocSet(name, f"app/bench/texts/{name}", (texts / name).read_text(encoding="utf-8"), items)
            for name, items in HELD_OUT]


# `--documents`: which of the set's documents to ask
DOCUMENT_GROUPS = ("all", "first-four", "held-out")


def qa_set(documents: str = "all") -> list[DocSet]:
    """The whole set (documentation, the report, then the held-out documents), or one group of it:
    `first-four` (the set as it was before the held-out documents) or `held-out`."""
    if documents not in DOCUMENT_GROUPS:
        raise ValueError(f"documents must be one of {', '.join(DOCUMENT_GROUPS)}, not {documents!r}")
    first = [*pydoc_sets(), report_set()] if documents != "held-out" else []
    return first + (held_out_sets() if documents != "first-four" else [])
