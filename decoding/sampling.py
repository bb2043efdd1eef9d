"""Turning logits into tokens, and the speculative accept/resample rule that keeps drafts lossless.

Every level of the hierarchy goes through `Sampler.probs` with the same processors (repetition
penalty, temperature, top-k, top-p, in transformers' order: see processors.py), row by row with
each row's own prefix, so p (verifier) and q (drafter) are shaped identically, which is what the
min(1, p/q) rule assumes. Greedy (temperature 0) is the limit: q and p are one-hot at the argmax of
the penalized logits (transformers' greedy search also applies its logits processors first);
top-k and top-p never remove the argmax, and with the penalty at 1.0 greedy is plain argmax.

The sampler carries the token history the penalty reads (`reset`, `extend`, `truncate`): the
decoder keeps it equal to the sequence before the next position to sample, drafts of the current
window included, so a drafter that only gets the sampler (ModelDrafter.propose) sees the same
prefix as the verifiers. With the penalty at 1.0 the history is not kept at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from triforce_chat.decoding.processors import (
    TokenHistory,
    apply_repetition_penalty,
    top_k_top_p_probs,
    top_p_filter,
)


@dataclass
class Sampler:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off
    repetition_window: int = 64  # previous tokens the penalty looks at; 0: the whole sequence

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top-p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top-k must be >= 0")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition penalty must be > 0")
        self.history = TokenHistory(self.repetition_window)
        self.generator = torch.Generator()
        if self.seed is not None:
            self.generator.manual_seed(self.seed)
        else:
            self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1.0

    # -- the prefix the repetition penalty reads -----------------------------------------------------
    def reset(self, tokens: Sequence[int]) -> None:
        """The sequence so far (the prompt and the answer up to the next position)."""
        if self.penalizes:
            self.history.reset(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        if self.penalizes:
            self.history.extend(tokens)

    def truncate(self, length: int) -> None:
        if self.penalizes:
            self.history.truncate(length)

    # -- processing -----------------------------------------------------------------------------------
    def scores(self, logits: Tensor, extra: Sequence[int] = ()) -> Tensor:
        """logits [..., V] -> fp32 logits after the repetition penalty. Rows of a [T, V] input follow
        consecutive positions: the last row the history plus all of `extra`, each row before it one
        token less (for a window [pending, d1..dk] pass extra = d1..dk)."""
        logits = logits.float()
        if not self.penalizes:
            return logits
        rows = logits.reshape(-1, logits.shape[-1])
        return apply_repetition_penalty(rows, self.repetition_penalty, self.history, extra).reshape(logits.shape)

    def probs(self, logits: Tensor, extra: Sequence[int] = ()) -> Tensor:
        """logits [..., V] -> probabilities [..., V] fp32 after the repetition penalty, temperature,
        top-k and top-p (rows and `extra` as in `scores`). Greedy: one-hot at the argmax of the
        penalized logits (ties go to the lowest id, like torch.argmax)."""
        scores = self.scores(logits, extra)
        if self.greedy:  # one-hot rows, made in place (F.one_hot builds an int64 copy of the vocabulary first)
            return torch.zeros_like(scores).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0)
        scores = scores / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            return top_k_top_p_probs(scores, self.top_k, self.top_p)
        return top_p_filter(torch.softmax(scores, dim=-1), self.top_p)

    def next_token(self, logits: Tensor) -> int:
        """sample(probs(logits)) for one row [V]; greedy takes the argmax of the processed scores
        directly (the same token, without a one-hot row of the vocabulary's size per step)."""
        if self.greedy:
            return int(self.scores(logits).argmax())
        return self.sample(self.probs(logits))

    def sample(self, probs: Tensor) -> int:
        """One token from probs [V], drawn among its nonzero entries: top-k and top-p leave a few
        dozen of a vocabulary of 151,936, and torch.multinomial over the whole row took ~3 ms."""
        if self.greedy:
            return int(probs.argmax())
        probs = probs.cpu()
        support = probs.nonzero().squeeze(1)
        return int(support[torch.multinomial(probs[support], 1, generator=self.generator)])

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


def verify_drafts(
    sampler: Sampler, drafts: list[int], q: Tensor | None, p: Tensor
) -> tuple[int, int]:
    """Standard speculative sampling over one window.

    drafts: n proposed tokens; q [n, V]: the drafter's probabilities for each (None: a point mass
    on the draft, as for n-gram proposals); p [n+1, V]: the verifier's probabilities at each draft
    position plus one past the last. Returns (accepted count a, next token): the next token is the
    residual resample at the first rejection, or the bonus from p[n] when all drafts pass. The
    emitted tokens drafts[:a] + [next] are distributed exactly as the verifier's own sampling.
    """
    n = len(drafts)
    for i, tok in enumerate(drafts):
        p_tok = float(p[i, tok])
        q_tok = 1.0 if q is None else float(q[i, tok])
        if sampler.greedy:
            ok = int(p[i].argmax()) == tok
        else:
            ok = q_tok > 0 and sampler.uniform() * q_tok < p_tok  # accept with prob min(1, p/q)
        if not ok:
            if sampler.greedy:
                return i, int(p[i].argmax())
            if q is None:
                residual = p[i].clone()
                residual[tok] = 0.0
            else:
                residual = (p[i] - q[i]).clamp_min_(0.0)
            total = float(residual.sum())
            if total <= 0:  # p == q up to rounding: the residual is empty, p itself is exact
                residual = p[i]
            return i, sampler.sample(residual / residual.sum())
    return n, sampler.sample(p[n])
