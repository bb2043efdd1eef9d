"""When an answer of the QA benchmark counts as right: the accepted answer appears in it, as words.

Both the model's answer and each accepted answer are normalised the same way, in this order:
1. Digit groups: a comma, underscore, no-break space or narrow no-break space between a digit and a
   group of exactly three digits is dropped, so `"1,024"` == `"1_024"` == `"1024"` (and
   `"412,000 crowns"` == `"412000 crowns"`); `"3,14"` keeps its comma, and a plain space is never a
   separator (it may stand between two numbers).
2. Unicode NFKC (full-width letters and digits, ligatures and non-breaking spaces become plain ones),
   then case folding (`"AssertionError"` == `"assertionerror"`); then the number words zero to
   twenty become digits (`"eight"` == `"8"`; `"eighteen"` is 18, `"eighty"` stays a word).
3. Every run of characters that are neither letters, digits nor underscores (punctuation,
   Markdown marks, quotes, whitespace) becomes one space, and the ends are trimmed. So
   `` "`__debug__`." `` == `"__debug__"`, `"sys.exception()"` == `"sys exception"`, and a decimal
   point splits a number into two words on both sides alike (`"3.10"` -> `"3 10"`).

An answer is right when one of the accepted answers, normalised, occurs in the normalised answer
as whole words: `"0o"` is found in `"use the 0o prefix"`, `"128"` is not found in `"1280"`, and
`"3 10"` (from `"3.10"`) is not found in `"3 100"`. Words, not the exact reply: short answers are
asked for, but models answer in sentences ("It raises AssertionError."), and a checkable fact is
what is scored. The price is that a reply listing many candidates can score; the questions ask for
one fact each, and the answers are greedy and short (`--max-new-tokens`), which keeps that rare.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
_DIGIT_GROUP_SEP = re.compile(r"(?<=\d)[,_\u00a0\u202f](?=\d{3}(?!\d))")
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b")
_NOT_WORD = re.compile(r"[^\w]+")


def normalize(text: str) -> str:
    """`text` as the scoring compares it (the steps are in the module docstring)."""
    text = _DIGIT_GROUP_SEP.sub("", text)  # before NFKC, which turns the no-break spaces into plain ones
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _NUMBER_WORD.sub(lambda m: str(NUMBER_WORDS.index(m.group(1))), text)
    return _NOT_WORD.sub(" ", text).strip()


def contains_answer(text: str, accepted: str) -> bool:
    """Whether `accepted`, normalised, occurs in `text`, normalised, as whole words. An accepted
    answer that normalises to nothing (only punctuation) never matches."""
    needle = normalize(accepted)
    return bool(needle) and f" {needle} " in f" {normalize(text)} "


def is_right(answer: str, accepted: Iterable[str]) -> bool:
    """Whether the model's `answer` holds one of the `accepted` answers (see the module docstring)."""
    return any(contains_answer(answer, a) for a in accepted)
