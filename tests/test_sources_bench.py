"""`bench-sources`: its questions locate their answers in the documents as they are, the BM25
baseline ranks by the question's words, and a run reports hits and an overhead pair whose tokens agree."""

from __future__ import annotations

import pytest

from triforce_chat.app.bench import sources as bench
from triforce_chat.app.bench.source_set import SourceContext, SourceItem, Target, contexts_at
from triforce_chat.decoding.session import DecodeConfig


@pytest.mark.parametrize("tokens", [7168, 29000])
def test_every_question_points_at_lines_of_its_documents(tokens):
    contexts = contexts_at(tokens)  # raises SnippetError if a snippet is not in its document exactly once
    assert sum(len(c.items) for c in contexts) >= 40
    for c in contexts:
        names = [n for n, _ in c.documents]
        assert len(set(names)) == len(names)
        for item in c.items:
            assert item.targets
            for t in item.targets:
                n_lines = c.documents[t.document][1].count("\n") + 1
                assert 1 <= t.first <= t.last <= n_lines


def test_bm25_finds_the_passage_with_the_questions_rare_words():
    docs = [("a.txt", "\n".join(f"The weather on day {i} was mild and grey." for i in range(40))),
            ("b.txt", "Nothing here.\nThe ferryman Olaf Brandt keeps the blue lantern.\nMore nothing.")]
    passages = bench.line_passages(docs, min_chars=20, max_lines=2)
    top = bench.bm25_passages("Who keeps the blue lantern?", passages, top=3)
    assert top[0].document == 1 and top[0].first <= 2 <= top[0].last
    assert bench.hits([(top[0].document, top[0].first, top[0].last)], [Target(1, 2, 2)])
    assert not bench.hits([(0, 1, 40)], [Target(1, 2, 2)])


def test_a_run_reports_hits_and_an_overhead_pair_with_identical_tokens(tiny_model):
    text = "\n".join(f"Line {i}: the keeper of tower {i} rings bell {i * 7 % 13}." for i in range(1, 80))
    ctx = SourceContext("towers", [("towers.txt", text)],
                        [SourceItem("Which bell does the keeper of tower 5 ring?", "doc", (Target(0, 5, 5),))])
    cfg = DecodeConfig(level=2, budget="64", max_new_tokens=10)
    record = bench.run_context(tiny_model, cfg, ctx, overhead=1, every=2, limit=None)
    [q] = record["questions"]
    assert isinstance(q["hit"], bool) and q["bm25_hit"]  # "tower 5" is on line 5
    assert 1 <= len(q["sources"]) <= 3
    [pair] = record["overhead"]
    assert pair["identical"] and pair["with"]["sources_s"] > 0
    summary = bench.summarize([record])
    assert summary["all"]["questions"] == 1 and summary["overhead"]["identical"]
