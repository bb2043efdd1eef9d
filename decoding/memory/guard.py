"""The memory guard: refuse, with one line saying what would fit, what the OOM killer would end.

Why: the kernel's OOM killer ends the process without a word, and a 32K-position model with its
preallocated cache, a retrieval buffer and a draft model outgrows a laptop quickly. The CLI and the
TUI check before loading a model (`check_before_load`), the Session before each prefill
(`check_session`); the bytes come from decoding/memory/footprint.py.

Available memory: the cgroup's limit minus its usage (v2 `memory.max`/`memory.current`, v1
`memory.limit_in_bytes`/`memory.usage_in_bytes`, reclaimable file cache not counted as used) where a
limit is set, bounded by MemAvailable from /proc/meminfo. TRIFORCE_CHAT_MEMORY_GUARD=off turns the
refusals off (the estimate is still shown). GPU memory is not checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triforce_chat.decoding.config import LOOKUPS
from triforce_chat.decoding.memory.footprint import (
    FIXED_OVERHEAD,
    RUNTIME_BYTES,
    MemoryEstimate,
    estimate,
    fmt_bytes,
    locate_model_files,
    session_estimate,
    tensor_bytes,
    weight_files,
)


class MemoryShortage(ValueError):
    """The estimate does not fit in the available memory; the message is one line for the user."""

    def __init__(self, message: str, estimate: MemoryEstimate, available: Available):
        super().__init__(message)
        self.estimate, self.available = estimate, available


def guard_enabled() -> bool:
    return os.environ.get("TRIFORCE_CHAT_MEMORY_GUARD", "on").strip().lower() not in ("off", "0", "false", "no")


# -- available memory --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Available:
    bytes: int
    source: str  # "cgroup v2 limit", "cgroup v1 limit" or "MemAvailable"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes (None where /proc/meminfo does not say)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[tuple[str, Path]]:
    """(version, directory) of this process's memory cgroup and its ancestors, innermost first."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[str, Path]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if parts[0] == "0" and controllers == "":
            version, base = "v2", root if (root / "cgroup.controllers").exists() else root / "unified"
        elif "memory" in controllers.split(","):
            version, base = "v1", root / "memory"
        else:
            continue
        path = base / rel.lstrip("/")
        while True:  # a limit may sit on any ancestor
            out.append((version, path))
            if path == base or base not in path.parents:
                break
            path = path.parent
    return out


