"""Losslessness of the speculative decoder.

Greedy: levels 1 and 2 (both drafters) produce exactly the tokens of level 0, with and without the
repetition penalty.
Sampling: the first tokens at levels 1 and 2 are distributed exactly as the full target's (a
chi-square goodness-of-fit test against the target's exact distribution, with fixed seeds so the
test is deterministic), and the same test rejects two deliberately broken verifiers. With top-k and
the repetition penalty the exact distribution comes from a naive reference of those processors
(each position penalized by the tokens before it), and the test rejects a sampler whose window
rows see one drafted token too few, and one that skips top-k on drafted positions.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import triforce_chat.decoding.speculative as spec
from conftest import save_bigram_model, save_random_model
from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.draft_head import DraftHead
from triforce_chat.decoding.drafters import LookupFirstDrafter, ModelDrafter, NGramDrafter, SuffixDrafter
from triforce_chat.decoding.loops import LoopRule
from triforce_chat.decoding.models.loading import load_weights_only
from triforce_chat.decoding.retrieval import RetrievalView
from triforce_chat.decoding.route import CostModel
from triforce_chat.decoding.sampling import Sampler
from triforce_chat.decoding.speculative import SpecConfig, SpeculativeDecoder


class Engine:
    """A prefilled prompt that can be decoded again and again at any level."""

    def __init__(self, model, prompt: list[int], budget: int, chunk: int, draft_model=None):
        self.model, self.prompt = model, prompt
        self.cache = KVCache.for_model(model)
        self.view = RetrievalView(self.cache, budget=budget, chunk_size=chunk)
        # drafters live across runs (as in a session): every run rolls them back to the prompt
        self.drafters = {"ngram": NGramDrafter(n_max=3, n_min=1), "suffix": SuffixDrafter()}
        if draft_model is not None:
            self.drafters["model"] = ModelDrafter(draft_model, sink=2, window=8)
            self.drafters["both"] = LookupFirstDrafter(SuffixDrafter(), ModelDrafter(draft_model, sink=2, window=8))
        model(torch.tensor(prompt[:-1]), self.cache, logits="none")

    def run(self, level: int, n: int, sampler: Sampler, drafter: str = "ngram", gamma_mid: int = 4,
            gamma_low: int = 3, adaptive: bool = False, eos: set[int] = frozenset(), loop: LoopRule | None = None,
            costs=None, mid_head=None) -> tuple[list[int], SpeculativeDecoder]:
        self.cache.truncate(len(self.prompt) - 1)
        self.view.stale = True
        dec = SpeculativeDecoder(self.model, self.cache, sampler, set(eos),
                                 SpecConfig(level=level, gamma_mid=gamma_mid, gamma_low=gamma_low, adaptive=adaptive,
                                            loop=loop),
                                 view=self.view, drafter=self.drafters[drafter] if level == 2 else None,
                                 costs=costs, mid_head=mid_head)
        context = list(self.prompt)
        events = list(dec.generate(context, n))
        dec.routes = [ev.route for ev in events if ev.tokens]
        dec.kept = [list(ev.tokens) for ev in events if ev.tokens]  # the tokens each round kept
        dec.tree_branches = [ev.tree_branch for ev in events if ev.route == "tree"]  # the branch each tree kept
        dec.stop_reason = events[-1].stop_reason
        dec.mid_drafts = [t for ev in events for t in ev.mid_proposed]  # what the middle level drafted
        dec.mid_accepted = sum(ev.mid_accepted for ev in events)
        dec.low_drafts = [t for ev in events for lr in ev.low_rounds for t in lr.proposed]  # the bottom's
        return context[len(self.prompt) :], dec


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """Target and draft model over a 64-token vocabulary (so n-gram matches are common)."""
    target = load_weights_only(save_random_model(tmp_path_factory.mktemp("t"), "llama", vocab_size=64, seed=1))
    draft = load_weights_only(save_random_model(tmp_path_factory.mktemp("d"), "llama", vocab_size=64, seed=2,
                                                num_hidden_layers=1))
    return target, draft


def repetitive_prompt(seed: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, vocab, (12,), generator=g).tolist()
    out: list[int] = []
    while len(out) < length:
        out += phrase if torch.rand((), generator=g) < 0.5 else torch.randint(0, vocab, (7,), generator=g).tolist()
    return out[:length]


@pytest.mark.parametrize("seed,length,budget,gamma_mid,gamma_low", [
    (0, 200, 32, 4, 3), (1, 333, 48, 6, 4), (2, 97, 16, 2, 1), (3, 260, 1024, 5, 5),
])
def test_greedy_levels_are_token_identical(small_models, seed, length, budget, gamma_mid, gamma_low):
    target, draft = small_models
    engine = Engine(target, repetitive_prompt(seed, length, 64), budget=budget, chunk=4, draft_model=draft)
    want, _ = engine.run(0, 60, Sampler(0.0))
    assert len(want) == 60
    for level, drafter, adaptive in [(1, "ngram", False), (2, "ngram", False), (2, "suffix", False),
                                     (2, "model", False), (2, "both", False), (1, "ngram", True), (2, "ngram", True),
                                     (2, "suffix", True), (2, "both", True)]:
        got, dec = engine.run(level, 60, Sampler(0.0), drafter, gamma_mid, gamma_low, adaptive)
        assert got == want, f"level {level} ({drafter}, adaptive={adaptive}) differs from level 0"
    rounds = engine.drafters["both"].rounds
    assert rounds["lookup"] > 0 and rounds["model"] > 0, rounds  # both bottoms were tested


@pytest.fixture(scope="module")
def qwen2_gguf_pair(tmp_path_factory):
    """A quantized Qwen2-layout target and a smaller quantized draft sharing its vocabulary, as
    GGUF files computed as shipped (the Qwen2.5-Coder 1.5B / 0.5B pair in miniature)."""
    from gguf_models import load, write_gguf

    d = tmp_path_factory.mktemp("qwen2-pair")
    target = load(write_gguf(d / "target.gguf", "qwen2", vocab=64, qtype="Q5_0", seed=1,
                             qtypes={"attn_v": "Q8_0", "ffn_down": "Q6_K", "output": "Q8_0"}))
    draft = load(write_gguf(d / "draft.gguf", "qwen2", vocab=64, n_layers=1, qtype="Q4_K", seed=2))
    return target, draft


def test_greedy_levels_are_token_identical_with_a_quantized_qwen2_pair(qwen2_gguf_pair):
    target, draft = qwen2_gguf_pair
    engine = Engine(target, repetitive_prompt(5, 280, 64), budget=48, chunk=4, draft_model=draft)
    want, _ = engine.run(0, 60, Sampler(0.0))
    for level, drafter, adaptive in [(1, "ngram", False), (2, "model", False), (2, "model", True),
                                     (2, "both", True)]:
        got, _ = engine.run(level, 60, Sampler(0.0), drafter, 5, 3, adaptive)
        assert got == want, f"level {level} ({drafter}, adaptive={adaptive}) differs from level 0"


def test_greedy_levels_are_token_identical_with_a_mid_head_over_part_of_the_vocabulary(small_models):
    """The middle level's head covers the prompt's tokens (ids 0..15 of 64): it drafts only those,
    the target answers with others too, and every level's answer is level 0's."""
    target, draft = small_models
    engine = Engine(target, repetitive_prompt(4, 240, 16), budget=32, chunk=4, draft_model=draft)
    want, _ = engine.run(0, 60, Sampler(0.0))
    assert set(want) - set(range(16)), "the answer should need tokens the head lacks"
    for level, drafter in [(1, "ngram"), (2, "suffix"), (2, "both")]:
        head = DraftHead(target.output, common=0)
        got, dec = engine.run(level, 60, Sampler(0.0), drafter, 4, 3, mid_head=head)
        assert got == want, f"level {level} ({drafter}) differs from level 0"
        assert head.member.nonzero().squeeze(1).tolist() == list(range(16))
        assert dec.mid_drafts and set(dec.mid_drafts) <= set(range(16))
        assert dec.mid_accepted > 0  # the restricted middle level still drafted what the target kept


def test_a_draft_model_with_a_head_over_part_of_the_vocabulary_drafts_only_those_tokens(small_models):
    """The draft model's head keeps the context's tokens (the prompt's ids 0..15 of 64 at first, then
    the tokens it is extended with as they come) and the end-of-answer id: greedy and sampled, it
    proposes nothing else (its q rows have no other support), and the answers are the target's."""
    target, draft = small_models
    prompt = repetitive_prompt(4, 240, 16)
    drafter = ModelDrafter(draft, sink=2, window=8, head_common=0, eos_ids=[40])
    drafter.extend(prompt)
    assert drafter.head.member.nonzero().squeeze(1).tolist() == [*range(16), 40]
    drafts, q = drafter.propose(4, Sampler(1.0, seed=3))
    assert q is not None and bool((q[:, ~drafter.head.member] == 0).all()) and set(drafts) <= {*range(16), 40}
    engine = Engine(target, prompt, budget=32, chunk=4)
    engine.drafters["model"] = ModelDrafter(draft, sink=2, window=8, head_common=0, eos_ids=[40])
    want, _ = engine.run(0, 60, Sampler(0.0), eos={40})
    got, dec = engine.run(2, 60, Sampler(0.0), "model", 4, 3, eos={40})
    assert got == want and set(want) - set(range(16))  # the target answers with others too
    covered = set(engine.drafters["model"].head.member.nonzero().squeeze(1).tolist())  # (grown in the answer)
    assert dec.low_drafts and set(dec.low_drafts) <= covered


