"""The adaptive route (decoding/route.py): costs, acceptance estimates and the choice they make.

Exactness never rests on these (tests/test_speculative.py checks every route against level 0);
what they decide is speed, so the tests pin the decisions a user's speed depends on.
"""

from __future__ import annotations

import pytest

from triforce_chat.decoding.route import (
    ANSWER_START,
    PROBE_EVERY,
    PROBE_MIN_REMAINING,
    Acceptance,
    CostModel,
    MidLevel,
    WindowCosts,
    expected_tokens,
    lookup_key,
    match_bucket,
    tree_expected_tokens,
)

STEP = 0.05


def windows(per_row: float, lengths=(2, 3, 4, 5, 6, 7, 8, 11)) -> WindowCosts:
    """Measured window costs: a step, and c(t) = step (1 + per_row (t - 1))."""
    w = WindowCosts()
    w.record(1, STEP)
    for t in lengths:
        w.record(t, STEP * (1 + per_row * (t - 1)))
    w.calibrated_depth = 4000
    return w


CHEAP = 0.02  # a matrix unit: a window of 8 costs about 1.14 steps
DEAR = 0.6  # a vector machine at one thread: every extra row costs more than half a step


def test_window_costs_interpolate_between_measured_lengths_and_keep_to_the_prior_otherwise():
    w = WindowCosts()
    w.record(1, 0.05)
    assert w.cost(3) == pytest.approx(0.05 * (1 + 2 * 0.3))  # only a step known: the prior slope
    w.record(4, 0.08)
    w.record(8, 0.16)
    assert w.cost(2) == pytest.approx(0.06) and w.cost(6) == pytest.approx(0.12)
    assert w.cost(10) == pytest.approx(0.20)  # past the longest: the last segment's slope
    assert w.cost(4) == pytest.approx(0.08) and w.cost(1) == pytest.approx(0.05)


def test_window_costs_ask_for_a_calibration_when_the_depth_moved_by_more_than_twice():
    w = windows(DEAR)
    assert not w.needs_calibration(4000) and not w.needs_calibration(7900) and not w.needs_calibration(2100)
    assert w.needs_calibration(8100) and w.needs_calibration(1900) and WindowCosts().needs_calibration(4000)


def test_acceptance_counts_the_positions_tried_not_the_drafts_proposed():
    a = Acceptance(prior=0.5, weight=1e-9)
    for _ in range(50):
        a.update(2, 4)  # 2 accepted, the third rejected: 3 positions tried
    assert a.value == pytest.approx(2 / 3, rel=1e-3)
    b = Acceptance(prior=0.5, weight=1e-9)
    for _ in range(50):
        b.update(4, 4)  # all passed: 4 tried, 4 accepted
    assert b.value == pytest.approx(1.0)


def test_expected_tokens_and_match_buckets():
    assert expected_tokens(0.0, 5) == pytest.approx(1.0)
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert [match_bucket(m) for m in (0, 1, 2, 3, 4, 7, 8, 16, 32)] == [0, 1, 2, 2, 3, 3, 4, 5, 5]


def test_dear_windows_and_poor_drafts_take_plain_steps_and_cheap_windows_take_long_ones():
    # a middle level that reads a third of a step's bytes, drafts accepted 90% of the time
    mid = MidLevel(bytes_ratio=0.3)
    dear = CostModel(windows(DEAR))
    dear.mid = Acceptance(0.9)
    cheap = CostModel(windows(CHEAP))
    cheap.mid = Acceptance(0.9)
    route, long_gamma, _ = cheap.choose(6, [], "none", 0, 100, mid)
    assert route == "mid" and long_gamma >= 4
    # the same drafts where every extra row of a window costs 0.6 of a step: they cannot pay
    assert dear.choose(6, [], "none", 0, 100, mid).route == "step"
    # the lookup's proposals after a one-token match are mostly wrong: with dear windows a step wins
    assert dear.choose(0, [7, 7, 7], "lookup", 1, 100, None).route == "step"
    # after a 20-token match they are mostly right: verified directly
    assert dear.choose(0, [7, 7, 7], "lookup", 20, 100, None)[0] == "direct"
    route, k, _ = cheap.choose(0, [7] * 10, "lookup", 20, 100, None)
    assert route == "direct" and k >= 8


