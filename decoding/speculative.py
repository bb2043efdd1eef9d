"""The hierarchical speculative decoder: bottom drafter -> retrieval-view target -> full target.

Invariant between rounds: `context` holds every token of the conversation so far; the full cache
holds all of them but the last (`context[-1]` is the pending token, fed in the next forward).

A round at level 0 feeds the pending token to the full target and samples one token.
A round at level 1 lets the middle level (the same weights reading the RetrievalView) draft a
window of γ tokens one at a time; the full target verifies [pending, d1..dγ] in one forward.
At level 2 the middle level does not draft alone: the bottom drafter proposes up to γ_low tokens,
the middle level verifies them in one forward (keeping an accepted prefix plus its own correction
or bonus token), and repeats until the window is full; the full target then verifies as at level 1.

Both verifications use `verify_drafts` (standard speculative sampling; greedy = argmax match), with
the drafter's own probabilities for every drafted token, so the middle level's output is distributed
exactly as the retrieval-view model's and the final output exactly as the full target's. The logits
processors (repetition penalty, temperature, top-k, top-p) are part of those distributions: every
row of every level is processed with its own prefix, the drafts before it included (the sampler's
history holds the context plus the window's tokens so far; `extra` adds a forward's own drafts).

An answer that ends in a loop (the same span repeated back to back, see loops.py) stops with the
reason "repetition": the rule reads the kept tokens one by one, so every level stops at the same
token even when a round keeps several.

The window length adapts: from the measured acceptance and the measured costs of a middle step and
of a verification, each round picks the γ in 0..γ_max that maximises expected tokens per second
(γ = 0 is a plain level-0 step), probing now and then so the estimates stay current. That is what
keeps level 2 from ever being slower than level 0 where speculation does not pay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from triforce_chat.decoding.cache import MAX_WINDOW, KVCache
from triforce_chat.decoding.drafters import Drafter, sync_context
from triforce_chat.decoding.events import LowRound, RoundEvent
from triforce_chat.decoding.loops import LoopDetector, LoopRule
from triforce_chat.decoding.model import Transformer
from triforce_chat.decoding.retrieval import RetrievalView
from triforce_chat.decoding.sampling import Sampler, verify_drafts


@dataclass
class SpecConfig:
    level: int = 2
    gamma_mid: int = 6
    gamma_low: int = 4
    adaptive: bool = True
    rebuild_below: float = 0.5  # rebuild the retrieval selection when mid acceptance drops below this
    probe_every: int = 8  # rounds between probes when adaptation chose γ = 0
    loop: LoopRule | None = None  # stop an answer that ends in a loop (None: never)


# The adaptive route's priors, before anything is measured: the first middle-level window drafts
# this many tokens (so does a probe of it), and a window of t tokens is assumed to cost
# 1 + slope (t - 1) steps. Short, because on a CPU whose matrix products are compute-bound every
# extra row of a window costs a good part of a step (docs/performance.md has the measurements).
FIRST_WINDOW = 2
VERIFY_PRIOR_SLOPE = 0.15


class _Ema:
    def __init__(self, value: float, weight: float = 0.25):
        self.value, self.weight, self.n = value, weight, 0

    def update(self, x: float) -> None:
        self.value = x if self.n == 0 else (1 - self.weight) * self.value + self.weight * x
        self.n += 1


class CostModel:
    """Running estimates that drive the adaptive window length."""

    def __init__(self) -> None:
        self.step = _Ema(0.0)  # full target, 1 token
        self.verify: dict[int, _Ema] = {}  # full target, T tokens
        self.mid_per_token = _Ema(0.0)  # middle level seconds per drafted token (level 2: bottom included)
        self.alpha = _Ema(0.8, weight=0.15)  # per-token acceptance of middle drafts by the target
        self.alpha_direct = _Ema(0.5, weight=0.15)  # ... of bottom drafts verified by the target directly
        # a draft model behind the lookup (LookupFirstDrafter): its seconds per drafted token and the
        # acceptance of its drafts verified directly (the lookup's are free and counted above)
        self.model_per_token = _Ema(0.0)
        self.alpha_model = _Ema(0.5, weight=0.15)
        # probes of a route adaptation keeps choosing against: rounds counted across the answers of a
        # session (the Session keeps one CostModel per level), so a losing probe's back-off carries over
        self.rounds = 0
        self.last_used: dict[str, int] = {}
        self.probe_gap: dict[str, int] = {}

    def verify_cost(self, t: int) -> float:
        if t in self.verify and self.verify[t].n:
            return self.verify[t].value
        known = sorted((k, e.value) for k, e in self.verify.items() if e.n)
        if not known:
            return self.step.value * (1 + VERIFY_PRIOR_SLOPE * (t - 1))
        k, v = min(known, key=lambda kv: abs(kv[0] - t))  # nearest measured window, scaled linearly
        return self.step.value + (v - self.step.value) * (t - 1) / max(1, k - 1)

    @staticmethod
    def expected_tokens(alpha: float, k: int) -> float:
        """Tokens kept by a window of k drafts with per-token acceptance alpha (bonus included)."""
        a = min(alpha, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def best_gamma(self, gamma_max: int) -> tuple[int, float]:
        """(γ, tokens/s) of the best middle-level window; γ = 0 is a plain step."""
        if not self.step.n or not self.mid_per_token.n:
            # nothing measured yet: try a short window (a long one that loses costs several steps)
            return min(FIRST_WINDOW, gamma_max), float("inf")
        best, best_rate = 0, 1.0 / self.step.value
        for g in range(1, gamma_max + 1):
            rate = self.expected_tokens(self.alpha.value, g) / (g * self.mid_per_token.value + self.verify_cost(g + 1))
            if rate > best_rate:
                best, best_rate = g, rate
        return best, best_rate

    def direct_rate(self, k: int, alpha: _Ema | None = None, draft_cost: float = 0.0) -> float:
        """Tokens/s of verifying k bottom drafts directly; draft_cost: seconds per draft still to pay."""
        if not self.step.n:
            return float("inf")
        alpha = alpha or self.alpha_direct
        return self.expected_tokens(alpha.value, k) / (k * draft_cost + self.verify_cost(k + 1))

    def best_direct(self, n: int, alpha: _Ema | None = None) -> tuple[int, float]:
        """(k, tokens/s) of the best prefix of n bottom drafts to verify directly: a window costs
        more per row than it saves once acceptance has fallen off (any prefix is a valid draft)."""
        return max(((k, self.direct_rate(k, alpha)) for k in range(1, n + 1)), key=lambda kr: kr[1])

    def model_drafts_pay(self, k: int) -> bool:
        """Whether up to k draft-model tokens, paid now, verified directly, beat a plain step."""
        if not self.step.n or not self.model_per_token.n:
            return True  # not measured yet
        best = max(self.direct_rate(j, self.alpha_model, self.model_per_token.value) for j in range(1, k + 1))
        return best > 1.0 / self.step.value


@dataclass
class RoundPlan:
    """What a round will do, decided before anything is verified (so the speculative-sampling
    argument holds round by round): a plain target step, a middle-level window of `gamma` tokens,
    or `gamma` of the bottom drafter's proposals verified by the target directly."""

    route: str = "step"  # "step" | "mid" | "direct"
    gamma: int = 0
    props: list[int] = field(default_factory=list)  # the bottom drafter's proposal (level 2)
    q_low: torch.Tensor | None = None  # its probabilities [len(props), V] (None: a point mass)
    source: str = "lookup"  # who proposed: "lookup" (free) | "model" (a draft model) | "none"


