"""The conversation bookkeeping: multi-turn without re-prefill, stop, documents that do not fit."""

from __future__ import annotations

import pydoc_data.topics
import re

import pytest

from triforce_chat.decoding.session import ContextOverflow, DecodeConfig, DocumentError, Session, Turn

DOC = "\n\n".join(list(pydoc_data.topics.topics.values())[:2])[:3000]


def answer(session: Session, question: str) -> list[int]:
    return [t for ev in session.generate(question) for t in ev.tokens]


def fresh_with_transcript(lm, level: int, turns: list[Turn], max_new_tokens: int = 12) -> Session:
    s = Session(lm, DecodeConfig(level=level, max_new_tokens=max_new_tokens, budget="64"))
    s.turns = [Turn(t.question, t.documents, t.answer) for t in turns]
    return s


@pytest.mark.parametrize("level", [0, 2])
def test_second_turn_prefills_only_new_tokens_and_matches_a_fresh_session(tiny_model, level):
    s = Session(tiny_model, DecodeConfig(level=level, max_new_tokens=12, budget="64"))
    s.add_document("doc.txt", DOC)
    first = answer(s, "What is this about?")
    assert s.stats.prefill_tokens == len(s.last_prompt_ids) - 1
    doc_tokens = s.stats.prefill_tokens
    second = answer(s, "And then?")
    assert 0 < s.stats.prefill_tokens < 80 < doc_tokens  # the document is not prefilled again
    assert len(first) == 12

    fresh = fresh_with_transcript(tiny_model, level, s.turns[:1])
    assert answer(fresh, "And then?") == second
    assert fresh.last_prompt_ids == s.last_prompt_ids


@pytest.mark.parametrize("restrict", [True, False])
def test_the_middle_level_s_head_covers_the_conversation_and_the_panel_says_so(tiny_model, restrict):
    """At level 1 the middle level drafts over the context's tokens and the vocabulary's most common
    ones (decoding/draft_head.py); the next answer's head has the conversation's new tokens too. The
    setting off: the model's full head, and the panel shows no line for it."""
    s = Session(tiny_model, DecodeConfig(level=1, max_new_tokens=12, budget="64", restrict_draft_heads=restrict,
                                         adaptive=False))  # (every round a middle-level window)
    s.add_document("doc.txt", DOC)
    first = answer(s, "What is this about?")
    assert s.stats.mid_proposed > 0
    fresh = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=12, budget="64"))
    fresh.add_document("doc.txt", DOC)
    assert answer(fresh, "What is this about?") == first  # the middle level's drafts changed nothing
    assert s._decoder(1).mid_head is (s.mid_head if restrict else None)
    if not restrict:
        assert s.cache_figures().mid_head_tokens == 0
        return
    fig = s.cache_figures()
    assert fig.vocab_size == tiny_model.model.args.vocab_size
    assert set(s.last_prompt_ids) <= set(s.mid_head.member.nonzero().squeeze(1).tolist())
    assert fig.mid_head_tokens == s.mid_head.size < fig.vocab_size
    answer(s, "And then?")
    assert bool(s.mid_head.member[s.last_prompt_ids].all())  # the first answer's tokens among them


def test_documents_are_prefilled_before_the_question(tiny_model):
    s = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=4))
    s.add_document("doc.txt", DOC)
    seen = []
    n, _ = s.prefill(progress=lambda done, total: seen.append((done, total)))
    assert n > 500 and seen[-1] == (n, n)
    answer(s, "Summarise.")
    assert s.last_sync.computed < 40  # the question prefilled only itself and the template around it
    # the answer's figures count the documents' prefill too: every prompt token in context
    assert s.stats.prefill_tokens == len(s.last_prompt_ids) - 1 and s.stats.restored_tokens == 0


