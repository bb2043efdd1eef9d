"""`bench-qa`: the scoring rule, the QA set's integrity, and the command end to end on the tiny random
model (it answers wrong: the report's shape, the levels' agreement, a skipped model and a caught
mismatch are what is checked). No timing is asserted."""

from __future__ import annotations

import json
import re
import sys

import pytest
from transformers import AutoTokenizer

from test_cli import run_cli  # the suite's one way to run the command line
from triforce_chat.app.bench import qa as bench_qa
from triforce_chat.app.bench.common import BenchError
from triforce_chat.app.bench.corpus import build_report
from triforce_chat.app.bench.qa import QASpec
from triforce_chat.app.bench.qa_score import contains_answer, is_right, normalize
from triforce_chat.app.bench.qa_set import ASK_SUFFIX, REPORT_SEED, REPORT_TOKENS, DocSet, QAItem, qa_set
from triforce_chat.decoding.session import DecodeConfig

SMOLLM2_CONTEXT = 8192


# -- scoring -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Hello,\n\tWorld!  ", "hello world"),
        ("AssertionError.", "assertionerror"),
        ("**`__debug__`**", "__debug__"),
        ("sys.exception()", "sys exception"),
        ("1,024", "1024"),
        ("1,024,000 crowns", "1024000 crowns"),
        ("100_000_000", "100000000"),
        ("12\u202f345 and 6\u00a0789", "12345 and 6789"),
        ("3,14", "3 14"),  # not a group of three digits: a comma, not a separator
        ("1 024", "1 024"),  # a plain space is not a separator (it may just separate two numbers)
        ("3.10", "3 10"),
        ("Eight hex digits, twenty-one items", "8 hex digits 20 1 items"),
        ("eighteen, eighty", "18 eighty"),
        ("ＡｓｓｅｒｔｉｏｎＥｒｒｏｒ", "assertionerror"),
        ("— ... —", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    ("answer", "accepted", "right"),
    [
        ("It raises AssertionError.", ["AssertionError"], True),
        ("it raises assertionerror", ["AssertionError"], True),
        ("AssertionErrors are raised", ["AssertionError"], False),  # whole words only
        ("The variable is `__debug__`.", ["__debug__"], True),
        ("The variable is debug.", ["__debug__"], False),
        ("It handled 66537 shipments.", ["66,537"], True),
        ("It handled 66,537 shipments.", ["66537"], True),
        ("It handled 665,370 shipments.", ["66,537"], False),
        ("It handled 66.537 shipments.", ["66,537"], False),
        ("The budget was 269,000 crowns.", ["269,000"], True),
        ("The budget was 269000.", ["269,000"], True),
        ("The budget was 2,690,000 crowns.", ["269,000"], False),
        ("Exactly eight hex digits.", ["8"], True),
        ("Exactly 8 hex digits.", ["eight"], True),
        ("Eighteen digits.", ["8"], False),
        ("In Python 3.10.", ["3.10"], True),
        ("In Python 3.1.", ["3.10"], False),
        ("In Python 3.100.", ["3.10"], False),
        ("In Python 3.0", ["3.10", "3.0"], True),  # any accepted answer will do
        ("Call sys.exception().", ["sys.exception"], True),
        ("Amara   Petrov\nleads it", ["Amara Petrov"], True),
        ("Petrov Amara leads it", ["Amara Petrov"], False),
        ("The real part is zero.", ["0.0", "zero"], True),
        ("", ["NameError"], False),
        ("anything at all", ["..."], False),  # an accepted answer of punctuation only never matches
        ("anything at all", [], False),
    ],
)
def test_is_right(answer, accepted, right):
    assert is_right(answer, accepted) is right


# -- the QA set ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sets() -> list[DocSet]:
    return qa_set()


FIRST_FOUR = ["python-simple-statements.txt", "python-compound-statements.txt", "python-literals.txt",
              "operations-report.md"]
HELD_OUT_NAMES = ["the-tide-ledger.md", "bread-maker-manual.md", "tenancy-agreement.md"]


def test_the_set_has_the_promised_shape(sets):
    assert [d.name for d in sets] == FIRST_FOUR + HELD_OUT_NAMES
    questions = [it.question for d in sets for it in d.items]
    assert len(questions) == 74
    assert len(set(questions)) == len(questions)
    assert all(len(d.items) >= 5 and d.items for d in sets)
    assert qa_set() == sets  # the same set every time (a fixed seed, the running Python's docs)


