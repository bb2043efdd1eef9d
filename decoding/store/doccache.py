"""Save a prefill's keys/values and restore them instead of prefilling again (the torch side of the
document cache; the files, manifests and the size cap are in `decoding/store/docstore.py`).

What is stored: the full KV cache of the prompt tokens, in the cache's own dtype, in chunks of
`chunk_tokens` tokens named by a hash chain over (fingerprint, the token ids up to the chunk's end),
and, once a whole document set is prefilled, a *tail*: the tokens after its last complete chunk
plus `KVCache.last_query` (the query of its last token, what the retrieval level scores chunks
against), so that reopening exactly that set computes nothing. Only sessions with documents save.
What is not stored, because it is rebuilt exactly and cheaply:
- the retrieval level's chunk means (`kernels.retrieval.ChunkMeans`): they listen to the cache's
  appends, and a restore appends through the same `KVCache.advance` calls, in the same steps as a
  prefill, so they are recomputed from the restored keys exactly as after a prefill (an average of
  8 keys per chunk and layer: a small fraction of a restore);
- the lookup drafter's index and the draft model's StreamingLLM cache: both are built from the
  token ids, after a restore exactly as after a prefill. (The draft model runs over the documents'
  last window + slack tokens only, a few seconds: `ModelDrafter._skip_ahead`.)
- `KVCache.last_query` when there is no tail: the restore then stops at least one token short of
  the end, so the last prefill step sets it as it would have.

Exactness. A restored answer must be token-identical to one after a fresh prefill, so a restore
must give the same bits a fresh prefill gives. Prefill chunks use the fastest kernels, whose bits
depend on the rows in a chunk; a session therefore only saves tokens computed by *canonical* steps:
full `prefill_chunk`-token steps starting at multiples of `prefill_chunk`, from token 0 on (a fresh
prefill of a document set). The store's chunk size is a multiple of `prefill_chunk`, so a restore
ends at a step boundary and the prefill that continues from there takes the same steps a fresh
one would; the tail is the last (short) step of that same fresh prefill. The fingerprint keys
everything else that determines the bits (`model_fingerprint`).

Restoring maps each chunk file (`torch.from_file`, a private read-only mapping: no read into a
buffer first), checks its CRC-32 over the mapped payload, then makes the one copy into the
preallocated cache (`copy_`). Chunks are loaded by a few threads at once (zlib and torch release
the GIL), and a chunk that fails any check is deleted with a notice: the restore stops before it
and the prefill takes over from there.

Saving copies a completed chunk out of the cache (one memcpy) on the prefill thread and hands the
copy to one writer thread, which checks the size cap, writes, fsyncs and renames while the next
chunk is prefilled; the sync waits for the writer before it returns, so "saved" means on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from array import array
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from triforce_chat.decoding.store.docstore import (
    DATA_OFFSET,
    DamagedFile,
    DocumentStore,
    Entry,
    payload_crc32,
    read_chunk_header,
    write_chunk_file,
)

if TYPE_CHECKING:
    from triforce_chat.decoding.cache import KVCache
    from triforce_chat.decoding.models.loading import LoadedModel

MAX_LOAD_THREADS = 4
MAX_WRITES_IN_FLIGHT = 2  # chunk copies waiting for the writer (memory: this many chunks)


# -- what the bytes depend on ------------------------------------------------------------------------------
def weights_identity(lm: LoadedModel) -> dict[str, Any]:
    """Which weights: a known SHA-256 when the loader has one (`lm.weights_sha256`, e.g. a catalogue
    GGUF), else (resolved path, size, mtime) of each weights file. Hashing the files at every start
    would cost 0.3-2 s (0.3-1 GB at ~1 GB/s), more than the restore it guards; a file replaced by a
    conversion or a download gets a new mtime and size. Not caught: a different file copied over
    it with its mtime forged (`touch -r`); `cache clear` is the remedy."""
    sha = getattr(lm, "weights_sha256", None)
    if sha:
        return {"sha256": str(sha)}
    path = Path(lm.path).resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin", ".pt") and p.is_file()
    )
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return {"files": out}


def _config_digest(model) -> str:
    cfg = getattr(getattr(model, "args", None), "hf_config", None)
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _rope_digest(model) -> str:
    """The RoPE tables themselves (a few MB): every rope/context setting (theta, YaRN factor,
    positions) is in them, however the loader derived them."""
    h = hashlib.sha256()
    for name in ("rope_cos", "rope_sin"):
        t = getattr(model, name, None)
        if isinstance(t, Tensor):
            h.update(t.detach().float().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def compute_identity(model) -> dict[str, Any]:
    """What decides the prefill's rounding besides the weights: the kernels' path and build, and
    where a prefill chunk goes through a vendor GEMM (which splits its sums by thread count, and
    other builds of torch may pick other kernels), the thread count and torch's CPU capability: a
    cache made under other settings could differ in the last bits (and a near-tie in the answer
    could flip). A model whose every operation is a native kernel at any length
    (`thread_invariant`: the int8 mode) computes the same bits at any thread count, so a document
    cached with 2 threads is restored with 1."""
    device = model.device
    # the kernels' path and build (native ISA + source hash, or torch's own) fix the decode bits
    numerics = getattr(model, "numerics", "")
    out: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "numerics": numerics}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    else:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if not getattr(model, "thread_invariant", False):
            out["threads"] = torch.get_num_threads()
    return out


@dataclass(frozen=True)
class Fingerprint:
    digest: bytes
    parts: dict[str, Any]

    @property
    def hex(self) -> str:
        return self.digest.hex()


def model_fingerprint(lm: LoadedModel, cache: KVCache, *, prefill_chunk: int, chunk_tokens: int) -> Fingerprint:
    """Everything that determines the bytes of a token's keys/values besides the token ids before
    it: the weights, their dtype/mode, the KV layout and dtype, the positions and RoPE, how the
    prefill computes them (`compute_identity`, the prefill step) and the chunking of the store."""
    model = lm.model
    parts = {
        "weights": weights_identity(lm),
        "weight_dtype": str(model.dtype),
        "weight_mode": str(getattr(model, "weights_label", "dense")),
        "config": _config_digest(model),
        "max_len": int(getattr(model, "max_len", 0)),
        "rope": _rope_digest(model),
        "kv": [[name, str(t.dtype), list(t.shape[:2]), int(t.shape[-1])] for name, t in chunk_views(cache, 0, 0)],
        "compute": compute_identity(model),
        "prefill_chunk": prefill_chunk,
        "chunk_tokens": chunk_tokens,
    }
    digest = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).digest()
    return Fingerprint(digest, parts)


def chunk_views(cache: KVCache, start: int, end: int) -> list[tuple[str, Tensor]]:
    """The per-token tensors of the cache for tokens [start, end), by name: what a chunk stores.
    The one place to extend if the cache gains other per-token state (e.g. quantization scales)."""
    return [("k", cache.k[:, :, start:end]), ("v", cache.v[:, :, start:end])]


def chain_keys(fp: Fingerprint, ids: Sequence[int], chunk_tokens: int) -> list[str]:
    """The name of every complete chunk of `ids`: key[j] hashes (fingerprint, ids[: (j+1) * C])."""
    out: list[str] = []
    h = fp.digest
    for j in range(len(ids) // chunk_tokens):
        part = array("i", ids[j * chunk_tokens : (j + 1) * chunk_tokens]).tobytes()
        h = hashlib.blake2b(h + part, digest_size=20).digest()
        out.append(h.hex())
    return out


def tail_key(fp: Fingerprint, keys: list[str], ids: Sequence[int], chunk_tokens: int) -> str:
    """The name of the tail: the tokens after the last complete chunk, saved with the last query
    when a whole sequence was prefilled (so that a restore of exactly that sequence computes nothing)."""
    prev = bytes.fromhex(keys[-1]) if keys else fp.digest
    rest = array("i", ids[len(keys) * chunk_tokens :]).tobytes()
    return hashlib.blake2b(prev + b"tail" + rest, digest_size=20).hexdigest()


def entry_id(fp: Fingerprint, ids: Sequence[int]) -> str:
    return hashlib.blake2b(fp.digest + array("i", ids).tobytes(), digest_size=8).hexdigest()


# -- what one sync did ----------------------------------------------------------------------------------
@dataclass
class SyncReport:
    """How the cache was brought up to date with a prompt: what the UI, `ask --json` and the
    benchmark show. `restored + computed` tokens were added after the `kept` ones."""

    target: int = 0  # tokens the cache holds when the sync is done
    kept: int = 0  # tokens that were already there (the common prefix)
    restored: int = 0  # tokens read from the document cache
    computed: int = 0  # tokens prefilled by the model
    seconds: float = 0.0  # wall time of the whole sync
    restore_s: float = 0.0
    saved: int = 0  # tokens written to the document cache
    save_s: float = 0.0  # time the prefill thread spent on saving (copies, waiting for the writer)
    write_s: float = 0.0  # the writer thread's time (overlaps the prefill)
    saving: bool = False  # a document cache is attached and accepting writes
    notices: list[str] = field(default_factory=list)

    @property
    def resumed(self) -> bool:
        """Part restored, a real part prefilled: a resumed or prefix-shared prefill."""
        return self.restored > 0 and self.computed > 0


def format_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


def describe(report: SyncReport) -> str:
    """One line for the Documents panel: "restored 29,009 tokens in 0.4 s", "prefilled 29,009
    tokens in 3 min (saved for next time)", ..."""
    secs = format_duration(report.seconds)
    saved = " (saved for next time)" if report.saved else ""
    if report.restored and report.computed:
        return (f"restored {report.restored:,} + prefilled {report.computed:,} tokens in {secs}{saved}")
    if report.restored:
        return f"restored {report.restored:,} tokens in {secs}"
    if report.computed:
        return f"prefilled {report.computed:,} tokens in {secs}{saved}"
    return ""


