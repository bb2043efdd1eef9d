"""Settings: defaults <- config TOML <- CLI flags, with errors that name the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from triforce_chat.app.settings import (
    Settings,
    SettingsError,
    config_path,
    data_dir,
    load_settings,
)
from triforce_chat.decoding.config import parse_budget


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_match_the_contract():
    s = Settings()
    assert (s.model, s.draft, s.level, s.budget, s.chunk_size) == (None, "suffix", 2, "4096", 8)
    assert (s.gamma_mid, s.gamma_low, s.temperature, s.top_p, s.seed) == (6, 4, 0.0, 1.0, None)
    assert (s.max_new_tokens, s.weights, s.device, s.threads, s.context) == (512, "auto", "auto", None, None)
    assert s.theme == "triforce-dark" and s.keymap == {}


def test_missing_file_gives_defaults(tmp_path):
    assert load_settings(tmp_path / "nope.toml") == Settings()


def test_config_then_cli_override(tmp_path):
    path = write(
        tmp_path,
        'level = 1\nbudget = "0.1"\ngamma-mid = 3\ntemperature = 1\ntheme = "triforce-light"\n'
        '[keymap]\ncycle-level = "ctrl+y"\nstop = "escape,ctrl+x"\n',
    )
    s = load_settings(path)
    assert (s.level, s.budget, s.gamma_mid, s.theme) == (1, "0.1", 3, "triforce-light")
    assert s.temperature == 1.0 and isinstance(s.temperature, float)
    assert s.keymap == {"cycle-level": "ctrl+y", "stop": "escape,ctrl+x"}
    merged = s.merged(level=0, budget=None, gamma_mid=None, keymap={"stop": "ctrl+g"})
    assert (merged.level, merged.budget, merged.gamma_mid) == (0, "0.1", 3)  # None keeps the config value
    assert merged.keymap == {"cycle-level": "ctrl+y", "stop": "ctrl+g"}
    assert s.level == 1  # frozen: merged() returns a copy


def test_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, 'level = 2\nbudget = "4096\n')
    with pytest.raises(SettingsError, match=r"line 2"):
        load_settings(path)


def test_a_config_path_that_never_ends_is_refused_not_read_to_the_end(tmp_path):
    """`--config /dev/zero` read until memory ran out (a MemoryError traceback, or the OOM killer)."""
    with pytest.raises(SettingsError, match="/dev/zero: cannot read the config file .over 1 MiB"):
        load_settings(Path("/dev/zero"))
    warnings: list[str] = []
    assert load_settings(Path("/dev/zero"), warn=warnings.append) == Settings()
    assert len(warnings) == 1 and "using the defaults" in warnings[0]
    big = write(tmp_path, "# " + "x" * (1 << 20) + "\nlevel = 1\n")  # a comment of a MiB: still refused
    with pytest.raises(SettingsError, match="over 1 MiB"):
        load_settings(big)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('model = "x"\n\nlevel = 7\n', 3, "level must be 0, 1 or 2"),
        ('level = 1\ngamma_low = "four"\n', 2, "gamma_low must be int"),
        ('colour = "red"\n', 1, "unknown setting 'colour'"),
        ('level = 1\n\n\nbudget = "lots"\n', 4, "budget must be a token count"),
        ("[keymap]\nstop = 3\n", 2, "keymap.stop must be a string"),
        ("truncate = 1\n", 1, "truncate must be bool"),
        ("level = true\n", 1, "level must be int"),
        ("level = 1\n[cache]\nmax_gb = -2\n", 3, "cache.max_gb must be a positive number"),
        ('[cache]\nmax_gb = "big"\n', 2, "cache.max_gb must be float or int"),
        ("[cache]\nsize = 3\n", 2, "unknown setting cache.size"),
        ("[cache]\nenabled = 1\n", 2, "cache.enabled must be bool"),
        ("cache = 3\n", 1, "cache must be a table"),
    ],
)
def test_bad_values_name_the_line(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert f"line {line}" in str(err.value)
    assert words in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"level": 3},
        {"gamma_mid": 0},
        {"top_p": 0},
        {"temperature": -1},
        {"budget": "8"},
        {"budget": "2.5"},
        {"max_new_tokens": 0},
        {"weights": "int4"},
        {"nonsense": 1},
        {"cache_max_gb": 0},
    ],
)
def test_merged_validates(overrides):
    with pytest.raises(SettingsError):
        Settings().merged(**overrides)


def test_parse_budget():
    assert parse_budget("4096") == (4096, 0.0)
    assert parse_budget(512) == (512, 0.0)
    assert parse_budget("0.1") == (0, 0.1)
    assert parse_budget("25%") == (0, 0.25)
    for bad in ("0", "1.5", "abc", "150%", "-3"):
        with pytest.raises(ValueError):
            parse_budget(bad)
        with pytest.raises(SettingsError, match="budget"):
            Settings().merged(budget=bad)


def test_paths_honour_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRIFORCE_CHAT_CONFIG", str(tmp_path / "c.toml"))
    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    assert config_path() == tmp_path / "c.toml"
    assert data_dir() == tmp_path / "data"
    write(tmp_path, "")
    (tmp_path / "c.toml").write_text("max_new_tokens = 64\n")
    assert load_settings().max_new_tokens == 64


def test_decode_config_carries_every_decoder_field():
    cfg = Settings(level=1, budget="0.2", gamma_mid=5, seed=7, max_new_tokens=9).decode_config()
    assert (cfg.level, cfg.budget, cfg.gamma_mid, cfg.seed, cfg.max_new_tokens) == (1, "0.2", 5, 7, 9)
    cfg.validate()


def test_settings_import_no_torch_and_share_the_decoder_defaults():
    """Bad flags must fail before torch loads (a second or more): settings may only import the
    torch-free decoding config, whose defaults they take rather than repeat."""
    import subprocess
    import sys

    code = (
        "import sys; from triforce_chat.app.settings import Settings; "
        "Settings().merged(level=1).validate(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr

    from triforce_chat.decoding.config import DecodeConfig

    assert Settings().decode_config() == DecodeConfig()


def test_the_document_cache_settings(tmp_path):
    assert (Settings().doc_cache, Settings().cache_max_gb) == (True, 8.0)
    s = load_settings(write(tmp_path, "[cache]\nmax_gb = 2\nenabled = false\n"))
    assert (s.doc_cache, s.cache_max_gb) == (False, 2.0) and isinstance(s.cache_max_gb, float)
    assert load_settings(write(tmp_path, "cache.max_gb = 0.5\n")).cache_max_gb == 0.5  # dotted key

    from triforce_chat.app.cli.main import given_settings

    assert given_settings({"no_doc_cache": True})["doc_cache"] is False
    assert given_settings({"no_doc_cache": False})["doc_cache"] is None  # not given: the config decides
