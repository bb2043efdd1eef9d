"""The adaptive route: what each speculative round does, chosen for the most expected tokens per second.

A round is a plain target step, a middle-level window of γ drafts, k of the bottom drafter's
proposals verified by the target directly, or those k with k_alt of the match's other way in one
tree window (decoding/tree.py). Each has an expected number of kept tokens (from the
acceptance of its drafts) and a cost (from the measured cost of a target window of t tokens, c(t),
and the drafters' own costs); the route takes the best rate, and a plain step when nothing beats it.
That is what keeps the default level from being slower than level 0 where speculation does not pay.

Where the numbers come from:
- c(t): measured once a session's documents are in the cache (`SpeculativeDecoder.calibrate`, a
  fraction of a second), then kept current by every window that runs. They are shared by the levels
  of a session (`WindowCosts`): they describe the machine at the current depth, not a level. On a
  CPU they vary a lot: vector kernels pay nearly a step per extra row, matrix units almost nothing,
  and kernels that tile rows make c(t) uneven (a window of 4 rows can cost less than one of 3). So
  once measured, the route uses only the window lengths it measured (CALIBRATION_WINDOWS): a draft
  of any length can be cut to fit one of them.
- acceptance: counted per drafted position (`Acceptance`), for the middle level, for a draft model,
  and for the lookup per length of the match its proposal follows and how many different tokens
  followed that match before (`lookup_key`): a proposal that follows a 20-token match is right
  far more often than one that follows a single token, and a match that was followed by four or
  more different tokens is right about a third as often as one that was always followed by the
  same token. The answer's first token has its own count: it follows the chat template, not the
  text, and the lookup's guess there (the token after an earlier "assistant" line) is nearly
  never it (0 of 38 bench-qa answers, docs/performance.md).
- the middle level's cost per draft, before it is measured: a target step scaled by the bytes a
  middle step reads (all weights, the retrieved part of the KV) against a full step's (all weights,
  all the KV). At a few thousand tokens the two read nearly the same, so the middle level is not
  tried where it cannot pay.
- the answer's expected remaining length: a once-per-answer cost (rebuilding the retrieval view)
  and a probe of a route the estimates choose against are paid only where the rest of the answer
  can win them back.

Exactness does not depend on anything here: every route verifies its drafts with the target's own
distribution; the route only decides how the tokens are found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# a window of t tokens costs 1 + PRIOR_SLOPE (t - 1) steps until c(t) is measured
PRIOR_SLOPE = 0.3
MID_PRIOR = 0.8  # per-position acceptance of the middle level's drafts (TriForce reports more)
MODEL_PRIOR = 0.5  # ... of a small draft model's drafts
# ... of the lookup's drafts, per branch class of the match (`branch_class`: 0 always followed by
# the same token, 1 by 2-3 different ones, 2 by 4 or more) and match bucket (1: 1 token, 2: 2-3,
# 3: 4-7, 4: 8-15, 5: 16+): a little under what the lookup's proposals at every position of
# bench-qa's answers showed (docs/performance.md), since those quote more than chat does; the
# session's own counts take over within a few windows
LOOKUP_PRIOR = {
    0: {0: 0.2, 1: 0.6, 2: 0.65, 3: 0.7, 4: 0.7, 5: 0.75},
    1: {0: 0.1, 1: 0.45, 2: 0.5, 3: 0.45, 4: 0.5, 5: 0.55},
    2: {0: 0.05, 1: 0.2, 2: 0.2, 3: 0.25, 4: 0.3, 5: 0.35},
}
ANSWER_START = "answer start"  # the lookup key of a proposal for an answer's first token
ANSWER_START_PRIOR = 0.05
# where a match was followed by different tokens before, the chance that what followed an earlier
# occurrence (a tree window's second branch, decoding/tree.py) is right when the proposal's first
# token is wrong, per branch class: a little under bench-qa's 7 of 36 (2-3 ways) and 11 of 83 (4+),
# measured with a tree forced at every such round (docs/performance.md; the most frequent earlier
# follower instead of the latest did no better); the session's own counts take over
ALTERNATIVE_PRIOR = {1: 0.15, 2: 0.1}
# a speculative route is taken only when its expected rate beats a plain step's by this factor: the
# estimates are noisy, and a near-tie is not worth a window that may lose
MARGIN = 1.05
ANSWER_PRIOR = 48  # tokens an answer runs to, until the session has seen some
PROBE_MIN_REMAINING = 24  # a probe is worth its loss only with this many tokens left to win it back
PROBE_EVERY = 8  # rounds between probes of a route that keeps losing (doubling up to 8x)
SHALLOW = 1024  # depths below this count as this one for re-calibrating
CALIBRATION_WINDOWS = (2, 4, 8)  # window lengths (tokens, pending one included) timed by a calibration
TREE_EXTRA_PRIOR = 0.1  # steps a tree window costs beyond a plain window of as many rows, until measured


class Ema:
    """An exponential moving average; `n` counts the updates (0: only the prior)."""

    def __init__(self, value: float, weight: float = 0.25):
        self.value, self.weight, self.n = value, weight, 0

    def update(self, x: float) -> None:
        self.value = x if self.n == 0 else (1 - self.weight) * self.value + self.weight * x
        self.n += 1


class AnswerCalibration:
    """How this answer's lookup drafts fare against what the session's counts predicted for them.

    Why: the counts are per session, and answers differ. One that quotes the document takes far
    more of the lookup's drafts than the session's average; one that rephrases the question (bench-
    qa's python-literals #2) takes almost none, and the session's counts, made by earlier quoting
    answers, kept paying for windows that failed at their first draft. `factor` scales the session's
    estimate for this answer: (hits + S) / (predicted hits + S), so a few windows move it little and
    a run of them a lot."""

    STRENGTH = 3.0  # S: tried positions' worth of "as the session predicts"

    def __init__(self) -> None:
        self.hits = self.predicted = 0.0

    def record(self, alpha: float, accepted: int, proposed: int) -> None:
        """A window of `proposed` lookup drafts, `accepted` of them kept, estimated at `alpha` per position."""
        tried = accepted + (1 if accepted < proposed else 0)
        self.hits += accepted
        self.predicted += alpha * tried

    def factor(self) -> float:
        return (self.hits + self.STRENGTH) / (self.predicted + self.STRENGTH)


class Acceptance:
    """Per-position acceptance of drafts, from counts: a window of k drafts of which a were accepted
    tried a + 1 positions (k when all passed) and accepted a, so accepted / tried estimates the
    geometric model's per-position rate (accepted / proposed would understate it). Counts decay, so
    the estimate follows the text; the prior counts as `weight` tries until it decays away."""

    def __init__(self, prior: float, weight: float = 4.0, decay: float = 0.9):
        self.hits, self.tries, self.decay, self.n = prior * weight, weight, decay, 0

    def update(self, accepted: int, proposed: int) -> None:
        tried = accepted + (1 if accepted < proposed else 0)
        self.hits = self.decay * self.hits + accepted
        self.tries = self.decay * self.tries + tried
        self.n += 1

    @property
    def value(self) -> float:
        return self.hits / self.tries


class Route(NamedTuple):
    """A round's route: "step", "mid" (a middle-level window of k), "direct" (k bottom drafts
    verified by the target) or "tree" (k bottom drafts and k_alt of a second branch, one window)."""

    route: str
    k: int
    k_alt: int = 0


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens kept by a window of k drafts with per-position acceptance alpha (the target's own
    correction or bonus token included)."""
    a = min(alpha, 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def tree_expected_tokens(alpha: float, beta: float, k: int, k_alt: int) -> float:
    """Tokens kept by a tree window: k drafts with per-position acceptance alpha, and a second
    branch of k_alt whose first token is right with probability beta when the first branch's is
    wrong (then alpha per position)."""
    a = min(alpha, 0.999)
    return 1 + a * (1 - a**k) / (1 - a) + beta * (1 - a**k_alt)


def match_bucket(match: int) -> int:
    """The lookup acceptance bucket of a proposal that follows a match of `match` tokens."""
    return min(5, max(0, match).bit_length())


def branch_class(branches: int) -> int:
    """0: the match was always followed by the same token before (or it is not known), 1: by 2-3
    different tokens, 2: by 4 or more."""
    return 0 if branches <= 1 else 1 if branches <= 3 else 2


LookupKey = tuple[int, int] | str


def lookup_key(match: int, branches: int, start: bool = False) -> LookupKey:
    """Where a lookup proposal's acceptance is counted: ANSWER_START for an answer's first token,
    else its match bucket and the branch class of the match."""
    return ANSWER_START if start else (match_bucket(match), branch_class(branches))


@dataclass
class WindowCosts:
    """Seconds of a full-target forward over t tokens at the current depth, c(t) (c(1): a step), and
    of a rebuild of the retrieval view. One per session: the machine's costs, shared by the levels."""

    step: Ema = field(default_factory=lambda: Ema(0.0))
    verify: dict[int, Ema] = field(default_factory=dict)  # t >= 2
    rebuild: Ema = field(default_factory=lambda: Ema(0.0))
    # seconds a tree window costs beyond a plain window of as many rows (its branches' attention is
    # one kernel call each: about a tenth of a step at 1K-7K tokens on a 2-core Zen 4), from tree rounds
    tree_extra: Ema = field(default_factory=lambda: Ema(0.0))
    calibrated_depth: int = 0

    def record(self, t: int, seconds: float) -> None:
        (self.step if t == 1 else self.verify.setdefault(t, Ema(seconds))).update(seconds)

    def needs_calibration(self, depth: int) -> bool:
        """Never measured, or measured at a depth that differs by more than 2x (attention's share
        of a window changes with it; below SHALLOW tokens the weights are most of a window's cost,
        so a chat without documents is not re-measured as it grows)."""
        if not self.step.n or not self.calibrated_depth:
            return True
        d, depth = max(self.calibrated_depth, SHALLOW), max(depth, SHALLOW)
        return not d / 2 <= depth <= 2 * d

    def tree_cost(self, t: int) -> float:
        """A tree window of t rows: c(t) and the measured extra (TREE_EXTRA_PRIOR steps until measured)."""
        extra = self.tree_extra.value if self.tree_extra.n else TREE_EXTRA_PRIOR * self.step.value
        return self.cost(t) + extra

    def lengths(self, n: int) -> list[int]:
        """Draft counts k <= n whose windows (k + 1 tokens) the route may use: those measured, once
        any is (the others' costs are guesses), else every k."""
        measured = sorted(t - 1 for t, e in self.verify.items() if e.n and t - 1 <= n)
        if any(e.n for e in self.verify.values()):
            return measured
        return list(range(1, n + 1))

    def cost(self, t: int) -> float:
        """c(t): measured, or interpolated between the measured lengths around t (extrapolated past
        the longest with the slope of the last two), or the prior slope when only a step is known."""
        step = self.step.value
        if t <= 1:
            return step
        if t in self.verify and self.verify[t].n:
            return self.verify[t].value
        known = sorted([(1, step), *((k, e.value) for k, e in self.verify.items() if e.n)])
        if len(known) == 1:
            return step * (1 + PRIOR_SLOPE * (t - 1))
        below = [kv for kv in known if kv[0] < t]
        above = [kv for kv in known if kv[0] > t]
        (k0, v0), (k1, v1) = (below[-1], above[0]) if above else (known[-2], known[-1])
        return max(step, v0 + (v1 - v0) * (t - k0) / (k1 - k0))


class CostModel:
    """The estimates of one level of a session (the window costs are the session's, shared)."""

    def __init__(self, windows: WindowCosts | None = None) -> None:
        self.windows = windows if windows is not None else WindowCosts()
        self.mid = Acceptance(MID_PRIOR)
        self.mid_per_token = Ema(0.0)  # middle level seconds per drafted token (level 2: bottom included)
        self.lookup: dict[LookupKey, Acceptance] = {
            (b, cls): Acceptance(p) for cls, priors in LOOKUP_PRIOR.items() for b, p in priors.items()}
        self.lookup[ANSWER_START] = Acceptance(ANSWER_START_PRIOR)
        self.alternative = {cls: Acceptance(p) for cls, p in ALTERNATIVE_PRIOR.items()}
        self.answer = AnswerCalibration()  # this answer's lookup drafts against the session's estimates
        self.model = Acceptance(MODEL_PRIOR)  # a draft model's drafts, verified directly
        self.model_per_token = Ema(0.0)
        self.answer_tokens = Ema(float(ANSWER_PRIOR), weight=0.3)
        # probes of a route the estimates keep choosing against, counted in rounds across the
        # answers of a session, so a losing probe's back-off carries over to the next answer
        self.rounds = 0
        self.last_used: dict[str, int] = {}
        self.probe_gap: dict[str, int] = {}

    @property
    def step(self) -> Ema:
        return self.windows.step

    def verify_cost(self, t: int) -> float:
        return self.windows.cost(t)

    # -- rates of the routes ----------------------------------------------------------------------------
    def step_rate(self) -> float:
        return 1.0 / max(self.step.value, 1e-9)

    def mid_cost_per_draft(self, bytes_ratio: float) -> float:
        """Measured, or a step scaled by the bytes a middle step reads against a full step's."""
        if self.mid_per_token.n:
            return self.mid_per_token.value
        return self.step.value * bytes_ratio

    def best_mid(self, gamma_max: int, bytes_ratio: float, once: float = 0.0, remaining: float = 1e9,
                 alpha: float | None = None) -> tuple[int, float]:
        """(γ, tokens/s) of the best middle-level window; `once`: seconds this answer still pays
        before its first window (a rebuild), spread over the `remaining` tokens."""
        m, a = self.mid_cost_per_draft(bytes_ratio), self.mid.value if alpha is None else alpha
        best, best_rate = 0, 0.0
        for g in self.windows.lengths(gamma_max):
            e = expected_tokens(a, g)
            rate = e / (g * m + self.verify_cost(g + 1) + once * e / max(1.0, remaining))
            if rate > best_rate:
                best, best_rate = g, rate
        return best, best_rate

    def direct_rate(self, k: int, alpha: float, draft_cost: float = 0.0) -> float:
        """Tokens/s of verifying k bottom drafts directly; draft_cost: seconds per draft still to pay."""
        return expected_tokens(alpha, k) / (k * draft_cost + self.verify_cost(k + 1))

    def best_direct(self, n: int, alpha: float, draft_cost: float = 0.0) -> tuple[int, float]:
        """(k, tokens/s) of the best prefix of n bottom drafts to verify directly: a window costs more
        per row than it saves once acceptance has fallen off (any prefix is a valid draft)."""
        rates = [(k, self.direct_rate(k, alpha, draft_cost)) for k in self.windows.lengths(n)]
        return max(rates, key=lambda kr: kr[1]) if rates else (0, 0.0)

    def best_tree(self, n: int, n_alt: int, alpha: float, beta: float) -> tuple[int, int, float]:
        """(k, k_alt, tokens/s) of the best tree window over prefixes of a proposal of n drafts and
        of a second branch of n_alt: the window's rows (1 + k + k_alt) cost what a plain window of
        as many rows costs (the same rows through the same kernels), plus a branch's own attention
        calls (`WindowCosts.tree_cost`)."""
        best = (0, 0, 0.0)
        for total in self.windows.lengths(n + n_alt):
            for k in range(max(1, total - n_alt), min(n, total - 1) + 1):
                rate = tree_expected_tokens(alpha, beta, k, total - k) / self.windows.tree_cost(total + 1)
                if rate > best[2]:
                    best = (k, total - k, rate)
        return best

    def lookup_alpha(self, key: LookupKey) -> float:
        """The per-position acceptance the route expects of a lookup proposal this round: the session's
        count for its key, scaled by how this answer's lookup drafts fared (`AnswerCalibration`)."""
        return min(0.99, self.lookup[key].value * self.answer.factor())

    def start_answer(self) -> None:
        self.answer = AnswerCalibration()

    def lookup_verified(self, key: LookupKey, accepted: int, proposed: int) -> None:
        """A window of lookup drafts was verified: the session's count and this answer's calibration."""
        self.answer.record(self.lookup[key].value, accepted, proposed)
        self.lookup[key].update(accepted, proposed)

    def model_cost_per_draft(self, bytes_ratio: float) -> float:
        """Seconds a draft model's token costs: measured, or a step scaled by the bytes its forward
        reads against a step's (its weights and its window of KV against the target's weights and
        whole cache), as the middle level's prior."""
        if self.model_per_token.n:
            return self.model_per_token.value
        return self.step.value * bytes_ratio

    def model_draft_length(self, k: int, bytes_ratio: float = 0.0) -> int:
        """How many draft-model tokens (at most k) to pay for now, to be verified directly: the length
        with the best expected rate, 0 where none beats a plain step (a probe then measures the model
        now and then: `probe_model_due`). Not always k: each draft costs a forward of the draft model
        whether the window keeps it or not, and with middling acceptance the best window is shorter
        (drafting γ_low every time, the 1.5B target with the 0.5B model lost to level 0 on several of
        bench-qa's short answers: docs/performance.md). Before the model's cost is measured, the bytes
        its forward reads say what it costs (`bytes_ratio`, against a target step's); drafting γ_low
        on trust made a session's first answer, when short, lose a third."""
        cost = self.model_cost_per_draft(bytes_ratio)
        if not self.step.n or cost <= 0:
            return k  # neither measured nor known from what its forward reads
        best, rate = self.best_direct(k, self.model.value, cost)
        return best if rate > self.step_rate() else 0

    # -- the choice ----------------------------------------------------------------------------------------
    def choose(self, gamma_max: int, props: list[int], source: str, match: int, remaining: float,
               mid: MidLevel | None, branches: int = 0, start: bool = False, alt: int = 0) -> Route:
        """A plain step, a middle window of γ, k of props verified directly, or a tree of k of props
        and k_alt of a second branch of `alt` drafts: the best expected rate; a route the estimates
        choose against is probed now and then where the rest of the answer can pay for it.
        `start`: this round makes the answer's first token."""
        self.rounds += 1
        choice, rate = Route("step", 0), self.step_rate() * MARGIN
        if source == "model":
            alpha = self.model.value
        else:
            alpha = self.lookup_alpha(lookup_key(match, branches, start))
        if props:
            k, direct = self.best_direct(len(props), alpha)
            if direct > rate:
                choice, rate = Route("direct", k), direct
        # not for an answer's first token: what followed earlier answers' openings is not counted apart
        if props and alt and source == "lookup" and not start and branch_class(branches) in self.alternative:
            beta = self.alternative[branch_class(branches)].value
            k, k_alt, tree = self.best_tree(len(props), alt, alpha, beta)
            if tree > rate:
                choice, rate = Route("tree", k, k_alt), tree
        if mid is not None and gamma_max > 0:
            gamma, mid_rate = self.best_mid(gamma_max, mid.bytes_ratio, mid.rebuild_s, remaining)
            if mid_rate > rate:
                choice, rate = Route("mid", gamma), mid_rate
            elif self._probe_due("mid", remaining):
                # would the middle level win if its drafts were as good as TriForce reports?
                g, hopeful = self.best_mid(gamma_max, mid.bytes_ratio, mid.rebuild_s, remaining, alpha=0.9)
                if hopeful > rate:
                    self._probed("mid")
                    return Route("mid", min(g, (self.windows.lengths(gamma_max) or [1])[0]))
        if choice.route == "mid":
            self.last_used["mid"], self.probe_gap["mid"] = self.rounds, PROBE_EVERY
        return choice

    def _probe_due(self, route: str, remaining: float) -> bool:
        gap = self.probe_gap.get(route, PROBE_EVERY)
        return remaining >= PROBE_MIN_REMAINING and self.rounds - self.last_used.get(route, 0) >= gap

    def _probed(self, route: str) -> None:
        """A probe ran: the next waits twice as long (up to 8x), unless the route wins meanwhile."""
        gap = self.probe_gap.get(route, PROBE_EVERY)
        self.last_used[route] = self.rounds
        self.probe_gap[route] = min(2 * gap, 8 * PROBE_EVERY)

    def probe_model_due(self, remaining: float) -> bool:
        """A draft model the estimates say loses is asked again now and then (see `_probe_due`)."""
        if self._probe_due("model", remaining):
            self._probed("model")
            return True
        return False

    def model_used(self) -> None:
        self.last_used["model"], self.probe_gap["model"] = self.rounds, PROBE_EVERY


@dataclass
class MidLevel:
    """What the route needs to know of the middle level this round: how the bytes of its step compare
    with a full step's, and what it still costs this answer before its first window."""

    bytes_ratio: float  # (weights + retrieved KV) / (weights + all the KV)
    rebuild_s: float = 0.0  # seconds of a view rebuild still due this answer (0: built)
