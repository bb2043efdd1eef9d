"""`triforce-chat ask`: the JSON contract, and one clear line plus exit code 2 for every bad input."""

from __future__ import annotations

import json

import pytest

from cli_run import run_main


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    code = run_main(monkeypatch, *args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("The lighthouse keeper on Farrow Island is Amelia Stroud. The boat is green.\n" * 5)
    return p


def test_ask_json_fields_are_present_and_consistent(monkeypatch, capsys, tiny_model, tiny_model_dir, doc):
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--doc", str(doc), "--model", str(tiny_model_dir),
                             "--max-new-tokens", "9", "--level", "2", "--json", "--dtype", "float32",
                             "Who keeps the light?")
    assert code == 0, err
    data = json.loads(out)
    stats = data["stats"]
    for key in ("text", "token_ids", "prompt_token_ids", "model", "model_path", "stats", "level", "token_origins"):
        assert key in data
    for key in ("prefill_tokens", "prefill_s", "new_tokens", "decode_s", "tokens_per_s", "acceptance",
                "mean_accepted_length", "position_histogram", "ms_per_token", "speedup_vs_level0", "cache"):
        assert key in stats
    assert data["model_path"] == str(tiny_model_dir) and data["level"] == 2
    assert len(data["token_ids"]) == stats["new_tokens"] == 9 == len(data["token_origins"])
    assert set(data["token_origins"]) <= {"low", "mid", "target"}
    assert stats["prefill_tokens"] == len(data["prompt_token_ids"]) - 1
    assert data["text"] == tiny_model.tokenizer.decode(data["token_ids"], skip_special_tokens=True)
    assert stats["tokens_per_s"] == pytest.approx(stats["new_tokens"] / stats["decode_s"], rel=0.01)
    assert stats["cache"]["full_kv_tokens"] == len(data["prompt_token_ids"]) + 8
    assert stats["cache"]["drafter"] == "suffix" and stats["cache"]["suffix_states"] > len(data["prompt_token_ids"])


def test_ask_json_still_says_on_stderr_that_more_threads_than_cores_slow_it_down(
    monkeypatch, capsys, tiny_model_dir, doc
):
    import torch

    from triforce_chat.app.runtime import usable_cores

    threads, before = usable_cores() + 1, torch.get_num_threads()
    try:
        code, out, err = run_cli(monkeypatch, capsys, "ask", "--doc", str(doc), "--model", str(tiny_model_dir),
                                 "-n", "2", "--threads", str(threads), "--json", "Who?")
    finally:
        torch.set_num_threads(before)  # the tests after this one keep the process's thread count
    assert code == 0, err
    assert json.loads(out)["stats"]["new_tokens"] == 2  # stdout is the JSON alone
    assert f"notice: {threads} threads on {threads - 1} cores" in err


def test_ask_streams_text_and_levels_agree(monkeypatch, capsys, tiny_model_dir, doc):
    outs = []
    for level in ("0", "1", "2"):
        code, out, err = run_cli(monkeypatch, capsys, "ask", "-d", str(doc), "--model", str(tiny_model_dir),
                                 "-n", "12", "--level", level, "--budget", "32", "--dtype", "float32", "Who?")
        assert code == 0, err
        outs.append(out)
    assert outs[0].strip() and outs[0] == outs[1] == outs[2]


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def bad_inputs(tmp_path):
    return [
        (["--doc", str(tmp_path / "missing.txt"), "q"], "no such file"),
        (["--doc", str(tmp_path), "q"], "is a directory"),
        (["--doc", write(tmp_path / "b.bin", b"\x00\x01\x02binary"), "q"], "binary"),
        (["--doc", write(tmp_path / "e.txt", b"  \n"), "q"], "empty"),
        (["--doc", write(tmp_path / "big.txt", b"word " * 3000), "q"], "over the model's context"),
        (["--max-new-tokens", "-3", "q"], "max-new-tokens"),
        (["--temperature", "-0.5", "q"], "temperature"),
        (["--top-p", "0", "q"], "top-p"),
        (["--top-p", "1.5", "q"], "top-p"),
        (["--level", "3", "q"], "level"),
        (["--budget", "lots", "q"], "budget"),
        (["--budget", "8", "q"], "budget"),
        (["--gamma-mid", "0", "q"], "gamma-mid"),
        (["--chunk-size", "0", "q"], "chunk-size"),
        (["--threads", "0", "q"], "threads"),
        (["--weights", "int4", "q"], "weights must be one of"),
        (["--kv-dtype", "int8", "q"], "kv-dtype must be one of"),
        (["--draft", str(tmp_path), "q"], "not a model folder"),
        (["  "], "question is empty"),
    ]


def test_bad_inputs_give_one_line_and_exit_2(monkeypatch, capsys, tmp_path, tiny_model_dir):
    for args, message in bad_inputs(tmp_path):
        code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), "--dtype", "float32",
                                 *args)
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)


def test_non_utf8_document_is_decoded_with_a_warning(monkeypatch, capsys, tmp_path, tiny_model_dir):
    path = write(tmp_path / "latin1.txt", "Café crème brûlée, naïve façade.\n".encode("latin-1") * 3)
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), "--dtype", "float32",
                             "-d", path, "-n", "3", "--json", "What?")
    assert code == 0, err
    assert "not valid UTF-8" in err
    assert len(json.loads(out)["token_ids"]) == 3


def test_truncate_fits_an_oversized_document(monkeypatch, capsys, tmp_path, tiny_model_dir):
    path = write(tmp_path / "big.txt", b"word " * 3000)
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), "--dtype", "float32",
                             "-d", path, "-n", "4", "--truncate", "--json", "What?")
    assert code == 0, err
    assert len(json.loads(out)["prompt_token_ids"]) < 2048


def test_model_errors_are_one_line(monkeypatch, capsys, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    cases = [
        (["--model", str(tmp_path / "gpt2")], "unsupported architecture: gpt2"),
        (["--model", "some-org/not-cached-model"], "pass a local folder"),
        (["--model", str(tmp_path)], "not a model folder"),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args, message in cases:
        code, out, err = run_cli(monkeypatch, capsys, "ask", *args, "q")
        assert code == 2 and message in err, (args, err)
        assert "Traceback" not in err


def test_gguf_and_catalogue_errors_are_one_line(monkeypatch, capsys, tmp_path):
    from gguf_models import write_gguf

    unsupported = write_gguf(tmp_path / "q2k.gguf", qtype="Q4_0", qtypes={"attn_q": "Q2_K"})
    whole = write_gguf(tmp_path / "whole.gguf", qtype="Q4_0").read_bytes()
    (tmp_path / "cut-data.gguf").write_bytes(whole[: len(whole) - 1000])
    (tmp_path / "cut-header.gguf").write_bytes(whole[:200])
    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04 not a model at all")
    monkeypatch.setenv("TRIFORCE_MODELS_DIR", str(tmp_path / "models"))
    cases = [
        (str(unsupported), "unsupported GGUF weight type Q2_K (tensor blk.0.attn_q.weight); supported: F32, F16, Q4_0"),
        (str(tmp_path / "cut-data.gguf"), "truncated GGUF file"),
        (str(tmp_path / "cut-header.gguf"), "truncated GGUF file"),
        (str(tmp_path / "notgguf.gguf"), "not a GGUF file"),
        ("qwen2.5-coder-1.5b", "not installed: run 'triforce-chat models pull qwen2.5-coder-1.5b'"),
        ("no-such-model", "known models: smollm2-135m, qwen2.5-coder-0.5b"),
    ]
    for model, message in cases:
        code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", model, "q")
        assert code == 2 and message in err, (model, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (model, err)
