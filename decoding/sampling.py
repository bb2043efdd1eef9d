"""Turning logits into tokens, and the speculative accept/resample rule that keeps drafts lossless.

Every level of the hierarchy goes through `Sampler.probs` with the same temperature and top-p, so
p (verifier) and q (drafter) are shaped identically, which is what the min(1, p/q) rule assumes.
Greedy (temperature 0) is the limit: q and p are one-hot at their argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Sampler:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top-p must be in (0, 1]")
        self.generator = torch.Generator()
        if self.seed is not None:
            self.generator.manual_seed(self.seed)
        else:
            self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: Tensor) -> Tensor:
        """logits [..., V] -> probabilities [..., V] fp32 after temperature and top-p.
        Greedy: one-hot at the argmax (ties go to the lowest id, like torch.argmax)."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def sample(self, probs: Tensor) -> int:
        """One token from probs [V]."""
        if self.greedy:
            return int(probs.argmax())
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

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
