"""kernels/gpu/: the same checks as tests/test_kernels.py, run by Triton's interpreter on a CPU
machine (on a real GPU when one is present). Skipped when triton is not installed.

TRITON_INTERPRET must be set before `@triton.jit` decorates the kernels, i.e. before the kernel
modules are imported, and is read again at every launch: it is set for that import and for each
test of this module only (restored afterwards), so that the rest of the session does not see it.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported without TRITON_INTERPRET=1 before this module", allow_module_level=True)
_saved = os.environ.get("TRITON_INTERPRET")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton itself is imported: tl.* helpers are jit too
try:
    from triforce_chat.kernels.gpu import attention as tri
    from triforce_chat.kernels.gpu import topk as tri_topk
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from triforce_chat.kernels.attention import reference_attention  # noqa: E402
from triforce_chat.kernels.retrieval import gather_chunks, select_chunks_torch  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET at launch: set it for these tests only."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    return ((out.double().cpu() - ref.cpu()).norm() / ref.cpu().norm()).item()


def make(hkv, g, t, d, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn(hkv, n + 3, d, generator=gen).to(dtype)  # views with a row stride > n*d
    vc = torch.randn(hkv, n + 3, d, generator=gen).to(dtype)
    q = torch.randn(hkv * g, t, d, generator=gen).to(dtype)
    return q.to(DEVICE), kc[:, :n].to(DEVICE), vc[:, :n].to(DEVICE)


CASES = [  # hkv, g, t, d, n, dtype
    (2, 3, 1, 64, 37, torch.float32),
    (1, 8, 9, 64, 70, torch.float32),
    (3, 1, 4, 128, 45, torch.float32),
    (2, 2, 6, 64, 81, torch.bfloat16),
    (1, 4, 1, 128, 50, torch.bfloat16),
]


@pytest.mark.parametrize("hkv,g,t,d,n,dtype", CASES)
def test_dense_segments_match_reference(hkv, g, t, d, n, dtype):
    q, k, v = make(hkv, g, t, d, n, dtype, n)
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), d**-0.5)
    rng = random.Random(n)
    a = rng.randint(0, n - t)
    # one segment split 3 ways (one split may be empty), and three segments incl. an empty one
    out1 = tri.attend_segments(q, [(k, v)], d**-0.5, n_splits=3)
    out2 = tri.attend_segments(q, [(k[:, :a], v[:, :a]), (k[:, a:a], v[:, a:a]), (k[:, a:], v[:, a:])], d**-0.5,
                               n_splits=2)
    for out in (out1, out2):
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_gathered_matches_reference(dtype):
    hkv, g, t, d, c = 3, 3, 2, 64, 8
    q, k, v = make(hkv, g, t, d, 165, dtype, 1)  # 165: not a multiple of the chunk size
    gen = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(150 // c, generator=gen)[:5].sort().values for _ in range(hkv)]).to(DEVICE)
    tail_k, tail_v = k[:, 150:], v[:, 150:]
    out = tri.sparse_attend(q, k[:, :150], v[:, :150], idx, c, [(tail_k, tail_v)], d**-0.5, n_splits=2)
    gk, gv = gather_chunks(k[:, :150].cpu(), v[:, :150].cpu(), idx.cpu(), c)
    ref = reference_attention(q.cpu(), torch.cat([gk, tail_k.cpu()], 1), torch.cat([gv, tail_v.cpu()], 1), d**-0.5)
    assert rel_err(out, ref) < TOL[dtype]


def test_partials_fully_written():
    """The partial buffers come from torch.empty: poison them (NaN fill) and check every element,
    padding rows included, is written."""
    import torch.utils.deterministic as det

    q, k, v = make(2, 3, 3, 64, 40, torch.float32, 4)
    old = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        o, lse = tri.partial_attention(q, k, v, 0.125, causal=True, n_splits=4)
    finally:
        det.fill_uninitialized_memory = old[1]
        torch.use_deterministic_algorithms(old[0])
    assert not o.isnan().any() and not lse.isnan().any()
    assert o.shape[2] >= 9  # BLOCK_M rows, 9 of them real


@pytest.mark.parametrize("hkv,g,c,k,always", [(3, 3, 50, 7, (0,)), (2, 4, 9, 9, (0,)), (1, 2, 300, 33, (0, 299)),
                                              (2, 1, 20, 30, ()), (2, 2, 10, 0, (0,))])
def test_select_chunks_matches_brute_force(hkv, g, c, k, always):
    gen = torch.Generator().manual_seed(c + k)
    query = torch.randn(hkv * g, 16, generator=gen)
    means = torch.randn(hkv, c, 16, generator=gen)
    ref = _brute(query, means, k, always)
    got = tri_topk.select_chunks(query.to(DEVICE), means.to(DEVICE), k, always)
    assert got.dtype == torch.long and torch.equal(got.cpu(), ref)
    assert torch.equal(select_chunks_torch(query, means, k, always), ref)
    scores = tri_topk.chunk_scores(query.to(DEVICE), means.to(DEVICE), always).cpu()
    finite = torch.isfinite(scores)
    expect = torch.stack([(query[h * g : (h + 1) * g] @ means[h].T).sum(0) for h in range(hkv)])
    assert torch.allclose(scores[finite], expect[finite], atol=1e-4)


def _brute(query, means, k, always):
    hkv, c, _ = means.shape
    g = query.shape[0] // hkv
    scores = torch.stack([(query[h * g : (h + 1) * g].double() @ means[h].double().T).sum(0) for h in range(hkv)])
    for j in always:
        if j < c:
            scores[:, j] = float("inf")
    k = min(k, c)
    return torch.stack([torch.tensor(sorted(scores[h].argsort(descending=True)[:k].tolist()), dtype=torch.long)
                        for h in range(hkv)]).view(hkv, k)