def test_a_match_followed_by_many_different_tokens_before_is_not_drafted_on():
    """A 1-token match that was always followed by the same token is a fair bet on windows that cost
    1.2 steps; the same match followed by five different tokens before is not (until the session's own
    counts say otherwise), and what is learnt of one kind does not move the other."""
    costs = CostModel(windows(0.2))
    assert costs.choose(0, [7, 7], "lookup", 1, 100, None, branches=1)[0] == "direct"
    assert costs.choose(0, [7, 7], "lookup", 1, 100, None, branches=5).route == "step"
    assert lookup_key(1, 0) == lookup_key(1, 1) == (1, 0) and lookup_key(3, 2) == (2, 1)
    assert lookup_key(3, 4) == lookup_key(3, 40) == (2, 2)
    for _ in range(20):  # branching matches turn out right after all
        costs.lookup[lookup_key(1, 5)].update(2, 2)
    assert costs.choose(0, [7, 7], "lookup", 1, 100, None, branches=5)[0] == "direct"
    for _ in range(20):  # ... and one-way matches wrong: each kind follows its own counts
        costs.lookup[lookup_key(1, 1)].update(0, 2)
    assert costs.choose(0, [7, 7], "lookup", 1, 100, None, branches=1).route == "step"
    assert costs.choose(0, [7, 7], "lookup", 1, 100, None, branches=5)[0] == "direct"


def test_an_answer_s_first_token_is_not_drafted_on_whatever_the_match():
    """An answer's first token follows the chat template, not the text, and the lookup's guess there
    is nearly never it: even behind a long one-way match the round is a step, and what first tokens
    show is counted apart from the rest of the answer (a session whose answers all open alike learns
    that)."""
    costs = CostModel(windows(0.2))
    assert costs.choose(0, [7, 7], "lookup", 20, 100, None, branches=1)[0] == "direct"
    assert costs.choose(0, [7, 7], "lookup", 20, 100, None, branches=1, start=True).route == "step"
    assert lookup_key(20, 1, start=True) == ANSWER_START != lookup_key(20, 1)
    for _ in range(20):
        costs.lookup[ANSWER_START].update(2, 2)
    assert costs.choose(0, [7, 7], "lookup", 20, 100, None, branches=1, start=True)[0] == "direct"
    assert costs.lookup[lookup_key(20, 1)].n == 0


def test_the_middle_level_is_never_tried_where_it_reads_what_a_step_reads():
    """At a few thousand tokens the retrieved KV is most of the KV: a middle step costs a step."""
    costs = CostModel(windows(CHEAP))
    same = MidLevel(bytes_ratio=0.99, rebuild_s=STEP)
    routes = {costs.choose(6, [], "none", 0, 1000, same)[0] for _ in range(500)}
    assert routes == {"step"}


def test_a_rebuild_due_this_answer_is_paid_only_where_the_answer_is_long_enough():
    costs = CostModel(windows(CHEAP))
    costs.mid = Acceptance(0.9)
    mid = MidLevel(bytes_ratio=0.45, rebuild_s=20 * STEP)
    assert costs.choose(6, [], "none", 0, 400, mid)[0] == "mid"
    assert costs.choose(6, [], "none", 0, 4, mid).route == "step"


def test_losing_probes_back_off_carry_over_answers_and_wait_for_an_answer_long_enough():
    costs = CostModel(windows(0.2))
    costs.mid_per_token.update(0.02)
    for _ in range(40):
        costs.mid.update(0, 3)  # the middle level's drafts keep failing: it loses
    mid = MidLevel(bytes_ratio=0.4)
    probes = []
    for i in range(1, 301):  # several answers on one session's cost model
        remaining = 100 if i < 250 else PROBE_MIN_REMAINING - 1
        route, gamma, _ = costs.choose(6, [], "none", 0, remaining, mid)
        if route == "mid":
            probes.append(i)
            assert gamma <= 2
        else:
            assert (route, gamma) == ("step", 0)
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert probes[0] == PROBE_EVERY and gaps[:3] == [16, 32, 64] and set(gaps[3:]) <= {64}, probes
    assert probes[-1] < 250  # none where the answer has too little left to win a probe back


