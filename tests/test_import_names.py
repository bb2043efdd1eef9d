"""No folder of the checkout shadows an installed package, whatever the current directory.

`python -m pytest`, `python -m triforce_chat` and any `python` started in the repository root put
that folder first on `sys.path`. Our top-level folders (`app/`, `decoding/`, `kernels/`, `themes/`)
are therefore kept free of `__init__.py`: a folder without one is only a namespace portion, and the
import system prefers a regular package found anywhere later on the path. On 2026-12-03
transformers 5.25 began to `import kernels` (Hugging Face's kernel hub) and found ours instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL_FOLDERS = ("app", "decoding", "kernels", "themes")


def run_python_in_repo_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c CODE` started in the repository root: sys.path[0] is that folder, as for `python -m`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def where_names_resolve(names: tuple[str, ...], extra_path: Path | None = None) -> dict[str, str]:
    code = (
        "import importlib, json, sys\n"
        "assert sys.path[0] in ('', '.') or sys.path[0] == __import__('os').getcwd(), sys.path[:2]\n"
        f"print(json.dumps({{n: str(importlib.import_module(n).__file__) for n in {list(names)!r}}}))\n"
    )
    done = run_python_in_repo_root(code, extra_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def packages_named_like_our_folders(tmp_path: Path) -> Path:
    """A folder of regular packages called app, decoding, kernels and themes, on PYTHONPATH (which
    comes after the current directory on sys.path, as site-packages does)."""
    for name in TOP_LEVEL_FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    return tmp_path


def test_installed_packages_named_like_our_folders_win_from_the_repository_root(packages_named_like_our_folders):
    resolved = where_names_resolve(TOP_LEVEL_FOLDERS, packages_named_like_our_folders)
    for name, file in resolved.items():
        assert Path(file).is_relative_to(packages_named_like_our_folders), f"import {name} found {file}"


def test_the_real_kernels_package_is_the_one_imported_from_the_repository_root():
    """Hugging Face's `kernels` (a dev dependency, for this test) against our kernels/ folder."""
    resolved = where_names_resolve(("kernels",))
    assert not Path(resolved["kernels"]).is_relative_to(REPO / "kernels"), resolved
    assert "site-packages" in Path(resolved["kernels"]).parts


def test_transformers_model_classes_import_from_the_repository_root():
    done = run_python_in_repo_root("from transformers import LlamaForCausalLM, Qwen2ForCausalLM; print('ok')")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_python_dash_m_triforce_chat_runs_from_the_repository_root():
    done = run_python_in_repo_root("import runpy, sys; sys.argv = ['triforce_chat', '--help']; "
                                   "runpy.run_module('triforce_chat', run_name='__main__')")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ask" in done.stdout


def test_no_folder_we_ship_is_named_like_a_dependency_it_sits_beside():
    """A script run by path from inside a folder puts that folder first on sys.path: a subfolder named
    like an installed package (kernels/triton did) would shadow it there."""
    from importlib.metadata import packages_distributions

    installed_top_levels = set(packages_distributions())
    ours = {p.name for folder in TOP_LEVEL_FOLDERS for p in (REPO / folder).iterdir() if p.is_dir()}
    ours |= {p.stem for folder in TOP_LEVEL_FOLDERS for p in (REPO / folder).glob("*.py")}
    assert not (ours & installed_top_levels) - {"__pycache__"}, ours & installed_top_levels


def test_our_top_level_folders_are_not_regular_packages():
    """The structural reason the tests above pass, stated once so a new `__init__.py` fails here first."""
    assert [name for name in TOP_LEVEL_FOLDERS if (REPO / name / "__init__.py").exists()] == []
