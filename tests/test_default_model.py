"""End to end on real models: levels 1 and 2 give level 0's greedy answer.

SmolLM2 ships with the project (CI always has it). The default model, Qwen2.5-Coder-1.5B, and
Qwen2.5-Coder-0.5B (its draft model in the true three-level chain) are pulled by `make test`; run
otherwise, these tests say so when a file is not there."""

from __future__ import annotations

import pydoc_data.topics

import pytest

from triforce_chat.decoding.models import catalog
from triforce_chat.decoding.session import DecodeConfig, Session

pytestmark = pytest.mark.slow

DOC = "\n\n".join(pydoc_data.topics.topics[k] for k in ("assert", "break", "continue", "del", "pass", "return"))
QUESTIONS = ["What does the assert statement do? Quote the documentation.", "When is pass useful?"]


def answers(lm, level: int, draft: str = "ngram", max_new_tokens: int = 48, adaptive: bool = False) -> list[list[int]]:
    """Greedy answers at `level`; not adaptive unless asked, so that the middle level runs every round
    (the adaptive route skips it where it cannot pay, as at these short contexts)."""
    session = Session(lm, DecodeConfig(level=level, draft=draft, budget="256", max_new_tokens=max_new_tokens,
                                       adaptive=adaptive))
    session.add_document("statements.txt", DOC)
    out = []
    for q in QUESTIONS:
        session.new_chat()
        out.append([t for ev in session.generate(q) for t in ev.tokens])
    if level and not adaptive:
        assert session.cache_figures().retrieval_chunks_selected > 0  # the middle level really was sparse
    return out


def installed(name: str):
    path = catalog.installed_path(catalog.find(name))
    if path is None:
        pytest.skip(f"{name} is not installed (triforce-chat models pull {name})")
    return path


def test_levels_are_identical_on_smollm2(default_model, tiny_model_dir):
    want = answers(default_model, 0)
    assert all(len(a) > 10 for a in want)
    assert answers(default_model, 1) == want
    assert answers(default_model, 2) == want
    assert answers(default_model, 2, adaptive=True) == want
    # a draft model sharing the tokenizer (random weights: nearly every draft is rejected)
    assert answers(default_model, 2, draft=str(tiny_model_dir)) == want


def test_levels_are_identical_on_the_default_model():
    from triforce_chat.decoding.models.loading import load_model

    installed(catalog.DEFAULT_MODEL_NAME)
    lm = load_model(catalog.DEFAULT_MODEL_NAME, context=4096, log=lambda m: None)
    assert not lm.model.sequential_windows, lm.notices  # the self-check passed: windows are exact
    want = answers(lm, 0, max_new_tokens=32)
    assert all(len(a) > 5 for a in want)
    assert answers(lm, 2, max_new_tokens=32) == want
    assert answers(lm, 2, max_new_tokens=32, adaptive=True) == want


def test_the_three_level_chain_with_a_real_draft_model():
    """Qwen2.5-Coder-1.5B over its full cache, over the retrieval view, and the 0.5B at the bottom."""
    from triforce_chat.decoding.models.loading import load_model

    installed("qwen2.5-coder-1.5b")
    installed("qwen2.5-coder-0.5b")
    lm = load_model("qwen2.5-coder-1.5b", context=4096, log=lambda m: None)
    want = answers(lm, 0, max_new_tokens=24)
    assert answers(lm, 2, draft="qwen2.5-coder-0.5b", max_new_tokens=24) == want