def cgroup_available(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> Available | None:
    """The tightest cgroup limit minus its usage (file cache that can be reclaimed not counted)."""
    best: Available | None = None
    for version, d in _cgroup_dirs(root, proc_cgroup):
        if version == "v2":
            limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
            reclaimable = _stat_value(d / "memory.stat", "inactive_file")
        else:
            limit, used = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
            reclaimable = _stat_value(d / "memory.stat", "total_inactive_file")
        if limit is None or used is None or limit >= 1 << 60:  # no limit ("max", or v1's page-rounded 2^63)
            continue
        free = max(0, limit - max(0, used - reclaimable))
        if best is None or free < best.bytes:
            best = Available(free, f"cgroup {version} limit")
    return best


def available_memory() -> Available | None:
    """Memory this process can still take: the cgroup's room where a limit is set, bounded by
    MemAvailable; None where neither can be read (then nothing is refused)."""
    cg = cgroup_available()
    host = meminfo_available()
    if cg is not None and (host is None or cg.bytes <= host):
        return cg
    return Available(host, "MemAvailable") if host is not None else None


# -- the check -----------------------------------------------------------------------------------------
HEADROOM = 0.05  # of the available memory, kept free: estimates are estimates


def fits(need: int, available: Available) -> bool:
    return need <= available.bytes * (1 - HEADROOM)


def shortage_message(
    est: MemoryEstimate,
    available: Available,
    what: str,
    need: int | None = None,
    max_context: Callable[[int], int | None] | None = None,
    smaller_budget: str | None = None,
) -> str:
    """One line: the numbers, then what would make it fit."""
    need = est.total if need is None else need
    hints = []
    if max_context is not None:
        ctx = max_context(int(available.bytes * (1 - HEADROOM)))
        if ctx:
            hints.append(f"--context {ctx}")
    if smaller_budget:
        hints.append(f"a smaller budget (--budget {smaller_budget})")
    hints.append("a smaller model")
    return (
        f"not enough memory for {what}: it needs about {fmt_bytes(need)} ({est.describe()}) but "
        f"{fmt_bytes(available.bytes)} is available ({available.source}); it would fit with "
        + " or ".join(hints)
    )


def largest_context(build: Callable[[int], MemoryEstimate], limit: int, room: int, floor: int = 512) -> int | None:
    """The largest context (a multiple of 256, at least `floor`, below `limit`) whose estimate fits
    in `room` bytes; None if none does."""
    lo, hi = floor // 256, (limit - 1) // 256
    if hi < lo or build(lo * 256).total > room:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if build(mid * 256).total <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def smaller_budget_that_fits(
    build: Callable[[str], MemoryEstimate], budget: str, room: int, chunk_size: int
) -> str | None:
    """A budget (halving the current one) whose estimate fits, if the view is what does not fit."""
    from triforce_chat.decoding.config import parse_budget

    tokens, frac = parse_budget(budget)
    for _ in range(16):
        if tokens:
            tokens //= 2
            if tokens < 2 * chunk_size:
                return None
            candidate = str(tokens)
        else:
            frac /= 2
            if frac < 0.005:
                return None
            candidate = f"{frac:.3g}"
        if build(candidate).total <= room:
            return candidate
    return None


def check_before_load(
    spec: str | None,
    *,
    dtype: Any,
    device: str,
    context: int | None,
    config: Any,
    kv_dtype: Any = None,
    available: Available | None = None,
) -> MemoryEstimate | None:
    """Raise MemoryShortage if the model named by `spec`, its cache at `context` and the decoder's
    buffers (DecodeConfig `config`) will not fit; returns the estimate (None if it cannot be made
    before loading: files not there yet). CUDA weights and caches live on the device: not checked."""
    if device != "cpu":
        return None
    if kv_dtype is None:
        from triforce_chat.decoding.models.loading import default_kv_dtype

        kv_dtype = default_kv_dtype(device)
    path = locate_model_files(spec)
    if path is None:
        return None
    try:
        files = weight_files(path, dtype, device, context)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if files is None or files.shape is None:
        return None
    draft_bytes, draft_shape = 0, None
    if config.level == 2 and config.draft not in LOOKUPS:
        draft_path = locate_model_files(config.draft)
        draft_files = weight_files(draft_path, None, device) if draft_path is not None else None
        if draft_files is not None:
            draft_bytes, draft_shape = draft_files.loaded_bytes + draft_files.transient_bytes, draft_files.shape

    from triforce_chat.decoding.models.loading import expects_prepared_blocks

    blocks = expects_prepared_blocks(files.shape.head_dim, dtype, device)

    def build(ctx: int | None = None, budget: str | None = None) -> MemoryEstimate:
        return estimate(
            files.shape, weights_bytes=files.loaded_bytes, context=ctx or files.shape.max_positions, dtype=dtype,
            kv_dtype=kv_dtype, level=config.level, budget=budget or config.budget, chunk_size=config.chunk_size,
            gamma_mid=config.gamma_mid, gamma_low=config.gamma_low, draft=config.draft,
            draft_weights_bytes=draft_bytes, draft_shape=draft_shape, transient_bytes=files.transient_bytes,
            runtime_bytes=RUNTIME_BYTES, prepared_blocks=blocks,
        )

    est = build()
    available = available or available_memory()
    if available is None or not guard_enabled() or fits(est.total, available):
        return est
    room = int(available.bytes * (1 - HEADROOM))
    budget = None
    if config.level >= 1 and est.parts.get("retrieval_view", 0):
        budget = smaller_budget_that_fits(lambda b: build(budget=b), config.budget, room, config.chunk_size)
    message = shortage_message(
        est, available, f"{path.name} at {est.context:,} tokens",
        max_context=lambda r: largest_context(lambda c: build(ctx=c), est.context, r),
        smaller_budget=budget,
    )
    raise MemoryShortage(message, est, available)


def _held_now(session: Any) -> dict[str, int]:
    """What the parts that grow hold already."""
    cache = session.cache
    # the cache's pages are resident once written (decoding/cache.py: `lazy_zeros`), as the blocks' are
    held = {"retrieval_view": session.view.buffer_bytes, "scratch": cache.scratch_bytes,
            "attention_blocks": cache.blocks_bytes, "kv_cache": cache.used_bytes}
    from triforce_chat.decoding.drafters import draft_model_of

    drafter = draft_model_of(getattr(session, "_drafter", None))
    if drafter is not None:
        held["draft"] = tensor_bytes(drafter.model) + drafter.cache.allocated_bytes
    return held


def check_session(session: Any, tokens: int, available: Available | None = None) -> None:
    """Before a prefill that brings the context to `tokens` (the answer's room included): raise
    MemoryShortage if what still has to be allocated does not fit."""
    if session.model.device.type != "cpu" or not guard_enabled():
        return
    est = session_estimate(session, tokens)
    held = _held_now(session)
    grow = {k: max(0, est.parts.get(k, 0) - held.get(k, 0))
            for k in ("kv_cache", "retrieval_view", "scratch", "draft", "attention_blocks")}
    if not held["scratch"]:  # nothing allocated yet: the fixed allowance is part of the RSS already
        grow["scratch"] = max(0, grow["scratch"] - FIXED_OVERHEAD)
    need = sum(grow.values())
    available = available or available_memory()
    if available is None or fits(need, available):
        return
    room = int(available.bytes * (1 - HEADROOM))
    cfg = session.config
    budget = None
    if cfg.level >= 1 and grow["retrieval_view"]:
        def with_budget(b: str) -> MemoryEstimate:
            saved = cfg.budget
            cfg.budget = b
            try:
                e = session_estimate(session, tokens)
            finally:
                cfg.budget = saved
            more = sum(max(0, e.parts.get(k, 0) - held.get(k, 0)) for k in grow)
            return MemoryEstimate({"more": more})

        budget = smaller_budget_that_fits(with_budget, cfg.budget, room, cfg.chunk_size)
    shown = MemoryEstimate({k: v for k, v in grow.items() if v})
    hints = ([f"a smaller budget (--budget {budget})"] if budget else []) + (
        ["level 1 or the suffix lookup alone"] if grow.get("draft") else []) + ["fewer or shorter documents"]
    raise MemoryShortage(
        f"not enough memory to continue to {tokens:,} tokens: it needs about {fmt_bytes(need)} more "
        f"({shown.describe() or 'scratch'}) but {fmt_bytes(available.bytes)} is available ({available.source}); "
        "it would fit with " + " or ".join(hints),
        est, available,
    )
