"""kernels/: every CPU path equals the float64 reference; retrieval helpers equal brute force."""

from __future__ import annotations

import random

import pytest
import torch

from triforce_chat.kernels import backends, native
from triforce_chat.kernels.attention import attend, attend_segments, cpu_attend, reference_attention
from triforce_chat.kernels.retrieval import ChunkMeans, chunk_scores, gather_chunks, select_chunks

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def poisoned():
    """Uninitialised memory (torch.empty) is filled with NaN: a buffer element the code forgets
    to write shows up in the result."""
    import torch.utils.deterministic as det

    old_flag, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_flag)


def make(hkv, g, t, d, n, dtype, seed, cache_len=None):
    """q [Hq, T, D] and k/v as strided views [Hkv, n, D] of a bigger cache, like KVCache."""
    gen = torch.Generator().manual_seed(seed)
    cache_len = cache_len or n + 5
    kc = torch.randn(2, hkv, cache_len, d, generator=gen).to(dtype)
    vc = torch.randn(2, hkv, cache_len, d, generator=gen).to(dtype)
    q = torch.randn(hkv * g, t, d, generator=gen).to(dtype)
    return q, kc[1, :, :n], vc[1, :, :n]


def random_cases(count, seed=0, t_max=9):
    rng = random.Random(seed)
    for i in range(count):
        yield (rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4, 8]), rng.randint(1, t_max), rng.choice([64, 128]),
               rng.choice([9, 37, 130, 1029, 2500]), rng.choice([torch.float32, torch.bfloat16]), i)