def test_timing_the_windows_is_part_of_an_answer_s_prefill_not_of_its_decode(tiny_model, monkeypatch):
    """A session asked at level 2 without a prefill first (`ask`, a benchmark) times the target's
    windows at the prompt's depth before the answer starts: its seconds are in prefill_s and
    calibrate_s, not in the answer's decode time or its first round; a level-0 answer times nothing,
    and a second answer at about the same depth does not time them again."""
    import time

    from triforce_chat.decoding.speculative import SpeculativeDecoder

    timed = SpeculativeDecoder.calibrate

    def slow_calibrate(self, context):  # a calibration that takes a visible 0.3 s
        time.sleep(0.3)
        return timed(self, context) + 0.3

    monkeypatch.setattr(SpeculativeDecoder, "calibrate", slow_calibrate)
    s = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=6, budget="64"))
    s.add_document("doc.txt", DOC)
    answer(s, "What is this about?")
    assert s.stats.calibrate_s == 0.0
    s.new_chat()
    s.set_level(2)
    events = list(s.generate("What is this about?"))
    st = s.stats
    assert st.calibrate_s >= 0.3 and st.prefill_s >= st.calibrate_s
    assert st.decode_s < 0.3 and events[0].timings.get("calibrate", 0.0) < 0.3
    assert st.to_dict()["calibrate_s"] == pytest.approx(st.calibrate_s, abs=1e-4)
    s.new_chat()
    answer(s, "And then?")
    assert s.stats.calibrate_s == 0.0


def test_stop_leaves_the_cache_as_if_the_answer_ended_there(tiny_model):
    s = Session(tiny_model, DecodeConfig(level=2, max_new_tokens=40, budget="64"))
    s.add_document("doc.txt", DOC)
    events = []
    for ev in s.generate("Tell me everything."):
        events.append(ev)
        if len(events) == 3:
            s.stop()
    # three rounds, then the closing event that carries the reason
    assert [bool(e.tokens) for e in events] == [True, True, True, False]
    assert events[-1].stop_reason == "stopped" == s.stats.stop_reason and s.stats.rounds == 3
    assert 0 < len(s.turns[0].token_ids) < 40
    follow = answer(s, "Go on.")
    fresh = fresh_with_transcript(tiny_model, 2, s.turns[:1], max_new_tokens=40)
    assert answer(fresh, "Go on.") == follow


def test_empty_and_oversized_documents(tiny_model):
    s = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=8))
    with pytest.raises(DocumentError, match="empty"):
        s.add_document("blank.txt", " \n\t")
    big = DOC * 4  # ~3.5K tokens against a 2048-token context
    with pytest.raises(DocumentError, match=r"\d+ over the model's context of 2048"):
        s.add_document("big.txt", big)
    for name in ("a.txt", "b.txt", "c.txt"):
        s.add_document(name, DOC)
    with pytest.raises(ContextOverflow, match="over the model's context of 2048.*--truncate"):
        answer(s, "Compare them.")


def test_truncate_keeps_head_and_tail(tiny_model):
    s = Session(tiny_model, DecodeConfig(level=2, max_new_tokens=8, truncate=True))
    big = "BEGINNING. " + DOC * 4 + " THE END."
    s.add_document("big.txt", big)
    out = answer(s, "How does it end?")
    assert len(out) == 8
    text = s.turns[0].documents[0].text
    assert text.startswith("BEGINNING.") and text.rstrip().endswith("THE END.")
    assert "tokens omitted" in text
    assert len(s.last_prompt_ids) + 8 <= s.max_context