def test_a_draft_model_drafts_only_where_its_drafts_pay_and_probes_otherwise():
    """Behind a lookup, a draft model costs a forward per token: the round asks it only when the
    cost model expects its drafts, verified directly, to beat a step (or when a probe is due), and
    for at most γ_low tokens; the lookup's drafts are always taken (they are free)."""
    from types import SimpleNamespace

    from triforce_chat.decoding.speculative import SpecConfig, SpeculativeDecoder

    costs = CostModel(windows(0.3))
    assert costs.model_draft_length(4) == 4  # neither measured nor known from its weights: try it
    # not measured, but a model whose forward reads 0.46 of a step's bytes costs about 0.46 of a step
    # per draft: with the prior's acceptance (a half) no window of its drafts beats a step, so a session's
    # first answer does not pay for them on trust (a probe measures it later); a model a tenth the
    # target's size pays where its drafts are good
    assert costs.model_draft_length(4, bytes_ratio=0.46) == 0
    small = CostModel(windows(0.02))
    for _ in range(20):
        small.model.update(4, 4)
    assert small.model_draft_length(4, bytes_ratio=0.1) == 4
    costs.model_per_token.update(0.04)  # each model draft costs 0.8 of a step
    for _ in range(20):
        costs.model.update(4, 4)
    assert costs.model_draft_length(4) == 0  # 0.8 step per draft is more than even good drafts save
    cheap = CostModel(windows(0.3))
    cheap.model_per_token.update(0.002)
    for _ in range(20):
        cheap.model.update(4, 4)
    assert cheap.model_draft_length(4) == 4

    class Bottom:
        drafts_with_model = True
        last_match = 12

        def __init__(self):
            self.lookup_hits, self.model_calls = [], []

        def propose_lookup(self, k):
            return ([7] * k, None) if self.lookup_hits.pop(0) else ([], None)

        def propose_model(self, k, sampler):  # measured: ~0.05 s per draft, as dear as a step
            import time

            self.model_calls.append(k)
            time.sleep(0.05 * k)
            return [5] * k, None

    bottom = Bottom()
    dec = SpeculativeDecoder(None, None, None, set(), SpecConfig(level=2, gamma_low=4),
                             view=SimpleNamespace(), drafter=bottom, costs=costs)
    sources = []
    for i in range(1, 121):
        bottom.lookup_hits.append(i % 5 == 0)
        props, _, source = dec._bottom_proposal(10, remaining=100)
        sources.append(source)
        assert props == {"lookup": [7] * 10, "model": [5] * 4, "none": []}[source]
        costs.choose(0, props, source, bottom.last_match, 100, None)
    assert sources.count("lookup") == 24  # every lookup hit is used, at full length
    assert 1 <= len(bottom.model_calls) <= 6 and set(bottom.model_calls) == {4}  # probes only, backing off


def test_a_draft_model_drafts_as_many_tokens_as_the_best_window_takes():
    """Each draft costs a forward of the draft model (here 0.3 of a step) whether the window keeps it or
    not: with middling acceptance fewer drafts pay best, and the decoder asks for that many."""
    from types import SimpleNamespace

    from triforce_chat.decoding.speculative import SpecConfig, SpeculativeDecoder

    def model_costs(accepted: int) -> CostModel:
        costs = CostModel(windows(0.15))
        costs.model_per_token.update(0.3 * STEP)
        for _ in range(40):
            costs.model.update(accepted, 4)  # accepted of 4, round after round
        return costs

    good, middling = model_costs(4), model_costs(1)
    assert good.model_draft_length(4) == 4
    k = middling.model_draft_length(4)
    assert 1 <= k < 4  # still beats a step, with fewer drafts
    rates = {n: middling.direct_rate(n, middling.model.value, 0.3 * STEP) for n in range(1, 5)}
    assert max(rates, key=rates.get) == k and rates[k] > middling.step_rate()

    class Bottom:
        drafts_with_model = True
        last_match = 0
        asked: list[int] = []

        def propose_lookup(self, k):
            return [], None

        def propose_model(self, k, sampler):
            self.asked.append(k)
            return [5] * k, None

    bottom = Bottom()
    dec = SpeculativeDecoder(None, None, None, set(), SpecConfig(level=2, gamma_low=4),
                             view=SimpleNamespace(), drafter=bottom, costs=middling)
    props, _, source = dec._bottom_proposal(10, remaining=100)
    assert source == "model" and bottom.asked == [k] and props == [5] * k


