"""The logits processors: the repetition penalty row by row with each row's own prefix, top-k and
top-p, checked against a naive reference, against transformers' own processors, and for the
bitwise agreement of a window's rows with single steps that greedy speculation needs."""

from __future__ import annotations

import random

import pytest
import torch

from triforce_chat.decoding.config import DecodeConfig, generation_defaults
from triforce_chat.decoding.processors import TokenHistory, top_k_filter, top_k_top_p_probs, top_p_filter
from triforce_chat.decoding.sampling import Sampler


def naive_penalty(row: torch.Tensor, prefix: list[int], penalty: float, window: int) -> torch.Tensor:
    """The CTRL rule written out: every id among the last `window` tokens (0: all) is penalized."""
    out = row.clone()
    for t in set(prefix[-window:] if window else prefix):
        if t < out.numel():
            out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    return out


@pytest.mark.parametrize("window", [0, 1, 3, 7, 64])
def test_penalty_rows_follow_their_own_prefix(window):
    """Random appends, rollbacks and multi-row windows: every row equals the naive rule applied to
    the history plus the drafts before it."""
    rng = random.Random(window)
    vocab = 12
    sampler = Sampler(1.0, repetition_penalty=1.7, repetition_window=window, seed=0)
    seq = [rng.randrange(vocab) for _ in range(rng.randrange(0, 20))]
    sampler.reset(seq)
    for step in range(60):
        op = rng.random()
        if op < 0.4:
            new = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
            sampler.extend(new)
            seq += new
        elif op < 0.6:
            n = rng.randrange(0, len(seq) + 1)
            sampler.truncate(n)
            del seq[n:]
        rows = rng.randrange(1, 7)
        extra = [rng.randrange(vocab) for _ in range(rows - 1 + rng.randrange(0, 3))]
        logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(step)) * 3
        got = sampler.scores(logits, extra)
        offset = len(extra) - (rows - 1)
        for j in range(rows):
            want = naive_penalty(logits[j], seq + extra[: offset + j], 1.7, window)
            torch.testing.assert_close(got[j], want, rtol=0, atol=0, msg=f"step {step} row {j}")
        assert sampler.history.tokens == seq


def test_incremental_counts_equal_counts_from_scratch():
    rng = random.Random(3)
    hist = TokenHistory(window=5)
    hist.reset([1, 2, 3])
    hist.counts(10, torch.device("cpu"))  # built now, then only updated
    for _ in range(200):
        if rng.random() < 0.6:
            hist.extend([rng.randrange(10) for _ in range(rng.randrange(1, 4))])
        else:
            hist.truncate(rng.randrange(0, len(hist) + 1))
        fresh = torch.bincount(torch.tensor(hist.tokens[-5:], dtype=torch.long), minlength=10)
        assert torch.equal(hist._counts, fresh)


@pytest.mark.parametrize("window", [0, 4])
def test_window_rows_equal_single_steps_bitwise(window):
    """Greedy identity across levels needs a row processed inside a window to get exactly the bits
    it gets when that position is sampled alone."""
    vocab = 300
    g = torch.Generator().manual_seed(1)
    history = torch.randint(0, vocab, (40,), generator=g).tolist()
    drafts = torch.randint(0, vocab, (6,), generator=g).tolist()
    logits = torch.randn(7, vocab, generator=g) * 4
    window_sampler = Sampler(0.0, repetition_penalty=1.3, repetition_window=window)
    window_sampler.reset(history)
    rows = window_sampler.scores(logits, drafts)
    for j in range(7):
        step = Sampler(0.0, repetition_penalty=1.3, repetition_window=window)
        step.reset(history + drafts[:j])
        assert torch.equal(rows[j], step.scores(logits[j])), j
        assert torch.equal(window_sampler.probs(logits, drafts)[j], step.probs(logits[j]))