class CyclingRoutes(CostModel):
    """A route chooser that ignores costs and takes every route in turn (a plain step, a middle window,
    the bottom drafts verified directly, a tree window where the match branched), so every route's
    bookkeeping meets every other's."""

    def choose(self, gamma_max, props, source, match, remaining, mid, branches=0, start=False, alt=0):
        self.rounds += 1
        turn = self.rounds % 4
        if turn == 1 and mid is not None:
            return "mid", 1 + self.rounds % gamma_max
        if turn == 2 and props:
            return "direct", 1 + self.rounds % len(props)
        if turn == 3 and props and alt:
            return "tree", 1 + self.rounds % len(props), 1 + self.rounds // 4 % alt
        return "step", 0


class TreeWhereBranched(CostModel):
    """A route chooser that takes a tree window wherever the lookup offers a second branch (lengths
    varying from round to round), a plain step elsewhere."""

    def choose(self, gamma_max, props, source, match, remaining, mid, branches=0, start=False, alt=0):
        self.rounds += 1
        if props and alt:
            return "tree", 1 + self.rounds % len(props), 1 + self.rounds // 2 % alt
        return "step", 0


def test_only_an_answer_s_first_round_is_planned_as_its_start(small_models):
    """The route counts the lookup's proposals for an answer's first token apart (route.ANSWER_START):
    the decoder says which round that is, in every answer of a session, and in no other round."""
    target, _ = small_models
    engine = Engine(target, repetitive_prompt(4, 300, 64), budget=32, chunk=4)

    class RecordingRoutes(CostModel):
        def __init__(self):
            super().__init__()
            self.starts: list[bool] = []

        def choose(self, gamma_max, props, source, match, remaining, mid, branches=0, start=False, alt=0):
            self.starts.append(start)
            return super().choose(gamma_max, props, source, match, remaining, mid, branches, start, alt)

    costs = RecordingRoutes()
    for _ in range(2):
        before = len(costs.starts)
        got, dec = engine.run(2, 30, Sampler(0.0), "suffix", gamma_mid=4, gamma_low=3, adaptive=True, costs=costs)
        starts = costs.starts[before:]
        assert len(starts) >= 2 and starts[0] and not any(starts[1:]), starts


