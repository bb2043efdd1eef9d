"""The logits processors that are part of the target distribution, and the token history they read.

The order is transformers' `generate`: repetition penalty, then temperature, then top-k, then top-p.
Every level of the hierarchy applies them identically and position by position, which is what
makes them part of the distribution the speculative decoder reproduces exactly.

Repetition penalty (the CTRL rule, as transformers and llama.cpp apply it): every token id that
occurs among the previous tokens has its logit divided by the penalty when it is positive and
multiplied by it otherwise. "Previous tokens" here are the last `window` tokens of the sequence
before the position being sampled, prompt included (0: the whole sequence). The default window is
64 tokens, llama.cpp's `repeat_last_n`, not transformers' whole input: a chat about a document is
supposed to quote it, and penalizing every token of a 30K-token document would push answers away
from the words they should reuse, while a loop of the answer's own sentences sits inside the
last few dozen tokens. Either way the penalty is a deterministic function of the token prefix.

Inside a verification window the prefix differs per row: row j of a window [pending, d1..dk]
follows the context plus d1..dj. `TokenHistory` keeps a count per vocabulary id over the window of
the context (updated as tokens are appended and rolled back, never rebuilt), so a call costs a
gather and a scatter over the ids in the window plus a small correction for the ids the drafted
tokens add or push out of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class TokenHistory:
    """The token sequence the repetition penalty looks back over, with per-id counts of its window.

    `tokens` is the whole sequence; the window is its last `window` tokens (0: all). Counts are a
    [V] int tensor built on first use (when the vocabulary size and device are known) and then
    updated by `extend` and `truncate` in time proportional to the tokens that enter or leave."""

    def __init__(self, window: int = 64):
        if window < 0:
            raise ValueError(f"repetition window must be >= 0, not {window}")
        self.window = window
        self.tokens: list[int] = []
        self._counts: Tensor | None = None  # [V'] int64, V' >= the vocabulary: occurrences in the window

    def __len__(self) -> int:
        return len(self.tokens)

    def _start(self, length: int) -> int:
        """First position of the window of a sequence of `length` tokens."""
        return max(0, length - self.window) if self.window else 0

    def reset(self, tokens: Sequence[int]) -> None:
        self.tokens = [int(t) for t in tokens]
        self._counts = None

    def extend(self, tokens: Sequence[int]) -> None:
        if not len(tokens):
            return
        old = (self._start(len(self.tokens)), len(self.tokens))
        self.tokens.extend(int(t) for t in tokens)
        self._move(old, (self._start(len(self.tokens)), len(self.tokens)))

    def truncate(self, length: int) -> None:
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"cannot truncate a history of {len(self.tokens)} tokens to {length}")
        if length == len(self.tokens):
            return
        self._move((self._start(len(self.tokens)), len(self.tokens)), (self._start(length), length))
        del self.tokens[length:]

    def _move(self, old: tuple[int, int], new: tuple[int, int]) -> None:
        """Counts of window [a, b) -> counts of window [c, d) (positions in `tokens`, which holds both)."""
        if self._counts is None:
            return
        (a, b), (c, d) = old, new
        toks = self.tokens
        gone = toks[a : min(b, c)] + toks[max(a, d) : b]
        came = toks[c : min(d, a)] + toks[max(c, b) : d]
        self._add(gone, -1)
        self._add(came, 1)

    def _add(self, ids: list[int], sign: int) -> None:
        if not ids:
            return
        assert self._counts is not None
        if max(ids) >= self._counts.numel():
            grown = self._counts.new_zeros(max(ids) + 1)
            grown[: self._counts.numel()] = self._counts
            self._counts = grown
        idx = torch.tensor(ids, dtype=torch.long, device=self._counts.device)
        self._counts.index_add_(0, idx, torch.full_like(idx, sign))

    def counts(self, vocab: int, device: torch.device) -> Tensor:
        """[>= vocab] occurrences of each id in the window (built once, then kept up to date)."""
        c = self._counts
        if c is None or c.device != device or c.numel() < vocab:
            window = self.tokens[self._start(len(self.tokens)) :]
            size = max(vocab, max(window) + 1) if window else vocab
            ids = torch.tensor(window, dtype=torch.long, device=device)
            self._counts = torch.bincount(ids, minlength=size)
        return self._counts

    def penalized(self, rows: int, extra: Sequence[int], vocab: int, device: torch.device
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Which ids are "previous tokens" for each of `rows` consecutive positions.

        The last row follows the history plus all of `extra`, each row before it one token less
        (row j of a window [pending, d1..dk] with extra = d1..dk follows history + d1..dj).
        Returns (base_ids [B]: ids in the history's window, seen by every row unless corrected;
        ids [M]: the ids that drafted tokens add to or push out of the window; seen [rows, M] bool:
        whether each row counts each of those ids as previous)."""
        if len(extra) < rows - 1:
            raise ValueError(f"{rows} rows need at least {rows - 1} extra tokens, got {len(extra)}")
        counts = self.counts(vocab, device)
        base_ids = counts[:vocab].nonzero().squeeze(1)
        extra = [int(t) for t in extra]
        offset = len(extra) - (rows - 1)  # row j follows history + extra[: offset + j]
        L, n = len(self.tokens), self.window
        a0 = self._start(L)
        # tokens that leave the window as extras come in, in order: the sequence from the window's start
        leaving = (self.tokens[a0 : a0 + len(extra)] + extra)[: len(extra)] if n else []
        touched = sorted({t for t in (*extra, *leaving) if t < vocab})
        if not touched:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return base_ids, empty, torch.zeros(rows, 0, dtype=torch.bool, device=device)
        pos = {t: i for i, t in enumerate(touched)}
        ids = torch.tensor(touched, dtype=torch.long, device=device)
        running = counts[ids].tolist()
        added = left = 0
        seen: list[list[bool]] = []
        for j in range(rows):
            k = offset + j  # extras before this row
            gone = max(0, L + k - n) - a0 if n else 0  # tokens pushed out of the window by them
            while added < k:
                t = extra[added]
                if t < vocab:
                    running[pos[t]] += 1
                added += 1
            while left < gone:
                t = leaving[left]
                if t < vocab:
                    running[pos[t]] -= 1
                left += 1
            seen.append([c > 0 for c in running])
        return base_ids, ids, torch.tensor(seen, dtype=torch.bool, device=device)


