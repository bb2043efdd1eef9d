"""Drafters: n-gram lookup against a brute-force scan, the streaming cache against explicit masked
attention, and rollback against fresh drafters built on the same tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.drafters import (
    DrafterError,
    LookupFirstDrafter,
    ModelDrafter,
    NGramDrafter,
    SuffixDrafter,
    make_drafter,
    sync_context,
)
from triforce_chat.decoding.model import ModelArgs, Transformer
from triforce_chat.decoding.sampling import Sampler
from triforce_chat.decoding.streaming import StreamingCache

VOCAB = 101


# -- n-gram ------------------------------------------------------------------------------------------


def reference_ngram(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Scan backwards for the earlier occurrences of the longest matching suffix; of the latest
    CANDIDATES, the one whose match reaches furthest back (up to REACH), the latest on ties."""
    L = len(tokens)
    for n in range(min(n_max, L), n_min - 1, -1):
        suffix = tokens[L - n :]
        ends = [end for end in range(L - 2, n - 2, -1) if tokens[end - n + 1 : end + 1] == suffix]
        if not ends:
            continue

        def reach(end: int) -> int:
            m = 0
            while m < NGramDrafter.REACH and end - m >= 0 and tokens[end - m] == tokens[L - 1 - m]:
                m += 1
            return m

        ends = ends[: NGramDrafter.CANDIDATES]
        best = max(ends, key=lambda e: (reach(e), e))
        return tokens[best + 1 : min(best + 1 + k, L)]
    return []


def index_state(d: NGramDrafter):
    heads = {n: dict(h) for n, h in d._head.items()}
    return d._tokens.tolist(), heads, {n: p.tolist() for n, p in d._prev.items()}


@pytest.mark.parametrize("n_min,n_max,alphabet", [(1, 4, 3), (2, 4, 5), (1, 1, 4), (3, 6, 2)])
def test_ngram_matches_bruteforce_through_extend_and_truncate(n_min, n_max, alphabet):
    rng = random.Random(n_min * 100 + n_max * 10 + alphabet)
    d = NGramDrafter(n_max=n_max, n_min=n_min, vocab_size=alphabet)
    tokens: list[int] = []
    for _ in range(150):
        if tokens and rng.random() < 0.35:
            if rng.random() < 0.2:
                length = rng.randrange(0, len(tokens) + 1)
            else:
                length = max(0, len(tokens) - rng.randint(1, 9))
            d.truncate(length)
            del tokens[length:]
            fresh = NGramDrafter(n_max=n_max, n_min=n_min, vocab_size=alphabet)
            fresh.extend(tokens)
            assert index_state(d) == index_state(fresh)
            assert d.figures() == fresh.figures()
        else:
            new = [rng.randrange(alphabet) for _ in range(rng.randint(1, 12))]
            d.extend(new)
            tokens += new
        assert d.length == len(tokens)
        for k in (1, 3, 8):
            got, q = d.propose(k, Sampler())
            assert q is None
            assert got == reference_ngram(tokens, k, n_min, n_max), (tokens, k)


def test_ngram_prefers_longest_then_most_recent():
    d = NGramDrafter(n_max=3, n_min=1, vocab_size=10)
    # "1 2 3 7" early, "9 3 8" later: the suffix "2 3" matches the early one with n=2, which wins
    # over the later, more recent unigram match of "3"
    d.extend([1, 2, 3, 7, 9, 3, 8, 1, 2, 3])
    assert d.propose(4, Sampler())[0] == [7, 9, 3, 8]
    d.extend([5, 3])  # only "3" matches now: the most recent earlier "3" is the one at index 9
    assert d.propose(2, Sampler())[0] == [5, 3]
    assert d.match_length() == 1


def test_ngram_follows_the_occurrence_that_matches_furthest_back():
    """A repeated template: the latest "who joined in" belongs to another paragraph than the one
    being quoted; the occurrence whose match also covers the name before it is followed."""
    d = NGramDrafter(n_max=4, n_min=1, vocab_size=4096)
    template = [10, 11, 12, 13]  # "who joined the cooperative in"
    d.extend([50, 51, *template, 1998, 60] + [52, 53, *template, 2004, 61] + [7, 8])
    d.extend([50, 51, *template])  # quoting the first paragraph again
    assert d.propose(2, Sampler())[0] == [1998, 60]
    d.truncate(d.length - 6)
    d.extend([99, 98, *template])  # a paragraph never seen: the matches tie, the latest wins
    assert d.propose(2, Sampler())[0] == [2004, 61]


