"""`bench-llama`: option checks, the figures (medians, ratios, agreement) and the whole run on the tiny
model against a stand-in baseline, all without llama.cpp; one smoke run with it where it is installed.

No timing is asserted anywhere: only that the figures are computed from what was measured."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
from rich.console import Console

from test_cli import run_cli
from triforce_chat.app.bench import common
from triforce_chat.app.bench import llama as bl
from triforce_chat.app.bench.levels import BenchError
from triforce_chat.app.settings import Settings
from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.session import DecodeConfig

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None


# -- options ------------------------------------------------------------------------------------------------
def test_spec_defaults_parse_and_duplicates_collapse():
    spec = bl.parse_spec(bl.DEFAULT_CONTEXTS, bl.DEFAULT_THREADS, "0,1,2,1", 64, 3)
    assert spec.contexts == [1024, 7168, 29000] and spec.threads == [1, 2] and spec.levels == [0, 1, 2]
    assert spec.new_tokens == 64 and spec.reps == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (("1k", "1", "0", 8, 1), "contexts must be a comma-separated list"),
        (("0,512", "1", "0", 8, 1), "contexts must be positive"),
        (("512", "1,0", "0", 8, 1), "threads must be >= 1, not 0"),
        (("512", "1", "0,3", 8, 1), "levels must be among 0, 1, 2, not 3"),
        (("512", "1", "", 8, 1), "levels must not be empty"),
        (("512", "1", "0", 0, 1), "new-tokens must be >= 1"),
        (("512", "1", "0", 8, 0), "reps must be >= 1"),
    ],
)
def test_bad_options_are_one_line(args, message):
    with pytest.raises(BenchError, match=message) as info:
        bl.parse_spec(*args)
    assert "\n" not in str(info.value)


def test_context_must_hold_the_longest_prompt_and_answer():
    with pytest.raises(BenchError, match=r"--context 8192 is too small .* \(at least 29065\)"):
        bl.parse_spec("1024,29000", "1", "0", 64, 1, context=8192)
    assert bl.parse_spec("1024,29000", "1", "0", 64, 1, context=32768).contexts == [1024, 29000]


def test_positions_are_the_files_own_unless_a_context_needs_more():
    assert bl.choose_positions([1024, 7168], 64, native=8192) == 8192
    assert bl.choose_positions([1024, 7168, 29000], 64, native=8192) == 32768  # YaRN x4, as the README's 29K runs
    assert bl.choose_positions([29000], 64, native=32768) == 32768  # the Qwen files hold 29K without extension
    assert bl.choose_positions([8192], 64, native=8192) == 16384  # prompt + answer must fit, not just the prompt
    assert bl.choose_positions([1024], 64, native=8192, explicit=40000) == 40000


def test_cpu_features_read_x86_and_arm_flag_lines():
    x86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n"
    assert common.cpu_features(x86) == {
        "avx2": True, "avx512f": True, "avx512_vnni": True, "avx512_bf16": False, "amx_tile": False, "amx_bf16": False,
    }
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"
    assert not any(common.cpu_features(arm).values())
    assert common.cpu_features("") == dict.fromkeys(common.SIMD_FLAGS, False)
    line = common.machine_line({"cpu": "Some CPU", "cpu_count": 2, "simd": common.cpu_features(x86),
                            "load_average_start": [0.5]})
    assert "Some CPU (2 CPUs)" in line and "avx2+" in line and "amx_bf16-" in line


# -- the model file -------------------------------------------------------------------------------------------
def test_model_argument_takes_gguf_files_only(tmp_path):
    with pytest.raises(BenchError, match="is a directory"):
        bl.resolve_gguf(str(tmp_path))
    text = tmp_path / "weights.bin"
    text.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(BenchError, match="not a GGUF file"):
        bl.resolve_gguf(str(text))
    with pytest.raises(BenchError, match="no such file"):
        bl.resolve_gguf(str(tmp_path / "missing.gguf"))
    good = tmp_path / "m.gguf"
    good.write_bytes(b"GGUF" + bytes(20))
    assert bl.resolve_gguf(str(good)) == good
    with pytest.raises(BenchError, match="unknown model 'no-such-model'"):  # a name goes to the catalogue
        bl.resolve_gguf("no-such-model")
    assert bl.resolve_gguf("smollm2") == bl.resolve_gguf(None)  # the catalogue's name for the bundled file


def _write_gguf(path, context_length: int | None):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if context_length is not None:
        w.add_context_length(context_length)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def test_default_model_is_the_bundled_gguf_and_positions_come_from_the_metadata(tmp_path):
    path = bl.resolve_gguf(None)
    with path.open("rb") as f:
        assert path.suffix == ".gguf" and f.read(4) == b"GGUF"
    assert bl.gguf_positions(bl.resolve_gguf(str(_write_gguf(tmp_path / "a.gguf", 4096)))) == 4096
    with pytest.raises(BenchError, match=r"b.gguf: no context length in its GGUF metadata \(llama.context_length\)"):
        bl.gguf_positions(_write_gguf(tmp_path / "b.gguf", None))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "a.gguf").read_bytes()[:40])
    with pytest.raises(BenchError, match="cut.gguf: not a readable GGUF file") as info:
        bl.gguf_positions(cut)
    assert "\n" not in str(info.value)


def test_load_ours_on_a_gguf_our_engine_cannot_read_is_one_line(tmp_path):
    fake = tmp_path / "other.gguf"
    fake.write_bytes(b"GGUF" + bytes(20))  # a truncated file: no loader may accept it
    with pytest.raises(BenchError, match="our engine cannot load other.gguf") as info:
        bl.load_ours(Settings(), fake, 2048, log=lambda m: None)
    assert "\n" not in str(info.value)


# -- figures ------------------------------------------------------------------------------------------------
def _run(engine, phase, variant, tokens, seconds, rep, ids=None, ctx=1000, threads=1, **extra):
    r = {"engine": engine, "phase": phase, "variant": variant, "tokens": tokens, "seconds": seconds,
         "context": ctx, "threads": threads, "rep": rep, "prompt_tokens": ctx - 10}
    if phase == "decode":
        r.update(token_ids=ids if ids is not None else list(range(tokens)),
                 level=extra.pop("level", None), mid_proposed=0, mid_accepted=0, low_proposed=0, low_accepted=0)
    r.update(extra)
    return r


def _synthetic_runs() -> list[dict]:
    runs = []
    # three reps; ours prefill 1000 tok in 2/4/3 s (median 333.333 tok/s), llama in 1/2/5 s (median 500)
    for rep, (po, pl, d0, d2, dl) in enumerate([(2, 1, 4, 1, 2), (4, 2, 8, 2, 4), (3, 5, 2, 4, 1)]):
        runs += [
            _run("ours", "prefill", "ours", 1000, po, rep),
            _run("ours", "decode", "level 0", 64, d0, rep, level=0),
            _run("ours", "decode", "level 2", 64, d2, rep, level=2, low_proposed=40, low_accepted=30),
            _run("llama", "prefill", bl.LLAMA, 1000, pl, rep),
            _run("llama", "decode", bl.LLAMA, 64, dl, rep, ids=list(range(10)) + [999] * 54),
        ]
    return runs


def test_summary_takes_medians_per_engine_and_ratios_ours_over_llama():
    (row,) = bl.summarize(_synthetic_runs())
    assert row["context"] == 1000 and row["threads"] == 1 and row["reps"] == 3 and row["prompt_tokens"] == 990
    assert row["prefill_tokens_per_s"] == {"ours": 333.333, bl.LLAMA: 500.0}
    assert row["prefill_ours_vs_llama"] == pytest.approx(0.667)
    # decode tok/s per rep: level 0 16, 8, 32 -> 16; level 2 64, 32, 16 -> 32; llama 32, 16, 64 -> 32
    assert row["decode_tokens_per_s"] == {"level 0": 16.0, "level 2": 32.0, bl.LLAMA: 32.0}
    assert row["decode_vs_llama"] == {"level 0": 0.5, "level 2": 1.0}
    assert row["decode_vs_level0"] == {"level 0": 1.0, "level 2": 2.0}
    assert row["acceptance"] == {"level 2": {"mid": None, "low": 0.75}}
    assert row["new_tokens"] == {"level 0": 64, "level 2": 64, bl.LLAMA: 64}
    assert (row["common_prefix"], row["compared_tokens"]) == (10, 64)
    assert row["levels_identical"] and row["llama_reps_identical"]


def test_levels_that_differ_in_any_rep_are_reported_and_the_row_says_so():
    runs = _synthetic_runs()
    bad = next(r for r in runs if r["variant"] == "level 2" and r["rep"] == 1)
    bad["token_ids"] = bad["token_ids"][:5] + [7] + bad["token_ids"][6:]
    (m,) = bl.level_mismatches(runs)
    assert m == {"context": 1000, "threads": 1, "rep": 1, "variant": "level 2", "reference": "level 0 (rep 1)",
                 "first_difference": 5, "got": 7, "expected": 5}
    assert bl.mismatch_line(m).startswith("MISMATCH: context 1000, 1 thread(s), rep 2: level 2 differs")
    assert not bl.summarize(runs)[0]["levels_identical"]


def test_rows_are_per_context_and_thread_count_and_missing_figures_stay_empty():
    runs = [r for r in _synthetic_runs() if r["engine"] == "ours"]  # no baseline: ratios cannot exist
    runs += [dict(r, threads=2) for r in runs]
    rows = bl.summarize(runs)
    assert [(r["context"], r["threads"]) for r in rows] == [(1000, 1), (1000, 2)]
    assert rows[0]["prefill_ours_vs_llama"] is None and rows[0]["decode_vs_llama"] == {"level 0": None,
                                                                                         "level 2": None}
    assert rows[0]["common_prefix"] is None
    assert common.ratio(1.0, 0.0) is None and common.ratio(None, 2.0) is None and common.ratio(3.0, 2.0) == 1.5
    assert common.first_difference([1, 2, 3], [1, 2]) == 2 and common.first_difference([], [1]) == 0
    assert common.first_difference([1, 2, 3], [1, 5, 3]) == 1


def test_table_shows_medians_ratios_and_agreement():
    result = {
        "machine": {"cpu": "Some CPU"},
        "model": {"gguf": "/m/x.gguf", "positions": 8192, "ours_weights": "x.gguf"},
        "settings": {"levels": [0, 2], "reps": 3},
        "rows": bl.summarize(_synthetic_runs()),
    }
    console = Console(file=io.StringIO(), width=220, record=True)
    console.print(bl.render_table(result))
    text = console.export_text()
    row = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("1000"))
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert cells == ["1000", "1", "990", "333", "500", "0.67x", "16.00", "32.00", "32.00", "0.50x", "1.00x",
                     "2.00x", "10/64", "✓"]
    assert "medians of 3 alternating repetitions" in text


# -- the whole run, against a stand-in baseline ------------------------------------------------------------------
class Replay:
    """A baseline that decodes greedily with our own model through the public forward (so its tokens are
    level 0's), optionally changing one token to act like an engine whose arithmetic differs."""

    def __init__(self, lm, threads: int, diverge_at: int | None = None):
        self.lm, self.threads, self.diverge_at = lm, threads, diverge_at
        self.calls: list[tuple] = []

    def prefill(self, ids):
        self.calls.append(("prefill", len(ids)))
        self.cache = KVCache.for_model(self.lm.model)
        with torch.inference_mode():
            self.lm.model(torch.tensor(list(ids)), self.cache, logits="none")
        return 0.5

    def decode(self, first, n, eos):
        self.calls.append(("decode", first, n))
        out, tok = [], first
        with torch.inference_mode():
            for i in range(n):
                tok = int(self.lm.model(torch.tensor([tok]), self.cache, logits="last")[0].argmax())
                if i == self.diverge_at:
                    tok = (tok + 1) % 100
                out.append(tok)
                if tok in eos:
                    break
        return out, 0.25

    def describe(self):
        return {"engine": "replay", "threads": self.threads}

    def close(self):
        self.calls.append(("close",))


def _spec(**kw) -> bl.SideBySideSpec:
    return bl.SideBySideSpec(**{"contexts": [300], "threads": [1], "levels": [0, 1, 2], "new_tokens": 8, "reps": 2,
                                **kw})


def _cfg() -> DecodeConfig:
    """budget < context: level 1 really drafts. The sampling settings are what a config file or a model's
    recommendation may bring; the benchmark must still decode plain greedy, as llama.cpp does here."""
    return DecodeConfig(budget="64", chunk_size=8, temperature=0.7, top_k=5, repetition_penalty=1.5,
                        stop_on_repetition=True)


def test_side_by_side_runs_each_thread_count_on_the_same_prompt_ids_and_levels_agree(tiny_model):
    engines: list[Replay] = []

    def make(threads):
        engines.append(Replay(tiny_model, threads))
        return engines[-1]

    threads_before = torch.get_num_threads()
    result = bl.run_side_by_side(tiny_model, _cfg(), _spec(threads=[1, 2], reps=1), make)
    assert torch.get_num_threads() == threads_before
    assert [e.threads for e in engines] == [1, 2] and all(e.calls[-1] == ("close",) for e in engines)
    runs = result["runs"]
    # per thread count: ours (prefill, L0, L1, L2) then the baseline (prefill, decode)
    assert [(r["threads"], r["engine"], r["phase"]) for r in runs] == [
        (t, e, ph) for t in (1, 2) for e, ph in [("ours", "prefill")] + [("ours", "decode")] * 3
        + [("llama", "prefill"), ("llama", "decode")]
    ]
    # the same prompt ids: both prefill all prompt tokens but the last, and the baseline decodes from the last
    n_prompt = runs[0]["prompt_tokens"]
    assert 200 < n_prompt <= 300
    assert {r["tokens"] for r in runs if r["phase"] == "prefill"} == {n_prompt - 1}
    for e in engines:  # after the warm-up: prefill the prompt but its last id, decode 8 from it
        assert e.calls[2:] == [("prefill", n_prompt - 1), ("decode", e.calls[3][1], 8), ("close",)]
    # lossless: every level equals level 0, and the replayed baseline (level 0 itself) agrees to the end,
    # which it can only do when handed the very prompt ids our side decoded from
    assert result["identical"] and not result["mismatches"]
    for row in result["rows"]:
        assert row["levels_identical"] and row["common_prefix"] == row["compared_tokens"] == 8
        assert set(row["decode_tokens_per_s"]) == {"level 0", "level 1", "level 2", bl.LLAMA}
        assert row["prefill_tokens_per_s"][bl.LLAMA] == pytest.approx((n_prompt - 1) / 0.5, abs=1e-3)
        assert row["decode_tokens_per_s"][bl.LLAMA] == pytest.approx(8 / 0.25)
    assert result["baseline"] == {1: {"engine": "replay", "threads": 1}, 2: {"engine": "replay", "threads": 2}}
    assert "How time is split" not in result["method"] and "prefill =" in result["method"]


def test_engines_alternate_rep_by_rep_and_a_diverging_baseline_is_information(tiny_model):
    result = bl.run_side_by_side(tiny_model, _cfg(), _spec(reps=3, levels=[0]),
                                 lambda t: Replay(tiny_model, t, diverge_at=3))
    assert [(r["rep"], r["engine"]) for r in result["runs"][::2]] == [(0, "ours"), (0, "llama"), (1, "ours"),
                                                                      (1, "llama"), (2, "ours"), (2, "llama")]
    (row,) = result["rows"]
    assert row["reps"] == 3 and row["llama_reps_identical"]
    assert result["identical"] and row["common_prefix"] == 3 and row["compared_tokens"] == 8


def test_a_level_that_differs_fails_the_run(tiny_model, monkeypatch):
    real = bl.run_ours

    def corrupted(lm, cfg, prompt, levels, new_tokens):
        ids, records = real(lm, cfg, prompt, levels, new_tokens)
        for r in records:
            if r.get("level") == 2 and prompt.context:  # not the warm-up
                r["token_ids"] = r["token_ids"][:2] + [r["token_ids"][2] + 1] + r["token_ids"][3:]
        return ids, records

    monkeypatch.setattr(bl, "run_ours", corrupted)
    result = bl.run_side_by_side(tiny_model, _cfg(), _spec(reps=1, levels=[0, 2]), lambda t: Replay(tiny_model, t))
    assert not result["identical"]
    assert [(m["variant"], m["first_difference"]) for m in result["mismatches"]] == [("level 2", 2)]
    assert not result["rows"][0]["levels_identical"]


def test_contexts_beyond_the_positions_are_refused_before_any_work(tiny_model):
    calls = []
    with pytest.raises(BenchError, match=r"does not fit the model's 2048 positions \(use --context"):
        bl.run_side_by_side(tiny_model, _cfg(), _spec(contexts=[300, 2040]), lambda t: calls.append(t))
    assert calls == []


# -- the command ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (("--threads", "0"), "error: threads must be >= 1, not 0"),
        (("--contexts", "1024,abc"), "error: contexts must be a comma-separated list"),
        (("--reps", "0"), "error: reps must be >= 1, not 0"),
        (("--contexts", "1024", "--context", "8"), "error: --context 8 is too small"),
        (("--weights", "int8"), "error: weights must be one of"),
        (("--budget", "abc"), "error: budget must be a token count"),
    ],
)
def test_command_rejects_bad_options_in_one_line(monkeypatch, capsys, args, message):
    code, out, err = run_cli(monkeypatch, capsys, "bench-llama", *args)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1 and out == ""