def test_document_groups_split_the_set_without_overlap(sets):
    first, held = qa_set("first-four"), qa_set("held-out")
    assert [d.name for d in first] == FIRST_FOUR and sum(len(d.items) for d in first) == 38
    assert [d.name for d in held] == HELD_OUT_NAMES
    assert first + held == sets
    for d in held:  # read from the installed package, as written
        assert d.source == f"app/bench/texts/{d.name}" and "invented" in d.text.split("\n\n", 2)[1]
    with pytest.raises(ValueError, match="documents must be one of all, first-four, held-out"):
        qa_set("pydoc")


def test_every_accepted_answer_is_in_its_document_and_not_in_its_question(sets):
    """The documentation documents come from the running Python's pydoc_data; the questions were
    written on 3.11's, where every accepted answer is in the text. A later Python may reword one
    (3.13: "raw string literals" for "raw strings"), so there one accepted answer must still be."""
    for doc in sets:
        written_on = sys.version_info[:2] == (3, 11) or not doc.source.startswith("pydoc_data")
        for item in doc.items:
            assert item.accepted, item.question
            found = [contains_answer(doc.text, answer) for answer in item.accepted]
            assert (all if written_on else any)(found), (doc.name, item.question, item.accepted)
            for answer in item.accepted:
                assert normalize(answer), (doc.name, item.question, answer)
                assert not contains_answer(item.question + ASK_SUFFIX, answer), (item.question, answer)