def resuming_line(report: SyncReport) -> str:
    return f"resuming at {report.kept + report.restored:,} of {report.target:,} tokens"


# -- one session's use of the store -------------------------------------------------------------------------
class DocCache:
    """Restores and checkpoints one Session's KV cache (see module docstring).

    Session calls: `begin(ids, target, documents, report)` once per sync, `restore()` after the
    cache was cut to the common prefix, `prefilled(start, end)` after every prefill step, `finish()`
    at the end (also after a cancel). It listens to the cache to know how far its content is
    canonical.
    """

    def __init__(self, store: DocumentStore, lm: LoadedModel, cache: KVCache, prefill_chunk: int,
                 model_name: str | None = None):
        self.store, self.lm, self.cache = store, lm, cache
        self.step = prefill_chunk
        self.chunk_tokens = -(-store.chunk_tokens // prefill_chunk) * prefill_chunk
        self.fp = model_fingerprint(lm, cache, prefill_chunk=prefill_chunk, chunk_tokens=self.chunk_tokens)
        self.model_name = model_name or lm.model_id
        self.canonical_end = 0  # tokens [0, canonical_end) came from canonical steps of this binding
        self.saving = True
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, int, Future]] = []
        self._ids: list[int] = []
        self._keys: list[str] = []
        self._tail_key = ""
        self._entry: Entry | None = None
        self._entry_written = False
        self._next_save = 0
        self._keep = False
        self._report = SyncReport()
        cache.listeners.append(self)

    # -- cache listener --------------------------------------------------------------------------------
    def on_append(self, cache, start: int, end: int) -> None:
        pass

    def on_truncate(self, cache, length: int) -> None:
        self.canonical_end = min(self.canonical_end, length)

    # -- one sync ----------------------------------------------------------------------------------------
    def begin(self, ids: Sequence[int], target: int, documents: list[str], report: SyncReport) -> None:
        self._ids = list(ids[:target])
        self._keys = chain_keys(self.fp, self._ids, self.chunk_tokens)
        self._tail_key = tail_key(self.fp, self._keys, self._ids, self.chunk_tokens)
        self._report = report
        self._keep = bool(documents)  # a chat without documents is not worth keeping
        report.saving = self.saving and self._keep
        self._entry = Entry(
            id=entry_id(self.fp, self._ids), model=self.model_name, documents=list(documents), tokens=target,
            chunk_tokens=self.chunk_tokens, chunks=list(self._keys), tail=self._tail_key,
            dtype=str(self.lm.model.dtype).removeprefix("torch."),
            kv_dtype=str(self.cache.k.dtype).removeprefix("torch."), fingerprint=self.fp.hex,
        )
        self._entry_written = False
        self._next_save = self.canonical_end // self.chunk_tokens

    def _notice(self, text: str) -> None:
        self._report.notices.append(text)

    def _write_entry(self) -> None:
        if self._entry_written or self._entry is None:
            return
        try:
            self.store.touch_entry(self._entry)
            self._entry_written = True
        except OSError as exc:
            self._stop_saving(f"cannot write to {self.store.root} ({exc.strerror or exc})")

    def _stop_saving(self, why: str) -> None:
        if self.saving:
            self.saving = False
            self._report.saving = False
            self._notice(f"document cache: {why}; prefilled tokens are no longer saved")

    # -- restore -------------------------------------------------------------------------------------------
    def restore(self) -> tuple[int, int]:
        """Load the longest run of saved chunks that extends the cache (and the tail, when the whole
        sequence was saved); returns (start, tokens restored). The cache may be cut back to a chunk
        boundary first (only when more comes back than it cuts)."""
        t0 = time.perf_counter()
        C, cache, target = self.chunk_tokens, self.cache, len(self._ids)
        n_full = len(self._keys)
        base = min(self.canonical_end, cache.length) // C
        j = base
        while j < n_full and self.store.has_chunk(self._keys[j]):
            j += 1
        with_tail = j == n_full and self.store.has_chunk(self._tail_key)
        # without the tail, stop a token short of the end: the prefill's last step sets last_query
        stop = j if with_tail else min(j, (target - 1) // C)
        end_planned = target if with_tail else stop * C
        if end_planned <= cache.length:
            return cache.length, 0
        start = base * C
        cache.truncate(start)
        jobs = [(self._keys[i], i * C, (i + 1) * C) for i in range(base, stop)]
        if with_tail:
            jobs.append((self._tail_key, n_full * C, target))
        n_good, query = self._load(jobs)
        if with_tail and n_good == len(jobs):
            end = target
        else:  # a token short of the end at least (see above)
            end = max(start, min(start + min(n_good, stop - base) * C, (target - 1) // C * C))
        for pos in range(start, end, self.step):  # the listeners see the appends a prefill makes
            cache.advance(min(self.step, end - pos))
        if end == target and query is not None:
            set_query_state(cache, query)
        self.canonical_end = end // self.step * self.step
        self._next_save = end // C
        restored = end - start
        self._report.restored += restored
        self._report.restore_s += time.perf_counter() - t0
        if restored:
            self._write_entry()
        return start, restored

    def _load(self, jobs: list[tuple[str, int, int]]) -> tuple[int, Tensor | None]:
        """Copy the files of `jobs` (key, start, end) into the cache, a few at a time; returns how
        many succeeded before the first failure, and the saved last query if the tail was among
        them. Damaged files are deleted with a notice."""
        if not jobs:
            return 0, None
        workers = max(1, min(MAX_LOAD_THREADS, os.cpu_count() or 1, len(jobs)))
        with ThreadPoolExecutor(workers, thread_name_prefix="doccache-load") as pool:
            results = list(pool.map(lambda job: self._load_one(*job), jobs))
        query = None
        for n, ((key, start, end), (problem, q)) in enumerate(zip(jobs, results, strict=True)):
            if problem is None:
                query = q if q is not None else query
                continue
            if problem != "missing":
                self.store.discard_chunk(key)
                self._notice(
                    f"document cache: saved tokens {start:,}-{end:,} were unusable ({problem}); "
                    "the file was discarded and those tokens are prefilled again"
                )
            return n, None
        return len(jobs), query

    def _load_one(self, key: str, start: int, end: int) -> tuple[str | None, Tensor | None]:
        """(None, saved query or None) on success, else (why the file cannot be used, None);
        "missing" when the file is gone."""
        path = self.store.chunk_path(key)
        views = chunk_views(self.cache, start, end)
        try:
            header, size = read_chunk_header(path)
            expected = {"key": key, "fingerprint": self.fp.hex, "start": start, "tokens": end - start}
            for name, value in expected.items():
                if header.get(name) != value:
                    raise DamagedFile(f"{name} mismatch: a file of another entry")
            specs = header.get("tensors")
            if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
                raise DamagedFile("damaged header")
            want = [[name, _dtype_name(t.dtype), list(t.shape)] for name, t in views]
            query = None
            if key == self._tail_key:  # the tail also holds the last query, in its own dtype
                if len(specs) != len(views) + 1 or specs[-1].get("name") != "q":
                    raise DamagedFile("tensor layout mismatch")
                q = specs[-1]
                dtype = getattr(torch, str(q.get("dtype")), None)
                shape = q.get("shape")
                if not isinstance(dtype, torch.dtype) or not isinstance(shape, list) or len(shape) != 3 \
                        or shape[0] != self.cache.k.shape[0]:
                    raise DamagedFile("tensor layout mismatch")
                query = torch.empty([int(x) for x in shape], dtype=dtype, device=self.cache.k.device)
                views = [*views, ("q", query)]
                want.append(["q", _dtype_name(dtype), list(query.shape)])
            if [[s.get("name"), s.get("dtype"), s.get("shape")] for s in specs] != want:
                raise DamagedFile("tensor layout mismatch")
            mapped = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)  # private mapping
            payload = mapped[DATA_OFFSET:]
            if payload_crc32(payload.numpy()) != int(header["payload_crc32"]):
                raise DamagedFile("payload checksum mismatch")
            offset = 0
            for _, dst in views:
                nbytes = dst.numel() * dst.element_size()
                dst.copy_(payload[offset : offset + nbytes].view(dst.dtype).view(dst.shape))
                offset += nbytes
            if offset != payload.numel():
                raise DamagedFile("payload size mismatch")
        except FileNotFoundError:
            return "missing", None
        except DamagedFile as exc:
            return str(exc), None
        except (OSError, RuntimeError, ValueError, TypeError) as exc:  # unreadable, unmappable, bad numbers
            return f"unreadable: {exc}", None
        return None, query

    # -- checkpoints -----------------------------------------------------------------------------------------
    def prefilled(self, start: int, end: int) -> None:
        """A prefill step wrote tokens [start, end): extend the canonical part, save every chunk it
        completed, and the tail when this was the last step of a prefill from token 0."""
        aligned = start == self.canonical_end and start % self.step == 0
        if aligned and end - start == self.step:
            self.canonical_end = end
        if not self._keep:
            return
        C = self.chunk_tokens
        while (self._next_save + 1) * C <= self.canonical_end and self._next_save < len(self._keys):
            j = self._next_save
            self._next_save += 1
            if self.saving and not self.store.has_chunk(self._keys[j]):
                self._save("chunk", j, j * C, (j + 1) * C)
        if aligned and end == len(self._ids) and self.saving and self._next_save == len(self._keys):
            if not self.store.has_chunk(self._tail_key):
                self._save("tail", len(self._keys), len(self._keys) * C, end)

    def _save(self, kind: str, j: int, start: int, end: int) -> None:
        t0 = time.perf_counter()
        self._write_entry()
        if not self.saving:
            return
        # a copy: the writer must not read the cache, which the next sync may overwrite
        tensors = [(name, t.to("cpu", copy=True, memory_format=torch.contiguous_format))
                   for name, t in chunk_views(self.cache, start, end)]
        if kind == "tail":
            query = query_state(self.cache)
            if query is None:
                return
            tensors.append(("q", query.to("cpu", copy=True)))
        key = self._tail_key if kind == "tail" else self._keys[j]
        parent = self._keys[j - 1] if j else self.fp.hex
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="doccache-save")
        future = self._writer.submit(self._write_file, kind, key, parent, j, start, end, tensors)
        self._pending.append((kind, start, future))
        while len(self._pending) > MAX_WRITES_IN_FLIGHT:
            self._collect(self._pending.pop(0))
        self._report.save_s += time.perf_counter() - t0

    def _write_file(self, kind: str, key: str, parent: str, j: int, start: int, end: int,
                    tensors: list[tuple[str, Tensor]]) -> tuple[str, int, float]:
        """On the writer thread: ("ok" | "full" | an error, tokens, seconds)."""
        t0 = time.perf_counter()
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        try:
            if not self.store.reserve(nbytes + DATA_OFFSET, protect=self._entry.id if self._entry else None):
                return "full", 0, time.perf_counter() - t0
            header = {
                "kind": f"kv-{kind}", "key": key, "parent": parent, "fingerprint": self.fp.hex, "index": j,
                "start": start, "tokens": end - start,
                "tensors": [{"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
                            for name, t in tensors],
            }
            blocks = [t.reshape(-1).view(torch.uint8).numpy() for _, t in tensors]
            write_chunk_file(self.store.chunk_path(key), header, blocks)
        except OSError as exc:
            return f"cannot write to {self.store.root} ({exc.strerror or exc})", 0, time.perf_counter() - t0
        return "ok", end - start, time.perf_counter() - t0

    def _collect(self, item: tuple[str, int, Future]) -> None:
        _, start, future = item
        status, tokens, secs = future.result()
        self._report.write_s += secs
        if status == "ok":
            self._report.saved += tokens
        elif status == "full":
            gb = self.store.max_bytes / 2**30
            self._stop_saving(f"the cap of {gb:.1f} GB is reached even after evicting older documents "
                              f"(saved up to token {start:,}; raise cache.max_gb)")
        else:
            self._stop_saving(status)

    def finish(self) -> None:
        """Wait for the writer (so that what is reported saved is on disk) and mark the entry used."""
        t0 = time.perf_counter()
        while self._pending:
            self._collect(self._pending.pop(0))
        if self._report.saved:
            self._entry_written = False
            self._write_entry()  # last_used: now
        self._report.save_s += time.perf_counter() - t0

    def detach(self) -> None:
        """Stop listening to the cache and let the writer go (after what it has)."""
        self.finish()
        if self in self.cache.listeners:
            self.cache.listeners.remove(self)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def query_state(cache: KVCache) -> Tensor | None:
    """The last token's query per layer, [n_layers, Hq, D] (None before any forward)."""
    if any(q is None for q in cache.last_query):
        return None
    return torch.stack(list(cache.last_query))


def set_query_state(cache: KVCache, query: Tensor) -> None:
    cache.last_query = [q.clone() for q in query.unbind(0)]


__all__ = [
    "DocCache", "Fingerprint", "SyncReport", "chain_keys", "chunk_views", "compute_identity", "describe",
    "entry_id", "format_duration", "model_fingerprint", "query_state", "resuming_line", "set_query_state",
    "tail_key", "weights_identity",
]