@pytest.mark.parametrize("drafter", ["suffix", "ngram"])
def test_every_route_in_turn_is_lossless(small_models, drafter):
    target, _ = small_models
    engine = Engine(target, repetitive_prompt(4, 300, 64), budget=32, chunk=4)
    want, _ = engine.run(0, 120, Sampler(0.0))
    got, dec = engine.run(2, 120, Sampler(0.0), drafter, gamma_mid=4, gamma_low=3, adaptive=True,
                          costs=CyclingRoutes())
    assert got == want
    assert {"step", "mid", "direct"} <= set(dec.routes), dec.routes
    if drafter == "suffix":  # only the suffix lookup knows a match's other ways
        assert "tree" in dec.routes, dec.routes


@pytest.mark.parametrize("drafter,seed", [("suffix", 4), ("suffix", 1), ("both", 4)])
def test_tree_windows_are_lossless(small_models, drafter, seed):
    """Every round where the lookup's match branched verifies both ways in one tree window."""
    target, draft = small_models
    engine = Engine(target, repetitive_prompt(seed, 300, 64), budget=32, chunk=4, draft_model=draft)
    kept_branches = []
    for penalty in (1.0, 1.3):
        want, _ = engine.run(0, 120, Sampler(0.0, repetition_penalty=penalty))
        got, dec = engine.run(2, 120, Sampler(0.0, repetition_penalty=penalty), drafter, gamma_mid=4, gamma_low=3,
                              adaptive=True, costs=TreeWhereBranched())
        assert got == want, f"penalty {penalty}"
        assert dec.routes.count("tree") >= 5, dec.routes
        assert engine.cache.length == len(engine.prompt) + len(got) - 1
        kept_branches += dec.tree_branches
    if drafter == "suffix":  # the trees really chose between their ways
        assert kept_branches.count(1) >= 2 and kept_branches.count(0) >= 2, kept_branches


