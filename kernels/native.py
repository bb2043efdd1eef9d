"""The CPU extension (kernels/cpu/*.cpp): built on first use with the system compiler, cached, optional.

Why native code: a verification window must compute each token's logits with exactly the
arithmetic of a single-token step, on any CPU and at any thread count. Vendor GEMMs pick kernels
and reduction splits by shape, so that cannot rest on them; these kernels fix every output's order
of operations by construction (see the headers). They also read GGUF blocks as shipped.

The build goes through torch's own `cpp_extension` (ninja + the system C++ compiler), with
`-march=native` so the host's SIMD is used (AVX-512, AVX2, or the portable scalar path), into
`<cache>/ext/<key>`: the key covers the sources, the flags, torch's version and the CPU's flags, so
a home directory shared by two machines never loads a build for the wrong CPU. It takes ~30-60 s
once. Every change of the sources (an upgrade) makes a new key, so old builds are pruned: a build's
directory is touched each time a process loads it, and after a load those unused for KEEP_DAYS, or
beyond the KEEP_BUILDS most recently used, are removed (a running process keeps its mapped
library). Without a compiler (or with TRIFORCE_NO_NATIVE=1) `status()` says why, and the model
falls back to PyTorch operations with windows verified token by token (exact, slower speculation).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).parent / "cpu"
SOURCES = ("ops.cpp", "linear.cpp", "linear_int8.cpp", "linear_int8_avx2.cpp", "attention.cpp", "attention_bf16.cpp",
           "attention_int8.cpp", "attention_int8_avx2.cpp", "rowwise.cpp")
HEADERS = ("simd.h", "quant.h", "blocks.h", "linear.h", "linear_int8.h", "linear_int8_tiles.h", "attention.h",
           "attention_bf16.h", "attention_int8.h", "attention_int8_walk.h", "attention_merge.h", "rowwise.h")


def _openmp_cflags(system: str = sys.platform) -> list[str]:
    """at::parallel_for is OpenMP in torch's wheels. Apple's clang has no -fopenmp driver flag: it
    takes the front end's, with the omp.h and libomp.dylib that torch's macOS wheel ships (torch's
    own inductor builds this way there). Not run on a Mac by this project yet."""
    return ["-Xclang", "-fopenmp"] if system == "darwin" else ["-fopenmp"]


CFLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-Wno-unused-function", *_openmp_cflags()]
KEEP_BUILDS = 12  # builds kept in the cache (the test suite alone builds up to eight ISA variants)
KEEP_DAYS = 30  # ... and none unused for longer


@dataclass(frozen=True)
class NativeStatus:
    available: bool
    isa: str  # "avx512", "avx2", "scalar" when available
    reason: str  # why not, when unavailable (one line)
    build_dir: Path | None = None
    int8: str = ""  # the int8-activation path built ("avx512-vnni", "avx2", "avx-vnni"), "" when none
    bf16_attention: str = ""  # the bf16-product attention built ("avx512-bf16"), "" when none
    int8_attention: str = ""  # the int8-product attention built (as `int8`), "" when none


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build_key(flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(platform.machine().encode())
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def _openmp_link_flags(lib: Path = Path(torch.__file__).parent / "lib", system: str = sys.platform) -> list[str]:
    """Link against torch's own OpenMP runtime (`lib`: torch's): two runtimes in one process would
    each start a pool."""
    bundled = sorted(lib.glob("libgomp*.so*"))
    if bundled:
        return [f"-L{lib}", f"-l:{bundled[0].name}", f"-Wl,-rpath,{lib}"]
    if system == "darwin":
        return [f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"] if (lib / "libomp.dylib").exists() else []
    return ["-fopenmp"]


def _cache_root() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("TRIFORCE_CHAT_CACHE") or user_cache_dir("triforce-chat"))


# TRIFORCE_NATIVE_ISA picks another path than the host's best (to test every path on one machine
# that can run it): "avx2" is AVX2 only (int8 activations and the int8 attention on the AVX2 paths),
# "avx512" AVX-512 without VNNI (the AVX2 int8 paths too), "avx512-vnni" the int8 mode and the int8
# attention on the VNNI paths (an Ice Lake's kernels) and "avx512-vnni-bf16" the bf16 attention too,
# whatever else the host has. "avx-vnni" is AVX2 with AVX-VNNI (Intel's client cores from Alder
# Lake: the AVX2 int8 paths with 256-bit `vpdpbusd`); "avx-vnni-evex" builds those paths with the
# same instruction's AVX512-VNNI encoding, so that an AVX-512 host without AVX-VNNI runs and tests
# them (the rest of that build is the AVX2 one; the compiler may give it EVEX forms, which only hosts
# with AVX-512 run). None enables another path than the name says (no -march=native), so each builds
# its path on a host with more.
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
ISA_FLAGS = {
    "native": ["-march=native"],
    "avx512-vnni-bf16": [*_AVX512, "-mavx512vnni", "-mavx512bf16"],
    "avx512-vnni": [*_AVX512, "-mavx512vnni"],
    "avx512": _AVX512,
    "avx-vnni": [*_AVX2, "-mavxvnni"],
    "avx-vnni-evex": [*_AVX2, "-mavx512vnni", "-mavx512vl", "-DTF_FORCE_AVX2"],
    "avx2": _AVX2,
    "scalar": [],
}


def _build_dir(key: str) -> Path:
    """The build's folder in the cache, else (a read-only, full or missing cache folder) in the temp
    folder: the kernels are most of the speed, and a cache that cannot be written must not cost
    them (it did: PyTorch's kernels, windows verified token by token)."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    roots = [_cache_root(), Path(tempfile.gettempdir()) / f"triforce-chat-{user}"]
    for root in roots:
        folder = root / "ext" / key
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            error = exc
            continue
        return folder
    raise error


def _build(native_arch: bool) -> NativeStatus:
    from torch.utils import cpp_extension

    isa = os.environ.get("TRIFORCE_NATIVE_ISA", "native")
    if isa not in ISA_FLAGS:
        raise ValueError(f"TRIFORCE_NATIVE_ISA must be one of {', '.join(ISA_FLAGS)}, not {isa!r}")
    flags = CFLAGS + (ISA_FLAGS[isa] if native_arch else [])
    key = _build_key(flags)
    build_dir = _build_dir(key)
    with _project_ninja_first():
        cpp_extension.load(
            name=f"triforce_cpu_{key}",
            sources=[str(SOURCE_DIR / s) for s in SOURCES],
            extra_cflags=flags,
            extra_ldflags=_openmp_link_flags(),
            extra_include_paths=[str(SOURCE_DIR)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=os.environ.get("TRIFORCE_NATIVE_VERBOSE") == "1",
        )
    t = torch.ops.triforce
    built = NativeStatus(True, t.isa(), "", build_dir, t.int8_path(), t.attention_bf16_path(),
                        t.attention_int8_path())
    prune_builds(build_dir)
    return built


@contextlib.contextmanager
def _project_ninja_first() -> Iterator[None]:
    """PATH with the project's own `ninja` (the `ninja` package, pinned in the lock) first, for the
    build: cpp_extension runs whichever `ninja` PATH finds. Why: started without its environment
    activated (`.venv/bin/triforce-chat`, as the Makefile does), the app found no ninja on a machine
    without a system one and ran without its kernels; and where the system has a ninja of another
    version, the two alternated by how the app was started, each reading the other's build log as
    changed commands: every switch rebuilt the whole extension (14 s on 2 cores)."""
    try:
        import ninja

        bin_dir = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        bin_dir = ""
    if not bin_dir or shutil.which("ninja", path=bin_dir) is None:  # no package, or no binary in it: PATH as is
        yield
        return
    old = os.environ.get("PATH")
    os.environ["PATH"] = bin_dir + os.pathsep + (old or os.defpath)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def prune_builds(used: Path, keep: int = KEEP_BUILDS, days: float = KEEP_DAYS) -> list[Path]:
    """Mark `used` as just used, and remove its sibling builds that no process loaded for `days`, or
    that are beyond the `keep` most recently used. Returns what was removed. Never fails the load."""
    removed: list[Path] = []
    try:
        os.utime(used)
        builds = sorted((d for d in used.parent.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
        cutoff = time.time() - days * 86400
        for rank, d in enumerate(builds):
            if d != used and (rank >= keep or d.stat().st_mtime < cutoff):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    except OSError:
        pass
    return removed


def _one_line(exc: BaseException) -> str:
    """The line of a failed build that says what is wrong: the compiler's first diagnostic ("error:"),
    not torch's first line ("Error building extension ...", then the whole compiler command)."""
    text = [line.strip() for line in str(exc).strip().splitlines()]
    errors = [line for line in text if re.search(r"\berror:", line, re.I)] or [
        line for line in text if re.search(r"error", line, re.I)]
    line = (errors or text or [type(exc).__name__])[0][:200]
    if "Python.h" in line:  # a distribution's Python without its development package (Debian, Ubuntu, Fedora)
        line += " (install the Python headers: python3-dev, or python3-devel)"
    return line


@functools.cache
def status() -> NativeStatus:
    """Build (once per process; cached on disk across processes) and load the extension."""
    if os.environ.get("TRIFORCE_NO_NATIVE") == "1":
        return NativeStatus(False, "", "disabled by TRIFORCE_NO_NATIVE=1")
    if hasattr(torch.ops, "triforce") and hasattr(torch.ops.triforce, "isa"):
        t = torch.ops.triforce
        return NativeStatus(True, t.isa(), "", None, t.int8_path(), t.attention_bf16_path(),
                        t.attention_int8_path())
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return NativeStatus(False, "", "no C++ compiler found (install g++ or clang++)")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return NativeStatus(False, "", "ninja is not installed (pip install ninja)")
    first_error = None
    for native_arch in (True, False):  # -march=native first; a compiler that refuses it gets the portable path
        try:
            return _build(native_arch)
        except Exception as exc:  # a failed build must never stop the app: fall back
            first_error = first_error or exc
    return NativeStatus(False, "", f"building the CPU extension failed: {_one_line(first_error)}")


def build_key() -> str:
    """A short hash of the kernels' sources and build flags (with the CPU's flags and torch's version)."""
    isa = os.environ.get("TRIFORCE_NATIVE_ISA", "native")
    return _build_key(CFLAGS + ISA_FLAGS.get(isa, []))


def available() -> bool:
    return status().available


def ops():
    """torch.ops.triforce (after a successful `status()`)."""
    return torch.ops.triforce


def set_row_skew(on: bool) -> None:
    """Test hook: make the linear kernel row-count dependent on purpose (one ulp off in windows)."""
    torch.ops.triforce.set_row_skew(on)


if __name__ == "__main__":  # `python -m triforce_chat.kernels.native`: build now, say what was built
    st = status()
    if st.available:
        int8 = f", int8 activations {st.int8}" if st.int8 else ", no int8-activation path (needs AVX2)"
        bf16 = f", bf16 attention {st.bf16_attention}" if st.bf16_attention else ", no bf16 attention"
        i8att = f", int8 attention {st.int8_attention}" if st.int8_attention else ", no int8 attention"
        print(f"native CPU kernels: {st.isa}{int8}{bf16}{i8att} ({st.build_dir or 'loaded'})")
    else:
        print(f"native CPU kernels unavailable: {st.reason}; the PyTorch fallback will be used")
