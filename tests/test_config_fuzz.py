"""Config and keymap mistakes: one message naming the file, the line and the key, and the app starts
with the defaults for what is wrong. Plus property-based fuzzing of the config loader and the
document reader (derandomized in CI: see the hypothesis profiles in conftest.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triforce_chat.app.runtime import read_document
from triforce_chat.app.safe_text import json_text, terminal_text
from triforce_chat.app.settings import _FIELD_TYPES, Settings, SettingsError, load_settings
from triforce_chat.app.ui.keymap import check_keymap, key_problem
from triforce_chat.decoding.session import DocumentError

RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def lenient(path: Path) -> tuple[Settings, list[str]]:
    warnings: list[str] = []
    return load_settings(path, warn=warnings.append), warnings


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ("level = 7", "level", "level must be 0, 1 or 2"),
        ('gamma-low = "four"', "gamma-low", "gamma-low must be int"),
        ('colour = "red"', "colour", "unknown setting 'colour'"),
        ("context = 1000000000000000000000000000000", "context", "context must be between 16 and 16,777,216"),
        ("threads = 100000000", "threads", "threads must be between 1 and 1024"),
        ("seed = 1180591620717411303424", "seed", "seed must fit in 64 bits"),
        ("temperature = inf", "temperature", "temperature must be a finite number"),
        ("temperature = nan", "temperature", "temperature must be a finite number"),
        ('budget = "inf"', "budget", "budget must be a token count"),
        ("chunk-size = 99999999999", "chunk-size", "chunk-size must be between 1 and 4096"),
        ("truncate = 1", "truncate", "truncate must be bool"),
        ("top_p = 1e400", "top_p", "top-p must be in (0, 1]"),
        ("history = [1, 2]", "history", "history must be bool"),
    ],
)
def test_each_mistake_is_one_message_naming_file_line_and_key_and_the_rest_applies(tmp_path, line, key, words):
    path = write(tmp_path, f'theme = "triforce-light"\n\n{line}\nmax-new-tokens = 64\n')
    settings, warnings = lenient(path)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{path}, line 3: ") and words in warnings[0], warnings[0]
    assert any(form in warnings[0] for form in (key, key.replace("-", "_"), key.replace("_", "-")))
    field = key.replace("-", "_")
    if field in _FIELD_TYPES:
        assert getattr(settings, field) == getattr(Settings(), field)  # the default stands in
        assert "using the default" in warnings[0]
    assert settings.theme == "triforce-light" and settings.max_new_tokens == 64  # the rest applies
    with pytest.raises(SettingsError, match="line 3"):  # strict mode (the default) still refuses
        load_settings(path)


def test_values_wrong_only_together_drop_the_one_the_message_names(tmp_path):
    path = write(tmp_path, 'chunk-size = 64\nbudget = "32"\n')
    settings, warnings = lenient(path)  # each is fine alone; together the budget is under two chunks
    assert settings.budget == Settings().budget and settings.chunk_size == 64
    [warning] = warnings
    assert warning.startswith(f"{path}, line 2: budget must be at least two chunks")


def test_keymap_entries_are_located_in_their_table(tmp_path):
    path = write(tmp_path, 'history = false\n\n[keymap]\nhistory = "f5"\nstop = 3\n"cycle-level" = "ctrl+y"\n')
    settings, warnings = lenient(path)
    assert settings.history is False and settings.keymap == {"history": "f5", "cycle-level": "ctrl+y"}
    [warning] = warnings
    assert warning.startswith(f"{path}, line 5: keymap.stop must be a string")
    assert settings.origin["keymap.history"] == f"{path}, line 4"  # not line 1, the setting of the same name
    assert settings.origin["keymap.cycle-level"] == f"{path}, line 6"


def test_ask_starts_with_defaults_for_what_is_wrong(monkeypatch, capsys, tiny_model_dir, tmp_path):
    from test_cli import run_cli

    config = write(tmp_path, 'level = 7\ncolour = "red"\nmax-new-tokens = 3\n')
    monkeypatch.setattr("sys.argv", ["x"])  # (run_cli sets it)
    doc = write(tmp_path, "The keeper is Amelia. " * 10, "doc.txt")
    code, out, err = run_cli(monkeypatch, capsys, "ask", "--config", str(config), "--model", str(tiny_model_dir),
                             "--dtype", "float32", "-d", str(doc), "--json", "Who?")
    assert code == 0, err
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith(f"warning: {config}, line ") for w in warnings)
    assert "line 1: level must be 0, 1 or 2" in warnings[0] and "line 2: unknown setting 'colour'" in warnings[1]
    data = json.loads(out)
    assert data["level"] == 2 and len(data["token_ids"]) == 3  # default level, the valid key applied


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--context", str(10**30), "context must be between"),
        ("--threads", str(10**9), "threads must be between"),
        ("--seed", str(2**70), "seed must fit in 64 bits"),
        ("--temperature", "nan", "temperature must be a finite number"),
        ("--temperature", "inf", "temperature must be a finite number"),
        ("--budget", "inf", "budget must be a token count"),
        ("--chunk-size", str(10**9), "chunk-size must be between"),
    ],
)
def test_huge_and_non_finite_flags_are_one_line_and_exit_2(monkeypatch, capsys, flag, value, words):
    from test_cli import run_cli

    code, out, err = run_cli(monkeypatch, capsys, "ask", flag, value, "q")
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


# -- keymap ---------------------------------------------------------------------------------------------
def test_key_names():
    for good in ("ctrl+t", "f5", "escape", "alt+up", "ctrl+shift+left", "question_mark", "?", "A", "é", "space"):
        assert key_problem(good) is None, good
    for bad in ("ctrl+", "foo", "ctrl + t", "hyperdrive+x", "\x1b", "", "f99"):
        assert key_problem(bad), bad


def test_the_apps_own_bindings_do_not_clash():
    from triforce_chat.app.ui.app import TriforceApp

    app = TriforceApp(Settings())
    assert check_keymap({}, app._binding_scopes(), str) == ({}, [])
    # and every binding of the app has an id, so every one can be remapped
    assert all(b.id for scope in app._binding_scopes() for b in scope)


async def test_keymap_mistakes_are_notices_and_the_app_starts_with_defaults(tiny_model, tmp_path, monkeypatch):
    from test_tui import make_app, notices, ready, text_of
    from triforce_chat.app.ui.history import History

    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    config = write(tmp_path, "\n".join([
        "level = 1",
        "[keymap]",
        'cycle-level = "ctrl+zz"',  # 3: not a key
        'stop = "ctrl+t"',  # 4: cycle-level's key (which keeps it)
        'toggle-viz = "f8"',  # 5: fine
        'help = "f8"',  # 6: toggle-viz's new key
        'warp-drive = "f7"',  # 7: no such binding
        'history = 5',  # 8: not a string
    ]) + "\n")
    warnings: list[str] = []
    settings = load_settings(config, warn=warnings.append).merged(max_new_tokens=8, budget="64")
    app = make_app(tiny_model, History(tmp_path / "data"))
    app = type(app)(settings, [], model=tiny_model, history=History(tmp_path / "data"), notices=warnings)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(pilot)
        shown = notices(app)
        expected = [
            f"{config}, line 8: keymap.history must be a string",
            f"{config}, line 3: keymap.cycle-level: 'ctrl+zz' is not a key name",
            f"{config}, line 7: keymap: unknown binding id warp-drive",
            f"{config}, line 4: keymap.stop: ctrl+t is already the key of cycle-level; stop keeps escape",
            f"{config}, line 6: keymap.help: f8 is already the key of toggle-viz; help keeps f1",
        ]
        for text in expected:
            assert sum(text in n for n in shown) == 1, (text, shown)
        await pilot.press("ctrl+t")  # cycle-level kept its default key
        assert app.pending.level == 2 and "Level 2" in text_of(app, "#stats-body")
        await pilot.press("f8")  # the valid remap applies
        assert app.viz
        await pilot.press("f1")  # help kept f1
        await pilot.pause(0.1)
        assert app.screen.query("#help-text")


# -- fuzzing ------------------------------------------------------------------------------------------
KNOWN = sorted(_FIELD_TYPES)
toml_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=30),
)
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string (lone surrogates make the file invalid: also a case)
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


@given(
    top=st.dictionaries(st.one_of(st.sampled_from(KNOWN + [k.replace("_", "-") for k in KNOWN]), st.text(max_size=12)),
                        toml_values, max_size=8),
    keymap=st.dictionaries(st.one_of(st.sampled_from(["stop", "cycle-level", "help", "send"]), st.text(max_size=8)),
                           st.one_of(st.text(max_size=12), st.sampled_from(["ctrl+t", "f5", "escape", "ctrl+"]),
                                     toml_scalars), max_size=4),
    noise=st.text(max_size=40),
    use_noise=st.booleans(),
)
def test_fuzz_the_config_loader(tmp_path_factory, top, keymap, noise, use_noise):
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in top.items()]
    if keymap:
        lines += ["[keymap]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in keymap.items()]
    text = noise if use_noise else "\n".join(lines) + "\n"
    path = tmp_path_factory.mktemp("fuzz") / "config.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    settings, warnings = lenient(path)  # never raises: every problem is a warning
    settings.validate()
    settings.decode_config().validate()
    for warning in warnings:
        assert warning.startswith(str(path)) and "\n" not in warning.strip()
    if not warnings:  # a clean file loads the same strictly
        assert load_settings(path) == settings
    from triforce_chat.app.ui.app import TriforceApp

    clean, problems = check_keymap(settings.keymap, TriforceApp(Settings())._binding_scopes(), str)
    assert all(key_problem(k) is None for keys in clean.values() for k in keys.split(","))


@given(
    data=st.one_of(
        st.binary(max_size=4000),
        st.lists(st.sampled_from([b"text ", b"\x00", b"\xff", b"\xc3", b"\x1b[31m", b"\xe2\x80\xae", "é".encode(),
                                  "👩‍👩‍👧".encode(), b"\r\n", b"\n", b" "]), max_size=400).map(b"".join),
    ),
    pad=st.booleans(),
)
def test_fuzz_the_document_reader(tmp_path_factory, data, pad):
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_bytes((b"x" * 9000 if pad else b"") + data)  # pad: NULs past the binary sniff
    warnings: list[str] = []
    try:
        name, text = read_document(path, warn=warnings.append)
    except DocumentError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert name == "doc.txt" and text.strip()
    assert "\x00" not in text
    text.encode("utf-8")  # no lone surrogates: the text can go anywhere
    assert all("\n" not in w for w in warnings)
    shown = terminal_text(text)
    assert not RAW.search(shown)
    assert json.loads(json_text(text)) == text