def test_a_chat_that_grows_from_a_few_tokens_is_not_recalibrated_at_every_doubling():
    w = windows(DEAR)
    w.calibrated_depth = 120
    assert not w.needs_calibration(300) and not w.needs_calibration(2000)
    assert w.needs_calibration(2100)


@pytest.mark.parametrize("alpha,beta,k,k_alt", [(0.4, 0.5, 3, 2), (0.8, 0.2, 5, 1), (0.1, 0.9, 1, 4)])
def test_tree_expected_tokens_is_the_mean_of_the_tree_it_describes(alpha, beta, k, k_alt):
    import random

    rng = random.Random(0)

    def kept() -> int:  # the first branch's drafts, else the second's, then the target's own token
        ok, n = rng.random() < alpha, k
        if not ok:
            ok, n = rng.random() < beta, k_alt
        accepted = 0
        while ok:
            accepted += 1
            ok = accepted < n and rng.random() < alpha
        return accepted + 1

    mean = sum(kept() for _ in range(200_000)) / 200_000
    assert mean == pytest.approx(tree_expected_tokens(alpha, beta, k, k_alt), abs=0.01)
    assert tree_expected_tokens(alpha, 0.0, k, k_alt) == pytest.approx(expected_tokens(alpha, k))


def test_a_branching_match_is_verified_both_ways_where_its_second_way_is_often_right():
    """Behind a match followed by 2-3 different tokens (its proposal right about half the time), once
    the other way has been right when the proposal was wrong, one window of both ways beats a window
    of the proposal alone; never for an answer's first token or a model's drafts; the session's own
    counts of the second way decide; and where every row costs most of a step, a plain step stays."""
    costs = CostModel(windows(0.3))
    for _ in range(20):
        costs.alternative[1].update(1, 1)
    route = costs.choose(0, [7, 7, 7], "lookup", 3, 100, None, branches=2, alt=2)
    assert route.route == "tree" and route.k >= 1 and route.k_alt >= 1
    assert costs.choose(0, [7, 7, 7], "lookup", 3, 100, None, branches=2).route != "tree"  # no second way
    assert costs.choose(0, [7, 7, 7], "lookup", 3, 100, None, branches=2, alt=2, start=True).route != "tree"
    assert costs.choose(0, [7, 7, 7], "model", 0, 100, None, alt=2).route != "tree"
    for _ in range(40):  # the other way turns out wrong
        costs.alternative[1].update(0, 1)
    assert costs.choose(0, [7, 7, 7], "lookup", 3, 100, None, branches=2, alt=2).route != "tree"
    dear = CostModel(windows(DEAR))  # where every row costs most of a step, not even a good second way pays
    for _ in range(20):
        dear.alternative[1].update(1, 1)
    assert dear.choose(0, [7, 7, 7], "lookup", 3, 100, None, branches=2, alt=2).route == "step"


def test_an_answer_whose_lookup_drafts_keep_failing_is_trusted_less_and_the_next_answer_starts_afresh():
    """The session's counts say one-way matches are right 80% of the time; an answer whose first
    windows all fail at their first draft (it rephrases rather than quotes) gets a lower estimate
    within a few windows, a quoting one a higher; the next answer starts from the session's."""
    costs = CostModel(windows(0.2))
    key = lookup_key(3, 1)
    for _ in range(30):
        costs.lookup[key].update(4, 5)  # earlier answers: 4 of 5 positions right
    session = costs.lookup[key].value
    assert costs.lookup_alpha(key) == pytest.approx(session)
    for _ in range(3):
        costs.lookup_verified(key, 0, 3)
    assert costs.lookup_alpha(key) < 0.6 * session
    k_after_misses = costs.choose(0, [7] * 7, "lookup", 3, 100, None, branches=1).k
    costs.start_answer()
    assert costs.lookup_alpha(key) == pytest.approx(costs.lookup[key].value)
    assert costs.choose(0, [7] * 7, "lookup", 3, 100, None, branches=1).k > k_after_misses
    for _ in range(3):
        costs.lookup_verified(key, 7, 7)  # a quoting answer
    assert costs.lookup_alpha(key) > costs.lookup[key].value
