"""Keeping freed memory for the next step instead of handing it back to the kernel (glibc only).

Why: every decode step and window allocates tensors of a vocabulary's width (151,936 floats, 0.6 MB
a row: logits, penalized and tempered scores, probabilities) and frees them. glibc serves blocks of
that size with mmap and unmaps them on free (its threshold grows only up to the largest block freed
so far, and trimming still returns the top of the heap), so the next step touches fresh pages: a
page fault per 4 KB. Measured on a 2-core Zen 4 (docs/performance.md): the sampler's probabilities
for an 8-row window took 10.3 ms, of which 8 were page faults; 2.2 ms with the thresholds below.

With them, blocks up to MMAP_THRESHOLD come from the heap and up to TRIM_THRESHOLD of freed heap is
kept for reuse: what the process holds is its peak of transient tensors (tens of MB), not more. The
weights and KV caches are far larger than the threshold and stay mapped as before.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 256 << 20

_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; False where the C library is not glibc (macOS,
    musl, Windows) or refuses them: allocation then stays as it was, only slower."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
