"""`ask` with the sampling options and the repetition stop: the model's recommended settings under
the flags and the config file, the stop reason in --json and on stderr, bad values in one line."""

from __future__ import annotations

import json

from conftest import QWEN_LIKE
from test_cli import run_cli


def ask_json(monkeypatch, capsys, model_dir, *args: str) -> dict:
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(model_dir), "--dtype", "float32", "--json",
                             *args, "Say something.")
    assert code == 0, err
    return json.loads(out)


def test_model_defaults_under_flags_and_config_file(monkeypatch, capsys, tmp_path, looping_chat_model_dir):
    data = ask_json(monkeypatch, capsys, looping_chat_model_dir, "-n", "4")
    model = {k: v for k, v in QWEN_LIKE.items() if k != "do_sample"}
    assert {k: data["sampling"][k] for k in model} == model
    data = ask_json(monkeypatch, capsys, looping_chat_model_dir, "-n", "4", "--temperature", "0", "--top-k", "7")
    assert (data["sampling"]["temperature"], data["sampling"]["top_k"]) == (0.0, 7)
    assert (data["sampling"]["top_p"], data["sampling"]["repetition_penalty"]) == (0.8, 1.1)
    config = tmp_path / "config.toml"
    config.write_text("repetition-penalty = 1.0\ntop-p = 0.5\n")
    data = ask_json(monkeypatch, capsys, looping_chat_model_dir, "-n", "4", "--config", str(config), "--top-p", "0.9")
    assert (data["sampling"]["repetition_penalty"], data["sampling"]["top_p"]) == (1.0, 0.9)
    assert data["sampling"]["temperature"] == 0.7


def test_a_looping_answer_stops_with_a_visible_reason(monkeypatch, capsys, looping_chat_model_dir):
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(looping_chat_model_dir), "--dtype", "float32",
                             "--level", "2", "Say something.")
    assert code == 0, err
    assert err.strip().splitlines()[-1].startswith("stopped: repetition")
    data = ask_json(monkeypatch, capsys, looping_chat_model_dir, "--level", "1")
    assert data["stats"]["stop_reason"] == "repetition" and data["stats"]["new_tokens"] < 100
    data = ask_json(monkeypatch, capsys, looping_chat_model_dir, "--no-stop-on-repetition", "-n", "100")
    assert data["stats"]["stop_reason"] == "max tokens" and data["stats"]["new_tokens"] == 100
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(looping_chat_model_dir), "--dtype", "float32",
                             "-n", "20", "Say something.")
    assert code == 0 and "stopped" not in err  # a max-tokens end says nothing


def test_bad_sampling_values_give_one_line_and_exit_2(monkeypatch, capsys, tiny_model_dir):
    for args, message in [(["--top-k", "-1"], "top-k must be >= 0"),
                          (["--repetition-penalty", "0"], "repetition-penalty must be in"),
                          (["--repetition-window", "-3"], "repetition-window must be >= 0"),
                          (["--top-k", "many"], "valid integer"), (["--level", "two"], "valid integer")]:
        code, out, err = run_cli(monkeypatch, capsys, "ask", "--model", str(tiny_model_dir), *args, "q")
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