def test_ngram_rejects_ids_outside_vocab():
    d = NGramDrafter(vocab_size=16)
    with pytest.raises(ValueError):
        d.extend([16])


# -- tiny model -----------------------------------------------------------------------------------------


def tiny_llama_hf(vocab: int = VOCAB, max_pos: int = 4096, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_pos, initializer_range=0.15,
    )
    return cfg, LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    cfg, hf = tiny_llama_hf()
    model = Transformer(ModelArgs.from_hf_config(cfg))
    model.load_hf_state_dict(hf.state_dict())
    return model.eval()


def greedy_full(model: Transformer, tokens: list[int], k: int) -> list[int]:
    cache = KVCache.for_model(model, max_len=len(tokens) + k)
    logits = model(torch.tensor(tokens), cache, logits="last")[0]
    out = []
    for _ in range(k):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor(out[-1:]), cache, logits="last")[0]
    return out


class BandReference:
    """Every key kept; each query at p attends in float64 to keys j <= p with j < sink or j > p - window."""

    def __init__(self, model: Transformer, sink: int, window: int):
        self.sink, self.window, self.scale = sink, window, model.scale
        self.k: list[list[torch.Tensor]] = [[] for _ in model.layers]
        self.v: list[list[torch.Tensor]] = [[] for _ in model.layers]
        self.length = 0

    def positions(self, n):
        return torch.arange(self.length, self.length + n)

    def attend(self, layer, q, k, v):  # token-major in and out, like the stores
        t, hq, d = q.shape
        q = q.transpose(0, 1)
        self.k[layer].append(k.transpose(0, 1))
        self.v[layer].append(v.transpose(0, 1))
        K, V = torch.cat(self.k[layer], 1).double(), torch.cat(self.v[layer], 1).double()  # [Hkv, L, D]
        G = q.shape[0] // K.shape[0]
        K, V = K.repeat_interleave(G, 0), V.repeat_interleave(G, 0)
        s = q.double() @ K.transpose(1, 2) * self.scale  # [Hq, T, L]
        qpos = torch.arange(self.length, self.length + q.shape[1]).unsqueeze(1)
        kpos = torch.arange(K.shape[1])
        visible = (kpos <= qpos) & ((kpos < self.sink) | (kpos > qpos - self.window))
        out = (torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ V).to(q.dtype)  # [Hq, T, D]
        return out.transpose(0, 1).reshape(t, hq * d)

    def advance(self, n):
        self.length += n


def band_reference_greedy(model, tokens, k, sink, window):
    store = BandReference(model, sink, window)
    logits = model(torch.tensor(tokens), store, logits="last")[0]
    first = logits.clone()
    out = []
    for _ in range(k):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor(out[-1:]), store, logits="last")[0]
    return first, out


def random_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def sizes(d: ModelDrafter) -> dict[str, int]:
    return {"drafter_cache_bytes": d.cache.allocated_bytes, "drafter_weight_bytes": d.model.weight_bytes}


def drafter(model, **kw) -> ModelDrafter:
    kw.setdefault("sink", 4)
    kw.setdefault("window", 16)
    kw.setdefault("slack", 6)
    kw.setdefault("headroom", 8)
    return ModelDrafter(model, **kw)


def test_streaming_equals_full_cache_when_nothing_is_evicted(tiny):
    tokens = random_tokens(70, seed=1)
    d = ModelDrafter(tiny, sink=4, window=128, chunk=32)
    d.extend(tokens[:50])
    d.extend(tokens[50:])
    got, q = d.propose(12, Sampler())
    assert q is None
    assert got == greedy_full(tiny, tokens, 12)
    assert d.length == 70 and d.cache.length == 70
    assert d.figures() == {"drafter_sink_tokens": 4, "drafter_recent_tokens": 66, **sizes(d)}