def test_truncate_cuts_a_huge_document_by_characters_before_tokenizing_it(tiny_model, monkeypatch):
    """A document of megabytes is cut to its first and last PRECUT_CHARS_PER_TOKEN * context
    characters before anything tokenizes it (50 MB took 6 minutes and 9 GB of memory); the exact cut
    then keeps head and tail as for any long document, and its marker counts the omitted tokens, the
    pre-cut ones estimated."""
    from triforce_chat.decoding.session import PRECUT_CHARS_PER_TOKEN

    s = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=8, truncate=True))
    span = s.max_context * PRECUT_CHARS_PER_TOKEN
    huge = "BEGINNING. " + DOC * (3 * span // len(DOC)) + " THE END."
    total = s.count_tokens(huge)
    seen: list[int] = []
    count, encode = s.count_tokens, s._encode
    monkeypatch.setattr(s, "count_tokens", lambda text: seen.append(len(text)) or count(text))
    monkeypatch.setattr(s, "_encode", lambda text: seen.append(len(text)) or encode(text))
    doc = s.add_document("huge.txt", huge)
    assert doc.original == huge and len(doc.text) < 2 * span + 100
    assert len(answer(s, "How does it end?")) == 8
    assert seen and max(seen) < 2 * span + 100  # nothing tokenized the whole text
    text = s.turns[0].documents[0].text
    assert text.startswith("BEGINNING.") and text.rstrip().endswith("THE END.")
    assert "characters omitted" not in text  # the pre-cut's marker went with the middle
    omitted = int(re.search(r"\[\.\.\. about (\d+) tokens omitted \.\.\.\]", text).group(1))
    kept = s.count_tokens(text)
    assert abs(omitted - (total - kept)) < 0.05 * total
    assert doc.pieces[-1].origin + doc.pieces[-1].end - doc.pieces[-1].start == len(huge)  # the tail is the file's


def test_a_document_whose_head_does_not_fit_is_refused_without_tokenizing_the_rest(tiny_model, monkeypatch):
    """Refusing a 10 MB text tokenized all of it first (6.6 s and 1.5 GB more than a small one)."""
    from triforce_chat.decoding.session import PRECUT_CHARS_PER_TOKEN

    s = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=8))
    span = s.max_context * PRECUT_CHARS_PER_TOKEN
    huge = DOC * (3 * span // len(DOC))
    assert len(huge) // s._longest_token < s.max_context  # (the cheap bound alone lets it through)
    seen: list[int] = []
    count = s.count_tokens
    monkeypatch.setattr(s, "count_tokens", lambda text: seen.append(len(text)) or count(text))
    with pytest.raises(DocumentError, match=r"characters, at least [\d,]+ tokens: over the model's context of 2048"):
        s.add_document("huge.txt", huge)
    assert seen == [span] and not s.pending_documents


@pytest.mark.parametrize("rebuild", ["exact", "window"])
def test_a_draft_model_reads_the_documents_during_the_prefill_not_the_first_answer(tiny_model, rebuild):
    """At level 2 the bottom drafter is brought up to the documents by prefill() (with progress,
    cancellable), so the first round of the first answer does not stall on it; the answer is
    still level 0's. With rebuild="window" (what --draft builds) it reads the last window only."""
    from triforce_chat.decoding.drafters import LookupFirstDrafter, ModelDrafter, NGramDrafter
    from triforce_chat.decoding.session import PrefillCancelled

    def both() -> LookupFirstDrafter:
        return LookupFirstDrafter(NGramDrafter(), ModelDrafter(tiny_model.model, window=64, slack=16, rebuild=rebuild))

    plain = Session(tiny_model, DecodeConfig(level=0, max_new_tokens=16))
    plain.add_document("doc.txt", DOC)
    want = answer(plain, "Summarise.")

    s = Session(tiny_model, DecodeConfig(level=2, max_new_tokens=16, budget="64", prefill_chunk=128),
                drafter=both())
    s.add_document("doc.txt", DOC)
    with pytest.raises(PrefillCancelled):  # cancelled inside the drafter's part (after the cache's)
        s.prefill(should_cancel=lambda: s.drafter.length > 0)
    held, ran = s.drafter.length, s.drafter.model.cache.length
    seen = []
    n, _ = s.prefill(progress=lambda done, total: seen.append((done, total)))
    ids = s._documents_only_ids()
    assert s.drafter.model.cache.length == len(ids) == s.drafter.length > held
    lag = len(ids) - ran if rebuild == "exact" else 64 + 16
    assert len(ids) - ran > 64 + 16 and seen[-1] == (lag, lag)  # the drafter's part, resumed where it stopped
    assert answer(s, "Summarise.") == want
