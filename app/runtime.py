"""The one way in: settings -> a loaded model -> a Session, for the TUI, `ask`, the benchmarks and tests.

Everything that turns settings into running objects happens here, once: the thread count, the device
and the weights' dtype, the memory guard, the model (catalogue name, .gguf file or folder), the
model's own sampling defaults, the document cache and the draft model. Front ends only map
`StartupError` (one line for the user) to their own way of showing it: exit code 2 in the CLI, an
error notice in the chat UI.
"""

from __future__ import annotations

import gc
import os
import select
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

if TYPE_CHECKING:
    from triforce_chat.app.settings import Settings
    from triforce_chat.decoding.models.loading import LoadedModel
    from triforce_chat.decoding.session import Session
    from triforce_chat.decoding.store.docstore import DocumentStore

Log = Callable[[str], None]


class StartupError(ValueError):
    """The settings cannot give a running session (no such model, no CUDA, not enough memory, a bad
    draft model, ...); the message is one line for the user."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# -- documents --------------------------------------------------------------------------------------------
SNIFF_BYTES = 8192  # a NUL in a document's first bytes: a binary file
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024  # ~500 times what a 32K-token context holds; --truncate keeps head and tail
FIFO_WAIT_S = 30.0  # how long a named pipe may go without anything writing to it
FIFO_NOTICE_S = 1.0  # when the wait is said out loud


class DocumentText(NamedTuple):
    """A document the command line has read already, for the chat to load: a pipe (`--doc <(cmd)`)
    gives its text once, so the chat must not read the path again."""

    path: Path
    text: str

    @property
    def name(self) -> str:
        return document_name(self.path)


class _PipeReader:
    """A pipe (named, or a shell's `<(cmd)`), read without ever blocking, so that every wait on it can
    be said, bounded or called off.

    Opening a named pipe blocks until something opens it for writing, which may be never (`mkfifo
    p; triforce-chat --doc p`), and reading one blocks while its writer is silent. So it is opened
    without blocking and watched: a read that says "try again" means a writer is there (then the
    wait lasts as long as it writes, as `cat`'s would: `--doc <(slow_command)`), and end of file
    before any writer means none has come yet: refused after FIFO_WAIT_S. `should_cancel` (the
    chat's esc) ends either wait at once."""

    def __init__(self, path: Path, warn: Log, should_cancel: Callable[[], bool] | None) -> None:
        self.path, self.warn, self.should_cancel = path, warn, should_cancel
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.writer_seen = self.ended = self.said = False
        self.start = time.monotonic()

    def __enter__(self) -> _PipeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def read(self, n: int) -> bytes:
        """Up to n bytes, fewer only at the end."""
        from triforce_chat.decoding.session import DocumentError

        chunks, got = [], 0
        while got < n and not self.ended:
            if self.should_cancel is not None and self.should_cancel():
                what = "reading it" if self.writer_seen else "waiting for something to write to it"
                raise DocumentError(f"{self.path}: stopped {what}")
            ready = bool(self.poller.poll(100))  # data, or a writer that came and went
            try:
                chunk = os.read(self.fd, min(n - got, 1 << 20))
            except BlockingIOError:  # a writer is there, with nothing (more) written yet
                self.writer_seen = True
                continue
            if chunk:
                self.writer_seen = True
                chunks.append(chunk)
                got += len(chunk)
            elif ready or self.writer_seen:  # end of file: the writer closed it
                self.ended = True
            else:  # end of file with no writer yet: nothing has opened the pipe for writing
                self._no_writer_yet()
        return b"".join(chunks)

    def _no_writer_yet(self) -> None:
        from triforce_chat.decoding.session import DocumentError

        waited = time.monotonic() - self.start
        if waited > FIFO_WAIT_S:
            raise DocumentError(f"{self.path}: a named pipe that nothing writes to (waited {FIFO_WAIT_S:.0f} s)")
        if waited > FIFO_NOTICE_S and not self.said:
            self.warn(f"waiting for something to write to {self.path} (up to {FIFO_WAIT_S:.0f} s)")
            self.said = True


def _open_for_reading(path: Path, warn: Log, should_cancel: Callable[[], bool] | None) -> BinaryIO | _PipeReader:
    """The document open for reading: a pipe through _PipeReader (where the OS has non-blocking
    pipes and poll: not Windows, whose pipes are read as files), anything else as a file."""
    if stat.S_ISFIFO(path.stat().st_mode) and hasattr(select, "poll") and hasattr(os, "O_NONBLOCK"):
        return _PipeReader(path, warn, should_cancel)
    return path.open("rb")


def read_document(
    path: Path, warn: Log = _stderr, should_cancel: Callable[[], bool] | None = None
) -> tuple[str, str]:
    """(name, text) of a text file, or a DocumentError naming what is wrong with it. Any path a shell
    hands over works: a pipe (`--doc <(cmd)`) is read once, as a file is; a named pipe that nothing
    writes to is refused after a wait (FIFO_WAIT_S, or when `should_cancel` says so); a device or a
    pipe that never ends (/dev/zero, `yes |`) stops at its first bytes (binary) or at
    MAX_DOCUMENT_BYTES, so reading never fills the memory."""
    from triforce_chat.decoding.session import DocumentError

    if not path.exists():
        raise DocumentError(f"{path}: no such file")
    if path.is_dir():
        raise DocumentError(f"{path}: is a directory, not a text file")
    try:
        with _open_for_reading(path, warn, should_cancel) as f:
            data = f.read(SNIFF_BYTES)
            if kind := _not_text(data):
                raise DocumentError(f"{path}: {kind}")
            data += f.read(MAX_DOCUMENT_BYTES + 1 - len(data))
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentError(
            f"{path}: over {MAX_DOCUMENT_BYTES >> 20} MiB, far more than a model's context holds; cut it first"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        warn(
            f"warning: {path} is not valid UTF-8 (first bad byte at offset {exc.start}); "
            "undecodable bytes were replaced with U+FFFD"
        )
    nuls = text.count("\x00")
    if nuls:  # past the first 8 KiB (else it was called binary above): shown like undecodable bytes
        text = text.replace("\x00", "\ufffd")
        warn(f"warning: {path} contains {nuls} NUL byte{'s' if nuls > 1 else ''}; replaced with U+FFFD")
    if not text.strip():
        raise DocumentError(f"{path}: the document is empty")
    return document_name(path), text


def _not_text(head: bytes) -> str:
    """Why a file whose first bytes are `head` is not a text document ('' when it may be one), with the
    way to its text for the formats people mean to ask about (a PDF need not have a NUL early on, and
    would be read as text: its markup)."""
    if head.startswith(b"%PDF-"):
        return "is a PDF, not text; give its text instead, e.g. --doc <(pdftotext FILE -)"
    if head.startswith(b"PK\x03\x04"):
        return ("is a zip archive (.docx, .epub, .odt ...), not text; give its text instead, "
                "e.g. --doc <(pandoc FILE -t plain)")
    if b"\x00" in head:
        return "looks like a binary file, not text"
    return ""


def document_name(path: Path) -> str:
    """The name a document goes by (in the prompt, the panels and the sources): the file's name, but
    "pipe 63" for a shell's `<(cmd)` (/dev/fd/63: "63" told neither the user nor the model what it
    was) and "stdin" for standard input."""
    in_fd_dir = path.parent in (Path("/dev/fd"), Path("/proc/self/fd")) or (
        path.parent.name == "fd" and path.parent.parent.parent == Path("/proc"))
    if str(path) == "/dev/stdin" or (in_fd_dir and path.name == "0"):
        return "stdin"
    return f"pipe {path.name}" if in_fd_dir else path.name


# -- the machine ------------------------------------------------------------------------------------------
def apply_threads(settings: Settings) -> None:
    """torch's thread count from the settings (None: torch's own default, every core)."""
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)


def resolve_device(settings: Settings) -> str:
    """"cpu" or "cuda" for the settings' device ("auto": CUDA when there is one)."""
    import torch

    if settings.device not in ("auto", "cpu", "cuda"):
        raise StartupError(f"unknown device {settings.device!r} (choose auto, cpu, cuda)")
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise StartupError("--device cuda: no CUDA device is available")
    return settings.device


def store_for(settings: Settings, root: Path | str | None = None) -> DocumentStore | None:
    """The settings' document store, or None when `[cache] enabled = false` / --no-doc-cache."""
    if not settings.doc_cache:
        return None
    from triforce_chat.decoding.store.docstore import DocumentStore

    return DocumentStore.from_gb(settings.cache_max_gb, root)


# -- the model and the session ----------------------------------------------------------------------------
def open_model(settings: Settings, log: Log | None = None) -> LoadedModel:
    """Load the settings' model after the memory guard agreed that it and its context fit.
    `log` gets progress lines (None: the loader's own, on stderr)."""
    from triforce_chat.decoding.memory.guard import MemoryShortage, check_before_load
    from triforce_chat.decoding.models.loading import ModelLoadError, load_model

    apply_threads(settings)
    device = resolve_device(settings)
    release_frozen()  # a model an earlier call froze and its caller dropped: freed before the memory check
    try:
        check_before_load(settings.model, dtype=settings.torch_dtype(), device=device, context=settings.context,
                          config=settings.decode_config(), kv_dtype=settings.torch_kv_dtype())
        lm = load_model(settings.model, dtype=settings.torch_dtype(), device=device, context=settings.context,
                        log=log, kv_dtype=settings.torch_kv_dtype())
    except (MemoryShortage, ModelLoadError) as exc:
        raise StartupError(str(exc)) from None
    cores = usable_cores()
    if settings.threads is not None and settings.threads > cores and device == "cpu":
        lm.notices.append(f"{settings.threads} threads on {cores} cores: more threads than cores slow every step "
                          "down (they wait on each other); leave --threads out to use every core")
    settle_heap()
    return lm


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: `taskset`, a container's cpuset; a CPU
    quota such as `docker --cpus` is not seen)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def release_frozen() -> None:
    """Give what `settle_heap` froze back to the collector, and collect: a model that an earlier
    `open_model` froze and its caller has dropped (bench-qa's models, one after another) is freed
    here, before the next one's memory check and load, not after them."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()


def settle_heap() -> None:
    """Take every object alive now (the imported libraries, the loaded model) out of the cyclic
    garbage collector's full passes.

    Why: with torch, transformers and Textual imported, a full pass walks ~240K objects, 130 ms with
    the GIL held on a Zen 4 core, and it comes whenever enough young objects have survived: a decode
    that meets one stalls that long (9 full passes in a run of six 128-token answers of
    app/bench/tui.py). Frozen objects are still freed by reference counting; a cycle among them (a
    model dropped for the next one, as bench-qa does) waits for `release_frozen`, which the next
    `open_model` calls first. What is garbage already is collected first, not frozen."""
    gc.collect()
    gc.freeze()


_FROM_SETTINGS = object()


def open_session(
    settings: Settings, lm: LoadedModel | None = None, log: Log | None = None, store=_FROM_SETTINGS,
) -> Session:
    """A Session for the settings: the model loaded (or `lm`, already loaded, shared between sessions),
    sampling defaults taken from the model where the settings did not give them, the document cache
    (`store`: the settings' own unless given, None for none), and at level 2 a draft model loaded now,
    so that a bad `--draft` fails here rather than after a long prefill."""
    from triforce_chat.decoding.drafters import DrafterError
    from triforce_chat.decoding.memory.guard import MemoryShortage
    from triforce_chat.decoding.models.loading import ModelLoadError
    from triforce_chat.decoding.session import Session

    if lm is None:
        lm = open_model(settings, log)
    else:
        apply_threads(settings)
    cfg = settings.with_model_defaults(lm.generation_defaults).decode_config()
    session = Session(lm, cfg, store=store_for(settings) if store is _FROM_SETTINGS else store)
    if cfg.level == 2:
        try:
            session.drafter  # noqa: B018 - loads a draft model now
        except (DrafterError, ModelLoadError, MemoryShortage) as exc:
            raise StartupError(str(exc)) from None
    return session
