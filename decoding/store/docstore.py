"""The document cache on disk: where it lives, its file format, its entries and its size cap.

Torch-free on purpose: `triforce-chat cache ls/rm/clear` read and prune the store in a blink,
without loading torch. The tensors themselves are written and read by `decoding/store/doccache.py`.

Layout (under `TRIFORCE_KV_CACHE_DIR`, else `<cache root>/kv`):

    chunks/ab/ab12….kv   the keys/values of `chunk_tokens` consecutive tokens, content-addressed:
                         the name is a hash chain over (model fingerprint, every token id up to
                         the chunk's end), so equal names mean equal bytes; a document set's
                         tail (its last tokens and last query) is a file of the same kind
    entries/<id>.json    one manifest per prefilled token sequence (a document set): its documents,
                         model, token count and the names of its chunks, plus when it was last used

Why chunks rather than one file per document set: a new set that starts like a saved one (the same
first document, another added after it) finds the shared chunks by name and prefills only the rest;
a prefill writes each chunk as it passes the chunk's end, so a prefill that is cancelled or killed
leaves complete chunks and the next start resumes after the last one; no separate checkpoint
format is needed.

Every chunk file: a fixed 24-byte prefix (magic, format version, header length, CRC-32 of the
header), a JSON header (key, fingerprint, token range, tensor names/dtypes/shapes, payload size and
CRC-32), zero padding to 4096 bytes (so the payload can be mapped and viewed in any dtype), then
the payload. Files are written to a temporary name in the same directory, flushed, fsync'ed and
renamed (then the directory is fsync'ed): a reader, or a kill -9 at any moment, sees the old file
or the new one, never a part. Anything that fails a check (empty, truncated, foreign, another
format version, another key, a checksum) is reported as `DamagedFile` and removed by the caller.

Space: `max_bytes` caps the chunks' total size. Before a chunk is written, the store evicts chunks
no manifest refers to, then whole entries in least-recently-used order (an entry is used when it
is restored or saved); chunks still referred to by another entry stay.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MAGIC = b"TFKVDOC\n"
_PREFIX = struct.Struct("<8sIII4x")  # magic, version, header length, header crc32 (24 bytes)
DATA_OFFSET = 4096  # the payload starts here: page-aligned for mapping, aligned for any dtype view
DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_MAX_GB = 8.0
TEMP_PREFIX = ".tmp-"
STALE_TEMP_S = 3600.0  # temporary files older than this are left-overs of a killed writer
_KEY = re.compile(r"^[0-9a-f]{16,64}$")


class DamagedFile(ValueError):
    """A cache file that must not be used; the message says why in a few words."""


def default_root() -> Path:
    """`TRIFORCE_KV_CACHE_DIR`, else `kv` under the app's cache root (the rule of
    `decoding.models.loading.cache_root`, repeated here so that this module needs no torch)."""
    env = os.environ.get("TRIFORCE_KV_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("TRIFORCE_CHAT_CACHE")
    if not base:
        from platformdirs import user_cache_dir

        base = user_cache_dir("triforce-chat")
    return Path(base) / "kv"


# -- atomic files ----------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write `path` through `write(file)` so that readers see the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


# -- chunk files -----------------------------------------------------------------------------------------
def write_chunk_file(path: Path, header: dict[str, Any], blocks: Iterable[Any]) -> int:
    """Write a chunk: `blocks` (buffers, in order) are the payload. Returns the file size."""

    def write(f) -> None:
        f.seek(DATA_OFFSET)
        crc, size = 0, 0
        for block in blocks:
            view = memoryview(block).cast("B")
            crc = zlib.crc32(view, crc)
            size += len(view)
            f.write(view)
        full = dict(header, payload_bytes=size, payload_crc32=crc)
        text = json.dumps(full, sort_keys=True, separators=(",", ":")).encode()
        if _PREFIX.size + len(text) > DATA_OFFSET:
            raise ValueError("chunk header too long")
        f.seek(0)
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(text), zlib.crc32(text)))
        f.write(text)
        f.write(b"\0" * (DATA_OFFSET - _PREFIX.size - len(text)))

    atomic_write(path, write)
    return path.stat().st_size


def read_chunk_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, file size) of a chunk file, checked for everything but the payload's checksum
    (see `payload_crc32`). Raises DamagedFile, or FileNotFoundError when it is gone."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise DamagedFile("empty file")
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise DamagedFile(f"truncated file ({size} bytes)")
        magic, version, length, crc = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise DamagedFile("not a document-cache file")
        if version != FORMAT_VERSION:
            raise DamagedFile(f"format version {version} (this version reads {FORMAT_VERSION})")
        if _PREFIX.size + length > DATA_OFFSET:
            raise DamagedFile("damaged header")
        text = f.read(length)
    if len(text) != length:
        raise DamagedFile(f"truncated file ({size} bytes)")
    if zlib.crc32(text) != crc:
        raise DamagedFile("header checksum mismatch")
    try:
        header = json.loads(text)
        expected = DATA_OFFSET + int(header["payload_bytes"])
        int(header["payload_crc32"])
    except (ValueError, KeyError, TypeError):
        raise DamagedFile("damaged header") from None
    if size != expected:
        raise DamagedFile(f"truncated file ({size:,} of {expected:,} bytes)" if size < expected
                          else f"file too long ({size:,} bytes, expected {expected:,})")
    return header, size


def payload_crc32(buffer: Any) -> int:
    return zlib.crc32(memoryview(buffer).cast("B"))


# -- entries -------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """A manifest: one prefilled token sequence (usually a document set) and its chunks."""

    id: str
    model: str
    documents: list[str]
    tokens: int  # tokens of the sequence (the cache length after its prefill)
    chunk_tokens: int
    chunks: list[str]  # the names of all its complete chunks, in order (some may not be saved yet)
    tail: str = ""  # the file of the tokens after the last complete chunk (+ the last query)
    dtype: str = ""  # weights
    kv_dtype: str = ""
    fingerprint: str = ""
    created: float = 0.0
    last_used: float = 0.0
    # filled in by the store when listing, not saved
    saved_chunks: int = field(default=0, compare=False)
    tail_saved: bool = field(default=False, compare=False)
    size_bytes: int = field(default=0, compare=False)

    @property
    def files(self) -> list[str]:
        return [*self.chunks, self.tail] if self.tail else list(self.chunks)

    @property
    def complete(self) -> bool:
        """Everything saved: a restore computes nothing."""
        return self.saved_chunks == len(self.chunks) and (self.tail_saved or not self.tail)

    @property
    def saved_tokens(self) -> int:
        """Tokens a restore gets back: the saved chunks from the first one on, up to a gap."""
        return self.tokens if self.complete else self.saved_chunks * self.chunk_tokens

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["saved_chunks"], data["size_bytes"], data["tail_saved"]
        data["format"] = FORMAT_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        if data.get("format") != FORMAT_VERSION:
            raise DamagedFile(f"format version {data.get('format')}")
        try:
            entry = cls(
                id=str(data["id"]), model=str(data["model"]), documents=[str(d) for d in data["documents"]],
                tokens=int(data["tokens"]), chunk_tokens=int(data["chunk_tokens"]),
                chunks=[str(c) for c in data["chunks"]], tail=str(data.get("tail", "")),
                dtype=str(data.get("dtype", "")),
                kv_dtype=str(data.get("kv_dtype", "")), fingerprint=str(data.get("fingerprint", "")),
                created=float(data.get("created", 0.0)), last_used=float(data.get("last_used", 0.0)),
            )
        except (KeyError, TypeError, ValueError):
            raise DamagedFile("damaged manifest") from None
        if not _KEY.match(entry.id) or not all(_KEY.match(c) for c in entry.files):
            raise DamagedFile("damaged manifest")
        return entry


# -- the store ---------------------------------------------------------------------------------------------
class DocumentStore:
    """Chunk files and manifests under `root`, at most `max_bytes` of chunks (see module docstring)."""

    def __init__(
        self, root: Path | str | None = None, max_bytes: int | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS, clock: Callable[[], float] = time.time,
    ):
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        self.root = Path(root) if root is not None else default_root()
        self.max_bytes = int(max_bytes if max_bytes is not None else DEFAULT_MAX_GB * 2**30)
        self.chunk_tokens = chunk_tokens
        self.clock = clock

    @classmethod
    def from_gb(cls, max_gb: float, root: Path | str | None = None, **kwargs: Any) -> DocumentStore:
        return cls(root, int(max_gb * 2**30), **kwargs)

    @property
    def chunks_dir(self) -> Path:
        return self.root / "chunks"

    @property
    def entries_dir(self) -> Path:
        return self.root / "entries"

    # -- chunks --------------------------------------------------------------------------------------
    def chunk_path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a chunk key: {key!r}")
        return self.chunks_dir / key[:2] / f"{key}.kv"

    def has_chunk(self, key: str) -> bool:
        return self.chunk_path(key).is_file()

    def discard_chunk(self, key: str) -> None:
        try:
            self.chunk_path(key).unlink()
        except OSError:
            pass

    def _chunk_files(self) -> dict[str, os.stat_result]:
        """Every chunk file by key (temporary files of killed writers are removed on the way)."""
        out: dict[str, os.stat_result] = {}
        if not self.chunks_dir.is_dir():
            return out
        now = self.clock()
        for sub in self.chunks_dir.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                try:
                    st = f.stat()
                except OSError:
                    continue
                if f.name.startswith(TEMP_PREFIX):
                    if now - st.st_mtime > STALE_TEMP_S:
                        _unlink(f)
                    continue
                if f.suffix == ".kv" and _KEY.match(f.stem):
                    out[f.stem] = st
        return out

    def usage(self) -> int:
        """Bytes of all chunk files."""
        return sum(st.st_size for st in self._chunk_files().values())

    # -- entries -------------------------------------------------------------------------------------
    def entry_path(self, entry_id: str) -> Path:
        return self.entries_dir / f"{entry_id}.json"

    def load_entry(self, entry_id: str) -> Entry | None:
        try:
            return Entry.from_json(json.loads(self.entry_path(entry_id).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None

    def put_entry(self, entry: Entry) -> None:
        data = json.dumps(entry.to_json(), indent=1).encode()
        atomic_write(self.entry_path(entry.id), lambda f: f.write(data))

    def touch_entry(self, entry: Entry) -> Entry:
        """Create the manifest or mark it used now (keeping its creation time)."""
        now = self.clock()
        old = self.load_entry(entry.id)
        entry.created = old.created if old is not None else now
        entry.last_used = now
        self.put_entry(entry)
        return entry

    def entries(self) -> tuple[list[Entry], list[Path]]:
        """(manifests, most recently used first, with their saved chunks and sizes; damaged manifest files)."""
        files = self._chunk_files()
        good: list[Entry] = []
        damaged: list[Path] = []
        if self.entries_dir.is_dir():
            for path in sorted(self.entries_dir.glob("*.json")):
                try:
                    entry = Entry.from_json(json.loads(path.read_text(encoding="utf-8")))
                    if entry.id != path.stem:
                        raise DamagedFile("manifest under another name")
                except (OSError, ValueError):
                    damaged.append(path)
                    continue
                n = 0
                while n < len(entry.chunks) and entry.chunks[n] in files:
                    n += 1
                entry.saved_chunks = n
                entry.tail_saved = bool(entry.tail) and entry.tail in files
                entry.size_bytes = sum(files[c].st_size for c in set(entry.files) if c in files)
                good.append(entry)
        good.sort(key=lambda e: (-e.last_used, e.id))
        return good, damaged

    def find(self, prefix: str) -> Entry:
        """The entry whose id starts with `prefix`; KeyError (none) or ValueError (several)."""
        prefix = prefix.strip().lower()
        matches = [e for e in self.entries()[0] if prefix and e.id.startswith(prefix)]
        if not matches:
            raise KeyError(prefix)
        if len(matches) > 1:
            raise ValueError(", ".join(e.id for e in matches))
        return matches[0]

    def remove(self, entry: Entry) -> int:
        """Delete a manifest and the chunks no other manifest refers to; returns the bytes freed."""
        _unlink(self.entry_path(entry.id))
        others = {c for e in self.entries()[0] for c in e.files}
        files = self._chunk_files()
        freed = 0
        for key in set(entry.files) - others:
            if key in files and _unlink(self.chunk_path(key)):
                freed += files[key].st_size
        return freed

    def clear(self) -> tuple[int, int]:
        """Delete everything; returns (entries, bytes) removed."""
        entries, damaged = self.entries()
        files = self._chunk_files()
        freed = 0
        for key, st in files.items():
            if _unlink(self.chunk_path(key)):
                freed += st.st_size
        for path in [*(self.entry_path(e.id) for e in entries), *damaged]:
            _unlink(path)
        for d in (self.chunks_dir, self.entries_dir):
            if d.is_dir():
                for f in d.rglob(f"{TEMP_PREFIX}*"):
                    _unlink(f)
        return len(entries), freed

    # -- the cap ---------------------------------------------------------------------------------------
    def reserve(self, need: int, protect: str | None = None) -> bool:
        """Make room for `need` more bytes of chunks under the cap: first chunks no manifest refers
        to (oldest first), then entries least recently used first, never `protect` (the entry being
        saved). False when even that is not enough."""
        files = self._chunk_files()
        usage = sum(st.st_size for st in files.values())
        if usage + need <= self.max_bytes:
            return True
        entries, damaged = self.entries()
        for path in damaged:
            _unlink(path)
        keep = next((set(e.files) for e in entries if e.id == protect), set())
        referenced = {c for e in entries for c in e.files} | keep
        for key in sorted(set(files) - referenced, key=lambda k: files[k].st_mtime):
            if usage + need <= self.max_bytes:
                return True
            if _unlink(self.chunk_path(key)):
                usage -= files.pop(key).st_size
        for victim in sorted((e for e in entries if e.id != protect), key=lambda e: (e.last_used, e.id)):
            if usage + need <= self.max_bytes:
                return True
            _unlink(self.entry_path(victim.id))
            entries = [e for e in entries if e.id != victim.id]
            still = {c for e in entries for c in e.files} | keep
            for key in set(victim.files) - still:
                if key in files and _unlink(self.chunk_path(key)):
                    usage -= files.pop(key).st_size
        return usage + need <= self.max_bytes


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False


__all__ = [
    "DEFAULT_CHUNK_TOKENS", "DEFAULT_MAX_GB", "DamagedFile", "DocumentStore", "Entry", "FORMAT_VERSION",
    "atomic_write", "default_root", "payload_crc32", "read_chunk_header", "write_chunk_file",
]
