"""Sources of an answer (decoding/sources.py): the map from prompt positions to documents' lines,
the ranking of chunks into passages, the attention reading against a plain reference, and the
Session's sources: exact text of what was prefilled, never across documents, never changing tokens."""

from __future__ import annotations

import math

import pytest
import torch

from triforce_chat.decoding.session import DecodeConfig, Session
from triforce_chat.decoding.sources import (
    LineIndex,
    Placement,
    PositionMap,
    Source,
    build_position_map,
    chunk_attention,
    copied_chunks,
    cut_pieces,
    document_evidence,
    quoted_lines,
    rank_sources,
    source_label,
    whole_text,
)


def numbered(name: str, n: int) -> str:
    return "\n".join(f"{name} line {i}: the keeper of tower {i} rings bell {i * 7 % 13}." for i in range(1, n + 1))


DOC_A, DOC_B = numbered("alpha", 30), numbered("beta", 25)


def unclipped(text: str) -> str:
    """A source's text without the ellipses where it was clipped."""
    return text.removeprefix("…").removesuffix("…")


def answer_of(session: Session, question: str) -> list[int]:
    return [t for ev in session.generate(question) for t in ev.tokens]


def session_with(tiny_model, docs, **cfg) -> Session:
    s = Session(tiny_model, DecodeConfig(**{"max_new_tokens": 12, "budget": "64", **cfg}))
    for name, text in docs:
        s.add_document(name, text)
    return s


# -- the position map ------------------------------------------------------------------------------------
def check_map(session: Session, question: str, originals: dict[int, str]) -> PositionMap:
    """Every mapped token is exactly the original text it claims; returns the map."""
    posmap = session.position_map(question)  # first: it applies --truncate, as an answer would
    rendered = session._render(session._messages(question), True)
    enc = session.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert posmap is not None and len(posmap) == len(enc.input_ids)
    for i, (s, e) in enumerate(enc.offset_mapping):
        d = posmap.doc[i]
        if d >= 0:
            assert originals[d][posmap.start[i] : posmap.end[i]] == rendered[s:e], i
    return posmap


def test_positions_map_to_each_documents_own_characters(tiny_model):
    s = session_with(tiny_model, [("a.txt", DOC_A), ("b.txt", DOC_B)])
    question = 'What does "alpha line 3" say about tower 3?'  # a quote of a document in the question
    posmap = check_map(s, question, {0: DOC_A, 1: DOC_B})
    for d, text in ((0, DOC_A), (1, DOC_B)):
        mine = [i for i in range(len(posmap)) if posmap.doc[i] == d]
        covered = "".join(text[posmap.start[i] : posmap.end[i]] for i in mine)
        # the whole document, token by token, in order (a token straddling its edge may belong to none)
        assert covered.strip() in text and len(covered.strip()) >= len(text) - 4
        assert all(posmap.start[a] < posmap.start[b] for a, b in zip(mine, mine[1:], strict=False))
    # the template, headers and the question belong to no document
    assert posmap.doc[0] == -1 and posmap.doc[-1] == -1
    n_question = len(s.tokenizer(question, add_special_tokens=False).input_ids)
    tail = posmap.doc[-(n_question + 2) :]
    assert set(tail) == {-1}


def test_later_turns_map_to_their_documents(tiny_model):
    """A document added in the second turn is found after the first turn's document and answer."""
    s = session_with(tiny_model, [("a.txt", DOC_A)], level=0)
    answer_of(s, "Which tower rings bell 5?")
    s.add_document("b.txt", DOC_B)
    posmap = check_map(s, "And in the second document?", {0: DOC_A, 1: DOC_B})
    assert {0, 1} <= set(posmap.doc)


def test_truncated_document_maps_to_the_file_as_loaded(tiny_model):
    long = numbered("gamma", 400)
    s = session_with(tiny_model, [("long.txt", long)], truncate=True)
    posmap = check_map(s, "What is on the last line?", {0: long})
    [doc] = s.pending_documents
    assert "tokens omitted" in doc.text and doc.original == long
    mapped = sorted(posmap.start[i] for i in range(len(posmap)) if posmap.doc[i] == 0)
    # the head and the tail of the original, nothing from the omitted middle or the marker
    gap = max(b - a for a, b in zip(mapped, mapped[1:], strict=False))
    assert mapped[0] < 20 and mapped[-1] > len(long) - 80 and gap > len(long) // 2


def test_cut_pieces_keep_the_origin_of_each_kept_part():
    pieces = cut_pieces(whole_text("0123456789"), [(0, 3, 0), (7, 10, 8)])  # "012" + "<m>" ... + "789"
    assert [(p.start, p.end, p.origin) for p in pieces] == [(0, 3, 0), (8, 11, 7)]
    again = cut_pieces(pieces, [(8, 11, 0)])  # a cut of a cut still points at the original
    assert [(p.start, p.end, p.origin) for p in again] == [(0, 3, 7)]