@pytest.mark.parametrize("chunk", [256, 7, 1])
def test_small_window_equals_explicit_band_attention(tiny, chunk):
    tokens = random_tokens(100, seed=2)
    d = drafter(tiny, chunk=chunk)
    d.extend(tokens)
    if chunk < 100:  # (one 100-token forward grows the buffer instead)
        assert d.cache.compactions > 0 and d.cache.base > d.cache.sink  # keys were evicted
    ref_logits, ref_tokens = band_reference_greedy(tiny, tokens, 6, sink=4, window=16)
    torch.testing.assert_close(d.next_logits(), ref_logits, atol=1e-4, rtol=1e-4)
    assert d.propose(6, Sampler())[0] == ref_tokens
    assert d.figures() == {"drafter_sink_tokens": 4, "drafter_recent_tokens": 16, **sizes(d)}
    # the window really matters: full attention gives different logits
    full = tiny(torch.tensor(tokens), KVCache.for_model(tiny, max_len=100), logits="last")[0]
    assert not torch.allclose(full, ref_logits, atol=1e-3)


def same_state(a: ModelDrafter, b: ModelDrafter) -> None:
    assert a.length == b.length
    torch.testing.assert_close(a.next_logits(), b.next_logits(), atol=1e-4, rtol=1e-4)
    assert a.propose(5, Sampler())[0] == b.propose(5, Sampler())[0]
    assert a.length == b.length  # propose left the length alone
    torch.testing.assert_close(a.next_logits(), b.next_logits(), atol=1e-4, rtol=1e-4)


def test_rollback_is_exact_across_evictions_and_deep_truncates(tiny):
    rng = random.Random(3)
    d = drafter(tiny, chunk=5)
    tokens: list[int] = []
    kinds = set()
    for step in range(40):
        if tokens and step % 3 == 2:
            deep = step % 9 == 8
            length = rng.randrange(0, len(tokens)) if deep else max(0, len(tokens) - rng.randint(1, 6))
            evicted_before = d.cache.base
            d.truncate(length)
            kinds.add("deep" if d.cache.length < length - 1 else "shallow")
            kinds.add("evicted" if evicted_before > d.cache.sink else "kept")
            del tokens[length:]
        else:
            new = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 25))]
            d.extend(new)
            tokens += new
        if tokens and step % 2 == 0:
            fresh = drafter(tiny, chunk=64)
            fresh.extend(tokens)
            same_state(d, fresh)
    assert {"deep", "shallow", "evicted"} <= kinds


def test_deep_truncate_reprefills_only_the_window_reach(tiny):
    tokens = random_tokens(160, seed=4)
    d = drafter(tiny, chunk=16)
    d.extend(tokens)
    d.truncate(120)  # 40 back: past slack 6, the keys it needs were compacted away
    reach = tiny.args.n_layers * (16 - 1)
    assert d.cache.length == 120 - 1 - reach
    fresh = drafter(tiny)
    fresh.extend(tokens[:120])
    same_state(d, fresh)
    # right after a re-prefill, the oldest re-prefilled keys are not exact: a short rollback must
    # not expose them
    d.truncate(117)
    fresh = drafter(tiny)
    fresh.extend(tokens[:117])
    same_state(d, fresh)
    d.truncate(2)
    fresh = drafter(tiny)
    fresh.extend(tokens[:2])
    same_state(d, fresh)


def test_window_rebuild_is_bounded_and_consistent(tiny):
    tokens = random_tokens(200, seed=6)
    d = drafter(tiny, chunk=16, rebuild="window")
    d.extend(tokens)
    d.truncate(150)
    assert d.cache.length == 150 - 1 - 16 - 6  # only one window (+ slack) is re-run
    assert len(d.propose(5, Sampler())[0]) == 5
    d.truncate(147)  # a short rollback right after the cheap rebuild stays O(1)
    assert d.cache.length == 146
    d.extend(tokens[147:170])
    assert d.length == d.cache.length == 170
    # the last window was re-run over a shorter past: logits are close to a fresh drafter's, not equal
    fresh = drafter(tiny)
    fresh.extend(tokens[:170])
    visible = ("drafter_sink_tokens", "drafter_recent_tokens")  # the buffers' sizes may differ: one grew
    assert {k: d.figures()[k] for k in visible} == {k: fresh.figures()[k] for k in visible}


