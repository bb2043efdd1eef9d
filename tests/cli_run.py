"""`triforce-chat ARGS` run inside the test process (models and monkeypatches shared), for the CLI's tests."""

from __future__ import annotations

import sys

import pytest

from triforce_chat.app.cli import main as cli


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run the CLI with `args` and no config file; its exit code (0 when it returned)."""
    monkeypatch.setattr(sys, "argv", ["triforce-chat", *args])
    monkeypatch.setenv("TRIFORCE_CHAT_CONFIG", "/nonexistent/config.toml")
    try:
        cli.main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (1 if exc.code else 0)
    return 0
