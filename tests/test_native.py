"""The native CPU kernels against float64 references, and their exactness: a row's result must be
bitwise the same whatever the number of rows in the call and the number of threads.

These assert properties of our own code (fixed operation order per output), not of a vendor
library, so they hold on any CPU; the SIMD path built here is printed in the header line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf_models import random_blocks
from triforce_chat.kernels import native
from triforce_chat.kernels.attention import reference_attention
from triforce_chat.kernels.quant import BY_NAME, reference_dequantize

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status().reason}")

QUANTS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
MAX_WINDOW = 32


def ops():
    return native.ops()


def test_the_extension_reports_its_simd_path():
    assert native.status().isa in ("avx512", "avx2", "scalar")


def quantized(name: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(random_blocks(name, n, k, np.random.default_rng(seed)))


@pytest.mark.parametrize("name", QUANTS)
def test_quantized_matvec_matches_the_gguf_reference(name):
    k = 512
    w = quantized(name, 67, k, seed=QUANTS.index(name))
    tid = BY_NAME[name].id
    ref_w = reference_dequantize(w, tid, k)  # float64, decoded by the gguf package
    x = torch.randn(MAX_WINDOW, k, generator=torch.Generator().manual_seed(1))
    y = ops().linear(x, [w], [tid], None)
    ref = x.double() @ ref_w.t()
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the dequantized values are the reference's exactly (one rounding of q * scale + min)
    deq = ops().dequantize(w, tid, k, torch.arange(w.shape[0]))
    assert torch.allclose(deq.double(), ref_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", QUANTS + ["F32", "F16", "BF16"])
def test_linear_rows_are_bitwise_independent_of_the_row_count(name, threads):
    k, n = 768, 203  # n not a multiple of anything: uneven thread chunks
    tid = BY_NAME[name].id
    if tid in (0, 1, 30):
        dt = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[tid]
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)).to(dt)
    else:
        w = quantized(name, n, k, seed=3)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(4))
    x = torch.randn(MAX_WINDOW, k, generator=torch.Generator().manual_seed(5))
    singles = torch.cat([ops().linear(x[i : i + 1], [w], [tid], bias) for i in range(MAX_WINDOW)])
    for t in (2, 3, 4, 5, 8, 13, 32):
        assert torch.equal(ops().linear(x[:t], [w], [tid], bias), singles[:t]), t


def test_parts_of_mixed_types_form_one_output():
    k = 512
    parts = [(quantized("Q5_0", 40, k), BY_NAME["Q5_0"].id), (quantized("Q8_0", 24, k, 1), BY_NAME["Q8_0"].id),
             (quantized("Q6_K", 24, k, 2), BY_NAME["Q6_K"].id)]
    x = torch.randn(3, k)
    together = ops().linear(x, [p for p, _ in parts], [t for _, t in parts], None)
    apart = torch.cat([ops().linear(x, [p], [t], None) for p, t in parts], dim=1)
    assert torch.equal(together, apart)


def test_dense_linear_handles_widths_that_are_not_a_register_multiple():
    w = torch.randn(9, 37)
    x = torch.randn(5, 37)
    y = ops().linear(x, [w], [0], None)
    assert torch.allclose(y, x @ w.t(), atol=1e-5)
    assert torch.equal(torch.cat([ops().linear(x[i : i + 1], [w], [0], None) for i in range(5)]), y)


def kv(hkv, length, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(hkv, length + 7, d, generator=g).to(dtype)  # capacity past `length`: never read
    v = torch.randn(hkv, length + 7, d, generator=g).to(dtype)
    return k, v


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 2, 7, 8])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_attention_matches_reference(d, g, kv_dtype):
    hkv = 2
    for length in (1, 31, 33, 300):
        k, v = kv(hkv, length, d, kv_dtype, seed=length + g)
        t = min(length, 9)
        q = torch.randn(t, hkv * g, d, generator=torch.Generator().manual_seed(length))
        out = ops().attention(q, k, v, length, d**-0.5)
        ref = reference_attention(q.transpose(0, 1), k[:, :length].float(), v[:, :length].float(), d**-0.5)
        assert (out.double() - ref.transpose(0, 1)).abs().max() < 1e-5, length


@pytest.mark.parametrize("d,g", [(64, 3), (64, 7), (128, 6), (16, 2)])
def test_attention_windows_equal_single_queries_bitwise(d, g, threads):
    """Lengths put windows inside a block, across the 32-key block and 256-key segment edges."""
    hkv = 2
    for length in (5, 32, 33, 40, 255, 256, 257, 270, 511, 530):
        k, v = kv(hkv, length, d, torch.float16, seed=length)
        t = min(length, MAX_WINDOW)
        q = torch.randn(t, hkv * g, d, generator=torch.Generator().manual_seed(length + 1))
        window = ops().attention(q, k, v, length, 0.1)
        for i in range(t):
            single = ops().attention(q[i : i + 1], k, v, length - t + i + 1, 0.1)
            assert torch.equal(window[i : i + 1], single), (length, i)


def test_rmsnorm_and_swiglu_match_references_and_are_row_independent():
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(0))
    w = torch.randn(576)
    out = ops().rmsnorm(x, w, 1e-5)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert (out - ref).abs().max() < 1e-5
    assert torch.equal(torch.cat([ops().rmsnorm(x[i : i + 1], w, 1e-5) for i in range(9)]), out)
    gu = torch.randn(9, 2 * 100, generator=torch.Generator().manual_seed(1)) * 6
    act = ops().swiglu(gu)
    ref = torch.nn.functional.silu(gu[:, :100].double()) * gu[:, 100:].double()
    assert (act - ref).abs().max() < 1e-4
    assert torch.equal(torch.cat([ops().swiglu(gu[i : i + 1]) for i in range(9)]), act)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gives_the_torch_operations_bits_on_views_of_the_qkv_rows(interleaved):
    """The model's q and k are views into the qkv rows (head stride D, row stride the qkv width);
    large and non-finite values included, since each product and sum must round as torch's do."""
    from triforce_chat.decoding.model import rope_reference

    g = torch.Generator().manual_seed(3)
    for t, hq, hkv, d in ((1, 14, 2, 64), (9, 12, 2, 128), (5, 4, 1, 64)):
        qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g) * 30
        qkv[0, 5], qkv[-1, -d - 3], qkv[0, 7] = float("inf"), float("nan"), 3e38
        pos = torch.randint(0, 30000, (t,), generator=g).double()
        angles = pos[:, None] * 1e6 ** (-torch.arange(d // 2).double() / (d // 2))
        cos, sin = angles.cos().float(), angles.sin().float()
        for x in (qkv[:, : hq * d].view(t, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)):
            out = ops().rope(x, cos, sin, interleaved)
            want = rope_reference(x, cos, sin, interleaved)
            assert out.is_contiguous() and torch.equal(out.isnan(), want.isnan())
            assert torch.equal(out.nan_to_num(), want.nan_to_num())


def test_bad_arguments_raise_instead_of_reading_past_buffers():
    w = quantized("Q4_0", 8, 64)
    with pytest.raises(RuntimeError, match="bytes"):
        ops().linear(torch.randn(1, 96), [w], [BY_NAME["Q4_0"].id], None)  # rows hold 36 bytes, not 54
    with pytest.raises(RuntimeError, match="unsupported weight type"):
        ops().linear(torch.randn(1, 64), [w], [10], None)
    k = torch.zeros(2, 10, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="out of range"):
        ops().attention(torch.randn(1, 4, 64), k, k, 11, 0.1)


def test_a_cache_folder_that_cannot_be_written_builds_in_the_temp_folder(tmp_path, monkeypatch):
    """A read-only, full or missing cache folder cost the native kernels entirely (PyTorch's
    kernels instead, windows verified token by token); the build now goes to the temp folder."""
    import tempfile

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TRIFORCE_CHAT_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    folder = native._build_dir("0123abcd")
    assert folder.is_dir() and folder.name == "0123abcd" and (tmp_path / "tmp") in folder.parents
    monkeypatch.setenv("TRIFORCE_CHAT_CACHE", str(tmp_path / "cache"))  # the usual case: the cache itself
    assert native._build_dir("0123abcd") == tmp_path / "cache" / "ext" / "0123abcd"


def test_a_failed_build_is_told_by_the_compiler_s_diagnostic_with_the_fix_for_missing_python_headers():
    """torch's message starts with "Error building extension" and the whole compiler command; what the
    user needs is the compiler's line, and, for the usual cause on Debian, Ubuntu or Fedora (Python
    without its development package), what to install. (The text's layout is torch 2.13's.)"""
    cmd = "c++ -MMD -MF ops.o.d -DTORCH_EXTENSION_NAME=triforce_cpu -isystem /usr/include/python3.12 -fPIC -c ops.cpp"
    log = (f"Error building extension 'triforce_cpu': [1/9] {cmd}\nFAILED: ops.o\n{cmd}\n"
           "In file included from /venv/torch/include/torch/csrc/Device.h:4,\n"
           "/venv/torch/include/torch/csrc/python_headers.h:12:10: fatal error: Python.h: No such file or directory\n"
           "   12 | #include <Python.h>\ncompilation terminated.\nninja: build stopped: subcommand failed.\n")
    line = native._one_line(RuntimeError(log))
    assert line.startswith("/venv/torch/include/torch/csrc/python_headers.h:12:10: fatal error: Python.h")
    assert "python3-dev" in line and "\n" not in line
    other = native._one_line(RuntimeError(log.replace("Python.h: No such", "immintrin.h: No such")))
    assert "immintrin.h" in other and "python3-dev" not in other
    assert native._one_line(OSError("ninja: not found")) == "ninja: not found"


def test_a_build_without_x86_simd_includes_no_x86_header_of_its_own():
    """On ARM (Apple Silicon, Graviton, a Raspberry Pi) the same sources build the portable path.
    linear_int8_tiles.h included immintrin.h unconditionally, so there the whole extension failed to
    build and the app ran on PyTorch's operations. The host's compiler preprocesses every source as the
    portable build does (no -march: x86-64's baseline, without AVX2) and lists what each file
    includes (-H); none of our files may include immintrin.h then. (torch's own headers may: they
    guard it by architecture.) Checked by hand with aarch64-linux-gnu-g++ on 6 December 2026."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler: the portable path is the PyTorch fallback here")
    includes = [f"-isystem{p}" for p in include_paths()] + [f"-isystem{sysconfig.get_paths()['include']}"]
    ours = native.SOURCE_DIR.resolve()
    for source in sorted(ours.glob("*.cpp")):
        listing = subprocess.run([compiler, "-E", "-H", "-o", os.devnull, "-std=c++20", *native._openmp_cflags(),
                                  *includes, str(source)], capture_output=True, text=True, cwd=ours, check=True).stderr
        parents = {0: source.name}  # depth -> the file being read at that depth
        for line in listing.splitlines():
            dots, _, path = line.partition(" ")
            if not dots or set(dots) != {"."}:
                continue  # the compiler's other notes ("Multiple include guards may be useful for:")
            depth = len(dots)
            parents[depth] = path
            includer = (ours / parents[depth - 1]).resolve()  # relative names are ours (cwd)
            if Path(path).name == "immintrin.h":
                assert includer.parent != ours, f"{includer.name} includes immintrin.h building {source.name}"


def test_openmp_comes_from_torch_s_own_runtime_on_linux_and_on_a_mac(tmp_path):
    """Linux links the libgomp that torch's wheel bundles; a Mac (Apple's clang: no -fopenmp driver
    flag) compiles with the front end's flag and links the libomp.dylib of torch's macOS wheel. Only
    the choice is checked here: no Mac has built the kernels yet (a failed build falls back to
    PyTorch's operations, as before)."""
    assert native._openmp_cflags("linux") == ["-fopenmp"]
    assert native._openmp_cflags("darwin") == ["-Xclang", "-fopenmp"]
    assert native._openmp_link_flags(tmp_path, "darwin") == []  # no runtime to link: the build says so
    (tmp_path / "libomp.dylib").touch()
    assert native._openmp_link_flags(tmp_path, "darwin") == [f"-L{tmp_path}", "-lomp", f"-Wl,-rpath,{tmp_path}"]
    (tmp_path / "libgomp-a34b3233.so.1").touch()
    assert native._openmp_link_flags(tmp_path, "linux")[1] == "-l:libgomp-a34b3233.so.1"
