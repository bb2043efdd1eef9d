"""Losslessness of the speculative decoder.

Greedy: levels 1 and 2 (both drafters) produce exactly the tokens of level 0.
Sampling: the first tokens at levels 1 and 2 are distributed exactly as the full target's (a
chi-square goodness-of-fit test against the target's exact distribution, with fixed seeds so the
test is deterministic), and the same test rejects two deliberately broken verifiers.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import triforce_chat.decoding.speculative as spec
from conftest import save_random_model
from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.drafters import ModelDrafter, NGramDrafter
from triforce_chat.decoding.loading import load_weights_only
from triforce_chat.decoding.retrieval import RetrievalView
from triforce_chat.decoding.sampling import Sampler
from triforce_chat.decoding.speculative import SpecConfig, SpeculativeDecoder


class Engine:
    """A prefilled prompt that can be decoded again and again at any level."""

    def __init__(self, model, prompt: list[int], budget: int, chunk: int, draft_model=None):
        self.model, self.prompt = model, prompt
        self.cache = KVCache.for_model(model)
        self.view = RetrievalView(self.cache, budget=budget, chunk_size=chunk)
        # drafters live across runs (as in a session): every run rolls them back to the prompt
        self.drafters = {"ngram": NGramDrafter(n_max=3, n_min=1)}
        if draft_model is not None:
            self.drafters["model"] = ModelDrafter(draft_model, sink=2, window=8)
        self.mirrors: dict[str, list[int]] = {name: [] for name in self.drafters}
        model(torch.tensor(prompt[:-1]), self.cache, logits="none")

    def run(self, level: int, n: int, sampler: Sampler, drafter: str = "ngram", gamma_mid: int = 4,
            gamma_low: int = 3, adaptive: bool = False, eos: set[int] = frozenset()
            ) -> tuple[list[int], SpeculativeDecoder]:
        self.cache.truncate(len(self.prompt) - 1)
        self.view.stale = True
        dec = SpeculativeDecoder(self.model, self.cache, sampler, set(eos),
                                 SpecConfig(level=level, gamma_mid=gamma_mid, gamma_low=gamma_low, adaptive=adaptive),
                                 view=self.view, drafter=self.drafters[drafter] if level == 2 else None)
        dec._drafter_ctx = self.mirrors[drafter]
        context = list(self.prompt)
        dec.routes = [ev.route for ev in dec.generate(context, n)]
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
    for level, drafter, adaptive in [(1, "ngram", False), (2, "ngram", False), (2, "model", False),
                                     (1, "ngram", True), (2, "ngram", True)]:
        got, dec = engine.run(level, 60, Sampler(0.0), drafter, gamma_mid, gamma_low, adaptive)
        assert got == want, f"level {level} ({drafter}, adaptive={adaptive}) differs from level 0"


def test_adaptive_routes_are_all_exercised_and_lossless(small_models):
    """Adaptive level 2 mixes plain steps, middle windows and bottom drafts verified directly."""
    target, _ = small_models
    engine = Engine(target, repetitive_prompt(4, 300, 64), budget=32, chunk=4)
    want, _ = engine.run(0, 120, Sampler(0.0))
    got, dec = engine.run(2, 120, Sampler(0.0), "ngram", gamma_mid=4, gamma_low=3, adaptive=True)
    assert got == want
    assert {"step", "mid", "direct"} <= set(dec.routes), dec.routes


def test_greedy_identity_is_checked_against_a_verifier_that_matters(small_models, monkeypatch):
    """The identity test above would catch a verifier that accepts every draft."""
    target, _ = small_models
    engine = Engine(target, repetitive_prompt(0, 200, 64), budget=16, chunk=4)
    want, _ = engine.run(0, 60, Sampler(0.0))
    got, dec = engine.run(1, 60, Sampler(0.0))
    assert got == want
    assert dec.costs.alpha.value < 1.0  # the sparse draft really disagrees sometimes

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


def chi2_statistic(engine, level, drafter, temperature, top_p, exact, adaptive=False) -> float:
    counts = dict.fromkeys(exact, 0)
    for seed in range(DRAWS):
        got, _ = engine.run(level, 2, Sampler(temperature, top_p, seed=seed), drafter, gamma_mid=3, gamma_low=2,
                            adaptive=adaptive)
        counts[tuple(got)] += 1
    # bins with small expectation are pooled so the chi-square approximation holds
    stat, pooled_obs, pooled_exp, df = 0.0, 0, 0.0, -1
    for key in sorted(exact, key=exact.get, reverse=True):
        e = exact[key] * DRAWS
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
    (2, "model", 0.8, 0.9, False), (2, "ngram", 1.0, 1.0, True),
])
def test_sampling_is_distributed_as_the_target(sampling_setup, level, drafter, temperature, top_p, adaptive):
    engine, target, prompt = sampling_setup
    exact = exact_pair_distribution(target, prompt, Sampler(temperature, top_p, seed=0))
    assert chi2_statistic(engine, level, drafter, temperature, top_p, exact, adaptive) < 1.0


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