class SpeculativeDecoder:
    """Answers one request at a time over a session's model, caches, drafter and cost model.

    Built with everything it keeps between answers (the cost model that drives the route, the
    drafter, which holds its own copy of the context), so a new decoder per answer behaves exactly
    as one that lives as long as the session."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        sampler: Sampler,
        eos_ids: set[int],
        config: SpecConfig,
        view: RetrievalView | None = None,
        drafter: Drafter | None = None,
        costs: CostModel | None = None,
    ):
        self.model, self.cache, self.sampler, self.eos_ids, self.config = model, cache, sampler, eos_ids, config
        self.view, self.drafter = view, drafter
        self.costs = costs if costs is not None else CostModel()
        self._rounds_since_rebuild = 0
        self.level0_step_s = 0.0

    # -- the loop -------------------------------------------------------------------------------------
    def generate(
        self, context: list[int], max_new_tokens: int, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[RoundEvent]:
        """Yield one RoundEvent per round until EOS, `max_new_tokens`, a full context, a loop or a
        stop; the last event carries the reason (`stop_reason`; an event without tokens when the
        answer stopped between rounds). `context` is extended in place with the kept tokens; the
        cache must hold context[:-1]."""
        if self.cache.length != len(context) - 1:
            raise RuntimeError(f"cache holds {self.cache.length} tokens, expected {len(context) - 1}")
        level = self._start_answer(context)
        loops = LoopDetector(self.config.loop) if self.config.loop is not None else None
        produced = index = 0
        while True:
            room = self.cache.max_len - self.cache.length - 1  # tokens the cache can take after pending
            stop = "max tokens" if produced >= max_new_tokens else "stopped" if should_stop() else \
                "context full" if room < 0 else ""
            if stop:
                yield RoundEvent(index=index, tokens=[], origins=[], text="", stop_reason=stop)
                return
            t_start = time.perf_counter()
            ev = RoundEvent(index=index, tokens=[], origins=[], text="")
            # drafts beyond the answer's budget are wasted; windows stay within the batch-invariant size
            window_max = min(max_new_tokens - produced - 1, room, MAX_WINDOW - 1)
            plan = self._plan_round(level, context, window_max, first=index == 0, ev=ev)
            kept, origins = self._run_route(plan, level, context, ev)
            kept, origins, ev.stop_reason = self._cut(kept, origins, max_new_tokens - produced, loops)
            self._keep(context, kept)
            ev.tokens, ev.origins = kept, origins
            ev.route, ev.gamma_mid, ev.gamma_low = plan.route, plan.gamma, self.config.gamma_low if level == 2 else 0
            ev.wall_s = time.perf_counter() - t_start
            produced += len(kept)
            index += 1
            yield ev
            if ev.stop_reason:
                return

    def _start_answer(self, context: list[int]) -> int:
        """The level this answer runs at (what the session gave it allows), with the drafter, the
        retrieval view and the sampler brought up to the context."""
        level = self.config.level if self.view is not None else 0
        if level == 2 and self.drafter is None:
            level = 1
        if level == 2:
            # once per answer: from here on only this loop changes the context (it grows) and the
            # drafter's (extended with drafts, and truncated back to the context), so the drafter holds a
            # prefix of the context and each round only appends the tokens kept since
            sync_context(self.drafter, context)
        if level >= 1 and self.view.needs_rebuild:
            self.view.rebuild()
            self._rounds_since_rebuild = 0
        self.sampler.reset(context)
        return level

    def _plan_round(self, level: int, context: list[int], window_max: int, first: bool, ev: RoundEvent) -> RoundPlan:
        """The route of this round. Adaptive: the first round is a level-0 step, which measures the
        baseline step time."""
        cfg = self.config
        if level == 0 or window_max <= 0 or (first and cfg.adaptive):
            return RoundPlan()
        plan = RoundPlan()
        if level == 2:
            self.drafter.extend(context[self.drafter.length :])
            t0 = time.perf_counter()
            plan.props, plan.q_low, plan.source = self._bottom_proposal(min(cfg.gamma_mid + cfg.gamma_low, window_max))
            ev.timings["low"] = time.perf_counter() - t0
        plan.route, plan.gamma = self._choose_route(level, min(cfg.gamma_mid, window_max), plan.props, plan.source)
        return plan

    def _run_route(
        self, plan: RoundPlan, level: int, context: list[int], ev: RoundEvent
    ) -> tuple[list[int], list[str]]:
        """Run the planned route; returns the tokens it produced (accepted drafts, then the target's
        own token) and their origins. The cache then holds everything before the last of them."""
        pending = context[-1]
        if plan.route == "step":
            t0 = time.perf_counter()
            kept, origins = self._target_step(pending)
            dt = time.perf_counter() - t0
            self.costs.step.update(dt)
            ev.timings["target"] = dt
            ev.final_kind = "step"
            if not self.level0_step_s:
                self.level0_step_s = dt
            return kept, origins
        if plan.route == "direct":  # bottom drafts (a prefix of them) verified by the full target itself
            props = plan.props[: plan.gamma]
            q_low = None if plan.q_low is None else plan.q_low[: plan.gamma]
            a, nxt = self._verify(pending, props, q_low, ev)
            (self.costs.alpha_model if plan.source == "model" else self.costs.alpha_direct).update(a / len(props))
            ev.low_rounds.append(LowRound(proposed=props, accepted=a, next_token=nxt))
            return props[:a] + [nxt], ["low"] * a + ["target"]
        if self.view.needs_rebuild:
            self.view.rebuild()
            self._rounds_since_rebuild = 0
        t0 = time.perf_counter()
        gl = self.config.gamma_low
        first = (plan.props[:gl], None if plan.q_low is None else plan.q_low[:gl])
        drafts, q, d_origins = self._mid_window(pending, context, plan.gamma, level, ev, first)
        t_mid = time.perf_counter() - t0
        self.costs.mid_per_token.update((t_mid + ev.timings.get("low", 0.0)) / len(drafts))
        ev.timings["mid"] = t_mid - ev.timings.get("low_inner", 0.0)
        ev.timings["low"] = ev.timings.get("low", 0.0) + ev.timings.pop("low_inner", 0.0)
        a, nxt = self._verify(pending, drafts, q, ev)
        self.costs.alpha.update(a / len(drafts))
        ev.mid_proposed, ev.mid_accepted = drafts, a
        self._maybe_rebuild()
        return drafts[:a] + [nxt], d_origins[:a] + ["target"]

    def _cut(
        self, kept: list[int], origins: list[str], budget: int, loops: LoopDetector | None
    ) -> tuple[list[int], list[str], str]:
        """The round's tokens cut at EOS, at a loop and at the answer's token budget, with the reason
        the answer stops there ("" to go on)."""
        cut, reason = min(len(kept), budget), ""
        for i, tok in enumerate(kept[:cut]):
            if tok in self.eos_ids:
                cut, reason = i + 1, "eos"
                break
            if loops is not None and loops.push(tok):
                cut, reason = i + 1, "repetition"
                break
        if not reason and cut >= budget:
            reason = "max tokens"
        return kept[:cut], origins[:cut], reason

    def _keep(self, context: list[int], kept: list[int]) -> None:
        """Append the kept tokens; the cache keeps holding everything but the new pending token."""
        context.extend(kept)
        self.sampler.extend(kept)
        self.cache.truncate(min(self.cache.length, len(context) - 1))

    # -- one round per level -----------------------------------------------------------------------------
    def _target_step(self, pending: int) -> tuple[list[int], list[str]]:
        logits = self.model(torch.tensor([pending], device=self.model.device), self.cache, logits="last")
        return [self.sampler.next_token(logits[0])], ["target"]

    def _mid_draft_alone(self, cur: int) -> tuple[int, torch.Tensor]:
        """One middle-level token after `cur`; the sampler's history holds everything up to `cur`."""
        logits = self.model(torch.tensor([cur], device=self.model.device), self.view, logits="last")
        q = self.sampler.probs(logits[0])
        return self.sampler.sample(q), q

    def _mid_window(self, pending: int, context: list[int], gamma: int, level: int, ev: RoundEvent, first=None):
        """Draft up to `gamma` tokens with the middle level (level 2: fed by the bottom drafter,
        whose first proposal may already be at hand). Returns (tokens, q rows [n, V], origins)."""
        view = self.view
        view.truncate_scratch(0)
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        origins: list[str] = []
        cur = pending
        base = len(context)
        t_low = 0.0
        while len(tokens) < gamma:
            props: list[int] = []
            q_low = None
            if level == 2:
                want = min(self.config.gamma_low, max(1, gamma - len(tokens)))
                if first is not None:
                    props, q_low = first
                    first = None
                else:
                    t0 = time.perf_counter()
                    props, q_low = self.drafter.propose(want, self.sampler)
                    t_low += time.perf_counter() - t0
                props = list(props)[:want]
            if not props:
                tok, q = self._mid_draft_alone(cur)
                new, new_q, new_o = [tok], [q], ["mid"]
            else:
                scratch0 = view.scratch_len
                window = torch.tensor([cur, *props], device=self.model.device)
                qm = self.sampler.probs(self.model(window, view, logits="all"), props)  # [k+1, V]
                if q_low is not None:
                    q_low = q_low[: len(props)]
                a, nxt = verify_drafts(self.sampler, props, q_low, qm)
                view.truncate_scratch(scratch0 + 1 + a)
                ev.low_rounds.append(LowRound(proposed=props, accepted=a, next_token=nxt))
                new = props[:a] + [nxt]
                new_q = [qm[i] for i in range(a + 1)]
                new_o = ["low"] * a + ["mid"]
            tokens.extend(new)
            qs.extend(new_q)
            origins.extend(new_o)
            self.sampler.extend(new)  # the next rows (and the bottom drafter) follow these tokens
            if level == 2:
                self.drafter.extend(new)
            cur = tokens[-1]
            if cur in self.eos_ids:
                break
        if level == 2 and self.drafter.length > base:
            self.drafter.truncate(base)
        self.sampler.truncate(base)
        ev.timings["low_inner"] = t_low
        return tokens, torch.stack(qs), origins

    def _verify(self, pending: int, drafts: list[int], q, ev: RoundEvent) -> tuple[int, int]:
        """The full target verifies [pending, *drafts] in one forward; the cache keeps the accepted."""
        t0 = time.perf_counter()
        start = self.cache.length
        window = torch.tensor([pending, *drafts], device=self.model.device)
        p = self.sampler.probs(self.model(window, self.cache, logits="all"), drafts)  # [k+1, V]
        a, nxt = verify_drafts(self.sampler, drafts, q, p)
        self.cache.truncate(start + 1 + a)
        dt = time.perf_counter() - t0
        self.costs.verify.setdefault(len(drafts) + 1, _Ema(dt)).update(dt)
        ev.timings["target"] = dt
        ev.final_kind = "bonus" if a == len(drafts) else "correction"
        return a, nxt

    def _bottom_proposal(self, k: int) -> tuple[list[int], torch.Tensor | None, str]:
        """The bottom drafter's proposal for this round and who made it: "lookup" (free, may be long),
        "model" or "none". A draft model pays a forward per token, so it drafts only when the cost
        model expects its drafts to pay (or to probe), and no more than γ_low tokens."""
        d = self.drafter
        props, q = d.propose_lookup(k)
        if props:
            return list(props), q, "lookup"
        if not d.drafts_with_model:
            return [], None, "none"
        k, c = min(k, self.config.gamma_low), self.costs
        if not self.config.adaptive or c.model_drafts_pay(k):
            c.last_used["model"], c.probe_gap["model"] = c.rounds, self.config.probe_every
        elif not self._probe_due("model"):
            return [], None, "none"
        t0 = time.perf_counter()
        props, q = d.propose_model(k, self.sampler)
        if props:
            c.model_per_token.update((time.perf_counter() - t0) / len(props))
        return list(props), q, "model"

    def _probe_due(self, route: str) -> bool:
        """A route adaptation keeps choosing against is tried again now and then, each losing probe
        waiting twice as long as the last (up to 8x probe_every); True when one is due now."""
        c = self.costs
        gap = c.probe_gap.get(route, self.config.probe_every)
        if c.rounds - c.last_used.get(route, 0) < gap:
            return False
        c.last_used[route] = c.rounds
        c.probe_gap[route] = min(2 * gap, 8 * self.config.probe_every)
        return True

    def _choose_route(self, level: int, gamma_max: int, props: list[int], source: str = "lookup") -> tuple[str, int]:
        """("step", 0) | ("mid", γ) | ("direct", k drafts of props): the route with the best expected
        tokens per second under the cost model, with a probe of a neglected route now and then."""
        if gamma_max <= 0:
            return "step", 0
        if not self.config.adaptive:
            return "mid", gamma_max
        c = self.costs
        c.rounds += 1
        # a view that selects nothing is the full cache: the "middle level" would be the target itself
        mid_useful = self.view.n_selected_chunks > 0
        gamma, rate = c.best_gamma(gamma_max) if mid_useful else (0, 1.0 / max(c.step.value, 1e-9))
        choice = ("mid", gamma) if gamma else ("step", 0)
        if props:
            k, direct = c.best_direct(len(props), c.alpha_model if source == "model" else None)
            if direct > rate:
                choice, rate = ("direct", k), direct
        # probe the middle level (and a short direct window) when adaptation keeps choosing against
        # them, so that the estimates follow a context that changes as the answer grows; a probe
        # that keeps losing waits twice as long each time (up to 8x), so probes cost little where
        # speculation does not pay
        for route in ("mid", "direct"):
            if (route == "direct" and not props) or (route == "mid" and not mid_useful):
                continue
            if choice[0] == route:
                c.last_used[route] = c.rounds
                c.probe_gap[route] = self.config.probe_every
            elif self._probe_due(route):
                return (route, min(FIRST_WINDOW, gamma_max)) if route == "mid" else (route, min(3, len(props)))
        return choice

    def _maybe_rebuild(self) -> None:
        self._rounds_since_rebuild += 1
        if self._rounds_since_rebuild >= 8 and self.costs.alpha.value < self.config.rebuild_below:
            self.view.stale = True
