"""The chat's worker jobs (app/ui/workers.py) called directly: what they post, for good and bad input."""

from __future__ import annotations

from triforce_chat.app.ui.messages import AnswerDone, LoadDone, LoadProgress, Notice
from triforce_chat.app.ui.workers import Job, answer, prefill_documents
from triforce_chat.decoding.config import DecodeConfig
from triforce_chat.decoding.drafters import LookupFirstDrafter, ModelDrafter, NGramDrafter
from triforce_chat.decoding.session import Session

DOC = "\n".join(f"Line {i}: the tide tables for harbour {i} are posted at the pier." for i in range(60))


def test_a_draft_models_reading_has_its_own_progress_label(tiny_model, tmp_path):
    path = tmp_path / "tides.txt"
    path.write_text(DOC, encoding="utf-8")
    drafter = LookupFirstDrafter(NGramDrafter(), ModelDrafter(tiny_model.model, window=64, slack=16))
    session = Session(tiny_model, DecodeConfig(level=2, budget="64", prefill_chunk=128), drafter=drafter)
    posted: list = []
    prefill_documents(session, [path], Job("prefill"), posted.append)
    labels = [m.label for m in posted if isinstance(m, LoadProgress) and m.total]
    target = [lab for lab in labels if lab == "Prefill tides.txt"]
    reading = [lab for lab in labels if lab == "Draft model reading tides.txt"]
    assert target and reading and labels.index(reading[0]) > labels.index(target[-1]), labels
    done = [m for m in posted if isinstance(m, LoadDone)]
    assert len(done) == 1 and done[0].ok
    assert drafter.model.cache.length == len(session.context) == session.cache.length + 1  # it read them all


def test_an_unreadable_document_is_a_notice_and_the_others_still_load(tiny_model, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(DOC, encoding="utf-8")
    session = Session(tiny_model, DecodeConfig(level=0))
    posted: list = []
    prefill_documents(session, [tmp_path / "missing.txt", tmp_path, good], Job("prefill"), posted.append)
    errors = [m.message for m in posted if isinstance(m, Notice) and m.severity == "error"]
    assert len(errors) == 2 and "no such file" in errors[0] and "is a directory" in errors[1]
    assert [d.name for d in session.documents] == ["good.txt"]
    assert [m.ok for m in posted if isinstance(m, LoadDone)] == [True]


def test_a_question_that_does_not_fit_comes_back_as_an_unstarted_answer(tiny_model):
    session = Session(tiny_model, DecodeConfig(level=0))
    posted: list = []

    class Shown:  # what the UI's answer widget holds
        text = ""

    answer(session, "why? " * (session.max_context + 10), Job("answer"), posted.append, Shown())
    done = [m for m in posted if isinstance(m, AnswerDone)]
    assert len(done) == 1 and not done[0].started and "over the model's context" in done[0].error
    assert session.turns == []