def test_documents_fit_the_token_bounds(sets, default_model_dir):
    """2K-8K tokens each (Qwen's tokenizer counts about 8% fewer than SmolLM2's on these texts), and
    small enough that SmolLM2 has room for the template, a question and the answer."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    for doc in sets:
        n = len(tokenizer(doc.text, add_special_tokens=False).input_ids)
        assert 2000 <= n <= SMOLLM2_CONTEXT - 1000, (doc.name, n)


def test_report_questions_come_from_the_facts_the_generator_drew(sets):
    report = build_report(REPORT_TOKENS, REPORT_SEED)
    doc = sets[FIRST_FOUR.index("operations-report.md")]
    assert doc.text == report.text and len(report.sites) >= 6
    sections = re.split(r"\n(?=## Section )", report.text)[1:]
    assert len(sections) == len(report.sites)
    for site, section in zip(report.sites, sections, strict=True):
        assert section.startswith(f"## Section {site.section}: The {site.title}\n")
        assert f"led by {site.lead}, who joined {report.organisation} in {site.joined}, with {site.deputy}" in section
        assert f"employs {site.staff} staff and handled {site.shipments:,} shipments" in section
        assert f"{site.growth} percent more" in section
        assert f"In {site.month}, the {site.title} started the {site.project} project with a crew of " \
               f"{site.crew} and a budget of {site.budget:,} crowns" in section
        for item, qty, unit in site.stock:
            assert f"| {item} | {qty} | {unit} |" in section
    # a site named in a question is named once: each question has one answer
    titles = [s.title for s in report.sites]
    for item in doc.items:
        named = [t for t in titles if t in item.question]
        assert len(named) <= 1, item.question


# -- running -------------------------------------------------------------------------------------------------
NOTES = DocSet(
    "notes.txt", "test", "The lighthouse keeper on Farrow Island is Amelia Stroud. The boat is green.\n" * 4,
    (QAItem("Who keeps the lighthouse?", ("Amelia Stroud",)), QAItem("What colour is the boat?", ("green",))),
)


def _cfg() -> DecodeConfig:
    return DecodeConfig(budget="32", chunk_size=8)


def test_run_model_scores_the_level_0_answers_and_checks_the_levels(tiny_model):
    spec = QASpec(models=["tiny"], threads=[1], levels=[2, 0], max_new_tokens=12)
    assert spec.levels == [0, 2]  # level 0 always runs, first
    m = bench_qa.run_model(tiny_model, _cfg(), spec, [NOTES])
    json.dumps(m)
    assert m["identical"] and not m["mismatches"] and not m["thread_differences"]
    assert [(r["threads"], r["level"], r["questions"]) for r in m["speed"]] == [(1, 0, 2), (1, 2, 2)]
    assert m["accuracy"]["total"] == 2 and m["accuracy"]["right"] == sum(a["right"] for a in m["answers"])
    for a in m["answers"]:
        assert a["right"] == is_right(a["answer"], a["accepted"])
        assert a["answer"] == tiny_model.tokenizer.decode(a["token_ids"], skip_special_tokens=True)
    assert m["speed"][0]["new_tokens"] == sum(len(a["token_ids"]) for a in m["answers"])
    assert m["prefill"][0]["tokens"] > 40


def test_repeats_alternate_the_levels_and_give_per_question_medians(monkeypatch, tiny_model):
    """--repeat N asks each question N times per level, level 0 first then last, and each question's
    ratio is the median of its side-by-side pairs (rates planted here, to check the arithmetic)."""
    order: list[tuple[int, int]] = []
    real = bench_qa.ask_in_new_chat

    def timed(session, item, level):
        r = real(session, item, level)
        order.append((NOTES.items.index(item), level))
        i, rep = order[-1][0], sum(1 for x in order if x == order[-1]) - 1
        r["new_tokens"], r["decode_s"] = 10, 1.0 if level == 0 else [0.5, 2.0, 0.8][rep] * (1 + i)
        return r

    monkeypatch.setattr(bench_qa, "ask_in_new_chat", timed)
    spec = QASpec(models=["tiny"], threads=[1], levels=[0, 2], max_new_tokens=6, repeat=3)
    m = bench_qa.run_model(tiny_model, _cfg(), spec, [NOTES])
    assert order == [(0, 0), (0, 2), (0, 2), (0, 0), (0, 0), (0, 2), (1, 0), (1, 2), (1, 2), (1, 0), (1, 0), (1, 2)]
    assert m["identical"] and len(m["runs"]) == 12
    assert [(r["questions"], r["answers"]) for r in m["speed"]] == [(2, 6), (2, 6)]
    ratios = {q["index"]: q for q in m["question_ratios"]}
    assert ratios[0]["pairs"] == [2.0, 0.5, 1.25] and ratios[0]["ratio"] == 1.25  # 1 / decode_s, median
    assert ratios[1]["ratio"] == 0.625
    row = m["speed"][1]
    assert row["worst_question_ratio"] == 0.625 and row["questions_below_0_97"] == 1
    assert "worst_question_ratio" not in m["speed"][0]
    with pytest.raises(BenchError, match="repeat"):
        QASpec(models=["tiny"], threads=[1], levels=[0], repeat=0)


def test_sampled_runs_use_the_model_s_settings_and_a_seed_per_repeat(monkeypatch, tiny_model):
    """--sample: each model's own sampling settings (an invalid one skipped, as the chat does), the same
    seed for every answer of a repeat and another for the next; the levels are not compared."""
    import dataclasses

    seeds: list[tuple[int, int | None]] = []
    real = bench_qa.ask_in_new_chat

    def recording(session, item, level):
        seeds.append((level, session.config.seed))
        return real(session, item, level)

    monkeypatch.setattr(bench_qa, "ask_in_new_chat", recording)
    lm = dataclasses.replace(tiny_model, generation_defaults={"temperature": 1.0, "top_p": 0.95, "top_k": 12,
                                                              "repetition_penalty": -2.0})
    spec = QASpec(models=["tiny"], threads=[1], levels=[0, 2], max_new_tokens=10, repeat=2, sample=True)
    m = bench_qa.run_model(lm, _cfg(), spec, [NOTES])
    json.dumps(m)
    assert m["sampling"] == {"temperature": 1.0, "top_p": 0.95, "top_k": 12, "repetition_penalty": 1.0}
    assert m["identical"] is None and not m["mismatches"] and all(r["identical"] is None for r in m["runs"])
    assert len(m["runs"]) == 8 and {r["level"] for r in m["runs"]} == {0, 2}
    first = bench_qa.SAMPLE_SEED
    assert seeds == [(0, first), (2, first), (2, first + 1), (0, first + 1)] * 2  # per question: repeat 0, 1
    again = bench_qa.run_model(lm, _cfg(), spec, [NOTES])  # seeded: the same answers again
    assert [a["token_ids"] for a in again["answers"]] == [a["token_ids"] for a in m["answers"]]
    other = bench_qa.run_model(lm, _cfg(), dataclasses.replace(spec, repeat=1), [NOTES])
    assert [a["token_ids"] for a in other["answers"]] == [a["token_ids"] for a in m["answers"]]  # repeat 0's seed
    greedy = bench_qa.run_model(lm, _cfg(), dataclasses.replace(spec, sample=False, repeat=1), [NOTES])
    assert greedy["sampling"] == "greedy" and greedy["identical"] is True
    assert [a["token_ids"] for a in greedy["answers"]] != [a["token_ids"] for a in m["answers"]]


def test_right_answers_are_counted(monkeypatch, tiny_model):
    """A model that gives the accepted answer scores it: the count comes from the answers."""
    real = bench_qa.ask_in_new_chat

    def knows_the_first(session, item, level):
        r = real(session, item, level)
        if item is NOTES.items[0]:
            r["text"] = f"The keeper is {item.accepted[0].upper()}."
        return r

    monkeypatch.setattr(bench_qa, "ask_in_new_chat", knows_the_first)
    m = bench_qa.run_model(tiny_model, _cfg(), QASpec(models=["tiny"], threads=[1], levels=[0], max_new_tokens=4),
                           [NOTES])
    assert [a["right"] for a in m["answers"]] == [True, False]
    assert m["accuracy"] == {"right": 1, "total": 2, "share": 0.5,
                             "by_document": {"notes.txt": {"right": 1, "total": 2}}}


def test_answers_that_differ_between_thread_counts_are_reported_not_failed(monkeypatch, tiny_model):
    """Levels must agree at each thread count; across thread counts a sum may round differently,
    which is reported in thread_differences and does not fail the run."""
    import torch

    real = bench_qa.ask_in_new_chat

    def other_rounding_on_2_threads(session, item, level):
        r = real(session, item, level)
        if torch.get_num_threads() == 2 and item is NOTES.items[1]:
            r["token_ids"] = [*r["token_ids"], 7]
        return r

    monkeypatch.setattr(bench_qa, "ask_in_new_chat", other_rounding_on_2_threads)
    m = bench_qa.run_model(tiny_model, _cfg(), QASpec(models=["tiny"], threads=[1, 2], levels=[0, 2],
                                                      max_new_tokens=4), [NOTES])
    assert m["identical"] and not m["mismatches"]
    assert m["thread_differences"] == [{"threads": 2, "document": "notes.txt", "index": 1}]
    assert [(r["threads"], r["level"]) for r in m["speed"]] == [(1, 0), (1, 2), (2, 0), (2, 2)]
    assert [p["threads"] for p in m["prefill"]] == [1, 2]
    assert torch.get_num_threads() == 1  # the caller's thread count is back


def test_bench_qa_end_to_end_with_a_skipped_model(monkeypatch, capsys, tmp_path, tiny_model_dir):
    monkeypatch.setenv("TRIFORCE_MODELS_DIR", str(tmp_path / "no-models"))
    code, out, err = run_cli(monkeypatch, capsys, "bench-qa", "--models", f"qwen2.5-coder-1.5b,{tiny_model_dir}",
                             "--threads", "1", "--levels", "0,2", "--limit", "2", "--max-new-tokens", "8",
                             "--context", "8192", "--documents", "held-out", "--json")
    assert code == 0, err
    assert "skipped qwen2.5-coder-1.5b: model qwen2.5-coder-1.5b is not installed: run " \
           "'triforce-chat models pull qwen2.5-coder-1.5b'" in err
    result = json.loads(out)
    assert result["identical"] and not result["mismatches"]
    assert [s["model"] for s in result["skipped"]] == ["qwen2.5-coder-1.5b"]
    assert result["settings"]["levels"] == [0, 2] and result["settings"]["limit"] == 2
    assert result["settings"]["documents"] == "held-out"
    assert result["qa_set"]["questions"] == 6 and [d["name"] for d in result["qa_set"]["documents"]] == HELD_OUT_NAMES
    assert set(result["machine"]["simd"]) >= {"avx2", "avx512f"} and result["machine"]["python"]
    [m] = result["models"]
    assert m["path"] == str(tiny_model_dir) and m["accuracy"]["total"] == 6
    by_doc = m["accuracy"]["by_document"]
    assert list(by_doc) == HELD_OUT_NAMES and all(c["total"] == 2 for c in by_doc.values())
    assert sum(c["right"] for c in by_doc.values()) == m["accuracy"]["right"]
    assert {a["document"] for a in m["answers"]} == {d["name"] for d in result["qa_set"]["documents"]}
    for a in m["answers"]:
        assert {"question", "accepted", "answer", "right", "token_ids", "stop_reason"} <= a.keys()
        assert 1 <= len(a["token_ids"]) <= 8
    assert len(m["runs"]) == 12 and all(r["identical"] for r in m["runs"])
    assert [(r["threads"], r["level"]) for r in m["speed"]] == [(1, 0), (1, 2)]
    assert [p["threads"] for p in m["prefill"]] == [1] and m["prefill"][0]["tokens"] > 8000


def test_bench_qa_table(monkeypatch, capsys, tiny_model_dir):
    code, out, err = run_cli(monkeypatch, capsys, "bench-qa", "--models", str(tiny_model_dir), "--threads", "1,2",
                             "--levels", "2", "--limit", "1", "--max-new-tokens", "4", "--context", "8192",
                             "--documents", "first-four")
    assert code == 0, err
    assert out.startswith("CPU: ")
    assert "right per document: python-simple-statements.txt 0/1, python-compound-statements.txt 0/1, " \
           "python-literals.txt 0/1, operations-report.md 0/1" in out
    for text in ("4 questions over 4 documents", "L0 1thr", "L2 2thr", "prefill tok/s", "0/4", "✓"):
        assert text in out, text
    for threads in (1, 2):
        assert re.search(rf"{threads} thread\(s\), level 2 / level 0 per question \(median of 1 pair\(s\)\): "
                         r"worst \d+\.\d\dx \(\S+ #0\), \d of 4 below 0\.97x", out), out


def test_bench_qa_sampled_from_the_command_line(monkeypatch, capsys, tiny_model_dir):
    code, out, err = run_cli(monkeypatch, capsys, "bench-qa", "--models", str(tiny_model_dir), "--threads", "1",
                             "--levels", "2", "--limit", "1", "--max-new-tokens", "4", "--context", "8192",
                             "--sample", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["settings"]["sample"] is True and result["identical"] is None
    assert set(result["models"][0]["sampling"]) == {"temperature", "top_p", "top_k", "repetition_penalty"}


def test_a_level_that_disagrees_is_reported_and_fails(monkeypatch, capsys, tiny_model_dir):
    real = bench_qa.ask_in_new_chat

    def corrupted(session, item, level):
        r = real(session, item, level)
        if level == 2:
            r["token_ids"] = [*r["token_ids"][:1], r["token_ids"][1] + 1, *r["token_ids"][2:]]
        return r

    monkeypatch.setattr(bench_qa, "ask_in_new_chat", corrupted)
    monkeypatch.setattr(bench_qa, "qa_set", lambda documents: [NOTES])
    code, out, err = run_cli(monkeypatch, capsys, "bench-qa", "--models", str(tiny_model_dir), "--threads", "1",
                             "--max-new-tokens", "6", "--json")
    assert code == 1
    assert "MISMATCH:" in err and "level 2 differs from level 0 at new token 1" in err
    result = json.loads(out)
    assert not result["identical"] and len(result["mismatches"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--levels", "0,3"], "levels must be among 0, 1, 2, not 3"),
        (["--threads", "0"], "threads must be >= 1, not 0"),
        (["--threads", "one"], "threads must be a comma-separated list of whole numbers"),
        (["--limit", "0"], "limit must be >= 1, not 0"),
        (["--documents", "pydoc"], "documents must be one of all, first-four, held-out, not 'pydoc'"),
        (["--models", "no-such-model"], "model not found: no-such-model"),
        (["--models", "qwen2.5-coder-0.5b"], "no model to run: model qwen2.5-coder-0.5b is not installed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.setenv("TRIFORCE_MODELS_DIR", str(tmp_path))
    code, out, err = run_cli(monkeypatch, capsys, "bench-qa", *args)
    assert code == 2 and not out
    assert message in err and "Traceback" not in err