def test_a_tree_verifier_that_keeps_the_wrong_branch_breaks_greedy_identity(small_models, monkeypatch):
    """The identity test above would catch a tree that keeps the proposal's branch whatever the target says."""
    target, _ = small_models
    engine = Engine(target, repetitive_prompt(4, 300, 64), budget=32, chunk=4)
    want, _ = engine.run(0, 120, Sampler(0.0))
    original = spec.verify_branches

    def always_first(sampler, branches, p):
        b, a, nxt = original(sampler, branches, p)
        return (0, a, nxt) if b == 1 else (b, a, nxt)

    monkeypatch.setattr(spec, "verify_branches", always_first)
    broken, _ = engine.run(2, 120, Sampler(0.0), "suffix", gamma_mid=4, gamma_low=3, adaptive=True,
                           costs=TreeWhereBranched())
    assert broken != want


def test_the_adaptive_route_is_lossless(small_models):
    """The real cost model, on whatever this machine measures."""
    target, _ = small_models
    engine = Engine(target, repetitive_prompt(4, 300, 64), budget=32, chunk=4)
    want, _ = engine.run(0, 120, Sampler(0.0))
    got, dec = engine.run(2, 120, Sampler(0.0), "suffix", gamma_mid=4, gamma_low=3, adaptive=True)
    assert got == want and dec.costs.windows.calibrated_depth == len(engine.prompt) - 1


def test_a_draft_model_as_large_as_the_target_is_not_asked_to_draft_before_it_is_timed(small_models):
    """Before a draft model's forward is timed, the bytes it reads say what one costs: a draft
    model as large as the target (here the target itself, over a short context) costs about a step
    per draft, which drafts of the prior's
    acceptance cannot win back, so a short first answer takes plain steps instead of paying for
    γ_low drafts on trust (a short answer lost a third that way, docs/performance.md); no probe is
    due in so few rounds. The answer is level 0's."""
    target, _ = small_models
    engine = Engine(target, repetitive_prompt(4, 300, 64), budget=32, chunk=4, draft_model=target)
    want, _ = engine.run(0, 6, Sampler(0.0))
    got, dec = engine.run(2, 6, Sampler(0.0), "model", gamma_mid=4, gamma_low=3, adaptive=True)
    assert got == want and dec.costs.step.n and dec.routes == ["step"] * 6 and dec.low_drafts == []


def test_one_slow_step_in_the_calibration_does_not_become_the_step(small_models):
    """The step every "x vs level 0" figure divides by is the median of three timed steps: a hiccup of
    a shared machine on one of them (here a planted 0.6 s) is not taken for the machine's step."""
    import time

    target, _ = small_models
    engine = Engine(target, repetitive_prompt(4, 300, 64), budget=32, chunk=4)
    calls = []

    class Hiccup:
        def __init__(self, model):
            self.model, self.device = model, model.device

        def __call__(self, tokens, cache, logits="last"):
            calls.append(len(tokens))
            if len(calls) == 3:  # the second timed step
                time.sleep(0.6)
            return self.model(tokens, cache, logits=logits)

    costs = CostModel()
    engine.cache.truncate(len(engine.prompt) - 1)
    dec = SpeculativeDecoder(Hiccup(target), engine.cache, Sampler(0.0), set(), SpecConfig(level=1),
                             view=engine.view, costs=costs)
    dec.calibrate(list(engine.prompt))
    assert calls[:4] == [1, 1, 1, 1] and sorted(calls[4:]) == [2, 4, 8]
    assert costs.step.n == 1 and costs.step.value < 0.15
    assert engine.cache.length == len(engine.prompt) - 1  # every timed forward rolled back


def test_greedy_identity_is_checked_against_a_verifier_that_matters(small_models, monkeypatch):
    """The identity test above would catch a verifier that accepts every draft."""
    target, _ = small_models
    engine = Engine(target, repetitive_prompt(0, 200, 64), budget=16, chunk=4)
    want, _ = engine.run(0, 60, Sampler(0.0))
    got, dec = engine.run(1, 60, Sampler(0.0))
    assert got == want
    assert dec.costs.mid.value < 1.0  # the sparse draft really disagrees sometimes

    def accept_all(sampler, drafts, q, p):
        return len(drafts), sampler.sample(p[len(drafts)])

    monkeypatch.setattr(spec, "verify_drafts", accept_all)
    broken, _ = engine.run(1, 60, Sampler(0.0))
    assert broken != want


