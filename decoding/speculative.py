"""The hierarchical speculative decoder: bottom drafter -> retrieval-view target -> full target.

Invariant between rounds: `context` holds every token of the conversation so far; the full cache
holds all of them but the last (`context[-1]` is the pending token, fed in the next forward).

A round at level 0 feeds the pending token to the full target and samples one token.
A round at level 1 lets the middle level (the same weights reading the RetrievalView, with logits
over the context's tokens and the most common ones: decoding/draft_head.py) draft a window of γ
tokens one at a time; the full target verifies [pending, d1..dγ] in one forward.
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

The route adapts (decoding/route.py): from the measured cost of a target window of each length, the
drafters' costs and the measured acceptance of their drafts, each round takes the route and length
with the most expected tokens per second, a plain level-0 step when nothing beats it. That is what
keeps level 2 from being slower than level 0 where speculation does not pay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from triforce_chat.decoding.cache import MAX_WINDOW, KVCache
from triforce_chat.decoding.draft_head import DraftHead
from triforce_chat.decoding.drafters import Drafter, draft_model_of, sync_context
from triforce_chat.decoding.events import LowRound, RoundEvent
from triforce_chat.decoding.loops import LoopDetector, LoopRule
from triforce_chat.decoding.model import Transformer
from triforce_chat.decoding.retrieval import RetrievalView
from triforce_chat.decoding.route import CALIBRATION_WINDOWS, CostModel, MidLevel, Route, branch_class, lookup_key
from triforce_chat.decoding.sampling import Sampler, verify_drafts
from triforce_chat.decoding.tree import TreeWindow, verify_branches


@dataclass
class SpecConfig:
    level: int = 2
    gamma_mid: int = 6
    gamma_low: int = 4
    adaptive: bool = True
    rebuild_below: float = 0.5  # rebuild the retrieval selection when mid acceptance drops below this
    loop: LoopRule | None = None  # stop an answer that ends in a loop (None: never)
    tree: bool = True  # where a lookup match branched, the route may verify its two ways in one window


@dataclass
class RoundPlan:
    """What a round will do, decided before anything is verified (so the speculative-sampling
    argument holds round by round): a plain target step, a middle-level window of `gamma` tokens,
    `gamma` of the bottom drafter's proposals verified by the target directly, or a tree window of
    `gamma` of them and `gamma_alt` of a second branch that parts from them at the first token."""

    route: str = "step"  # "step" | "mid" | "direct" | "tree"
    gamma: int = 0
    props: list[int] = field(default_factory=list)  # the bottom drafter's proposal (level 2)
    q_low: torch.Tensor | None = None  # its probabilities [len(props), V] (None: a point mass)
    source: str = "lookup"  # who proposed: "lookup" (free) | "model" (a draft model) | "none"
    match: int = 0  # the length of the match a lookup proposal follows
    branches: int = 0  # distinct tokens that followed that match before (0: not known)
    start: bool = False  # the round makes the answer's first token
    alt: list[int] = field(default_factory=list)  # a second branch of the lookup's match (a tree's)
    gamma_alt: int = 0  # of it, the drafts a tree window verifies


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
        mid_head: DraftHead | None = None,
    ):
        self.model, self.cache, self.sampler, self.eos_ids, self.config = model, cache, sampler, eos_ids, config
        self.view, self.drafter = view, drafter
        self.costs = costs if costs is not None else CostModel()
        self.mid_head = mid_head  # the middle level's head over part of the vocabulary (None: the model's)
        self._weight_bytes = getattr(model, "weight_bytes", 0) if model is not None else 0
        self._draft = draft_model_of(drafter)
        self._draft_weight_bytes = getattr(self._draft.model, "weight_bytes", 0) if self._draft is not None else 0
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
        t_start = time.perf_counter()
        level, calibrated = self._start_answer(context)
        setup_s = time.perf_counter() - t_start  # counted in round 0 (a calibration, when one was due)
        loops = LoopDetector(self.config.loop) if self.config.loop is not None else None
        produced = index = 0
        while True:
            room = self.cache.max_len - self.cache.length - 1  # tokens the cache can take after pending
            stop = "max tokens" if produced >= max_new_tokens else "stopped" if should_stop() else \
                "context full" if room < 0 else ""
            if stop:
                yield RoundEvent(index=index, tokens=[], origins=[], text="", stop_reason=stop)
                return
            if index:
                t_start = time.perf_counter()
            ev = RoundEvent(index=index, tokens=[], origins=[], text="")
            if calibrated and not index:
                ev.timings["calibrate"] = setup_s
            # drafts beyond the answer's budget are wasted; windows stay within the batch-invariant size
            window_max = min(max_new_tokens - produced - 1, room, MAX_WINDOW - 1)
            # what is left of this answer to win back a once-per-answer cost or a probe: its budget, or
            # what the session's answers usually run to
            remaining = min(max_new_tokens - produced, max(8.0, self.costs.answer_tokens.value - produced))
            plan = self._plan_round(level, context, window_max, remaining, ev, start=not produced)
            kept, origins = self._run_route(plan, level, context, ev)
            kept, origins, ev.stop_reason = self._cut(kept, origins, max_new_tokens - produced, loops)
            self._keep(context, kept)
            ev.tokens, ev.origins = kept, origins
            ev.route, ev.gamma_mid, ev.gamma_low = plan.route, plan.gamma, self.config.gamma_low if level == 2 else 0
            ev.wall_s = time.perf_counter() - t_start
            produced += len(kept)
            index += 1
            if ev.stop_reason:
                self.costs.answer_tokens.update(produced)
            yield ev
            if ev.stop_reason:
                return

    def _start_answer(self, context: list[int]) -> tuple[int, bool]:
        """The level this answer runs at (what the session gave it allows), with the drafter, the
        retrieval view and the sampler brought up to the context; and whether the window costs had
        to be timed first (a Session does that before the answer, so this is for a bare decoder)."""
        level = self.config.level if self.view is not None else 0
        if level == 2 and self.drafter is None:
            level = 1
        if level == 2:
            # once per answer: from here on only this loop changes the context (it grows) and the
            # drafter's (extended with drafts, and truncated back to the context), so the drafter holds a
            # prefix of the context and each round only appends the tokens kept since
            sync_context(self.drafter, context)
        if level >= 1 and self.mid_head is not None:
            self.mid_head.cover(context)  # the documents' and the conversation's tokens can be drafted
        calibrated = level >= 1 and self.config.adaptive and self.costs.windows.needs_calibration(len(context))
        if calibrated:
            self.calibrate(context)
        if self.costs.step.n:  # the level-0 step this answer's speed is compared with
            self.level0_step_s = self.costs.step.value
        self.sampler.reset(context)
        self.costs.start_answer()
        return level, calibrated

    def calibrate(self, context: list[int]) -> float:
        """Time full-target windows of the lengths the route weighs (CALIBRATION_WINDOWS) at the
        current depth, so that the route starts from this machine's costs rather than a prior. Each
        forward is rolled back: the cache, and the query the retrieval view selects against, end as
        they began. Returns the seconds it took (a fraction of a second: about ten steps)."""
        t_start = time.perf_counter()
        cache, windows = self.cache, self.costs.windows
        start, queries = cache.length, list(cache.last_query)
        room = cache.max_len - start
        steps: list[float] = []
        # the first forward only warms up; the step, which every ratio shown to the user is measured
        # against ("x1.4 vs level 0"), is the median of three, so one hiccup of a shared machine
        # cannot pass for the machine's step
        for i, t in enumerate((1, 1, 1, 1, *CALIBRATION_WINDOWS)):
            if t > room:
                break
            window = torch.tensor([context[-1]] * t, device=self.model.device)
            t0 = time.perf_counter()
            self.model(window, cache, logits="all" if t > 1 else "last")
            dt = time.perf_counter() - t0
            cache.truncate(start)
            if i and t == 1:
                steps.append(dt)
            elif i:
                windows.record(t, dt)
        if steps:
            windows.record(1, sorted(steps)[len(steps) // 2])
        cache.last_query[:] = queries
        windows.calibrated_depth = max(1, start)
        return time.perf_counter() - t_start

    def _plan_round(self, level: int, context: list[int], window_max: int, remaining: float,
                    ev: RoundEvent, start: bool = False) -> RoundPlan:
        """The route of this round. Until the session has measured a step, the first round is one."""
        cfg = self.config
        if level == 0 or window_max <= 0 or (cfg.adaptive and not self.costs.step.n):
            return RoundPlan()
        plan = RoundPlan(start=start)
        if level == 2:
            self.drafter.extend(context[self.drafter.length :])
            t0 = time.perf_counter()
            k = min(cfg.gamma_mid + cfg.gamma_low, window_max)
            plan.props, plan.q_low, plan.source = self._bottom_proposal(k, remaining)
            if plan.source == "lookup":
                plan.match, plan.branches = self.drafter.last_match, self.drafter.last_branches
                if plan.branches > 1 and cfg.tree:  # a match that branched: its other way
                    plan.alt = self.drafter.propose_alternative(min(k, MAX_WINDOW - 1 - len(plan.props)))
            ev.timings["low"] = time.perf_counter() - t0
        plan.route, plan.gamma, plan.gamma_alt = self._choose_route(level, min(cfg.gamma_mid, window_max), plan,
                                                                    remaining)
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
            self.costs.windows.record(1, dt)
            ev.timings["target"] = dt
            ev.final_kind = "step"
            if not self.level0_step_s:
                self.level0_step_s = dt
            return kept, origins
        if plan.route == "direct":  # bottom drafts (a prefix of them) verified by the full target itself
            props = plan.props[: plan.gamma]
            q_low = None if plan.q_low is None else plan.q_low[: plan.gamma]
            a, nxt = self._verify(pending, props, q_low, ev)
            c = self.costs
            if plan.source == "model":
                c.model.update(a, len(props))
            else:
                c.lookup_verified(lookup_key(plan.match, plan.branches, plan.start), a, len(props))
            ev.low_rounds.append(LowRound(props, a, nxt, plan.match, plan.branches))
            return props[:a] + [nxt], ["low"] * a + ["target"]
        if plan.route == "tree":
            return self._run_tree(pending, plan, ev)
        if self.view.needs_rebuild:
            t0 = time.perf_counter()
            self.view.rebuild()
            self._rounds_since_rebuild = 0
            ev.timings["rebuild"] = time.perf_counter() - t0
            self.costs.windows.rebuild.update(ev.timings["rebuild"])
        t0 = time.perf_counter()
        gl = self.config.gamma_low
        first = (plan.props[:gl], None if plan.q_low is None else plan.q_low[:gl], plan.match, plan.branches)
        drafts, q, d_origins = self._mid_window(pending, context, plan.gamma, level, ev, first)
        t_mid = time.perf_counter() - t0
        self.costs.mid_per_token.update((t_mid + ev.timings.get("low", 0.0)) / len(drafts))
        ev.timings["mid"] = t_mid - ev.timings.get("low_inner", 0.0)
        ev.timings["low"] = ev.timings.get("low", 0.0) + ev.timings.pop("low_inner", 0.0)
        a, nxt = self._verify(pending, drafts, q, ev)
        self.costs.mid.update(a, len(drafts))
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
        logits = self.model(torch.tensor([cur], device=self.model.device), self.view, logits="last",
                            head=self.mid_head)
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
            q_low, match, branches = None, 0, 0
            if level == 2:
                want = min(self.config.gamma_low, max(1, gamma - len(tokens)))
                if first is not None:
                    props, q_low, match, branches = first
                    first = None
                else:
                    t0 = time.perf_counter()
                    props, q_low = self.drafter.propose(want, self.sampler)
                    match, branches = self.drafter.last_match, self.drafter.last_branches
                    t_low += time.perf_counter() - t0
                props = list(props)[:want]
            if not props:
                tok, q = self._mid_draft_alone(cur)
                new, new_q, new_o = [tok], [q], ["mid"]
            else:
                scratch0 = view.scratch_len
                window = torch.tensor([cur, *props], device=self.model.device)
                qm = self.sampler.probs(self.model(window, view, logits="all", head=self.mid_head), props)  # [k+1, V]
                if q_low is not None:
                    q_low = q_low[: len(props)]
                a, nxt = verify_drafts(self.sampler, props, q_low, qm)
                view.truncate_scratch(scratch0 + 1 + a)
                ev.low_rounds.append(LowRound(props, a, nxt, match, branches))
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
        self.costs.windows.record(len(drafts) + 1, dt)
        ev.timings["target"] = dt
        ev.final_kind = "bonus" if a == len(drafts) else "correction"
        return a, nxt

    def _run_tree(self, pending: int, plan: RoundPlan, ev: RoundEvent) -> tuple[list[int], list[str]]:
        """The lookup's proposal and the match's other branch verified by the full target in one
        tree window (decoding/tree.py); the cache keeps the accepted branch."""
        t0 = time.perf_counter()
        branches = [plan.props[: plan.gamma], plan.alt[: plan.gamma_alt]]
        lengths = [len(b) for b in branches]
        tree = TreeWindow(self.cache, lengths)
        window = torch.tensor([pending, *branches[0], *branches[1]], device=self.model.device)
        logits = self.model(window, tree, logits="all")  # [1 + k + k_alt, V]
        root = self.sampler.probs(logits[:1])  # the pending row's once, then each branch's own rows
        p = [torch.cat([root, self.sampler.probs(logits[tree.rows_of(i)[1:]], b)]) for i, b in enumerate(branches)]
        taken, a, nxt = verify_branches(self.sampler, branches, p)
        tree.keep(taken, a)
        dt = time.perf_counter() - t0
        windows = self.costs.windows  # what the tree cost beyond a plain window of as many rows
        windows.tree_extra.update(max(0.0, dt - windows.cost(len(window))))
        ev.timings["target"] = dt
        ev.final_kind = "bonus" if a == lengths[taken] else "correction"
        ev.tree_width, ev.tree_branch = len(branches), taken
        # the proposal counts as a direct window's; the second branch's first token when the first failed
        c = self.costs
        c.lookup_verified(lookup_key(plan.match, plan.branches, plan.start), a if taken == 0 else 0, lengths[0])
        if taken == 1 or a == 0:
            c.alternative[branch_class(plan.branches)].update(1 if taken == 1 else 0, 1)
        # the match is the first way's (counted once); the second way was tried only where the first failed
        ev.low_rounds.append(LowRound(branches[0], a if taken == 0 else 0, nxt, plan.match, plan.branches))
        ev.low_rounds.append(LowRound(branches[1], a if taken == 1 else 0, nxt, tried=taken == 1 or a == 0))
        return branches[taken][:a] + [nxt], ["low"] * a + ["target"]

    def _bottom_proposal(self, k: int, remaining: float) -> tuple[list[int], torch.Tensor | None, str]:
        """The bottom drafter's proposal for this round and who made it: "lookup" (free, may be long),
        "model" or "none". A draft model pays a forward per token, so it drafts only when the cost
        model expects its drafts to pay (or to probe), and no more than γ_low tokens: as many as the
        best directly verified window takes."""
        d = self.drafter
        props, q = d.propose_lookup(k)
        if props:
            return list(props), q, "lookup"
        if not d.drafts_with_model:
            return [], None, "none"
        k, c = min(k, self.config.gamma_low), self.costs
        paying = c.model_draft_length(k, self._draft_read_ratio()) if self.config.adaptive else k
        if paying:
            k = paying
            c.model_used()
        elif not c.probe_model_due(remaining):  # (a probe drafts all k: it measures the acceptance)
            return [], None, "none"
        t0 = time.perf_counter()
        props, q = d.propose_model(k, self.sampler)
        if props:
            c.model_per_token.update((time.perf_counter() - t0) / len(props))
        return list(props), q, "model"

    def _draft_read_ratio(self) -> float:
        """What a draft model's forward reads against a target step's: its weights and the KV it
        attends (its StreamingLLM sinks and window), against all the target's weights and its whole
        cache; what a draft costs before one is timed (the middle level's prior is made the same way).
        0 without a draft model or the weights' size."""
        if self._draft is None or not self._draft_weight_bytes or not self._weight_bytes:
            return 0.0
        length, own = self.cache.length, self._draft.cache
        read = self._draft_weight_bytes + min(length, own.sink + own.window) * own.bytes_per_token
        return read / self._step_bytes(length)

    def _step_bytes(self, length: int) -> int:
        """What a target step reads at `length` tokens: all the weights and the whole cache (the
        drafters' priors are their reads against this)."""
        return self._weight_bytes + length * self.cache.bytes_per_token

    def _choose_route(self, level: int, gamma_max: int, plan: RoundPlan, remaining: float) -> Route:
        """A step, a middle window, a direct window or a tree window: decoding/route.py weighs them."""
        if gamma_max <= 0:
            return Route("step", 0)
        if not self.config.adaptive:
            return Route("mid", gamma_max)
        return Route(*self.costs.choose(gamma_max, plan.props, plan.source, plan.match, remaining,
                                        self._mid_level(), plan.branches, plan.start, len(plan.alt)))

    def _mid_level(self) -> MidLevel | None:
        """The middle level as the route sees it this round; None where its view would select
        nothing (a context within the budget: the "middle level" would be the target itself)."""
        view, cache = self.view, self.cache
        length = cache.length
        if not view.selects(length):
            return None
        budget = view.budget_for(length)
        kv = cache.bytes_per_token
        weights = self._weight_bytes
        if self.mid_head is not None and weights:  # its head's rows instead of the model's
            weights = max(0, weights - self.mid_head.source.nbytes) + self.mid_head.nbytes
        read = weights + min(length, budget + view.recent_window) * kv
        rebuild = self.costs.windows.rebuild.value if view.needs_rebuild else 0.0
        if view.needs_rebuild and not self.costs.windows.rebuild.n:
            rebuild = self.costs.step.value  # not measured yet: about a step (scores and a gather)
        return MidLevel(bytes_ratio=read / self._step_bytes(length), rebuild_s=rebuild)

    def _maybe_rebuild(self) -> None:
        self._rounds_since_rebuild += 1
        if self._rounds_since_rebuild >= 8 and self.costs.mid.value < self.config.rebuild_below:
            self.view.stale = True