def test_command_without_the_extra_says_how_to_install_it(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_llama(name, *a, **kw):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    code, out, err = run_cli(monkeypatch, capsys, "bench-llama", "--contexts", "256", "--threads", "1")
    assert code == 2 and "llama-cpp-python is not installed: pip install -e '.[bench]'" in err
    assert err.count("\n") == 1


def test_command_refuses_kernels_until_bench_cpu_provides_them(monkeypatch, capsys):
    from triforce_chat.kernels import bench_cpu

    monkeypatch.delattr(bench_cpu, "side_by_side", raising=False)
    code, out, err = run_cli(monkeypatch, capsys, "bench-llama", "--kernels")
    assert code == 2 and "--kernels: kernels/bench_cpu.py does not provide side_by_side() yet" in err


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python (the optional 'bench' extra) is not installed")
def test_smoke_against_llama_cpp_on_the_bundled_gguf(monkeypatch, capsys, default_model_dir):
    import json

    code, out, err = run_cli(monkeypatch, capsys, "bench-llama", "--contexts", "300", "--threads", "1",
                             "--reps", "1", "-n", "4", "--levels", "0,2", "--json")
    assert code == 0, err
    data = json.loads(out)
    (row,) = data["rows"]
    assert row["levels_identical"] and set(row["decode_tokens_per_s"]) == {"level 0", "level 2", bl.LLAMA}
    assert row["prefill_tokens_per_s"][bl.LLAMA] > 0 and row["decode_tokens_per_s"][bl.LLAMA] > 0
    assert row["compared_tokens"] >= 1 and 0 <= row["common_prefix"] <= row["compared_tokens"]
    assert data["model"]["gguf"].endswith(".gguf") and data["baseline"]["1"]["n_ctx"] == 8192
    assert set(data["machine"]["simd"]) == set(common.SIMD_FLAGS)


def test_the_first_speculative_answer_s_calibration_is_not_decode_time(tiny_model, monkeypatch):
    """bench-llama prefills through the forward, so the timing of window costs that the app does
    right after a document's prefill comes with the first level-1/2 answer here: the Session counts
    it with that answer's prefill (reported apart), so it is out of the decode seconds, as the
    prompt's re-rendering is."""
    from triforce_chat.app.bench.levels import Prompt

    answered = bl.timed_answer
    sessions = []

    def answer(session, question):  # the answer as it runs, with a wall time of exactly 100 s
        sessions.append(session)
        return answered(session, question)[0], 100.0

    monkeypatch.setattr(bl, "timed_answer", answer)
    prompt = Prompt(300, 0, "doc.md", "The keeper lights the lamp at dusk. " * 40, "Repeat the text.", "quote")
    _, records = bl.run_ours(tiny_model, _cfg(), prompt, [0, 2], 8)
    decode = {r["level"]: r for r in records if r["phase"] == "decode"}
    assert decode[0]["calibrate_s"] == 0.0 < decode[2]["calibrate_s"]
    st = sessions[-1].stats
    assert st.calibrate_s <= st.prefill_s and "calibrate" not in st.timings
    assert decode[2]["seconds"] == pytest.approx(100.0 - st.prefill_s)