def penalize(values: Tensor, penalty: float) -> Tensor:
    """The CTRL rule on some logits: positive ones divided by the penalty, the others multiplied.
    One elementwise formula wherever it is applied, so a logit gets the same bits in a window and
    in a single step."""
    return torch.where(values > 0, values / penalty, values * penalty)


def apply_repetition_penalty(logits: Tensor, penalty: float, history: TokenHistory,
                             extra: Sequence[int] = ()) -> Tensor:
    """logits [T, V] fp32 -> a new tensor with the penalty applied row by row (see
    TokenHistory.penalized for which prefix each row follows). The input is left unchanged."""
    rows, vocab = logits.shape
    base_ids, ids, seen = history.penalized(rows, extra, vocab, logits.device)
    out = logits.clone()
    if base_ids.numel():
        out[:, base_ids] = penalize(logits[:, base_ids], penalty)
    if ids.numel():  # the ids whose status the drafted tokens change, row by row, from the input
        original = logits[:, ids]
        out[:, ids] = torch.where(seen, penalize(original, penalty), original)
    return out


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties with the k-th kept, as transformers does); the
    others become -inf. k = 0 or k >= V keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (the token crossing it
    included), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    probs = torch.zeros_like(probs).scatter_(-1, order, _within_top_p(sorted_p, top_p))
    return probs / probs.sum(-1, keepdim=True)


def _within_top_p(sorted_p: Tensor, top_p: float) -> Tensor:
    """Rows of probabilities sorted in descending order, with every entry past the one whose mass
    reaches top_p set to zero (not renormalised)."""
    return sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)


def top_k_top_p_probs(scores: Tensor, k: int, top_p: float) -> Tensor:
    """softmax, then top-p, of top_k_filter(scores, k): the same distribution computed on each row's
    k best logits (a sort of k values, not of a 151,936-token vocabulary: ~5 ms a row with the full
    sort) and scattered back into zeros. A row with ties at its k-th logit, which the definition
    keeps all of, goes the long way. Each row's path and arithmetic depend on that row alone, so
    a row of a window gets the bits it gets alone."""
    rows = scores.reshape(-1, scores.shape[-1])  # [R, V]
    if k >= rows.shape[-1]:  # nothing is past the k-th logit
        vals, idx = rows.topk(rows.shape[-1], dim=-1)
        tied = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    else:
        vals, idx = rows.topk(k + 1, dim=-1)  # [R, k + 1] descending
        tied = vals[:, k] == vals[:, k - 1]  # [R]: the k-th logit has a tie past it (no pass over the row)
        vals, idx = vals[:, :k], idx[:, :k]
    p = torch.softmax(vals, dim=-1)
    if top_p < 1.0:  # rows already sorted
        p = _within_top_p(p, top_p)
        p = p / p.sum(-1, keepdim=True)
    out = torch.zeros_like(rows).scatter_(-1, idx, p)
    if bool(tied.any()):
        out[tied] = top_p_filter(torch.softmax(top_k_filter(rows[tied], k), dim=-1), top_p)
    return out.reshape(scores.shape)


__all__ = ["TokenHistory", "apply_repetition_penalty", "penalize", "top_k_filter", "top_k_top_p_probs", "top_p_filter"]
