"""Verifying two drafts that part at their first token, in one forward of the target.

Where the lookup's match was followed by different tokens before, its proposal (what followed the
latest occurrence) is often wrong at the first token, and what followed an earlier occurrence is
then often right (decoding/suffix.py, `propose_alternative`). A tree window verifies both chains at
once: rows [pending, a1 .. am, b1 .. bn] in one forward, where a1 and b1 are different tokens that
would both sit at the pending token's next position.

Exact by construction, greedy bits included: every row must get the logits it would get in a plain
window of its own chain. The linears are row-invariant (a row's arithmetic does not depend on the
other rows of a window up to MAX_WINDOW), so only attention must see, for each row, exactly the keys
of its own chain at its own positions. `TreeWindow` gives each branch that: per layer, the pending
token and chain a are written at positions p .. p + m and attended as a window; then chain b is
written at positions p + 1 .. p + n, over chain a's keys, and attended as a window of its own. The
attention kernels' arithmetic depends on a query's position and the keys alone (kernels/cpu/
attention.h), so branch b's rows get the bits of a window [pending, b1 .. bn]. After verification,
`keep` writes the accepted chain's keys/values into place and advances the cache over them.

Sampling: the verifier of the first token is multi-draft speculative sampling for drafts that are
point masses (SpecInfer, Miao et al. 2024, "multi-step speculative sampling"; Chen et al. 2023's
recursive rejection): accept a1 with probability p(a1); after a rejection the target's distribution
without a1, renormalised, is the residual, and b1 is accepted with its probability there; after both
are rejected the token is drawn from p without a1 and b1. Every token x comes out with probability
p(x). The chosen chain's later drafts are then verified as any window (`verify_drafts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.sampling import Sampler, verify_drafts


class TreeWindow:
    """A KVStore over `cache` for rows [pending, *branch 0, *branch 1, ...]: every branch follows the
    pending token, at the positions it would have alone. The cache's length moves only in `keep`."""

    exact_windows = True  # the target verifies on it: its rows must equal single steps

    def __init__(self, cache: KVCache, branch_lengths: Sequence[int]):
        if not branch_lengths or min(branch_lengths) < 1:
            raise ValueError(f"a tree needs branches of one token or more, not {list(branch_lengths)}")
        self.cache, self.start = cache, cache.length
        if self.start + 1 + max(branch_lengths) > cache.max_len:
            raise ValueError(f"KV cache full: {self.start} + {1 + max(branch_lengths)} tokens > {cache.max_len}")
        # per row of the window: its position, and the row at which its branch begins
        self.row_pos: list[int] = [self.start]
        self.branch_rows: list[tuple[int, int]] = []  # (first row, row count) of each branch
        for n in branch_lengths:
            self.branch_rows.append((len(self.row_pos), n))
            self.row_pos += [self.start + 1 + i for i in range(n)]
        self.rows = len(self.row_pos)
        self.cursor = 0  # the next row a forward feeds (a model without row-invariant windows feeds one at a time)
        self.keys: list[Tensor | None] = [None] * len(cache.k)  # per layer [rows, Hkv, D], for `keep`
        self.values: list[Tensor | None] = [None] * len(cache.k)
        # per layer and branch, the query of the branch's last row: a plain window of the kept branch
        # leaves it in `cache.last_query` (the retrieval view and the sources read it)
        self.last_queries: list[list[Tensor | None]] = [[None] * len(branch_lengths) for _ in cache.k]

    # -- KVStore protocol ----------------------------------------------------------------------------
    def positions(self, n: int) -> Tensor:
        if self.cursor + n > self.rows:
            raise ValueError(f"a tree window of {self.rows} rows was fed {self.cursor + n}")
        return torch.tensor(self.row_pos[self.cursor : self.cursor + n], device=self.cache.k.device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Rows cursor .. cursor + T - 1 of the window, attended branch by branch (see the module)."""
        lo, hi = self.cursor, self.cursor + k.shape[0]
        keys, values = self.keys[layer], self.values[layer]
        if keys is None:
            keys = self.keys[layer] = k.new_empty((self.rows, *k.shape[1:]))
            values = self.values[layer] = v.new_empty((self.rows, *v.shape[1:]))
        keys[lo:hi], values[lo:hi] = k, v
        out: list[Tensor] = []
        # the pending row goes with the first branch: [pending, a1 .. am] is a plain window
        spans = [(0, 1 + self.branch_rows[0][1])] + [(r, r + n) for r, n in self.branch_rows[1:]]
        for branch, (first, end) in enumerate(spans):
            a, b = max(lo, first), min(hi, end)
            if a < b:
                out.append(self.cache.attend(layer, q[a - lo : b - lo], k[a - lo : b - lo], v[a - lo : b - lo],
                                             start=self.row_pos[a]))
                if b == end:
                    self.last_queries[layer][branch] = self.cache.last_query[layer]
        return out[0] if len(out) == 1 else torch.cat(out)

    def advance(self, n: int) -> None:
        self.cursor += n

    def rows_of(self, branch: int) -> list[int]:
        """The window's rows of `branch`, the pending row first: the rows a plain window [pending,
        *branch] would have."""
        first, n = self.branch_rows[branch]
        return [0, *range(first, first + n)]

    # -- after verification ----------------------------------------------------------------------------
    def keep(self, branch: int, accepted: int) -> None:
        """The cache then holds the pending token and the first `accepted` tokens of `branch` (their
        keys/values from this forward, written where a plain window of that branch put them)."""
        if self.cursor != self.rows:
            raise RuntimeError(f"the tree window was fed {self.cursor} of its {self.rows} rows")
        first, n = self.branch_rows[branch]
        if not 0 <= accepted <= n:
            raise ValueError(f"branch {branch} has {n} drafts, cannot keep {accepted}")
        cache = self.cache
        # the last branch attended was written last: its rows are in place; another's were written over
        if accepted and branch != len(self.branch_rows) - 1:
            for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
                cache.write(layer, self.start + 1, k[first : first + accepted], v[first : first + accepted])
        for layer, queries in enumerate(self.last_queries):
            cache.last_query[layer] = queries[branch]
        cache.advance(1 + accepted)
        cache.truncate(cache.length)  # forgets the prepared blocks a branch made past the kept rows


def verify_branches(sampler: Sampler, branches: Sequence[Sequence[int]], p: Sequence[Tensor]) -> tuple[int, int, int]:
    """Verify drafts that part at their first token (point masses, first tokens all different).

    p[b]: the target's probabilities along branch b [len(branches[b]) + 1, V] (row 0, the pending
    token's, is the same for every branch). Returns (branch, accepted, next token): the emitted tokens
    branches[branch][:accepted] + [next] are distributed exactly as the target's own sampling (see
    the module docstring); with nothing accepted, branch is 0."""
    root = p[0][0]
    firsts = [int(b[0]) for b in branches]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"tree branches must start with different tokens, not {firsts}")
    if sampler.greedy:
        top = int(root.argmax())
        for i, tok in enumerate(firsts):
            if tok == top:
                a, nxt = verify_drafts(sampler, list(branches[i][1:]), None, p[i][1:])
                return i, 1 + a, nxt
        return 0, 0, top
    residual = root.clone()
    for i, tok in enumerate(firsts):
        total = float(residual.sum())
        if total > 0 and sampler.uniform() * total < float(residual[tok]):  # p'(tok) of the residual p'
            a, nxt = verify_drafts(sampler, list(branches[i][1:]), None, p[i][1:])
            return i, 1 + a, nxt
        residual[tok] = 0.0
    if float(residual.sum()) <= 0:  # every token of p's support was drafted and rejected: rounding
        residual = root
    return 0, 0, sampler.sample(residual / residual.sum())
