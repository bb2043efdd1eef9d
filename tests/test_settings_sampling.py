"""The sampling settings: file keys, and the precedence flag > config file > the model's
recommended settings > the built-in defaults."""

from __future__ import annotations

import pytest

from triforce_chat.app.settings import Settings, SettingsError, load_settings
from triforce_chat.decoding.config import DecodeConfig
from triforce_chat.decoding.loops import LoopRule

QWEN = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}


def write(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_new_keys_from_the_file_reach_the_decoder(tmp_path):
    path = write(tmp_path, "top-k = 40\nrepetition-penalty = 1\nrepetition-window = 0\nstop-on-repetition = false\n"
                           "loop-repeats = 4\nloop-min-tokens = 64\nloop-max-span = 128\n")
    cfg = load_settings(path).decode_config()
    assert (cfg.top_k, cfg.repetition_penalty, cfg.repetition_window) == (40, 1.0, 0)
    assert isinstance(cfg.repetition_penalty, float)
    assert cfg.stop_on_repetition is False and cfg.loop_rule() is None
    assert (cfg.loop_repeats, cfg.loop_min_tokens, cfg.loop_max_span) == (4, 64, 128)
    assert Settings().decode_config().loop_rule() == LoopRule()  # on by default


@pytest.mark.parametrize(("text", "words"), [
    ("top-k = 1.5\n", "top-k must be int"),
    ("top-k = -2\n", "top-k must be >= 0"),
    ("repetition-penalty = 0\n", "repetition-penalty must be in"),
    ("stop-on-repetition = 1\n", "stop-on-repetition must be bool"),
    ("loop-repeats = 1\n", "loop-repeats must be >= 2"),
])
def test_bad_values_name_the_line(tmp_path, text, words):
    with pytest.raises(SettingsError, match=words) as info:
        load_settings(write(tmp_path, "level = 1\n" + text))
    assert "line 2" in str(info.value)


def test_model_defaults_fill_only_what_nobody_gave(tmp_path):
    # nothing given: the model's settings replace the built-in defaults
    s = load_settings(tmp_path / "missing.toml").with_model_defaults(QWEN)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.7, 0.8, 20, 1.1)
    # the file gives top_k and temperature; a flag gives temperature again
    s = load_settings(write(tmp_path, "top-k = 5\ntemperature = 0.2\n")).merged(temperature=0.0)
    s = s.with_model_defaults(QWEN)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.0, 0.8, 5, 1.1)
    # a flag equal to the built-in default still counts as given
    s = Settings().merged(repetition_penalty=1.0).with_model_defaults(QWEN)
    assert s.repetition_penalty == 1.0 and s.temperature == 0.7
    # no model defaults: the built-in ones, as before
    assert Settings().with_model_defaults({}) == Settings()
    assert Settings().with_model_defaults({}).decode_config() == DecodeConfig()


def test_odd_model_defaults_are_skipped_not_fatal():
    s = Settings().with_model_defaults({"temperature": -1, "top_p": 0.0, "top_k": True, "repetition_penalty": "x",
                                        "min_p": 0.1})
    assert s == Settings()
    s = Settings().with_model_defaults({"top_k": 20.0, "top_p": 1})
    assert s.top_k == 20 and isinstance(s.top_k, int) and s.top_p == 1.0


def test_given_is_not_an_option():
    with pytest.raises(SettingsError, match="unknown option: given"):
        Settings().merged(given=frozenset({"top_k"}))
    assert "given" not in Settings().to_dict()
