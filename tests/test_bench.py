"""`bench` on the tiny random model: the report's shape, losslessness across levels, and that a
level producing different tokens is caught (the check must fire, not just pass)."""

from __future__ import annotations

import json

import pytest
import torch

from triforce_chat.app.bench import levels as bench
from triforce_chat.app.bench.corpus import build_report, generate_report, pick_questions
from triforce_chat.decoding.session import DecodeConfig

ROW_FIELDS = {
    "context",
    "variant",
    "prompt_tokens",
    "decode_tokens_per_s",
    "ms_per_token",
    "prefill_tokens_per_s",
    "speedup_vs_level0",
    "speedup_vs_hf",
    "speedup_vs_hf_lookup",
    "acceptance_mid",
    "acceptance_low",
    "mean_accepted_length",
    "identical",
}


@pytest.fixture(autouse=True)
def one_thread():
    """Like the command's default: on a shared 2-core machine two threads fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg() -> DecodeConfig:
    # budget < context so level 1 reads a selection; the fixed route (not adaptive) so it drafts every
    # round whatever this machine's timings say, which is what "level 1 really drafted" checks.
    return DecodeConfig(budget="64", chunk_size=8, max_new_tokens=16, adaptive=False)


def _corrupt_level(monkeypatch, level: int) -> None:
    real = bench.run_level

    def corrupted(lm, cfg, prompt, lvl, max_new_tokens, session=None, store=None):
        r = real(lm, cfg, prompt, lvl, max_new_tokens, session, store)
        if lvl == level and prompt.context:  # not the warm-up
            r["token_ids"] = r["token_ids"][:3] + [r["token_ids"][3] + 1] + r["token_ids"][4:]
        return r

    monkeypatch.setattr(bench, "run_level", corrupted)


def test_report_is_deterministic_and_answers_survive_a_cut():
    a, b = build_report(3000, seed=7), build_report(3000, seed=7)
    assert a.text == b.text and a.questions == b.questions
    assert generate_report(3000, seed=8) != a.text
    head = a.text[: len(a.text) // 2]
    kept = a.questions_in(head)
    assert kept and len(kept) < len(a.questions) and all(q.source in head for q in kept)
    picked = pick_questions(a.questions, 3)
    assert [q.kind for q in picked] == ["quote", "fact", "table"]
    assert all(q.answer in a.text for q in picked if q.kind == "quote")


def test_bench_rows_and_identical_outputs(tiny_model):
    spec = bench.BenchSpec(contexts=[300], levels=[0, 1, 2], max_new_tokens=16, questions=2, hf=True)
    result = bench.run_bench(tiny_model, _cfg(), spec)
    json.dumps(result)  # the --json output must serialise
    assert result["identical"] and not result["mismatches"]
    variants = [r["variant"] for r in result["rows"]]
    assert variants == ["level 0", "level 1", "level 2", bench.HF_PLAIN, bench.HF_LOOKUP]
    for row in result["rows"]:
        assert ROW_FIELDS <= row.keys()
        assert 250 <= row["prompt_tokens"] <= 300
        assert row["decode_tokens_per_s"] > 0
    assert result["rows"][0]["speedup_vs_level0"] == 1.0
    assert result["rows"][1]["acceptance_mid"] is not None  # level 1 really drafted
    runs = result["runs"]
    assert len(runs) == 2 * 5
    for p in (0, 1):
        ids = [r["token_ids"] for r in runs if r["prompt"] == p and r["level"] is not None]
        assert len(ids) == 3 and ids[0] == ids[1] == ids[2] and len(ids[0]) > 0
    assert {"torch", "threads", "dtype", "cpu", "date"} <= result["machine"].keys()
    assert "tokens after the first" in str(bench.render_table(result).caption)


def test_mismatch_is_detected(tiny_model, monkeypatch):
    _corrupt_level(monkeypatch, 2)
    spec = bench.BenchSpec(contexts=[300], levels=[0, 1, 2], max_new_tokens=16, questions=1, hf=False)
    result = bench.run_bench(tiny_model, _cfg(), spec)
    assert not result["identical"]
    [m] = result["mismatches"]
    assert (m["variant"], m["reference"], m["first_difference"]) == ("level 2", "level 0", 3)
    assert bench.mismatch_line(m).startswith("MISMATCH: context 300, prompt 0: level 2 differs from level 0")
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["level 1"]["identical"] and not rows["level 2"]["identical"]


def test_reuse_prefill_keeps_the_cache_and_the_output(tiny_model):
    """One prefill per context: the other levels and the second question keep its cache."""
    spec = bench.BenchSpec(
        contexts=[300], levels=[0, 2, 1], max_new_tokens=16, questions=2, hf=False, reuse_prefill=True
    )
    result = bench.run_bench(tiny_model, _cfg(), spec)
    assert result["identical"]
    prefilled = [r["prefill_tokens"] for r in result["runs"]]
    assert prefilled[0] > 250 and prefilled[1:3] == [0, 0]
    assert 0 < prefilled[3] < 40 and prefilled[4:] == [0, 0]  # the second question: only itself
    assert [r["reused"] for r in result["runs"]] == [False] + [True] * 5
    assert [r["prefill_tokens_per_s"] is None for r in result["rows"]] == [False, True, True]
    # each answer is the one a fresh session gives
    for run in result["runs"][3:4]:
        fresh = bench.run_level(tiny_model, _cfg(), bench.make_prompts(tiny_model, spec)[1], 0, 16)
        assert run["token_ids"] == fresh["token_ids"]


def test_cli_exits_nonzero_on_mismatch(tiny_model_dir, monkeypatch, tmp_path, capsys):
    from triforce_chat.app.cli.main import app

    monkeypatch.setenv("TRIFORCE_CHAT_CONFIG", str(tmp_path / "none.toml"))
    _corrupt_level(monkeypatch, 1)
    with pytest.raises(SystemExit) as done:
        app(
            [
                "bench",
                "--model",
                str(tiny_model_dir),
                "--contexts",
                "300",
                "--max-new-tokens",
                "12",
                "--questions",
                "1",
                "--levels",
                "0,1",
                "--budget",
                "64",
                "--no-hf",
                "--json",
            ]
        )
    out = capsys.readouterr()
    assert done.value.code == 1
    assert "MISMATCH: context 300, prompt 0: level 1 differs from level 0" in out.err
    assert json.loads(out.out)["identical"] is False


def test_bad_lists_are_one_line_errors():
    with pytest.raises(bench.BenchError, match="contexts must be a comma-separated list"):
        bench.parse_int_list("1k,2k", "contexts")
    assert bench.parse_int_list("1024, 7168", "contexts") == [1024, 7168]


def test_static_cache_baseline_runs_and_agrees(tiny_model, monkeypatch):
    """--hf-cache static asks generate for a StaticCache (not prompt lookup, which crops its cache)."""
    seen: list[tuple[str | None, bool]] = []
    real_generate = None

    def spy(self, *args, **kwargs):
        out = real_generate(self, *args, **kwargs)
        gen = kwargs["generation_config"]
        seen.append((gen.cache_implementation, gen.prompt_lookup_num_tokens is not None))
        return out

    from transformers import GenerationMixin

    real_generate = GenerationMixin.generate
    monkeypatch.setattr(GenerationMixin, "generate", spy)
    spec = bench.BenchSpec(contexts=[300], levels=[0], max_new_tokens=12, questions=1, hf_cache="static")
    result = bench.run_bench(tiny_model, _cfg(), spec)
    assert result["settings"]["hf_cache"] == "static"
    assert ("static", False) in seen and (None, True) in seen and ("static", True) not in seen
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows[bench.HF_PLAIN]["identical"]  # greedy: transformers with a StaticCache agrees with level 0
    with pytest.raises(bench.BenchError, match="hf-cache must be one of dynamic, static"):
        bench.BenchSpec(contexts=[300], levels=[0], hf_cache="paged")


def test_doc_cache_makes_a_rerun_restore_the_prefill(tiny_model, tmp_path):
    """bench --doc-cache: a second run restores the documents a first run prefilled (long-context
    reruns in seconds), with the same tokens; prefill rates then count restores."""
    from triforce_chat.decoding.store.docstore import DocumentStore

    def run():
        spec = bench.BenchSpec(contexts=[300], levels=[0, 2], max_new_tokens=12, questions=1, hf=False,
                               reuse_prefill=True, store=DocumentStore(tmp_path / "store", chunk_tokens=64))
        return bench.run_bench(tiny_model, _cfg(), spec)

    first, second = run(), run()
    assert first["settings"]["doc_cache"] and first["identical"] and second["identical"]
    assert first["runs"][0]["restored_tokens"] == 0
    assert second["runs"][0]["restored_tokens"] >= 192  # whole 64-token chunks of the ~290-token prompt
    assert [r["token_ids"] for r in second["runs"]] == [r["token_ids"] for r in first["runs"]]