def test_a_token_across_a_documents_edge_belongs_to_none():
    text = "abc def"
    placements = [Placement(0, 10, 17, 0, whole_text(text))]  # the document is rendered at 10..17
    posmap = build_position_map([(8, 11), (11, 14), (14, 17), (16, 19), (5, 5)], placements)
    assert posmap.doc == [-1, 0, 0, -1, -1]
    assert (posmap.start[1], posmap.end[1]) == (1, 4)


# -- ranking chunks into passages ------------------------------------------------------------------------------
def line_map(texts: list[str], chunk: int) -> tuple[PositionMap, list[int]]:
    """One token per whole line, documents one after another with a chunk of template tokens before
    each. Returns the map and the first position of each document."""
    doc: list[int] = []
    start: list[int] = []
    end: list[int] = []
    firsts = []
    for d, text in enumerate(texts):
        doc += [-1] * chunk
        start += [0] * chunk
        end += [0] * chunk
        firsts.append(len(doc))
        idx = LineIndex(text)
        for line in range(len(idx.starts)):
            a, b = idx.span(line, line)
            doc.append(d)
            start.append(a)
            end.append(b)
    return PositionMap(doc, start, end), firsts


def test_passages_follow_the_attention_and_merge_adjacent_chunks():
    chunk = 2
    posmap, firsts = line_map([DOC_A, DOC_B], chunk)
    scores = [0.0] * math.ceil(len(posmap) / chunk)
    b_line = 10  # 0-based line of b.txt: its chunk gets the most attention
    scores[(firsts[1] + b_line) // chunk] = 5.0
    a_chunk = (firsts[0] + 20) // chunk  # two adjacent chunks of a.txt: one passage
    scores[a_chunk], scores[a_chunk + 1] = 2.0, 1.5
    scores[(firsts[0] + 2) // chunk] = 0.5
    out = rank_sources(scores, chunk, posmap, [("a.txt", DOC_A), ("b.txt", DOC_B)], top=3)
    assert [s.document for s in out] == ["b.txt", "a.txt", "a.txt"]
    best, merged, last = out
    assert best.lines[0] <= b_line + 1 <= best.lines[1] and f"beta line {b_line + 1}:" in best.text
    assert merged.lines[1] - merged.lines[0] + 1 == 2 * chunk  # two chunks of 2 lines
    assert merged.score > last.score and sum(s.score for s in out) == pytest.approx(1.0)
    for s, text in ((best, DOC_B), (merged, DOC_A), (last, DOC_A)):
        a, b = s.chars
        assert s.text == text[a:b] and text.count("\n", 0, a) + 1 == s.lines[0]
    assert source_label(out).startswith(f"b.txt {best.lines[0]}-{best.lines[1]} · a.txt ")


def test_a_chunk_over_two_documents_makes_a_passage_in_each():
    """The end of a.txt and the start of b.txt share a chunk (no template between): still two passages."""
    doc = [0, 0, 1, 1]
    posmap = PositionMap(doc, [0, 4, 0, 4], [3, 7, 3, 7])
    out = rank_sources([1.0, 0.0], 4, posmap, [("a.txt", "aaa\nbbb"), ("b.txt", "ccc\nddd")], top=3)
    assert sorted((s.document, s.text) for s in out) == [("a.txt", "aaa\nbbb"), ("b.txt", "ccc\nddd")]


def test_no_attention_on_documents_means_no_sources():
    posmap = PositionMap([-1] * 8, [0] * 8, [0] * 8)
    assert rank_sources([1.0, 2.0], 4, posmap, [("a.txt", "x")]) == []


# -- the attention reading ---------------------------------------------------------------------------------
def test_chunk_attention_matches_a_plain_softmax():
    torch.manual_seed(0)
    hkv, g, d, length, chunk = 2, 3, 16, 50, 8
    q, k = torch.randn(hkv * g, d), torch.randn(hkv, 64, d)
    got = chunk_attention(q, k.half(), length, chunk, scale=0.25, block=16)
    ref = torch.zeros(length // chunk, dtype=torch.float64)
    kk = k.half().double()
    for h in range(hkv * g):
        p = torch.softmax(kk[h // g, :length] @ q[h].double() * 0.25, dim=0)
        share = p[: (length // chunk) * chunk].view(-1, chunk).sum(-1)
        ref += share * share
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


# -- sources of a real answer -------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0, 2])
def test_sources_cite_prefilled_text_and_never_change_the_tokens(tiny_model, level):
    with_sources = session_with(tiny_model, [("a.txt", DOC_A), ("b.txt", DOC_B)], level=level, sources_every=1)
    without = session_with(tiny_model, [("a.txt", DOC_A), ("b.txt", DOC_B)], level=level, sources_every=0)
    question = "Which tower rings bell 3?"
    assert answer_of(with_sources, question) == answer_of(without, question)
    assert without.turns[-1].sources == []
    sources = with_sources.turns[-1].sources
    assert 1 <= len(sources) <= 3
    texts = {"a.txt": DOC_A, "b.txt": DOC_B}
    for s in sources:
        text = texts[s.document]
        a, b = s.chars
        assert unclipped(s.text) in text[a:b]  # clipped at most, never another document's text
        assert text.count("\n", 0, a) + 1 == s.lines[0] and text.count("\n", 0, b) + 1 == s.lines[1]
        assert s.document_index == ["a.txt", "b.txt"].index(s.document) and 0 < s.score <= 1
    stats = with_sources.stats.to_dict()
    assert "sources" in stats["timings_s"] and stats["sources_rank_s"] >= 0  # what they cost is counted


def test_sources_of_a_truncated_document_cite_the_file_as_loaded(tiny_model):
    long = numbered("gamma", 400)
    s = session_with(tiny_model, [("long.txt", long)], truncate=True, sources_every=1, level=0)
    answer_of(s, "What rings last?")
    assert s.turns[-1].sources
    for src in s.turns[-1].sources:
        a, b = src.chars
        assert unclipped(src.text) in long[a:b] and "omitted" not in src.text
        assert long.count("\n", 0, a) + 1 == src.lines[0]


def test_an_edited_document_is_cited_as_it_was_prefilled(tiny_model):
    """Sources refer to the text the session holds: a document loaded again (edited) is another
    document, and the first answer's sources keep quoting the first text."""
    s = session_with(tiny_model, [("a.txt", DOC_A)], sources_every=1, level=0)
    answer_of(s, "Which tower rings bell 3?")
    first = list(s.turns[-1].sources)
    s.add_document("a.txt", DOC_A.replace("keeper", "painter"))
    answer_of(s, "And now?")
    assert first == s.turns[0].sources and all("painter" not in x.text for x in first)
    for src in s.turns[-1].sources:
        text = s.documents[src.document_index].original
        assert unclipped(src.text) in text[src.chars[0] : src.chars[1]]


def test_quoted_lines_and_saved_sources():
    passage = "The keeper rings the bell at dawn every day.\nNothing else.\nBell 3"
    assert quoted_lines(passage, "It says: the keeper rings the bell at dawn, every day!") == [True, False, False]
    assert quoted_lines(passage, "bell 3") == [False, False, True]
    src = Source("a.txt", (3, 5), "text", 0.25, 1, (10, 40))
    assert Source.from_dict(src.to_dict()) == src
    assert Source.from_dict({"document": "a.txt", "lines": [1, True], "text": "x"}) is None
    assert Source.from_dict("nonsense") is None


def test_copied_runs_point_at_the_place_they_were_copied_from():
    # positions 0-3 template, 4-11 document 0, 12-15 template (the question), 16-23 document 1
    doc = [-1] * 4 + [0] * 8 + [-1] * 4 + [1] * 8
    posmap = PositionMap(doc, list(range(24)), list(range(1, 25)))
    prompt = [0, 0, 0, 0, 5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 99, 20, 21, 22, 5, 6, 7, 30, 31]
    # copies 9 10 11 (once, in chunk 2 of document 0) and 5 6 7 (in document 0 and document 1, and in
    # the question, which is no document)
    copied = copied_chunks(prompt, [9, 10, 11, 50, 5, 6, 7], posmap, chunk_size=4)
    assert copied == pytest.approx([0.0, 0.5, 1.0, 0.0, 0.5, 0.0])
    assert copied_chunks(prompt, [1, 2, 3], posmap, 4) == [0.0] * 6
    # a run said twice counts twice
    assert copied_chunks(prompt, [9, 10, 11, 9, 10, 11], posmap, 4)[2] == pytest.approx(2.0)
    # equal shares of each kind of evidence, attention over document chunks only
    both = document_evidence([9.0, 1.0, 1.0, 0.0, 2.0, 0.0], [copied], posmap, 4)
    assert both == pytest.approx([0.0, 0.25 + 0.25, 0.25 + 0.5, 0.0, 0.5 + 0.25, 0.0])
    quoted = [0.0, 0.0, 0.0, 0.0, 3.0, 0.0]
    three = document_evidence([9.0, 1.0, 1.0, 0.0, 2.0, 0.0], [copied, quoted], posmap, 4)
    assert three == pytest.approx([0.0, 0.5, 0.75, 0.0, 0.75 + 1.0, 0.0])
    assert document_evidence([0.0, 2.0, 2.0, 0.0, 0.0, 0.0], [[0.0] * 6], posmap, 4) == pytest.approx(
        [0.0, 0.5, 0.5, 0.0, 0.0, 0.0])