def test_matches_transformers_processors():
    """Over the whole context (window 0), probs equal transformers' repetition penalty ->
    temperature -> top-k -> top-p followed by softmax: the same rule in the same order."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(5)
    vocab = 50
    for trial in range(20):
        ids = torch.randint(0, vocab, (1, 30), generator=g)
        logits = torch.randn(1, vocab, generator=g) * 3
        penalty, temp, k, p = 1.1 + 0.1 * (trial % 5), 0.7, 20 - trial % 7, 0.8
        scores = logits.clone()
        for proc in (RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temp),
                     TopKLogitsWarper(k), TopPLogitsWarper(p)):
            scores = proc(ids, scores)
        want = torch.softmax(scores, -1)[0]
        sampler = Sampler(temp, top_p=p, top_k=k, repetition_penalty=penalty, repetition_window=0)
        sampler.reset(ids[0].tolist())
        torch.testing.assert_close(sampler.probs(logits[0]), want, rtol=1e-5, atol=1e-7)


def test_greedy_is_argmax_without_penalty_and_penalized_argmax_with_it():
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    plain = Sampler(0.0, top_k=2, top_p=0.5)
    plain.reset([1, 1, 1])
    assert int(plain.probs(logits).argmax()) == 1  # penalty 1.0: the history is ignored
    penal = Sampler(0.0, repetition_penalty=1.1)
    penal.reset([1])
    assert int(penal.probs(logits).argmax()) == 2  # 3.0 / 1.1 < 2.9
    assert torch.equal(penal.probs(logits), torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_top_k_keeps_ties_and_nothing_else():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, True, True, False]]
    assert top_k_filter(logits, 0) is logits and top_k_filter(logits, 9) is logits
    probs = Sampler(1.0, top_k=1).probs(logits[0])
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("top_p", [1.0, 0.8, 0.3])
def test_top_k_then_top_p_on_the_k_best_is_the_two_filters(k, top_p):
    """The fast path (a sort of k values) gives the distribution of top_k_filter then top_p_filter
    over the whole row: the same support, the same probabilities up to the softmax's rounding; rows
    with ties at the k-th logit (kept, by definition) take the long way and match it exactly."""
    g = torch.Generator().manual_seed(k + int(10 * top_p))
    rows = torch.randn(6, 400, generator=g) * 3
    rows[4, :30] = rows[4].max() + 1  # 30 tied maxima: with k < 30 every one of them is kept
    want = top_p_filter(torch.softmax(top_k_filter(rows, k), dim=-1), top_p)
    got = top_k_top_p_probs(rows, k, top_p)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if k < 30:
        assert torch.equal(top_k_top_p_probs(rows[4:5], k, top_p), want[4:5])  # the long way
    for j in range(6):  # each row as alone, whatever path the others take
        assert torch.equal(got[j], top_k_top_p_probs(rows[j], k, top_p)), j


def test_sampled_window_rows_equal_single_steps_bitwise():
    """Sampling is exact only if a row processed inside a window gets the probabilities it gets
    alone: penalty, temperature, top-k and top-p, row by row."""
    vocab = 3000
    g = torch.Generator().manual_seed(3)
    history = torch.randint(0, vocab, (80,), generator=g).tolist()
    drafts = torch.randint(0, vocab, (7,), generator=g).tolist()
    logits = torch.randn(8, vocab, generator=g) * 4
    for top_k in (0, 20):
        window = Sampler(0.7, top_p=0.8, top_k=top_k, repetition_penalty=1.1)
        window.reset(history)
        rows = window.probs(logits, drafts)
        for j in range(8):
            step = Sampler(0.7, top_p=0.8, top_k=top_k, repetition_penalty=1.1)
            step.reset(history + drafts[:j])
            assert torch.equal(rows[j], step.probs(logits[j])), (top_k, j)


def test_a_token_is_drawn_from_the_support_at_its_probability():
    """`sample` draws among a row's nonzero entries (top-k / top-p keep a few of a large vocabulary):
    never outside them, each as often as its probability says."""
    probs = torch.zeros(5000)
    probs[[7, 400, 2999, 4998]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    sampler = Sampler(1.0, seed=11)
    n = 20000
    counts = torch.bincount(torch.tensor([sampler.sample(probs) for _ in range(n)]), minlength=5000)
    assert counts.sum() == counts[[7, 400, 2999, 4998]].sum() == n
    for tok, p in ((7, 0.1), (400, 0.2), (2999, 0.3), (4998, 0.4)):
        assert abs(int(counts[tok]) - n * p) < 5 * (n * p * (1 - p)) ** 0.5, (tok, int(counts[tok]))


def test_sampler_refuses_bad_values():
    for kwargs, words in [({"top_k": -1}, "top-k"), ({"repetition_penalty": 0.0}, "repetition penalty"),
                          ({"repetition_window": -2}, "window")]:
        with pytest.raises(ValueError, match=words):
            Sampler(1.0, **kwargs)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("top_k", -1, "top-k must be >= 0"),
    ("repetition_penalty", 0.0, "repetition-penalty must be in"),
    ("repetition_penalty", 11.0, "repetition-penalty must be in"),
    ("repetition_window", -1, "repetition-window must be >= 0"),
    ("loop_repeats", 1, "loop-repeats must be >= 2"),
    ("loop_min_tokens", 0, "loop-min-tokens must be >= 2"),
    ("loop_max_span", 0, "loop-max-span must be between"),
])
def test_decode_config_messages(field, value, words):
    with pytest.raises(ValueError, match=words) as info:
        DecodeConfig(**{field: value}).validate()
    assert "\n" not in str(info.value)


def test_generation_defaults_from_a_hugging_face_generation_config():
    qwen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
            "eos_token_id": [151645, 151643]}
    assert generation_defaults(qwen) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    # without do_sample transformers decodes greedily: only the penalty is a recommendation then
    assert generation_defaults({"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.2}) == {
        "repetition_penalty": 1.2}
    # values the decoder would refuse, and non-numbers, are left out
    assert generation_defaults({"do_sample": True, "temperature": -1, "top_p": 0, "top_k": True,
                                "repetition_penalty": "1.1"}) == {}
    assert generation_defaults({}) == {}
