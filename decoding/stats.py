"""Aggregates over the rounds of one answer: what `ask --json`, `bench` and the TUI panels show.

Definitions (one place, so every view of a number agrees):
- prefill_tokens: prompt tokens this answer put into the cache, since the previous answer (the
  documents prefilled before the question included): for a first answer, every prompt token in
  context; restored_tokens: those of them read from the document cache; prefill_s: the wall time
  of restoring and prefilling them.
- acceptance["mid"]: drafted tokens the full target accepted / drafted tokens it verified.
- acceptance["low"]: bottom-drafter tokens the middle level accepted / proposed.
- mean_accepted_length: tokens kept per target verification round, the correction or bonus token
  counted (as vLLM reports it); level 0 is exactly 1.
- position_histogram[level][i]: fraction of windows whose i-th draft was accepted.
- trees: rounds that verified two ways of a branching lookup match in one window, and how many of
  them kept the second way; the second way's drafts count in acceptance["low"] where it was tried
  (the first way's first token was rejected).
- speedup_vs_level0: (level-0 step time measured in this answer's context) x tokens / decode time;
  None for a level-0 answer, which is the reference (its ratio would only show the noise of one
  answer against a few timed steps: x0.65 for a short answer on a busy machine).
- timings_s["sources"]: the part of decode_s spent reading the attention for the answer's sources
  (between rounds, decoding/sources.py); sources_rank_s: the time after the last token that turned
  those readings into passages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from triforce_chat.decoding.events import ORIGINS, RoundEvent


@dataclass
class Stats:
    level: int = 0
    chain: str = "target"
    gamma_mid: int = 0
    gamma_low: int = 0
    prefill_tokens: int = 0  # prompt tokens this answer put into the cache (restored or computed)
    prefill_s: float = 0.0  # wall time of restoring and prefilling them
    restored_tokens: int = 0  # of prefill_tokens, those read from the document cache
    restore_s: float = 0.0
    saved_tokens: int = 0  # tokens written to the document cache meanwhile
    save_s: float = 0.0  # prefill time spent on saving them
    calibrate_s: float = 0.0  # of prefill_s: timing the target's windows at this depth, where due (route.py)
    new_tokens: int = 0
    decode_s: float = 0.0
    rounds: int = 0
    level0_step_s: float = 0.0  # measured full-cache single-token step at this context
    sources_rank_s: float = 0.0  # after the last token: mapping the readings to passages
    stop_reason: str = ""
    token_origins: list[str] = field(default_factory=list)
    mid_proposed: int = 0
    mid_accepted: int = 0
    low_proposed: int = 0
    low_accepted: int = 0
    # lookup proposals: how many, the matches they followed (tokens, summed), how many of those
    # matches the lookup knew the branching of (not the n-gram index), how many had only ever been
    # followed by one token
    lookup_proposals: int = 0
    lookup_match_tokens: int = 0
    lookup_branching_known: int = 0
    lookup_unique: int = 0
    # tree windows (decoding/tree.py): rounds that verified two ways of a branching match at once, and
    # those where the target kept the second way (the lookup's own proposal was wrong at its first token)
    tree_rounds: int = 0
    tree_second_kept: int = 0
    _pos_tries: dict[str, list[int]] = field(default_factory=lambda: {"mid": [], "low": []})
    _pos_hits: dict[str, list[int]] = field(default_factory=lambda: {"mid": [], "low": []})
    timings: dict[str, float] = field(default_factory=lambda: {"low": 0.0, "mid": 0.0, "target": 0.0})
    recent_tokens_per_s: list[float] = field(default_factory=list)  # one per round, for a sparkline
    _started: float = field(default_factory=time.perf_counter)

    def add(self, ev: RoundEvent) -> None:
        if ev.stop_reason:
            self.stop_reason = ev.stop_reason
        if not ev.tokens:  # the closing event of an answer stopped between rounds
            return
        self.rounds += 1
        self.new_tokens += len(ev.tokens)
        self.decode_s += ev.wall_s
        self.token_origins.extend(ev.origins)
        for k, v in ev.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v
        if ev.tree_width:
            self.tree_rounds += 1
            self.tree_second_kept += ev.tree_branch > 0
        if ev.mid_proposed:
            self.mid_proposed += len(ev.mid_proposed)
            self.mid_accepted += ev.mid_accepted
            self._count_positions("mid", len(ev.mid_proposed), ev.mid_accepted)
        for lr in ev.low_rounds:
            if lr.proposed and lr.tried:
                self.low_proposed += len(lr.proposed)
                self.low_accepted += lr.accepted
                self._count_positions("low", len(lr.proposed), lr.accepted)
            if lr.match:
                self.lookup_proposals += 1
                self.lookup_match_tokens += lr.match
                self.lookup_branching_known += lr.branches > 0
                self.lookup_unique += lr.branches == 1
        if ev.wall_s > 0:
            self.recent_tokens_per_s.append(len(ev.tokens) / ev.wall_s)

    def _count_positions(self, level: str, proposed: int, accepted: int) -> None:
        tries, hits = self._pos_tries[level], self._pos_hits[level]
        while len(tries) < proposed:
            tries.append(0)
            hits.append(0)
        for i in range(proposed):
            tries[i] += 1
            hits[i] += i < accepted

    # -- derived figures ------------------------------------------------------------------------
    @property
    def acceptance(self) -> dict[str, float | None]:
        return {
            "mid": self.mid_accepted / self.mid_proposed if self.mid_proposed else None,
            "low": self.low_accepted / self.low_proposed if self.low_proposed else None,
        }

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def position_histogram(self) -> dict[str, list[float]]:
        return {
            lvl: [h / t if t else 0.0 for h, t in zip(self._pos_hits[lvl], self._pos_tries[lvl], strict=True)]
            for lvl in ("mid", "low")
        }

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.decode_s / self.new_tokens if self.new_tokens else 0.0

    @property
    def speedup_vs_level0(self) -> float | None:
        if not self.level or not self.level0_step_s or not self.decode_s:
            return None
        return self.level0_step_s * self.new_tokens / self.decode_s

    @property
    def lookup(self) -> dict[str, float | int | None]:
        """The lookup's proposals this answer: how many, the mean length of the matches behind them,
        and the share of those matches that were always followed by the same token before (None
        where the lookup does not know it: the n-gram index)."""
        n, known = self.lookup_proposals, self.lookup_branching_known
        return {"proposals": n, "mean_match": self.lookup_match_tokens / n if n else None,
                "unique_share": self.lookup_unique / known if known else None}

    @property
    def origin_counts(self) -> dict[str, int]:
        return {o: self.token_origins.count(o) for o in ORIGINS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "chain": self.chain,
            "gamma_mid": self.gamma_mid,
            "gamma_low": self.gamma_low,
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "restored_tokens": self.restored_tokens,
            "restore_s": round(self.restore_s, 4),
            "saved_tokens": self.saved_tokens,
            "save_s": round(self.save_s, 4),
            "calibrate_s": round(self.calibrate_s, 4),
            "new_tokens": self.new_tokens,
            "decode_s": round(self.decode_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "ms_per_token": round(self.ms_per_token, 3),
            "rounds": self.rounds,
            "acceptance": self.acceptance,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "lookup": self.lookup,
            "trees": {"rounds": self.tree_rounds, "second_way_kept": self.tree_second_kept},
            "position_histogram": self.position_histogram,
            "level0_step_ms": round(1000 * self.level0_step_s, 3),
            "speedup_vs_level0": self.speedup_vs_level0,
            "origin_counts": self.origin_counts,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "sources_rank_s": round(self.sources_rank_s, 4),
            "stop_reason": self.stop_reason,
        }