def test_stops_at_eos_and_budget(small_models):
    target, _ = small_models
    engine = Engine(target, repetitive_prompt(5, 120, 64), budget=16, chunk=4)
    want, _ = engine.run(0, 40, Sampler(0.0))
    eos = want[17]
    first = want.index(eos)
    for level in (0, 1, 2):
        got, dec = engine.run(level, 40, Sampler(0.0), eos={eos})
        assert got == want[: first + 1]
        assert engine.cache.length == len(engine.prompt) + len(got) - 1
        got, _ = engine.run(level, 7, Sampler(0.0))
        assert got == want[:7]
        assert engine.cache.length == len(engine.prompt) + 6


# -- sampling -------------------------------------------------------------------------------------------
VOCAB = 4
DRAWS = 1000


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% quantile of chi-square (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def exact_pair_distribution(model, prompt, sampler) -> dict[tuple[int, int], float]:
    cache = KVCache.for_model(model)
    p1 = sampler.probs(model(torch.tensor(prompt), cache, logits="last")[0])
    out = {}
    for a in range(VOCAB):
        cache.truncate(len(prompt))
        p2 = sampler.probs(model(torch.tensor([a]), cache, logits="last")[0])
        for b in range(VOCAB):
            out[(a, b)] = float(p1[a] * p2[b])
    return out


def chi2_statistic(engine, level, drafter, temperature, top_p, exact, adaptive=False, make_sampler=None,
                   draws: int = DRAWS, costs=None, mid_head=None) -> float:
    """Chi-square of the first two tokens over `draws` seeds against `exact`, divided by its 0.1%
    critical value. make_sampler(seed) replaces Sampler(temperature, top_p, seed=seed); `costs`: a
    route chooser kept across the draws (as a session keeps one)."""
    make_sampler = make_sampler or (lambda seed: Sampler(temperature, top_p, seed=seed))
    counts = dict.fromkeys(exact, 0)
    trees = 0
    for seed in range(draws):
        got, dec = engine.run(level, 2, make_sampler(seed), drafter, gamma_mid=3, gamma_low=2, adaptive=adaptive,
                              costs=costs, mid_head=mid_head)
        counts[tuple(got)] += 1
        trees += "tree" in dec.routes
    if isinstance(costs, TreeWhereBranched):
        assert trees > draws // 2, trees  # the second token came out of a tree window in most draws
    # bins with small expectation are pooled so the chi-square approximation holds
    stat, pooled_obs, pooled_exp, df = 0.0, 0, 0.0, -1
    for key in sorted(exact, key=exact.get, reverse=True):
        e = exact[key] * draws
        if e >= 5:
            stat += (counts[key] - e) ** 2 / e
            df += 1
        else:
            pooled_obs += counts[key]
            pooled_exp += e
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        df += 1
    return stat / chi2_critical(max(df, 1))  # > 1 rejects "distributed as the target" at 0.1%


@pytest.fixture(scope="module")
def sampling_setup(tmp_path_factory):
    target = load_weights_only(save_random_model(tmp_path_factory.mktemp("st"), "llama", vocab_size=VOCAB, seed=7))
    draft = load_weights_only(save_random_model(tmp_path_factory.mktemp("sd"), "llama", vocab_size=VOCAB, seed=8,
                                                num_hidden_layers=1))
    prompt = torch.randint(0, VOCAB, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    return Engine(target, prompt, budget=12, chunk=4, draft_model=draft), target, prompt


@pytest.mark.parametrize("level,drafter,temperature,top_p,adaptive", [
    (1, "ngram", 1.0, 1.0, False), (2, "ngram", 1.0, 1.0, False), (2, "model", 1.0, 1.0, False),
    (2, "model", 0.8, 0.9, False), (2, "ngram", 1.0, 1.0, True), (2, "both", 1.0, 1.0, False),
    (2, "suffix", 1.0, 1.0, True), (2, "suffix", 1.0, 1.0, False),
])
def test_sampling_is_distributed_as_the_target(sampling_setup, level, drafter, temperature, top_p, adaptive):
    engine, target, prompt = sampling_setup
    exact = exact_pair_distribution(target, prompt, Sampler(temperature, top_p, seed=0))
    assert chi2_statistic(engine, level, drafter, temperature, top_p, exact, adaptive) < 1.0


def branching_prompt(vocab: int, length: int, seed: int = 0) -> list[int]:
    """A random prompt whose end matches earlier text that was followed by different tokens, so the
    answer's first round can be a tree window (whose two tokens the chi-square tests then cover)."""
    for s in itertools.count(seed):
        prompt = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(s)).tolist()
        lookup = SuffixDrafter()
        lookup.extend(prompt)
        if lookup.propose(1)[0] and lookup.last_branches >= 2 and lookup.propose_alternative(1):
            return prompt


@pytest.fixture(scope="module")
def tree_sampling_setup(sampling_setup):
    _, target, _ = sampling_setup
    prompt = branching_prompt(VOCAB, 96)
    exact = exact_pair_distribution(target, prompt, Sampler(1.0, 1.0, seed=0))
    return Engine(target, prompt, budget=12, chunk=4), exact


def test_sampling_through_tree_windows_is_distributed_as_the_target(tree_sampling_setup):
    engine, exact = tree_sampling_setup
    assert chi2_statistic(engine, 2, "suffix", 1.0, 1.0, exact, adaptive=True, costs=TreeWhereBranched()) < 1.0


def test_chi_square_rejects_a_tree_verifier_that_skips_the_residual(tree_sampling_setup, monkeypatch):
    """A tree verifier that accepts the second branch with p(b1) rather than p(b1) / (1 - p(a1))."""
    engine, exact = tree_sampling_setup

    def unnormalised(sampler, branches, p):
        root = p[0][0]
        for i, b in enumerate(branches):
            if sampler.uniform() < float(root[b[0]]):
                a, nxt = spec.verify_drafts(sampler, list(b[1:]), None, p[i][1:])
                return i, 1 + a, nxt
        rest = root.clone()
        rest[[b[0] for b in branches]] = 0
        return 0, 0, sampler.sample(rest / rest.sum())

    monkeypatch.setattr(spec, "verify_branches", unnormalised)
    assert chi2_statistic(engine, 2, "suffix", 1.0, 1.0, exact, adaptive=True, costs=TreeWhereBranched()) > 1.0


def test_chi_square_rejects_biased_verifiers(sampling_setup, monkeypatch):
    """The same test fails for a verifier that skips the residual (resamples from p after a
    rejection, as the reference implementation's middle level does) and for one that accepts all."""
    engine, target, prompt = sampling_setup
    exact = exact_pair_distribution(target, prompt, Sampler(1.0, 1.0, seed=0))
    original = spec.verify_drafts

    def no_residual(sampler, drafts, q, p):
        a, _ = original(sampler, drafts, q, p)
        return a, sampler.sample(p[a])

    def accept_all(sampler, drafts, q, p):
        return len(drafts), sampler.sample(p[len(drafts)])

    for broken in (no_residual, accept_all):
        monkeypatch.setattr(spec, "verify_drafts", broken)
        assert chi2_statistic(engine, 1, "ngram", 1.0, 1.0, exact) > 1.0, broken.__name__


def test_exact_distribution_helper_sums_to_one(sampling_setup):
    _, target, prompt = sampling_setup
    exact = exact_pair_distribution(target, prompt, Sampler(1.0, 1.0, seed=0))
    assert abs(sum(exact.values()) - 1) < 1e-5
    assert set(exact) == set(itertools.product(range(VOCAB), repeat=2))


# -- sampling with top-k and the repetition penalty ------------------------------------------------------
PVOCAB = 8
PDRAWS = 600  # the planted biases below score 5x the critical value and more with this many
PROCESSED = {  # two settings: the penalty over the whole context, and over a 3-token window
    "whole": dict(temperature=1.0, top_p=1.0, top_k=3, repetition_penalty=3.0, repetition_window=0),
    "window3": dict(temperature=0.9, top_p=0.9, top_k=0, repetition_penalty=3.0, repetition_window=3),
}


def reference_probs(logits: torch.Tensor, prefix: list[int], temperature: float, top_p: float, top_k: int,
                    repetition_penalty: float, repetition_window: int) -> list[float]:
    """The processed distribution written out plainly for one position: penalty over the ids among
    the last `repetition_window` tokens of its prefix, temperature, top-k, top-p."""
    x = logits.double().tolist()
    for t in set(prefix[-repetition_window:] if repetition_window else prefix):
        x[t] = x[t] / repetition_penalty if x[t] > 0 else x[t] * repetition_penalty
    x = [v / temperature for v in x]
    if top_k:
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else float("-inf") for v in x]
    top = max(x)
    e = [0.0 if v == float("-inf") else torch.tensor(v - top).exp().item() for v in x]
    p = [v / sum(e) for v in e]
    kept, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        if mass >= top_p:
            break
        kept.add(i)
        mass += p[i]
    p = [v if i in kept else 0.0 for i, v in enumerate(p)]
    return [v / sum(p) for v in p]