def test_sampled_proposals_carry_q_rows(tiny):
    d = drafter(tiny, target_vocab=VOCAB + 27)  # a target with a padded embedding table
    d.extend(random_tokens(40, seed=5))
    before = d.next_logits().clone()
    toks, q = d.propose(4, Sampler(temperature=0.8, top_p=0.9, seed=0))
    assert len(toks) == 4 and q is not None and q.shape == (4, VOCAB + 27)
    torch.testing.assert_close(q.sum(-1), torch.ones(4))
    assert float(q[:, VOCAB:].sum()) == 0.0
    assert all(float(q[i, t]) > 0 for i, t in enumerate(toks))
    assert d.length == 40 and d.cache.length == 40
    torch.testing.assert_close(d.next_logits(), before)
    # q[0] is exactly what the sampler makes of the draft's logits
    torch.testing.assert_close(q[0], Sampler(temperature=0.8, top_p=0.9).probs(
        torch.cat([before, before.new_full((27,), float("-inf"))])))


def test_positions_must_cover_the_target_context(tiny):
    with pytest.raises(DrafterError, match="covers 4096 positions"):
        ModelDrafter(tiny, max_context=8192)
    d = ModelDrafter(tiny, window=8)
    with pytest.raises(DrafterError):
        d.extend([1] * 4097)


def test_streaming_cache_refuses_inexact_truncate():
    c = StreamingCache(1, 1, 4, 0.5, sink=2, window=4, slack=1, headroom=2)
    for _ in range(20):
        c.positions(1)
        c.attend(0, torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 4))  # [T, H, D]
        c.advance(1)
    assert c.base > c.sink
    assert c.can_truncate(19) and not c.can_truncate(10)
    with pytest.raises(ValueError, match="are gone"):
        c.truncate(10)


# -- loading by spec --------------------------------------------------------------------------------------


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


def test_make_drafter_checks_the_tokenizer(tiny, tmp_path: Path):
    from triforce_chat.decoding.models.loading import LoadedModel

    words = [f"w{i}" for i in range(VOCAB)]
    _, hf = tiny_llama_hf(seed=7)
    draft_dir = tmp_path / "draft"
    hf.save_pretrained(draft_dir)
    word_tokenizer(words).save_pretrained(draft_dir)

    target = LoadedModel(tiny, word_tokenizer(words), "target", tmp_path, 0.0)
    d = make_drafter(str(draft_dir), target, window=32)
    assert isinstance(d, LookupFirstDrafter) and d.name == f"suffix+{draft_dir}"
    assert isinstance(d.lookup, SuffixDrafter)
    assert isinstance(d.model, ModelDrafter) and d.model.name == str(draft_dir)
    d.extend([3, 4, 5, 6])
    assert len(d.propose(3, Sampler())[0]) == 3

    renamed = words[:50] + [f"x{i}" for i in range(50, VOCAB)]
    other = LoadedModel(tiny, word_tokenizer(renamed), "t", tmp_path, 0.0)
    expected = r"does not share the target's tokenizer: token 'w50' is id 50 in the draft, absent"
    with pytest.raises(DrafterError, match=expected):
        make_drafter(str(draft_dir), other)
    smaller = LoadedModel(tiny, word_tokenizer(words[:60]), "t", tmp_path, 0.0)
    with pytest.raises(DrafterError, match="101 vs 60 tokens"):
        make_drafter(str(draft_dir), smaller)

    assert isinstance(make_drafter("ngram", target), NGramDrafter)
    assert isinstance(make_drafter("suffix", target), SuffixDrafter)


@pytest.mark.parametrize("lookup,index_figure", [(SuffixDrafter, "suffix_states"),
                                                 (NGramDrafter, "ngram_index_entries")])
def test_lookup_first_drafter_takes_the_lookup_on_a_repeat_and_the_model_elsewhere(tiny, lookup, index_figure):
    """On a repeated span the lookup's continuation, else the model's drafts; the model records the
    tokens without running them and, when asked, drafts exactly as a model fed them eagerly."""
    phrase = random_tokens(10, seed=11)
    tokens = random_tokens(30, seed=12) + phrase + random_tokens(20, seed=13) + phrase[:3]
    both = LookupFirstDrafter(lookup(), drafter(tiny, chunk=8))
    eager = drafter(tiny, chunk=8)
    both.extend(tokens[:40])
    both.extend(tokens[40:])
    eager.extend(tokens)
    assert both.model.cache.length == 0  # recorded, not run
    got, q = both.propose(5, Sampler())
    assert got == phrase[3:8] and q is None and both.last_match >= 3
    assert both.rounds == {"lookup": 1, "model": 0}
    both.extend([phrase[3], (phrase[4] + 1) % VOCAB])  # the repeat breaks off: no 2-gram match
    eager.extend([phrase[3], (phrase[4] + 1) % VOCAB])
    assert both.lookup.match_length() < 2
    got, _ = both.propose(4, Sampler())
    assert got == eager.propose(4, Sampler())[0]
    assert both.rounds == {"lookup": 1, "model": 1} and both.last_match == 0  # the model drafted
    same_state(both.model, eager)
    both.truncate(50)
    eager.truncate(50)
    same_state(both.model, eager)
    assert both.length == 50 and both.lookup.length == 50
    figures = both.figures()
    assert figures["drafter_lookup_rounds"] == 1 and figures["drafter_model_rounds"] == 1
    assert index_figure in figures and "drafter_cache_bytes" in figures


