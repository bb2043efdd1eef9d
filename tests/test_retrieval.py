"""The middle level's RetrievalView: it must attend over exactly the keys it claims to.

Greedy identity and the sampling test cannot see a wrong view (a bad draft only costs speed), so
this checks the view itself: the selection is the sink plus the top-scoring chunks within the
budget, the recent window in its buffer follows the full cache through appends, rollbacks and
discarded scratch drafts, and its attention equals a reference over [selected | recent | scratch].
"""

from __future__ import annotations

import torch

from conftest import save_random_model
from triforce_chat.decoding.cache import KVCache
from triforce_chat.decoding.models.loading import load_weights_only
from triforce_chat.decoding.retrieval import RetrievalView
from triforce_chat.kernels.attention import reference_attention
from triforce_chat.kernels.retrieval import chunk_scores

CHUNK, BUDGET = 8, 96


def _setup(tmp_path):
    model = load_weights_only(save_random_model(tmp_path, "llama", vocab_size=128, seed=3))
    cache = KVCache.for_model(model)
    view = RetrievalView(cache, budget=str(BUDGET), chunk_size=CHUNK)
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    model(ids[:300], cache, logits="none")
    return model, cache, view, ids


def _expected_chunks(cache: KVCache, view: RetrievalView, layer: int) -> list[set[int]]:
    """Brute force: per KV head, the sink chunk plus the best-scoring complete chunks before sel_end."""
    keys = cache.k[layer, :, : view.sel_end].float()
    means = keys.unflatten(1, (-1, CHUNK)).mean(2)  # [Hkv, C, D]
    scores = chunk_scores(cache.last_query[layer], means)
    picked = []
    for h in range(scores.shape[0]):
        order = [0] + [int(i) for i in scores[h].argsort(descending=True) if int(i) != 0]
        picked.append(set(order[: view.n_selected_chunks]))
    return picked


def _buffer_chunks(cache: KVCache, view: RetrievalView, layer: int) -> list[set[int]]:
    """Which full-cache chunks the buffer's selected part holds (matched by content)."""
    found = []
    for h in range(cache.k.shape[1]):
        chunks = cache.k[layer, h, : view.sel_end].unflatten(0, (-1, CHUNK))
        held = view.k[layer, h, : view.n_sel].unflatten(0, (-1, CHUNK))
        found.append({int((chunks == c).all(-1).all(-1).nonzero()[0]) for c in held})
    return found


def _assert_recent_matches(cache: KVCache, view: RetrievalView) -> None:
    view.positions(1)  # what a middle-level forward does first: bring the recent window in
    n_recent = cache.length - view.sel_end
    start = view.n_sel
    assert torch.equal(view.k[:, :, start : start + n_recent], cache.k[:, :, view.sel_end : cache.length])
    assert torch.equal(view.v[:, :, start : start + n_recent], cache.v[:, :, view.sel_end : cache.length])


def test_selection_is_sink_plus_top_chunks_within_budget(tmp_path):
    _, cache, view, _ = _setup(tmp_path)
    view.rebuild()
    assert 0 < view.sel_end < cache.length and view.n_selected_chunks > 1
    assert view.attended_tokens <= BUDGET
    n_layers, hkv, _, d = cache.k.shape
    per_token = 2 * n_layers * hkv * d * cache.k.element_size()  # keys and values, every layer
    # a copy of about the budget (plus the scratch, rounded up to 256 tokens), not of the context
    assert view.n_sel * per_token <= view.buffer_bytes <= (2 * BUDGET + view.scratch_capacity + 256) * per_token
    assert cache.length - view.sel_end >= view.recent_window  # the most recent tokens are always kept
    for layer in range(cache.k.shape[0]):
        held = _buffer_chunks(cache, view, layer)
        assert all(0 in h for h in held)  # the attention sink
        assert held == _expected_chunks(cache, view, layer)


def test_recent_window_follows_appends_rollbacks_and_scratch(tmp_path):
    model, cache, view, ids = _setup(tmp_path)
    view.rebuild()
    _assert_recent_matches(cache, view)
    model(ids[300:310], cache, logits="none")  # the target accepted 10 tokens
    _assert_recent_matches(cache, view)
    model(ids[310:313], view, logits="none")  # the middle level drafts 3 tokens into its scratch
    assert view.scratch_len == 3
    view.truncate_scratch(0)
    cache.truncate(cache.length - 4)  # the target rejected some: roll back, then take other tokens
    model(ids[350:356], cache, logits="none")
    _assert_recent_matches(cache, view)
    cache.truncate(view.sel_end - 1)  # a rollback below the selection makes the view stale
    assert view.needs_rebuild


def test_view_attention_equals_reference_over_its_keys(tmp_path):
    model, cache, view, ids = _setup(tmp_path)
    view.rebuild()
    model(ids[300:305], cache, logits="none")
    model(ids[305:307], view, logits="none")  # two scratch tokens already drafted
    hq, d = model.args.n_heads, model.args.head_dim
    hkv = cache.k.shape[1]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, n, d, generator=gen) for n in (hq, hkv, hkv))  # token-major, as the model passes
    view.positions(3)
    layer = 1
    got = view.attend(layer, q, k, v).view(3, hq, d).transpose(0, 1)  # [Hq, T, D]
    q = q.transpose(0, 1)
    new = slice(view._scratch_base + 2, view._scratch_base + 5)
    k, v = view.k[layer, :, new], view.v[layer, :, new]  # as stored (float16 in the view's buffer)
    keys = torch.cat([view.k[layer, :, : view.n_sel], cache.k[layer, :, view.sel_end : cache.length]], 1)
    values = torch.cat([view.v[layer, :, : view.n_sel], cache.v[layer, :, view.sel_end : cache.length]], 1)
    scratch = view.n_sel + cache.length - view.sel_end
    keys = torch.cat([keys, view.k[layer, :, scratch : scratch + 2], k], 1)
    values = torch.cat([values, view.v[layer, :, scratch : scratch + 2], v], 1)
    want = reference_attention(q, keys.float(), values.float(), cache.scale)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-5, err