def reference_pair_distribution(model, prompt, settings) -> dict[tuple[int, int], float]:
    cache = KVCache.for_model(model)
    p1 = reference_probs(model(torch.tensor(prompt), cache, logits="last")[0], prompt, **settings)
    out = {}
    for a in range(PVOCAB):
        cache.truncate(len(prompt))
        p2 = reference_probs(model(torch.tensor([a]), cache, logits="last")[0], prompt + [a], **settings)
        for b in range(PVOCAB):
            out[(a, b)] = p1[a] * p2[b]
    return out


@pytest.fixture(scope="module")
def processed_setup(tmp_path_factory):
    """A target that likes to repeat its last token (logit about 2.5 against about 0 for the
    others, plus a little context), over a prompt of ids 0 and 1 in a vocabulary of 8: whether
    the next token repeats depends on the penalty, and ids 2..7 are penalized only once drafted,
    so the penalty changes from one position of a window to the next. The draft model is random."""
    target = load_weights_only(save_bigram_model(tmp_path_factory.mktemp("pt"), {(t, t): 0.4 for t in range(PVOCAB)},
                                                 vocab_size=PVOCAB, seed=11, mix=0.003))
    draft = load_weights_only(save_random_model(tmp_path_factory.mktemp("pd"), "llama", vocab_size=PVOCAB,
                                                seed=12, num_hidden_layers=1))
    prompt = torch.randint(0, 2, (96,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = Engine(target, prompt, budget=12, chunk=4, draft_model=draft)
    exact = {name: reference_pair_distribution(target, prompt, st) for name, st in PROCESSED.items()}
    return engine, exact


def processed_sampler(name: str, cls=Sampler):
    st = PROCESSED[name]
    return lambda seed: cls(st["temperature"], st["top_p"], seed, top_k=st["top_k"],
                            repetition_penalty=st["repetition_penalty"], repetition_window=st["repetition_window"])


@pytest.mark.parametrize("level,drafter,setting,adaptive", [
    (1, "ngram", "whole", False), (2, "model", "whole", False), (2, "model", "window3", False),
    (2, "ngram", "window3", True), (2, "both", "window3", True), (2, "suffix", "window3", True),
])
def test_sampling_with_top_k_and_penalty_is_distributed_as_the_target(processed_setup, level, drafter, setting,
                                                                      adaptive):
    engine, exact = processed_setup
    stat = chi2_statistic(engine, level, drafter, None, None, exact[setting], adaptive,
                          make_sampler=processed_sampler(setting), draws=PDRAWS)
    assert stat < 1.0


@pytest.mark.parametrize("setting", ["whole", "window3"])
def test_sampling_through_tree_windows_with_top_k_and_penalty_is_distributed_as_the_target(processed_setup,
                                                                                            setting):
    """Each branch's rows are processed with their own prefix: the penalty sees that branch's drafts."""
    engine, _ = processed_setup
    prompt = branching_prompt(2, 96, seed=3)  # ids 0 and 1, as processed_setup's
    engine = Engine(engine.model, prompt, budget=12, chunk=4)
    exact = {setting: reference_pair_distribution(engine.model, prompt, PROCESSED[setting])}
    stat = chi2_statistic(engine, 2, "suffix", None, None, exact[setting], True,
                          make_sampler=processed_sampler(setting), draws=PDRAWS, costs=TreeWhereBranched())
    assert stat < 1.0


class PrefixOffByOne(Sampler):
    """Planted bias: the rows of a window after the first see one drafted token too few."""

    def scores(self, logits, extra=()):
        if logits.dim() == 1 or logits.shape[0] == 1:
            return super().scores(logits, extra)
        rows, extra = logits.shape[0], list(extra)
        offset = len(extra) - (rows - 1)
        return torch.stack([super(PrefixOffByOne, self).scores(logits[j], extra[: max(0, offset + j - 1)])
                            for j in range(rows)])


class TopKOnFirstRowOnly(Sampler):
    """Planted bias: top-k applied at the first position of a window only, not at drafted ones."""

    def probs(self, logits, extra=()):
        p = super().probs(logits, extra)
        if logits.dim() == 2 and logits.shape[0] > 1:
            k, self.top_k = self.top_k, 0
            p[1:] = super().probs(logits, extra)[1:]
            self.top_k = k
        return p


def test_processed_chi_square_rejects_planted_biases(processed_setup):
    """Both bugs leave the first token right and bias the second, in the verifier and the middle
    level alike; the test has the power to see it."""
    engine, exact = processed_setup
    off_by_one = chi2_statistic(engine, 1, "ngram", None, None, exact["whole"],
                                make_sampler=processed_sampler("whole", PrefixOffByOne), draws=PDRAWS)
    assert off_by_one > 1.0
    no_top_k = chi2_statistic(engine, 2, "model", None, None, exact["whole"],
                              make_sampler=processed_sampler("whole", TopKOnFirstRowOnly), draws=PDRAWS)
    assert no_top_k > 1.0


@pytest.mark.parametrize("level,drafter", [(1, "ngram"), (2, "model")])
def test_sampling_with_a_mid_head_over_part_of_the_vocabulary_is_distributed_as_the_target(processed_setup, level,
                                                                                            drafter):
    """The middle level's distribution restricted to the prompt's ids 0 and 1 (of 8), with top-k and
    the penalty: the target's other tokens come from the residual, at their exact probability."""
    engine, exact = processed_setup
    head = DraftHead(engine.model.output, common=0)
    stat = chi2_statistic(engine, level, drafter, None, None, exact["whole"], make_sampler=processed_sampler("whole"),
                          draws=PDRAWS, mid_head=head)
    assert head.size == 2
    assert stat < 1.0


def test_reference_pair_distribution_sums_to_one_and_feels_the_penalty(processed_setup):
    engine, exact = processed_setup
    for dist in exact.values():
        assert abs(sum(dist.values()) - 1) < 1e-9
    plain = reference_pair_distribution(engine.model, engine.prompt, {**PROCESSED["whole"], "repetition_penalty": 1.0})
    assert max(abs(plain[k] - exact["whole"][k]) for k in plain) > 0.02  # the penalty is not a no-op here


@pytest.fixture(scope="module")
def walker(tmp_path_factory):
    """After token t this model prefers t again (logit about 4) to t + 1 (about 2.4), unless t is
    penalized (4 / 3 < 2.4): with the penalty it walks to ids it has not seen, and the position
    after a drafted new id is where a penalty missing that id changes the greedy token."""
    vocab = 64
    edges = {(t, t): 0.5 for t in range(vocab)} | {(t, (t + 1) % vocab): 0.3 for t in range(vocab)}
    return load_weights_only(save_bigram_model(tmp_path_factory.mktemp("walk"), edges, vocab_size=vocab, seed=5,
                                               mix=0.003))


@pytest.mark.parametrize("case", ["random-window16", "walker-whole"])
def test_greedy_with_the_penalty_is_token_identical(small_models, walker, case):
    """Greedy applies the penalty (as transformers' greedy search does) at every level alike: a
    random model with the penalty over the last 16 tokens, and the walker with the penalty over
    the whole context, where the identity test also rejects a window whose rows miss a draft."""
    target, draft = small_models
    if case == "random-window16":
        engine = Engine(target, repetitive_prompt(6, 200, 64), budget=32, chunk=4, draft_model=draft)
        settings = dict(top_k=5, repetition_penalty=1.5, repetition_window=16)
    else:
        engine = Engine(walker, repetitive_prompt(6, 200, 16), budget=32, chunk=4, draft_model=draft)
        settings = dict(top_k=5, repetition_penalty=3.0, repetition_window=0)
    n = 40

    def sampler(cls=Sampler):
        return cls(0.0, **settings)

    want, _ = engine.run(0, n, sampler())
    plain, _ = engine.run(0, n, Sampler(0.0))
    assert want != plain  # the penalty changes the answer
    for level, drafter, adaptive in [(1, "ngram", False), (2, "ngram", False), (2, "model", False),
                                     (2, "both", False), (2, "ngram", True), (2, "suffix", True)]:
        got, _ = engine.run(level, n, sampler(), drafter, 4, 3, adaptive)
        assert got == want, f"level {level} ({drafter}, adaptive={adaptive}) differs from level 0"
    if case == "walker-whole":
        broken, _ = engine.run(1, n, sampler(PrefixOffByOne))
        assert broken != want
