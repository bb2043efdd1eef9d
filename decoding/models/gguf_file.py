"""A small GGUF reader: metadata, tensor infos, and tensors as views of the memory-mapped file.

Why our own: the `gguf` package parses every string of the vocabulary into Python objects on
open (~20 s for a 152K-token vocabulary here); this reader walks past large arrays and decodes
them only when asked, so opening a model takes well under a second. Tensors are zero-copy views of
a private (copy-on-write) mapping: the weights cost page cache, not a second copy in memory.

Format (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata count
u64; metadata entries (key string, value type u32, value); tensor infos (name, n_dims u32, dims
u64[n] in ggml order = innermost first, type u32, offset u64); padding to `general.alignment`
(default 32); tensor data.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from triforce_chat.kernels.quant import TYPES, UnsupportedQuantType

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_EAGER_LIMIT = 64  # arrays up to this many elements are decoded on open

# The open files' mappings, for `release_pages`: (first address, length, weak reference to the mmap).
_MAPPINGS: list[tuple[int, int, weakref.ref]] = []


def release_pages(t: torch.Tensor) -> int:
    """Drop the resident pages under `t` when it is a view of a mapped GGUF file; returns the bytes
    released (0 for any other tensor). For weights that are read once and then used from a copy
    (the int8 mode's packed tiles): without this the process keeps both the copy and the file's
    pages, ~2x the weights in its resident set. The mapping is private and never written, so a
    later read of `t` faults the file's bytes back in."""
    _MAPPINGS[:] = [m for m in _MAPPINGS if m[2]() is not None]
    if not hasattr(mmap, "MADV_DONTNEED") or not hasattr(mmap.mmap, "madvise"):  # e.g. Windows: keep both
        return 0
    start, n = t.data_ptr(), t.numel() * t.element_size()
    page = mmap.PAGESIZE
    for base, length, ref in _MAPPINGS:
        mm = ref()
        if mm is None or not (base <= start and start + n <= base + length):
            continue
        first = -(-(start - base) // page) * page  # whole pages inside the tensor only
        last = (start - base + n) // page * page
        if last <= first:
            return 0
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)
        return last - first
    return 0


class GGUFError(ValueError):
    """A file that is not a usable GGUF model; the message is one line for the user."""


@dataclass
class LazyArray:
    """A metadata array decoded on demand (vocabularies, merges)."""

    file: GGUFFile
    elem_type: int
    count: int
    offset: int  # of the first element

    def __len__(self) -> int:
        return self.count

    def values(self) -> list:
        return self.file._read_array(self.elem_type, self.count, self.offset)[0]


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    type_id: int
    offset: int  # absolute, in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """torch order: [rows, row length]."""
        return tuple(reversed(self.dims))


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise GGUFError(f"{self.path}: cannot open ({exc})") from None
        self.size = len(self._mm)
        if self.size:
            view = ctypes.c_char.from_buffer(self._mm)
            _MAPPINGS.append((ctypes.addressof(view), self.size, weakref.ref(self._mm)))
            del view  # a live export would keep the mapping from closing
        try:
            self._parse()
        except struct.error:
            raise GGUFError(f"{self.path}: truncated GGUF file (the header ends early)") from None

    # -- parsing ------------------------------------------------------------------------------------
    def _unpack(self, fmt: str, offset: int) -> tuple[Any, int]:
        value = struct.unpack_from(fmt, self._mm, offset)[0]
        return value, offset + struct.calcsize(fmt)

    def _string(self, offset: int) -> tuple[str, int]:
        n, offset = self._unpack("<Q", offset)
        if offset + n > self.size:
            raise struct.error("string past the end")
        return bytes(self._mm[offset : offset + n]).decode("utf-8", errors="replace"), offset + n

    def _skip_strings(self, count: int, offset: int) -> int:
        mm, size = self._mm, self.size
        for _ in range(count):
            n = struct.unpack_from("<Q", mm, offset)[0]
            offset += 8 + n
            if offset > size:
                raise struct.error("array past the end")
        return offset

    def _read_array(self, elem_type: int, count: int, offset: int) -> tuple[list, int]:
        if elem_type == _STRING:
            out = []
            for _ in range(count):
                s, offset = self._string(offset)
                out.append(s)
            return out, offset
        if elem_type in _NUMPY:
            import numpy as np

            dt = np.dtype(_NUMPY[elem_type])
            end = offset + count * dt.itemsize
            if end > self.size:
                raise struct.error("array past the end")
            return np.frombuffer(self._mm, dtype=dt, count=count, offset=offset).tolist(), end
        raise GGUFError(f"{self.path}: unsupported metadata array type {elem_type}")

    def _value(self, vtype: int, offset: int) -> tuple[Any, int]:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype], offset)
        if vtype == _STRING:
            return self._string(offset)
        if vtype == _ARRAY:
            elem_type, offset = self._unpack("<I", offset)
            count, offset = self._unpack("<Q", offset)
            if count <= _EAGER_LIMIT:
                return self._read_array(elem_type, count, offset)
            lazy = LazyArray(self, elem_type, count, offset)
            if elem_type == _STRING:
                return lazy, self._skip_strings(count, offset)
            if elem_type in _NUMPY:
                import numpy as np

                end = offset + count * np.dtype(_NUMPY[elem_type]).itemsize
                if end > self.size:
                    raise struct.error("array past the end")
                return lazy, end
        raise GGUFError(f"{self.path}: unsupported metadata value type {vtype}")

    def _parse(self) -> None:
        if self.size < 24 or bytes(self._mm[:4]) != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (no GGUF magic number)")
        version, off = self._unpack("<I", 4)
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, off = self._unpack("<Q", off)
        n_kv, off = self._unpack("<Q", off)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, off = self._string(off)
            vtype, off = self._unpack("<I", off)
            self.metadata[key], off = self._value(vtype, off)
        infos = []
        for _ in range(n_tensors):
            name, off = self._string(off)
            n_dims, off = self._unpack("<I", off)
            dims = struct.unpack_from(f"<{n_dims}Q", self._mm, off)
            off += 8 * n_dims
            type_id, off = self._unpack("<I", off)
            rel, off = self._unpack("<Q", off)
            infos.append((name, tuple(int(d) for d in dims), type_id, rel))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-off // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, rel in infos:
            n_bytes = 0
            if type_id in TYPES:
                t = TYPES[type_id]
                n_elems = 1
                for d in dims:
                    n_elems *= d
                n_bytes = n_elems // t.block_elems * t.block_bytes
            self.tensors[name] = TensorInfo(name, dims, type_id, data_start + rel, n_bytes)

    # -- access -------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key, default)
        return value.values() if isinstance(value, LazyArray) else value

    def array_length(self, key: str) -> int | None:
        value = self.metadata.get(key)
        return None if value is None else len(value)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def tensor(self, name: str) -> tuple[torch.Tensor, int]:
        """(tensor, ggml type id): a view of the file. Quantized matrices come as uint8
        [rows, row_bytes]; dense ones in their dtype with the torch shape."""
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: tensor {name} is missing")
        if info.type_id not in TYPES:
            raise UnsupportedQuantType(info.type_id, name)
        if info.offset + info.n_bytes > self.size:
            raise GGUFError(f"{self.path}: truncated GGUF file (tensor {name} ends past the end of the file)")
        t = TYPES[info.type_id]
        shape = info.shape
        if info.dims[0] % t.block_elems:
            raise GGUFError(f"{self.path}: tensor {name} rows of {info.dims[0]} do not split into {t.name} blocks")
        raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=info.n_bytes, offset=info.offset)
        if t.name == "F32":
            return raw.view(torch.float32).view(shape), info.type_id
        if t.name == "F16":
            return raw.view(torch.float16).view(shape), info.type_id
        if t.name == "BF16":
            return raw.view(torch.bfloat16).view(shape), info.type_id
        rows = 1
        for d in shape[:-1]:
            rows *= d
        return raw.view(rows, t.row_bytes(info.dims[0])), info.type_id
