"""What the benchmark programs share: their error, option parsing, ratios, table cells and the machine
description every result carries (a measurement without its CPU cannot be read)."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Log = Callable[[str], None]
# the SIMD flags that decide which kernels our engine and llama.cpp can use
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


class BenchError(ValueError):
    """The benchmark cannot run as asked; the message is one line for the user."""


def parse_int_list(text: str, what: str) -> list[int]:
    """'1024,7168' -> [1024, 7168]; BenchError naming `what` for anything else."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise BenchError(f"{what} must be a comma-separated list of whole numbers, not {text!r}") from None
    if not values:
        raise BenchError(f"{what} must not be empty")
    return values


def ratio(a: float | None, b: float | None, digits: int = 4) -> float | None:
    """a / b rounded, or None where either is missing or b is 0 (nothing measured)."""
    if a is None or not b:
        return None
    return round(a / b, digits)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first token where `a` and `b` differ: the length of their common prefix (the
    shorter length when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    """A table cell: the value formatted, or a dash where nothing was measured."""
    return "—" if value is None else f"{value:{spec}}{suffix}"


def timed_answer(session, question: str) -> tuple[list[int], float]:
    """The token ids a session answers `question` with, and the wall seconds of the whole answer."""
    ids: list[int] = []
    t0 = time.perf_counter()
    for ev in session.generate(question):
        ids.extend(ev.tokens)
    return ids, time.perf_counter() - t0


# -- the machine --------------------------------------------------------------------------------------------
def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features(cpuinfo: str) -> dict[str, bool]:
    """The SIMD flags of SIMD_FLAGS the CPU has, from /proc/cpuinfo's text."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / aarch64
            flags.update(value.split())
            break
    return {f: f in flags for f in SIMD_FLAGS}


def machine_info(load_start: list[float] | None = None) -> dict[str, Any]:
    """The machine and software a measurement ran on, with the load average before and now (the
    machine may be shared: a high load makes the figures doubtful)."""
    import torch
    import transformers

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "simd": cpu_features(cpuinfo),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "load_average_start": load_average() if load_start is None else load_start,
        "load_average_end": load_average(),
    }


def machine_line(m: dict[str, Any]) -> str:
    flags = " ".join(f"{k}{'+' if v else '-'}" for k, v in m["simd"].items())
    return f"CPU: {m['cpu']} ({m['cpu_count']} CPUs) | SIMD: {flags} | load average {m['load_average_start']}"
