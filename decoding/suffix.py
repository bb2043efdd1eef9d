"""The default bottom drafter: the longest earlier match of the context's end, from a suffix automaton.

Why a suffix automaton (Blumer et al. 1985; the online construction as in SAM-Decoding, arXiv
2411.10666): it finds the *longest* suffix of the context that occurred before, whatever its length,
in O(1) amortized per token, where an n-gram index sees at most n tokens back. How far a match
reaches is what predicts whether its continuation is right (a 20-token match continues a quote; a
1-token match is a guess), and the automaton also says how many different tokens followed that
suffix before (`last_branches`): a suffix that was always followed by the same token is a far better
bet than one followed by ten. The route (route.py) keeps acceptance per (match length, branching)
and drafts only where those pay; with no earlier match there is no draft at all.

The automaton, over the context tokens t[0..L-1]: each state stands for a set of substrings that
end at the same set of positions; `_len[s]` is the longest of them, `_link[s]` the state of the
longest suffix that ends at more positions, `_next[s]` the transitions by token (so `len(_next[s])`
is the number of distinct tokens that followed it). The state of the whole context is `_last`; its
suffix link is the longest suffix that occurred before. Where that suffix occurred last is found by
searching the tokens' bytes backwards (bytes.rfind, in C: microseconds at 30K tokens) rather than
kept per state, which would cost a walk up the suffix links per token (quadratic on periodic text).
Each token is written as 4 bytes of 7 bits, the first with its high bit set and the others without,
so a pattern (which starts with a first byte) can only match where a token starts.

Rollback: every extend records what it changed (the states it added, the transitions it set or
redirected with their old targets, the one suffix link it redirected), and truncate undoes those
records newest first, so the automaton after any sequence of extends and truncates is the one
built from scratch over the same tokens (tests/test_suffix.py checks that against a brute force).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Sequence

from torch import Tensor

from triforce_chat.decoding.sampling import Sampler

MAX_TOKEN = 1 << 28  # token ids the byte form below can hold


def _token_bytes(tok: int) -> bytes:
    """A token as 4 bytes of 7 bits each, high bit set on the first only: byte patterns of whole
    tokens then match only at token boundaries."""
    return bytes((0x80 | tok >> 21, tok >> 14 & 0x7F, tok >> 7 & 0x7F, tok & 0x7F))


class SuffixDrafter:
    """Prompt lookup by the longest earlier match (see the module docstring)."""

    name = "suffix"
    drafts_with_model = False

    def __init__(self, min_match: int = 1, vocab_size: int | None = None):
        if min_match < 1:
            raise ValueError(f"need min_match >= 1, got {min_match}")
        self.min_match = min_match
        self.vocab_size = vocab_size
        self._tokens = array("i")  # [L]
        self._bytes = bytearray()  # [4 L] the tokens as `_token_bytes`, searched for a match's latest occurrence
        self._len = array("i", [0])  # per state
        self._link = array("i", [-1])
        self._next: list[dict[int, int]] = [{}]
        self._last = 0
        # per extended token: (last state before, state count before, changed transitions as flat
        # (state, token, old target or -1) triples, redirected link as (state, old link) or ())
        self._undo: list[tuple[int, int, array, tuple[int, ...]]] = []
        self.last_match = 0  # length of the match behind the last proposal (0: none)
        self.last_branches = 0  # distinct tokens that followed that match before
        self._last_end = -1  # where the occurrence the last proposal followed ends

    # -- the context --------------------------------------------------------------------------------------
    @property
    def tokens(self) -> Sequence[int]:
        return self._tokens

    @property
    def length(self) -> int:
        return len(self._tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        limit = min(self.vocab_size or MAX_TOKEN, MAX_TOKEN)
        for tok in tokens:
            tok = int(tok)
            if not 0 <= tok < limit:
                raise ValueError(f"token id {tok} is outside the suffix index's vocabulary of {limit}")
            self._add(tok)

    def _add(self, tok: int) -> None:
        lens, links, nexts = self._len, self._link, self._next
        self._tokens.append(tok)
        self._bytes += _token_bytes(tok)
        prev_last, n_states = self._last, len(lens)
        changed = array("i")
        relinked: tuple[int, ...] = ()
        cur = n_states
        lens.append(lens[prev_last] + 1)
        links.append(0)
        nexts.append({})
        s = prev_last
        while s >= 0 and tok not in nexts[s]:
            nexts[s][tok] = cur
            changed.extend((s, tok, -1))
            s = links[s]
        if s >= 0:
            q = nexts[s][tok]
            if lens[s] + 1 == lens[q]:
                links[cur] = q
            else:  # q also stands for longer strings than s + tok: split off the shorter ones
                clone = len(lens)
                lens.append(lens[s] + 1)
                links.append(links[q])
                nexts.append(dict(nexts[q]))
                while s >= 0 and nexts[s].get(tok) == q:
                    nexts[s][tok] = clone
                    changed.extend((s, tok, q))
                    s = links[s]
                relinked = (q, links[q])
                links[q] = clone
                links[cur] = clone
        self._last = cur
        self._undo.append((prev_last, n_states, changed, relinked))

    def truncate(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"cannot truncate {len(self._tokens)} tokens to {length}")
        nexts, links = self._next, self._link
        while len(self._tokens) > length:
            prev_last, n_states, changed, relinked = self._undo.pop()
            if relinked:
                links[relinked[0]] = relinked[1]
            for i in range(len(changed) - 3, -1, -3):
                s, tok, old = changed[i], changed[i + 1], changed[i + 2]
                if old < 0:
                    del nexts[s][tok]
                else:
                    nexts[s][tok] = old
            del self._len[n_states:], self._link[n_states:], nexts[n_states:]
            self._last = prev_last
            self._tokens.pop()
        del self._bytes[4 * length :]

    # -- proposals ------------------------------------------------------------------------------------------
    # The occurrence a draft follows: the latest earlier one of the match's last REACH tokens. Why the
    # latest: where a short match was followed by different tokens before, the most recent occurrence
    # (the answer's own phrasing, the passage being quoted) is right far more often than the first.
    REACH = 32

    def match(self) -> tuple[int, int, int]:
        """(length, end, branches) of the longest suffix of the context that occurred before: its
        length (0: none), where the latest earlier occurrence of its last REACH tokens ends, and how
        many distinct tokens followed it."""
        if not self._tokens:
            return 0, -1, 0
        s = self._link[self._last]
        if s <= 0:
            return 0, -1, 0
        length = self._len[s]
        return length, self._latest_end(min(length, self.REACH)), len(self._next[s])

    def _latest_end(self, m: int) -> int:
        """The last position before the context's last token where its last m tokens end (one
        exists: the automaton found them there; the bytes can only match where a token starts)."""
        buf, L = self._bytes, len(self._tokens)
        at = buf.rfind(bytes(buf[4 * (L - m) :]), 0, 4 * (L - 1))  # ending before the last token
        return at // 4 + m - 1

    def match_length(self) -> int:
        if not self._tokens:
            return 0
        return self._len[max(0, self._link[self._last])]

    def propose_lookup(self, k: int) -> tuple[list[int], Tensor | None]:
        return self.propose(k)

    def propose_model(self, k: int, sampler: Sampler) -> tuple[list[int], Tensor | None]:
        return [], None

    def propose(self, k: int, sampler: Sampler | None = None) -> tuple[list[int], Tensor | None]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix
        (a point mass: q is None); nothing when no match of min_match tokens backs a draft."""
        self.last_match, self.last_branches = 0, 0
        if k <= 0 or self.match_length() < self.min_match:
            return [], None
        length, end, branches = self.match()
        self.last_match, self.last_branches = length, branches
        self._last_end = end
        return self._tokens[end + 1 : min(end + 1 + k, len(self._tokens))].tolist(), None

    # Earlier occurrences looked at for a second continuation: a match followed by different tokens
    # before is usually a short one, with many occurrences; a few dozen of the latest are plenty.
    ALTERNATIVE_SCAN = 48

    def propose_alternative(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the last proposal's match
        whose next token differs from the proposal's first (a second branch for a tree window,
        decoding/tree.py); nothing when the match was always followed by the same token, or when
        no such occurrence is among the ALTERNATIVE_SCAN latest."""
        if k <= 0 or self.last_branches < 2 or self.last_match <= 0:
            return []
        toks, buf, L = self._tokens, self._bytes, len(self._tokens)
        m = min(self.last_match, self.REACH)
        first = toks[self._last_end + 1]
        pattern = bytes(buf[4 * (L - m) :])
        hi = 4 * (self._last_end + 1)  # occurrences ending before the proposal's own
        for _ in range(self.ALTERNATIVE_SCAN):
            at = buf.rfind(pattern, 0, hi - 4)
            if at < 0:
                return []
            end = at // 4 + m - 1
            if toks[end + 1] != first:
                return toks[end + 1 : min(end + 1 + k, L)].tolist()
            hi = 4 * (end + 1)
        return []

    def catch_up(
        self, progress: Callable[[int, int], None] | None = None, should_cancel: Callable[[], bool] | None = None
    ) -> bool:
        """Nothing to run: the automaton is current after every extend."""
        return True

    def figures(self) -> dict[str, int]:
        return {"suffix_states": len(self._len)}

    @property
    def index_bytes(self) -> int:
        """Approximate memory of the automaton (its arrays, transition dicts and undo records)."""
        total = sum(sys.getsizeof(a) for a in (self._tokens, self._bytes, self._len, self._link))
        total += sys.getsizeof(self._next) + sum(sys.getsizeof(d) for d in self._next)
        total += sys.getsizeof(self._undo) + sum(sys.getsizeof(u[2]) + 64 for u in self._undo)
        return total
