"""`triforce-chat cache ls | rm ID | clear`: what the document cache holds, and pruning it.

Torch-free (the store's files are read by decoding/store/docstore.py), so these commands answer at once.
Errors are one line and exit code 2, like every other command (`fail` here does what app/cli/main.py's
does, without importing it: cli.py registers this sub-app).
"""

from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

cache_app = typer.Typer(
    add_completion=False,
    help="The document cache: prefilled documents saved for next time (ls, rm, clear).",
)


@cache_app.callback(invoke_without_command=True)
def _overview(ctx: typer.Context) -> None:
    """`triforce-chat cache` alone prints its commands."""
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Settings file (TOML).")]
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def fail(message: str) -> None:
    """One line on stderr and exit code 2, as every command of the CLI does."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


def _store(config: Path | None):
    from triforce_chat.app.settings import SettingsError, load_settings
    from triforce_chat.decoding.store.docstore import DocumentStore

    try:
        settings = load_settings(config)
    except SettingsError as exc:
        fail(str(exc))
    return DocumentStore.from_gb(settings.cache_max_gb)


@contextmanager
def _reading(store):
    """A store that cannot be read or written ends in one line and exit code 2."""
    try:
        yield
    except OSError as exc:
        fail(f"document cache {printable(str(store.root))}: {exc.strerror or exc}")


def printable(text: str) -> str:
    """User data (file names) without terminal control characters."""
    return _CONTROL.sub("?", text)


def size_text(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _row(e) -> dict[str, Any]:
    return {
        "id": e.id,
        "documents": [printable(d) for d in e.documents],
        "tokens": e.tokens,
        "saved_tokens": e.saved_tokens,
        "complete": e.complete,
        "model": printable(e.model),
        "dtype": e.dtype,
        "kv_dtype": e.kv_dtype,
        "size_bytes": e.size_bytes,
        "last_used": e.last_used,
    }


@cache_app.command("ls")
def ls(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    config: ConfigOpt = None,
) -> None:
    """List saved documents: id, tokens saved, size, last use, model, documents."""
    store = _store(config)
    with _reading(store):
        entries, damaged = store.entries()
        usage = store.usage()
    if json_out:
        print(json.dumps({"root": str(store.root), "max_bytes": store.max_bytes, "used_bytes": usage,
                          "entries": [_row(e) for e in entries], "damaged_manifests": len(damaged)}))
        return
    if not entries:
        print(f"the document cache is empty ({printable(str(store.root))})")
        return
    rows = [("ID", "TOKENS", "SIZE", "LAST USED", "MODEL", "DOCUMENTS")]
    for e in entries:
        tokens = f"{e.tokens:,}" if e.complete else f"{e.saved_tokens:,} of {e.tokens:,} (partial)"
        rows.append((e.id, tokens, size_text(e.size_bytes), _when(e.last_used), printable(e.model),
                     printable(", ".join(e.documents)) or "(no documents)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    line = (f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {size_text(usage)} of "
            f"{size_text(store.max_bytes)} (cache.max_gb) in {printable(str(store.root))}")
    if damaged:
        line += f"; {len(damaged)} damaged manifest file(s) ignored"
    print(line)


@cache_app.command("rm")
def rm(
    ids: Annotated[list[str], typer.Argument(help="Entry ids (or unique prefixes) from `cache ls`.")],
    config: ConfigOpt = None,
) -> None:
    """Remove saved documents (chunks another entry still uses are kept)."""
    store = _store(config)
    found = []
    for ref in ids:
        try:
            with _reading(store):
                found.append(store.find(ref))
        except KeyError:
            fail(f"no document cache entry matches {printable(ref)!r} (see `triforce-chat cache ls`)")
        except ValueError as exc:
            fail(f"{printable(ref)!r} matches several entries ({exc}); give more of the id")
    for entry in found:
        with _reading(store):
            freed = store.remove(entry)
        docs = printable(", ".join(entry.documents)) or "no documents"
        print(f"removed {entry.id} ({docs}; {size_text(freed)} freed)")


@cache_app.command("clear")
def clear(config: ConfigOpt = None) -> None:
    """Remove everything the document cache holds."""
    store = _store(config)
    with _reading(store):
        n, freed = store.clear()
    if n == 0 and freed == 0:
        print(f"the document cache is already empty ({printable(str(store.root))})")
        return
    print(f"removed {n} entr{'y' if n == 1 else 'ies'} ({size_text(freed)}) from {printable(str(store.root))}")
