"""Stopping an answer that loops: the same span of tokens repeated back to back at its end.

Small models fall into loops (SmolLM2-135M repeats one whole sentence until the token limit); a
reader gets nothing from the copies. The rule looks only at the answer's own tokens, one at a time,
so every speculation level, which emits the same tokens, stops at the same token, however many
tokens a round emits at once.

A loop: for some span length s <= max_span, the answer ends with at least `min_repeats` copies of
its last s tokens, back to back, covering at least `min_tokens` tokens. The token floor keeps
ordinary text from tripping it: a short span must repeat many times (a one-token span 48 times, a
two-token span such as ", 0" 24 times), while a sentence of 20 tokens stops at its third copy.

Cost: per token, a step per earlier occurrence of the same token among the last max_span tokens
(see LoopDetector), whatever the answer's length. Torch-free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class LoopRule:
    min_repeats: int = 3
    min_tokens: int = 48
    max_span: int = 256

    def validate(self) -> None:
        """Raise ValueError with a one-line message for the first invalid value."""
        if self.min_repeats < 2:
            raise ValueError(f"loop-repeats must be >= 2, not {self.min_repeats}")
        if self.min_tokens < 2:
            raise ValueError(f"loop-min-tokens must be >= 2, not {self.min_tokens}")
        if not 1 <= self.max_span <= 4096:
            raise ValueError(f"loop-max-span must be between 1 and 4096, not {self.max_span}")


class LoopDetector:
    """Feed the answer's tokens in order; `push` says whether the answer now ends in a loop.

    `_runs[s]` is the length of the longest suffix in which every token equals the one s before it,
    kept only for the s where it is positive: a new token extends the runs of the periods s at
    which the same token occurred s positions back and ends all the others. `_recent[t]` holds the
    positions of token t among the last max_span tokens, so a push costs the number of recent
    occurrences of that token (a handful in ordinary text), not a scan of the answer."""

    def __init__(self, rule: LoopRule):
        rule.validate()
        self.rule = rule
        self.length = 0
        self._runs: dict[int, int] = {}
        self._recent: dict[int, deque[int]] = {}

    def push(self, token: int) -> bool:
        n, rule = self.length, self.rule
        runs: dict[int, int] = {}
        looped = False
        seen = self._recent.get(token)
        if seen is None:
            seen = self._recent[token] = deque()
        while seen and seen[0] < n - rule.max_span:
            seen.popleft()
        for p in seen:
            s = n - p
            r = self._runs.get(s, 0) + 1
            runs[s] = r
            if r + s >= max(rule.min_repeats * s, rule.min_tokens):  # the last r + s tokens have period s
                looped = True
        seen.append(n)
        self._runs = runs
        self.length = n + 1
        return looped


def find_loop(tokens: list[int], rule: LoopRule) -> int | None:
    """Index of the token at which a LoopDetector fed `tokens` first reports a loop (None: never)."""
    detector = LoopDetector(rule)
    for i, tok in enumerate(tokens):
        if detector.push(tok):
            return i
    return None


__all__ = ["LoopDetector", "LoopRule", "find_loop"]
