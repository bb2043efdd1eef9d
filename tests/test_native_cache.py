"""The native extension's build cache (kernels/native.py): every source change makes a new build
directory, so old ones are pruned by last use. Needs no compiler: it works on directories."""

from __future__ import annotations

import os
import time

import pytest

from triforce_chat.kernels.native import prune_builds


def test_builds_unused_for_long_or_beyond_the_most_recent_are_removed(tmp_path):
    ext = tmp_path / "ext"
    now = time.time()
    ages_days = {"a": 1, "b": 2, "c": 3, "d": 40, "e": 4, "f": 5}
    for name, age in ages_days.items():
        (ext / name).mkdir(parents=True)
        (ext / name / "lib.so").write_bytes(b"x")
        os.utime(ext / name, (now - age * 86400, now - age * 86400))
    used = ext / "f"  # loaded just now: the most recent, whatever its age was
    removed = prune_builds(used, keep=4, days=30)
    # by last use: f (now), a, b, c kept; e is fifth; d is fifth-or-later and 40 days old
    assert sorted(p.name for p in removed) == ["d", "e"]
    assert sorted(p.name for p in ext.iterdir()) == ["a", "b", "c", "f"]
    assert time.time() - (ext / "f").stat().st_mtime < 60


def test_a_build_in_use_is_never_removed_and_a_missing_cache_is_no_error(tmp_path):
    ext = tmp_path / "ext"
    (ext / "old").mkdir(parents=True)
    os.utime(ext / "old", (0, 0))
    assert prune_builds(ext / "old", keep=1, days=1) == [] and (ext / "old").is_dir()
    assert prune_builds(tmp_path / "nowhere" / "x") == []


def test_the_build_runs_the_project_s_ninja_whatever_path_the_app_was_started_with(tmp_path, monkeypatch):
    """Started as `.venv/bin/triforce-chat` (no activated environment), the build found no ninja on a
    machine without a system one and the app ran without its kernels; with a system ninja of another
    version, the two alternated and each rebuilt everything. The build sees the `ninja` package's
    first, and PATH is given back as it was."""
    import shutil
    from pathlib import Path

    import ninja
    from torch.utils import cpp_extension

    from triforce_chat.kernels import native

    if not native.available():  # _build reads the loaded library's fields after "building"
        pytest.skip(f"the native kernels are not built here: {native.status().reason}")
    no_ninja = tmp_path / "bin"
    no_ninja.mkdir()
    monkeypatch.setenv("PATH", str(no_ninja))
    monkeypatch.setenv("TRIFORCE_CHAT_CACHE", str(tmp_path / "cache"))
    found = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: found.append(shutil.which("ninja")))
    assert native._build(True).available
    assert found and found[0] is not None and Path(found[0]).parent == Path(ninja.BIN_DIR)
    assert os.environ["PATH"] == str(no_ninja)


def test_a_ninja_package_without_its_binary_leaves_path_alone(monkeypatch):
    """`ninja.BIN_DIR` is "" when the package cannot find its binary (some --target installs); an
    empty PATH entry would mean the current folder, searched first for ninja and the compiler."""
    import ninja

    from triforce_chat.kernels import native

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(ninja, "BIN_DIR", "", raising=False)
    with native._project_ninja_first():
        assert os.environ["PATH"] == "/usr/bin:/bin"
    assert os.environ["PATH"] == "/usr/bin:/bin"
