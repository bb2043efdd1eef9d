"""The batch-invariant attention kernel: correct, and bitwise independent of the query count."""

from __future__ import annotations

import pytest
import torch

from triforce_chat.kernels.attention import reference_attention
from triforce_chat.kernels.exact import BLOCK, Workspace, invariant_attend


def buffers(hkv: int, length: int, d: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = -(-length // BLOCK) * BLOCK + BLOCK
    k = torch.randn(hkv, size, d, generator=g).to(dtype)
    v = torch.randn(hkv, size, d, generator=g).to(dtype)
    k[:, length:] = 1e4  # whatever lies past the length must not leak in (finite, as in the cache)
    v[:, length:] = -1e4
    return k, v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hkv,g,d", [(3, 3, 64), (1, 1, 128), (2, 8, 64), (4, 2, 128)])
@pytest.mark.parametrize("t,length", [(1, 1), (1, 300), (4, 256), (9, 257), (9, 777)])
def test_matches_float64_reference(dtype, tol, hkv, g, d, t, length):
    k, v = buffers(hkv, length, d, dtype, seed=length + t)
    q = torch.randn(hkv * g, t, d).to(dtype)
    got = invariant_attend(q, k, v, length, d**-0.5)
    want = reference_attention(q, k[:, :length], v[:, :length], d**-0.5)
    assert got.shape == (hkv * g, t, d) and got.dtype == dtype
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", [1, 3])
def test_window_rows_equal_single_queries_bitwise(dtype, g, threads):
    """Also with several threads: a split of the work that changed a row's order of summation
    would break greedy exactness only at 2+ threads (as `ask` runs)."""
    hkv, d = 2, 64
    for length in (9, 255, 256, 260, 513, 1030, 4100):
        k, v = buffers(hkv, length, d, dtype, seed=length)
        q = torch.randn(hkv * g, 9, d).to(dtype)
        t = min(9, length)
        window = invariant_attend(q[:, :t], k, v, length, 0.125)
        for i in range(t):
            single = invariant_attend(q[:, i : i + 1], k, v, length - t + i + 1, 0.125)
            assert torch.equal(window[:, i : i + 1], single), (length, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,g,d", [(1, 1, 128), (3, 3, 64), (1, 8, 64), (2, 5, 128)])
def test_masked_tail_windows_bitwise(dtype, hkv, g, d):
    """Windows spanning two blocks (T > BLOCK - length % BLOCK), one block, and buffers longer than
    the used blocks (the cache's views are strided): every row equals its single-step result."""
    for t, length in [(32, 256 + 5), (32, 2 * 256 + 31), (11, 256 + 3), (32, 3 * 256), (9, 700)]:
        k, v = buffers(hkv, length + BLOCK, d, dtype, seed=length + t)
        k[:, length:] = 1e4
        v[:, length:] = -1e4
        q = torch.randn(hkv * g, t, d).to(dtype)
        window = invariant_attend(q, k, v, length, d**-0.5)
        for i in range(t):
            single = invariant_attend(q[:, i : i + 1], k, v, length - t + i + 1, d**-0.5)
            assert torch.equal(window[:, i : i + 1], single), (length, t, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reused_workspace_gives_fresh_results_and_returns_no_views_of_it(dtype):
    """The cache reuses one Workspace for every call: after larger and smaller calls, and with its
    buffers poisoned in between, a call must equal one with a fresh workspace (every scratch element
    it reads was written by that call), and an earlier result must not change (no aliasing)."""
    ws = Workspace()
    hkv, g, d = 3, 3, 64
    calls = [(9, 1030), (1, 1030), (4, 300), (9, 2000), (1, 5), (32, 777)]
    returned, copies = [], []
    for t, length in calls:
        k, v = buffers(hkv, length, d, dtype, seed=length + t)
        q = torch.randn(hkv * g, t, d).to(dtype)
        got = invariant_attend(q, k, v, length, d**-0.5, ws)
        assert torch.equal(got, invariant_attend(q, k, v, length, d**-0.5)), (t, length)
        returned.append(got)
        copies.append(got.clone())
        for buf in ws._buffers.values():
            buf.fill_(float("nan"))
        assert all(torch.equal(a, b) for a, b in zip(returned, copies, strict=True)), "a result aliases the workspace"
    assert ws.nbytes > 0