def test_sync_context_keeps_the_common_prefix_and_prefills_in_pieces_with_progress(tiny):
    both = LookupFirstDrafter(NGramDrafter(n_max=3, n_min=1), drafter(tiny, chunk=8))
    tokens = random_tokens(45, seed=21)
    seen: list[tuple[int, int]] = []
    sync_context(both, tokens, step=20, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(8, 45), (16, 45), (24, 45), (32, 45), (40, 45), (45, 45)]  # the model's pieces
    assert list(both.tokens) == tokens and both.length == 45
    assert both.model.cache.length == 45  # run now: nothing left for the first round
    other = tokens[:30] + random_tokens(5, seed=22)
    sync_context(both, other)
    assert list(both.tokens) == other and both.length == 35
    ref = drafter(tiny, chunk=8)
    ref.extend(other)
    same_state(both.model, ref)
    # a cancel while extending leaves the drafter holding a prefix of the context
    stop = iter([False, True])
    assert not sync_context(both, tokens, step=10, should_cancel=lambda: next(stop))
    assert list(both.tokens) == tokens[:40] and both.length == 40
    # a cancel while the model catches up leaves it all recorded, the model behind until it drafts
    stop = iter([False, True])
    assert not sync_context(both, tokens, step=10, should_cancel=lambda: next(stop))
    assert list(both.tokens) == tokens and both.model.cache.length < 45
    ref = drafter(tiny, chunk=8)
    ref.extend(tokens)
    same_state(both.model, ref)


def test_a_window_rebuild_drafter_catches_up_on_a_long_lag_from_its_last_window(tiny):
    """rebuild="window": a lag longer than window + slack runs only the sinks and the last window +
    slack tokens (a book costs the draft model a window's prefill, not the book's), progress
    counting those; the lookup still has every token, and a short lag runs whole."""
    window, slack, sink = 16, 6, 4
    both = LookupFirstDrafter(NGramDrafter(), drafter(tiny, chunk=8, rebuild="window"))
    tokens = random_tokens(100, seed=31)
    seen: list[tuple[int, int]] = []
    assert sync_context(both, tokens, step=20, progress=lambda d, t: seen.append((d, t)))
    keep = window + slack
    assert seen == [(8, keep), (16, keep), (keep, keep)]
    cache = both.model.cache
    assert cache.length == 100 and cache.base == cache.exact_from == 100 - keep
    assert list(both.tokens) == tokens and both.lookup.length == 100
    assert both.model.figures()["drafter_sink_tokens"] == sink
    # the window's first layer is what a drafter that ran every token holds there (a key of layer
    # 0 depends on its token and position alone); deeper layers saw a shorter past
    full = drafter(tiny, chunk=8)
    full.extend(tokens)
    slots = lambda c, pos: [c._slot(p) for p in pos]  # noqa: E731
    pos = range(100 - window, 100)
    torch.testing.assert_close(cache.k[0, :, slots(cache, pos)], full.cache.k[0, :, slots(full.cache, pos)])
    torch.testing.assert_close(cache.k[0, :, :sink], full.cache.k[0, :, :sink])
    assert not torch.allclose(cache.k[-1, :, slots(cache, pos)], full.cache.k[-1, :, slots(full.cache, pos)])
    # a lag within window + slack runs whole, as with rebuild="exact"
    more = random_tokens(keep, seed=32)
    seen.clear()
    sync_context(both, tokens + more, step=20, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (keep, keep) and cache.length == 100 + keep and cache.exact_from == 100 - keep


