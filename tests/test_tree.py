"""Tree windows (decoding/tree.py): each branch's rows get the bits of a plain window of that branch,
the cache keeps exactly what a plain window of the kept branch leaves, and the multi-draft verifier
emits the target's distribution (and a verifier that forgets to renormalise the residual does not).
The decoder-level tests (greedy identity, sampling with top-k and the penalty) are in
test_speculative.py; the second branch's proposals in test_suffix.py."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import save_random_model
from gguf_models import load as load_gguf
from gguf_models import random_ids, write_gguf
from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.models.loading import load_weights_only
from triforce_chat.decoding.sampling import Sampler
from triforce_chat.decoding.tree import TreeWindow, verify_branches
from triforce_chat.kernels import native


@pytest.fixture(scope="module", params=["fp32", "int8-bf16", "int8-int8"])
def model(request, tmp_path_factory):
    if request.param == "fp32":
        return load_weights_only(save_random_model(tmp_path_factory.mktemp("tree"), "llama", vocab_size=96, seed=3))
    m = load_gguf(write_gguf(tmp_path_factory.mktemp("tree-gguf") / "q.gguf", "qwen2", vocab=96, qtype="Q5_0",
                             seed=4, qtypes={"attn_v": "Q8_0", "output": "Q8_0"}))
    if native.status().int8:
        m.set_activations("int8")
    attention = request.param.split("-")[1]
    if request.param == "int8-int8" and (m.attention_available("int8") or not native.status().int8):
        pytest.skip("this build has no int8 activations and int8 attention (AVX512-VNNI)")
    if m.attention_available(attention) == "":
        m.set_attention(attention)  # the cache then keeps prepared blocks, which the branches overwrite
    return m


def prefilled(model, prompt: list[int]) -> KVCache:
    cache = KVCache.for_model(model, max_len=256)
    model(torch.tensor(prompt), cache, logits="none")
    return cache


@pytest.mark.parametrize("start,lengths", [(60, (3, 5)), (29, (4, 2)), (90, (1, 1)), (62, (6, 6))])
def test_branches_get_the_bits_of_their_own_windows_and_the_cache_keeps_the_kept_one(model, start, lengths):
    """Windows that cross a block of 32 keys (positions 60..66 cross 64), where the prepared blocks
    of one branch would be read by the other if the tree did not make them again."""
    vocab = model.args.vocab_size
    prompt = random_ids(start, vocab, seed=start).tolist()
    rng = random.Random(start)
    pending = rng.randrange(vocab)
    branches = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    branches[1][0] = (branches[0][0] + 1) % vocab  # they part at the first token
    cache = prefilled(model, prompt)
    tree = TreeWindow(cache, lengths)
    logits = model(torch.tensor([pending, *branches[0], *branches[1]]), tree, logits="all")
    assert cache.length == start  # the tree moves the cache only when told what to keep
    for b, (rows, drafts) in enumerate(zip([tree.rows_of(0), tree.rows_of(1)], branches, strict=True)):
        alone = prefilled(model, prompt)
        want = model(torch.tensor([pending, *drafts]), alone, logits="all")
        assert torch.equal(logits[rows], want), f"branch {b}"
    for b, accepted in [(1, lengths[1]), (0, 1), (1, 0)]:
        cache = prefilled(model, prompt)
        tree = TreeWindow(cache, lengths)
        model(torch.tensor([pending, *branches[0], *branches[1]]), tree, logits="all")
        tree.keep(b, accepted)
        alone = prefilled(model, prompt)  # a plain window of the kept branch, rolled back as the verifier does
        model(torch.tensor([pending, *branches[b]]), alone, logits="all")
        n = start + 1 + accepted
        alone.truncate(n)
        assert cache.length == alone.length == n
        assert torch.equal(cache.k[:, :, :n], alone.k[:, :, :n]) and torch.equal(cache.v[:, :, :n], alone.v[:, :, :n])
        assert all(torch.equal(a, b) for a, b in zip(cache.last_query, alone.last_query, strict=True))
        nxt = torch.tensor([rng.randrange(vocab) for _ in range(3)])  # and the next window reads it alike
        assert torch.equal(model(nxt, cache, logits="all"), model(nxt, alone, logits="all"))


def test_a_tree_refuses_what_it_cannot_hold(model):
    cache = prefilled(model, random_ids(250, model.args.vocab_size).tolist())
    with pytest.raises(ValueError, match="KV cache full"):
        TreeWindow(cache, [2, 8])
    with pytest.raises(ValueError, match="one token or more"):
        TreeWindow(cache, [2, 0])
    tree = TreeWindow(cache, [2, 2])
    with pytest.raises(RuntimeError, match="fed 0 of its 5 rows"):
        tree.keep(0, 1)


# -- the verifier ----------------------------------------------------------------------------------------
V = 6
ROOT = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])
NEXT = torch.tensor([0.1, 0.1, 0.5, 0.1, 0.1, 0.1])


def draw_counts(verify, branches, draws: int = 6000) -> dict[tuple[int, ...], int]:
    """The first two tokens `verify` emits (the kept drafts and the next token; where that is one
    token, the next round's, from NEXT as the target would), over `draws` seeds: the target's
    distribution is ROOT, then NEXT whatever came first."""
    p = [torch.stack([ROOT, *[NEXT] * len(b)]) for b in branches]
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(draws):
        sampler = Sampler(1.0, seed=seed)
        b, a, nxt = verify(sampler, branches, p)
        key = (*branches[b][:a], nxt, sampler.sample(NEXT))[:2]
        counts[key] = counts.get(key, 0) + 1
    return counts


def chi2_over_critical(counts: dict[tuple[int, ...], int], draws: int = 6000) -> float:
    """Chi-square of the first two emitted tokens against ROOT x NEXT over its 0.1% critical value."""
    stat, df = 0.0, -1
    for a in range(V):
        for b in range(V):
            e = float(ROOT[a] * NEXT[b]) * draws
            stat += (counts.get((a, b), 0) - e) ** 2 / e
            df += 1
    return stat / (df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3)


@pytest.mark.parametrize("branches", [[[0, 2], [1, 2]], [[3, 2], [4]], [[5], [0, 2, 2]]])
def test_the_multi_draft_verifier_emits_the_target_distribution(branches):
    counts = draw_counts(verify_branches, branches)
    assert chi2_over_critical(counts) < 1.0
    assert counts.get((branches[1][0], 2), 0) > 0  # the second branch was really kept


def test_a_verifier_that_skips_the_residual_renormalisation_is_rejected():
    """The test above would catch accepting the second branch with p(b1) instead of p(b1) / (1 - p(a1))."""

    def unnormalised(sampler, branches, p):
        root = p[0][0]
        for i, b in enumerate(branches):
            if sampler.uniform() < float(root[b[0]]):
                return i, 1, sampler.sample(p[i][1])
        rest = root.clone()
        rest[[b[0] for b in branches]] = 0
        return 0, 0, sampler.sample(rest / rest.sum())

    assert chi2_over_critical(draw_counts(unnormalised, [[0, 2], [1, 2]])) > 1.0


def test_greedy_takes_the_branch_of_the_argmax_and_refuses_equal_first_tokens():
    p = [torch.eye(V)[[1, 2, 3]], torch.eye(V)[[1, 4]]]
    assert verify_branches(Sampler(0.0), [[0, 2], [1]], p) == (1, 1, 4)
    assert verify_branches(Sampler(0.0), [[1, 2], [0]], [p[1][:1].repeat(3, 1), p[1]]) == (0, 1, 1)
    assert verify_branches(Sampler(0.0), [[2, 2], [3]], p) == (0, 0, 1)
    with pytest.raises(ValueError, match="different tokens"):
        verify_branches(Sampler(0.0), [[1], [1]], p)
