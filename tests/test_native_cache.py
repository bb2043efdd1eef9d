"""The native extension's build cache (kernels/native.py): every source change makes a new build
directory, so old ones are pruned by last use. Needs no compiler: it works on directories."""

from __future__ import annotations

import os
import time

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
