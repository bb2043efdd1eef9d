"""End to end on the real default model: levels 1 and 2 give level 0's greedy answer."""

from __future__ import annotations

import pydoc_data.topics

import pytest

from triforce_chat.decoding.session import DecodeConfig, Session

pytestmark = pytest.mark.slow

DOC = "\n\n".join(pydoc_data.topics.topics[k] for k in ("assert", "break", "continue", "del", "pass", "return"))
QUESTIONS = ["What does the assert statement do? Quote the documentation.", "When is pass useful?"]


def answers(lm, level: int, draft: str = "ngram") -> list[list[int]]:
    session = Session(lm, DecodeConfig(level=level, draft=draft, budget="256", max_new_tokens=48))
    session.add_document("statements.txt", DOC)
    out = []
    for q in QUESTIONS:
        session.new_chat()
        out.append([t for ev in session.generate(q) for t in ev.tokens])
    if level:
        assert session.cache_figures().retrieval_chunks_selected > 0  # the middle level really was sparse
    return out


def test_levels_are_identical_on_the_default_model(default_model, tiny_model_dir):
    want = answers(default_model, 0)
    assert all(len(a) > 10 for a in want)
    assert answers(default_model, 1) == want
    assert answers(default_model, 2) == want
    # a draft model sharing the tokenizer (random weights: nearly every draft is rejected)
    assert answers(default_model, 2, draft=str(tiny_model_dir)) == want