@pytest.mark.parametrize("hkv,g,t,d,n,dtype,seed", list(random_cases(24)))
def test_attend_matches_reference(hkv, g, t, d, n, dtype, seed):
    n = max(n, t)
    q, k, v = make(hkv, g, t, d, n, dtype, seed)
    scale = d**-0.5
    ref = reference_attention(q, k, v, scale)
    out = attend(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    # every CPU formulation: flash kernel + merge; GEMMs in both orientations, with and without
    # splitting the key axis
    assert rel_err(cpu_attend(q, [(k, v)], scale, method="flash"), ref) < TOL[dtype]
    for key_major in (False, True):
        for n_split in (1, 2, 3):
            if n >= n_split * t:
                o = cpu_attend(q, [(k, v)], scale, method="gemm", key_major=key_major, n_split=n_split)
                assert rel_err(o, ref) < TOL[dtype], (key_major, n_split)


@pytest.mark.parametrize("t", [1, 4, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_split_matches_reference(t, dtype):
    """The thread-aware default (blocks of the key axis when 2 threads) on a long context."""
    q, k, v = make(3, 3, t, 64, 4099, dtype, 7)
    ref = reference_attention(q, k, v, 0.125)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert rel_err(attend(q, k, v, 0.125), ref) < TOL[dtype]
    finally:
        torch.set_num_threads(old)


def test_causal_tail_is_masked():
    """Changing a key after a query's position must not change that query's output."""
    q, k, v = make(2, 2, 5, 64, 50, torch.float32, 3)
    out = attend(q, k, v, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[:, -1] += 5.0
    v2[:, -1] += 5.0
    out2 = attend(q, k2, v2, 0.125)
    assert torch.allclose(out[:, :-1], out2[:, :-1], atol=1e-6)
    assert not torch.allclose(out[:, -1], out2[:, -1], atol=1e-3)


@pytest.mark.parametrize("t,n,dtype", [(32, 300, torch.float32), (40, 77, torch.bfloat16), (600, 700, torch.float32)])
def test_prefill_matches_reference(t, n, dtype):
    q, k, v = make(3, 3, t, 64, n, dtype, 11)
    ref = reference_attention(q, k, v, 0.125)
    assert rel_err(attend(q, k, v, 0.125), ref) < TOL[dtype]


def cut(n, t, rng, n_segments):
    """Segment boundaries over [0, n) with the last segment holding >= t keys; empties allowed."""
    inner = sorted(rng.randint(0, n - t) for _ in range(n_segments - 1))
    bounds = [0, *inner, n]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@pytest.mark.parametrize("hkv,g,t,d,n,dtype,seed", list(random_cases(16, seed=1)))
def test_attend_segments_matches_reference(hkv, g, t, d, n, dtype, seed, poisoned):
    n = max(n, t)
    q, k, v = make(hkv, g, t, d, n, dtype, seed)
    ref = reference_attention(q, k, v, d**-0.5)
    rng = random.Random(seed)
    for n_segments in (1, 2, 3, 5):
        segs = [(k[:, a:b], v[:, a:b]) for a, b in cut(n, t, rng, n_segments)]
        out = attend_segments(q, segs, d**-0.5)
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], n_segments
        nonempty = [(a, b) for a, b in segs if a.shape[1]]
        for method in ("gemm", "flash"):
            assert rel_err(cpu_attend(q, nonempty, d**-0.5, method=method), ref) < TOL[dtype], method


def test_attend_segments_budget_empty_and_full(poisoned):
    """Retrieval view shapes: no chunk selected (empty first segment) and everything selected."""
    q, k, v = make(3, 3, 1, 64, 517, torch.float32, 5)
    ref = reference_attention(q, k, v, 0.125)
    empty = k[:, :0], v[:, :0]
    assert rel_err(attend_segments(q, [empty, (k[:, :400], v[:, :400]), (k[:, 400:], v[:, 400:])], 0.125), ref) < 1e-5
    assert rel_err(attend_segments(q, [(k, v), empty], 0.125), ref) < 1e-5  # empty scratch skipped
    assert rel_err(attend_segments(q, [(k[:, :-1], v[:, :-1]), (k[:, -1:], v[:, -1:])], 0.125), ref) < 1e-5
    with pytest.raises(ValueError):
        attend_segments(q, [empty], 0.125)


def test_attend_segments_last_segment_must_hold_queries():
    q, k, v = make(1, 1, 4, 64, 20, torch.float32, 1)
    with pytest.raises(ValueError):
        attend_segments(q, [(k[:, :18], v[:, :18]), (k[:, 18:], v[:, 18:])], 0.125)


# -- retrieval ----------------------------------------------------------------------------------------


def brute_force_select(query, means, k, always):
    hkv, c, d = means.shape
    g = query.shape[0] // hkv
    rows = []
    for h in range(hkv):
        scores = []
        for j in range(c):
            s = sum(float(query[h * g + i].double() @ means[h, j].double()) for i in range(g))
            scores.append(float("inf") if j in always else s)
        order = sorted(range(c), key=lambda j: -scores[j])[: min(k, c)]
        rows.append(sorted(order))
    return torch.tensor(rows, dtype=torch.long).view(hkv, min(k, c))


@pytest.mark.parametrize("hkv,g,c,k,always", [(3, 3, 50, 7, (0,)), (2, 4, 9, 9, (0,)), (1, 1, 30, 1, (0,)),
                                              (2, 8, 40, 6, (0, 39, 100)), (3, 2, 20, 30, ()), (2, 2, 10, 0, (0,))])
def test_select_chunks_matches_brute_force(hkv, g, c, k, always):
    gen = torch.Generator().manual_seed(c + k)
    query = torch.randn(hkv * g, 16, generator=gen)
    means = torch.randn(hkv, c, 16, generator=gen)
    got = select_chunks(query, means, k, always)
    assert got.dtype == torch.long
    assert torch.equal(got, brute_force_select(query, means, k, always))


def test_chunk_scores_sum_group_scores():
    query, means = torch.randn(6, 32), torch.randn(2, 11, 32)
    ref = torch.stack([(query[3 * h : 3 * h + 3] @ means[h].T).sum(0) for h in range(2)])
    assert torch.allclose(chunk_scores(query, means), ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_chunks(dtype, poisoned):
    k = torch.randn(3, 203, 16).to(dtype)
    v = torch.randn(3, 203, 16).to(dtype)
    idx = torch.tensor([[0, 3, 5], [0, 1, 24], [2, 7, 9]])
    gk, gv = gather_chunks(k, v, idx, 8)
    for h in range(3):
        ref_k = torch.cat([k[h, 8 * c : 8 * c + 8] for c in idx[h].tolist()])
        ref_v = torch.cat([v[h, 8 * c : 8 * c + 8] for c in idx[h].tolist()])
        assert torch.equal(gk[h], ref_k) and torch.equal(gv[h], ref_v)
    buf_k, buf_v = torch.empty(3, 24, 16, dtype=dtype), torch.empty(3, 24, 16, dtype=dtype)
    ok, ov = gather_chunks(k, v, idx, 8, out=(buf_k, buf_v))
    assert ok.data_ptr() == buf_k.data_ptr() and torch.equal(ok, gk) and torch.equal(ov, gv)


class FakeCache:
    def __init__(self, n_layers=3, hkv=2, max_len=200, d=8, dtype=torch.float32):
        self.k = torch.randn(n_layers, hkv, max_len, d).to(dtype)
        self.v = torch.randn(n_layers, hkv, max_len, d).to(dtype)
        self.length = 0
        self.listeners = []

    def append(self, n):
        start = self.length
        self.k[:, :, start : start + n] = torch.randn_like(self.k[:, :, start : start + n])
        self.length += n
        for listener in self.listeners:
            listener.on_append(self, start, self.length)

    def truncate(self, length):
        self.length = length
        for listener in self.listeners:
            listener.on_truncate(self, length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_means_incremental_equals_recomputed(dtype):
    cache = FakeCache(dtype=dtype)
    cache.append(13)  # means are taken over what is there at construction too
    c = 6
    cm = ChunkMeans(cache, c)
    rng = random.Random(0)
    for _ in range(25):
        if rng.random() < 0.3 and cache.length:
            cache.truncate(rng.randint(0, cache.length))  # rollback, then new keys are written
        else:
            cache.append(rng.randint(1, min(17, cache.k.shape[2] - cache.length)))
        n = cache.length // c
        assert cm.n_complete == n
        for layer in range(cache.k.shape[0]):
            ref = cache.k[layer, :, : n * c].float().view(2, n, c, -1).mean(2)
            assert torch.allclose(cm.means(layer), ref, atol=1e-6)


def test_chunk_means_only_computes_new_chunks(monkeypatch):
    cache = FakeCache()
    cm = ChunkMeans(cache, 4)
    cache.append(10)
    calls = []
    real_mean = torch.mean

    def spy(x, *a, **kw):
        calls.append(x.shape)
        return real_mean(x, *a, **kw)

    monkeypatch.setattr(torch, "mean", spy)
    cache.append(1)  # completes no chunk
    cache.append(1)  # completes chunk 2 only
    assert len(calls) == 1 and calls[0][2] == 1
    assert cm.n_complete == 3


def test_backends_without_optional_packages():
    assert isinstance(backends.triton_available(), bool)
    assert isinstance(backends.flash_attn_available(), bool)
    assert backends.describe("cpu").startswith("cpu")
    q, k, v = make(3, 3, 1, 64, 100, torch.float32, 2)
    idx = torch.tensor([[0, 2], [1, 3], [0, 4]])
    tail = [(k[:, 90:], v[:, 90:])]
    out = backends.sparse_attend(q, k[:, :80], v[:, :80], idx, 8, tail, 0.125)
    gk, gv = gather_chunks(k[:, :80], v[:, :80], idx, 8)
    ref = reference_attention(q, torch.cat([gk, k[:, 90:]], 1), torch.cat([gv, v[:, 90:]], 1), 0.125)
    assert rel_err(out, ref) < 1e-5


def test_bench_scripts_smoke(capsys):
    from triforce_chat.kernels import bench_cpu, bench_gpu

    bench_cpu.main(["--model", "smollm2-135m", "--lengths", "1100", "--reps", "1"])
    text = capsys.readouterr().out
    if native.available():
        assert "copy bandwidth" in text and "verify-8 / step-1" in text and "sparse / full-1K" in text
    else:
        assert "native kernels unavailable" in text
    if not torch.cuda.is_available():
        assert bench_gpu.main([]) == 0


def test_bench_cpu_skips_the_prefill_at_chunk_zero_and_refuses_bad_counts(capsys):
    """--prefill-chunk 0 skips the prefill timing (it once crashed after the whole run); counts
    that cannot be measured stop at the command line."""
    from triforce_chat.kernels import bench_cpu

    if native.available():
        bench_cpu.main(["--model", "smollm2-135m", "--lengths", "1100", "--reps", "1", "--rows", "1,2",
                        "--context", "64", "--prefill-chunk", "0", "--modes", "fp32"])
        text = capsys.readouterr().out
        assert "verify-T / step-1" in text and "prefill chunk" not in text and "step / floor" in text
    for bad in (["--threads", "0"], ["--prefill-chunk", "-1"], ["--reps", "0"], ["--ppl-chunk", "0"],
                ["--rows", "0,8"]):
        with pytest.raises(SystemExit) as exc:
            bench_cpu.main(bad)
        assert exc.value.code == 2
        assert "must be positive" in capsys.readouterr().err
    if native.available():  # a context the model cannot hold with its windows: refused before it is filled
        with pytest.raises(SystemExit) as exc:
            bench_cpu.main(["--model", "smollm2-135m", "--context", "8192", "--rows", "1,8"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--context 8192 plus the longest of --rows and --prefill-chunk is 8704 positions" in err
