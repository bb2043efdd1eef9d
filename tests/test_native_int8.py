"""The int8-activation mode of the native kernels (kernels/cpu/linear_int8.h).

Its products are checked against float64 references computed on the *same rounded inputs* (the
kernel's own int8 activations and scales, the weights as the `gguf` package decodes them), so the
only difference left is fp32 rounding; its rounding of activations against the definition written
in the header, bitwise; and its exactness: a row's result bitwise the same at any row count and
thread count, in the kernel and through the whole forward. These tests run on whichever path the
build has (AVX512-VNNI, or AVX2: TRIFORCE_NATIVE_ISA=avx2 / avx512 on any host that runs it), and the
AVX2 path is compared bitwise with the VNNI path on the same inputs, in a subprocess with an AVX2
build. On a build with neither (the portable path: another CPU, or TRIFORCE_NATIVE_ISA=scalar) the
mode must be reported unavailable and the model must fall back to fp32 activations."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf_models import KQUANT_SCALE_FIELDS, random_blocks, random_ids, write_gguf
from gguf_models import load as load_gguf
from triforce_chat.kernels import native
from triforce_chat.kernels.quant import BY_NAME, reference_dequantize

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status().reason}")

QUANTS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
MAX_WINDOW = 32


def has_int8() -> bool:
    return native.available() and bool(native.status().int8)


NO_INT8 = "this build of the kernels has no int8-activation path (it needs AVX2 or AVX512-VNNI)"
needs_int8 = pytest.mark.skipif(not has_int8(), reason=NO_INT8)


def ops():
    return native.ops()


def quantized(name: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(random_blocks(name, n, k, np.random.default_rng(seed)))


def reference_rounding(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The header's step 1 in float32 numpy arithmetic: per block of 32, d = amax / 127 and
    q = round-half-even(x * (127 / amax)), clamped to +-127."""
    xb = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    d = (amax / np.float32(127)).astype(np.float32)
    q = np.clip(np.rint((xb * inv[..., None]).astype(np.float32)), -127, 127).astype(np.int8)
    return torch.from_numpy(q.reshape(x.shape)), torch.from_numpy(d)


# -- a build without the mode ----------------------------------------------------------------------------


@pytest.mark.skipif(has_int8(), reason="this build has the int8 path (the fallback is tested where it does not)")
def test_without_avx2_the_mode_is_unavailable_and_the_model_stays_fp32(tmp_path):
    assert native.status().int8 == ""
    w = quantized("Q8_0", 16, 64)
    with pytest.raises(RuntimeError, match="AVX2 or AVX512-VNNI"):
        ops().linear_int8(torch.randn(1, 64), [w], [BY_NAME["Q8_0"].id], None)
    from triforce_chat.decoding.models.loading import choose_activations

    model = load_gguf(write_gguf(tmp_path / "m.gguf", "llama", qtype="Q8_0"))
    assert "AVX2" in model.int8_available()
    assert choose_activations(model, "auto") == ("fp32", "")
    mode, notice = choose_activations(model, "int8")
    assert mode == "fp32" and "unavailable" in notice
    with pytest.raises(ValueError, match="AVX2"):
        model.set_activations("int8")


def test_the_int8_path_is_reported_with_the_build():
    st = native.status()
    assert st.int8 in ("", *INT8_PATHS)
    assert st.int8 == ops().int8_path()
    if st.isa == "scalar":
        assert st.int8 == ""  # the mode is built on AVX2 or AVX-512 registers only
    else:  # every x86 build has one: VNNI where the build has it, AVX2 otherwise
        assert st.int8 != ""


# -- the kernels --------------------------------------------------------------------------------------------


@needs_int8
def test_activation_rounding_follows_its_definition_bitwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 256, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 1.0, 1.0])[:, None]
    x[4, 32:64] = 0.0  # an all-zero block: d = 0, q = 0
    x[5, :32] = torch.arange(32) - 16.0  # exact multiples of the step: ties and the extremes
    x[5, 64:96] = torch.tensor([0.5, -0.5, 1.5, -2.5] * 8) * (127 / 2.5)  # products landing on .5
    q, d = ops().quantize_int8(x)
    want_q, want_d = reference_rounding(x)
    assert torch.equal(d, want_d)
    assert torch.equal(q, want_q)
    assert d[4, 1] == 0 and not q[4, 32:64].any()
    assert q.abs().max() == 127


@needs_int8
def test_a_nan_activation_makes_its_outputs_nan():
    w = quantized("Q8_0", 16, 64)
    x = torch.randn(2, 64)
    x[1, 40] = float("nan")
    y = ops().linear_int8(x, [w], [BY_NAME["Q8_0"].id], None)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


def rounded_inputs(x: torch.Tensor) -> torch.Tensor:
    """The activations as the kernel multiplies them: q * d, in float64."""
    q, d = ops().quantize_int8(x)
    return (q.double().view(x.shape[0], -1, 32) * d.double()[..., None]).view(x.shape)


@needs_int8
@pytest.mark.parametrize("name", QUANTS)
def test_int8_products_match_float64_on_the_same_rounded_inputs(name):
    """n = 203: twelve full tiles of 16 weight rows (the wide decoders of Q4_0, Q5_0, Q8_0, Q4_K and
    Q6_K) and a tail of 11 (the per-row decode); K = 768: three K-quant blocks."""
    k, n = 768, 203
    tid = BY_NAME[name].id
    w = quantized(name, n, k, seed=QUANTS.index(name))
    x = torch.randn(MAX_WINDOW, k, generator=torch.Generator().manual_seed(1))
    x[3] *= 50.0  # rows of very different scales
    x[4, ::7] = 0.0
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    y = ops().linear_int8(x, [w], [tid], bias)
    ref = rounded_inputs(x) @ reference_dequantize(w, tid, k).double().t() + bias.double()
    scale = ref.abs().amax(1, keepdim=True)
    assert ((y.double() - ref).abs() / scale).max() < 2e-6
    # and the rounding really is of the order expected of int8 activations, not larger
    full = x.double() @ reference_dequantize(w, tid, k).double().t() + bias.double()
    rel = (y.double() - full).norm() / full.norm()
    assert 1e-4 < rel < 2e-2


@needs_int8
def test_parts_of_mixed_types_form_one_output():
    k = 512
    parts = [(quantized("Q5_0", 40, k), BY_NAME["Q5_0"].id), (quantized("Q8_0", 24, k, 1), BY_NAME["Q8_0"].id),
             (quantized("Q6_K", 24, k, 2), BY_NAME["Q6_K"].id), (quantized("Q4_K", 7, k, 3), BY_NAME["Q4_K"].id)]
    x = torch.randn(5, k)
    bias = torch.randn(95)
    together = ops().linear_int8(x, [p for p, _ in parts], [t for _, t in parts], bias)
    apart, col = [], 0
    for p, t in parts:
        apart.append(ops().linear_int8(x, [p], [t], bias[col : col + p.shape[0]].contiguous()))
        col += p.shape[0]
    assert torch.equal(together, torch.cat(apart, dim=1))


@needs_int8
@pytest.mark.parametrize("name", QUANTS)
def test_int8_rows_are_bitwise_independent_of_the_row_count(name, threads):
    """Windows of every tile composition (8, 4 and single rows) and prefill lengths past the
    window, at 1, 2 and 4 threads, against the same rows computed one at a time."""
    k, n = 768, 203
    tid = BY_NAME[name].id
    w = quantized(name, n, k, seed=3)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(4))
    x = torch.randn(45, k, generator=torch.Generator().manual_seed(5))
    singles = torch.cat([ops().linear_int8(x[i : i + 1], [w], [tid], bias) for i in range(45)])
    for t in (2, 3, 4, 5, 8, 9, 13, 32, 45):
        assert torch.equal(ops().linear_int8(x[:t], [w], [tid], bias), singles[:t]), t
    assert torch.equal(ops().linear_int8(x[7:20], [w], [tid], bias), singles[7:20])  # a row at another position


@needs_int8
def test_bad_arguments_raise():
    w = quantized("Q4_0", 16, 64)
    with pytest.raises(RuntimeError, match="bytes"):
        ops().linear_int8(torch.randn(1, 96), [w], [BY_NAME["Q4_0"].id], None)
    with pytest.raises(RuntimeError, match="fp32 mode"):
        ops().linear_int8(torch.randn(1, 64), [torch.randn(4, 64)], [0], None)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops().quantize_int8(torch.randn(1, 48))


# -- packed tiles -----------------------------------------------------------------------------------------

PACKED = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K")  # what both paths pack (linear_int8_tiles.h)


def packed(w: torch.Tensor, name: str, k: int) -> tuple[torch.Tensor, int]:
    tid = BY_NAME[name].id
    return ops().pack_int8(w, tid, k), ops().int8_packed_type(tid, w.shape[0])


@needs_int8
def test_which_weights_are_packed_follows_the_path_and_the_row_count():
    for name in QUANTS:
        tid = BY_NAME[name].id
        want = 1000 + tid if name in PACKED else -1
        assert ops().int8_packed_type(tid, 896) == want, name
        assert ops().int8_packed_type(tid, 203) == -1, name  # a tail tile stays in the file's order


@needs_int8
@pytest.mark.parametrize("name", PACKED)
def test_packed_tiles_give_the_file_orders_bits(name, threads):
    """Packing moves bytes only: every row count (the 8-, 4-, 2- and 1-row passes), blocks as
    `quantize` writes them, random bytes and codes at both ends, against the file's order."""
    tid = BY_NAME[name].id
    weights = [quantized(name, 208, 768, seed=1), raw_blocks(name, 48, 512, seed=2),
               raw_blocks(name, 16, 4864, seed=3)]
    weights += [raw_blocks(name, 32, 512, seed=4, code_byte=byte) for byte in END_BYTES]
    for w in weights:
        n, k = w.shape[0], w.shape[1] // BY_NAME[name].block_bytes * BY_NAME[name].block_elems
        p, pt = packed(w, name, k)
        assert p.shape == w.shape and not torch.equal(p, w)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
        x = torch.cat([extreme_rows(k, seed=8), torch.randn(28, k, generator=torch.Generator().manual_seed(9))])
        x[8] *= 50.0
        for t in (1, 2, 3, 5, 8, 9, 15, 33):
            assert torch.equal(ops().linear_int8(x[:t], [p], [pt], bias), ops().linear_int8(x[:t], [w], [tid], bias))
    # parts: packed and file-order ones in one call, as a layer's q/k/v may be
    w5, w8, w6 = quantized("Q5_0", 32, 512, 5), quantized("Q8_0", 16, 512, 6), quantized("Q6_K", 16, 512, 7)
    (p5, t5), (p8, t8) = packed(w5, "Q5_0", 512), packed(w8, "Q8_0", 512)
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(10))
    ids = [BY_NAME[n].id for n in ("Q5_0", "Q8_0", "Q6_K")]
    assert torch.equal(ops().linear_int8(x, [p5, p8, w6], [t5, t8, ids[2]], None),
                       ops().linear_int8(x, [w5, w8, w6], ids, None))


@needs_int8
def test_packed_weights_are_refused_where_the_file_order_is_read():
    w = quantized("Q5_0", 32, 512)
    p, pt = packed(w, "Q5_0", 512)
    with pytest.raises(RuntimeError, match="int8 mode"):
        ops().linear(torch.randn(1, 512), [p], [pt], None)
    with pytest.raises(RuntimeError, match="int8 mode"):
        ops().dequantize(p, pt, 512, torch.arange(2))
    with pytest.raises(RuntimeError, match="not packed"):
        ops().pack_int8(quantized("Q5_0", 20, 512), BY_NAME["Q5_0"].id, 512)
    with pytest.raises(RuntimeError, match="not packed"):
        ops().pack_int8(quantized("Q5_K", 32, 512), BY_NAME["Q5_K"].id, 512)


# -- codes at the ends of their ranges ----------------------------------------------------------------------

# Where each type's codes lie in its block, bytes [start, end): all 0xFF is the largest code of every
# weight (Q8_0: -1), 0x00 the smallest (Q8_0: 0), 0x80 Q8_0's -128, 0x7F its 127 (the nibble types: a
# mix). The AVX2 path's int16 sums are tightest there (linear_int8_avx2.cpp).
CODE_BYTES = {"Q4_0": (2, 18), "Q4_1": (4, 20), "Q5_0": (2, 22), "Q5_1": (4, 24), "Q8_0": (2, 34),
              "Q4_K": (16, 144), "Q5_K": (16, 176), "Q6_K": (0, 192)}
SCALE_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), **KQUANT_SCALE_FIELDS}
END_BYTES = (0x00, 0xFF, 0x80, 0x7F)


def raw_blocks(name: str, n: int, k: int, seed: int, code_byte: int | None = None) -> torch.Tensor:
    """n rows of random bytes as blocks of `name`, with small positive f16 scale fields (every bit
    pattern of the codes is a valid block: Q8_0 gets -128 too, which `quantize` never writes); with
    `code_byte`, every byte of the codes set to it."""
    rng = np.random.default_rng(seed)
    t = BY_NAME[name]
    nb = k // t.block_elems
    raw = rng.integers(0, 256, size=(n, nb, t.block_bytes), dtype=np.uint8)
    for off in SCALE_FIELDS[name]:
        scales = rng.uniform(0.002, 0.01, size=(n, nb)).astype(np.float16)
        raw[:, :, off : off + 2] = scales.view(np.uint8).reshape(n, nb, 2)
    if code_byte is not None:
        start, end = CODE_BYTES[name]
        raw[:, :, start:end] = code_byte
    return torch.from_numpy(raw.reshape(n, nb * t.block_bytes))


def extreme_rows(k: int, seed: int) -> torch.Tensor:
    """Activations whose int8 values are +-127 everywhere (all +1, all -1, alternating, in pairs),
    then two random rows."""
    ones = torch.ones(k)
    signs = torch.tensor([1.0, -1.0]).repeat(k // 2)
    x = torch.stack([ones, -ones, signs, signs.view(-1, 2).flip(1).reshape(-1), signs.repeat_interleave(2)[:k]])
    return torch.cat([x, torch.randn(2, k, generator=torch.Generator().manual_seed(seed))])


@needs_int8
@pytest.mark.parametrize("name", QUANTS)
def test_int8_products_are_exact_at_the_ends_of_the_code_ranges(name):
    """The largest products the int16 steps of the AVX2 path can meet (every code at an end of its
    range, every activation +-127) against float64: a saturated sum would be off by a large part of
    the output, the fp32 rounding of the scales is 1e-7 of it."""
    k, n = 512, 19
    tid = BY_NAME[name].id
    x = extreme_rows(k, seed=6)
    q, _ = ops().quantize_int8(x)
    assert (q[:5].abs() == 127).all()
    for byte in END_BYTES:
        w = raw_blocks(name, n, k, seed=7, code_byte=byte)
        y = ops().linear_int8(x, [w], [tid], None)
        wd = reference_dequantize(w, tid, k).double()
        ref = rounded_inputs(x) @ wd.t()
        magnitude = rounded_inputs(x).abs() @ wd.abs().t()  # what the fp32 rounding is relative to
        assert ((y.double() - ref).abs() <= 1e-5 * magnitude + 1e-30).all(), hex(byte)


# -- every int8 path against the AVX2 path, bitwise -------------------------------------------------------------

# TRIFORCE_NATIVE_ISA of a build with each int8 path (the path's name too), and the CPU flags that
# run it. "avx-vnni-evex" is the AVX-VNNI path's source with the AVX512-VNNI encoding of `vpdpbusd`.
_AVX2_FLAGS = ("avx2", "fma", "f16c")
INT8_PATHS = {
    "avx2": _AVX2_FLAGS,
    "avx512-vnni": (*_AVX2_FLAGS, "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "avx-vnni": (*_AVX2_FLAGS, "avx_vnni"),
    "avx-vnni-evex": (*_AVX2_FLAGS, "avx512f", "avx512vl", "avx512_vnni"),
}

PATH_SCRIPT = """
import importlib, sys, torch
from triforce_chat.kernels import native
path, module, function, cases, out = sys.argv[1:6]
st = native.status()
assert st.int8 == path and st.int8_attention == path, (st.isa, st.int8, st.int8_attention)
torch.set_num_threads(2)  # the other side runs at 1 thread: the comparison crosses thread counts too
torch.save(getattr(importlib.import_module(module), function)(torch.load(cases)), out)
"""


def windows_and_singles(x: torch.Tensor, parts: list, types: list, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of all rows of x in one call, and each row computed alone."""
    window = ops().linear_int8(x, parts, types, bias)
    singles = torch.cat([ops().linear_int8(x[i : i + 1], parts, types, bias) for i in range(x.shape[0])])
    return window, singles


def int8_outputs(cases: dict) -> dict:
    """For each case (x, parts, types, bias): the rounded activations, the window and the single
    rows, then the parts this path packs, packed (their bytes), and the window and the single rows
    over the packed parts."""
    out = {}
    for name, (x, parts, types, bias) in cases.items():
        q, d = ops().quantize_int8(x)
        packed_types = [ops().int8_packed_type(t, p.shape[0]) for p, t in zip(parts, types, strict=True)]
        packed = [ops().pack_int8(p, t, x.shape[1]) if pt > 0 else p
                  for p, t, pt in zip(parts, types, packed_types, strict=True)]
        read_as = [pt if pt > 0 else t for t, pt in zip(types, packed_types, strict=True)]
        out[name] = (q, d, *windows_and_singles(x, parts, types, bias),
                     [p for p, pt in zip(packed, packed_types, strict=True) if pt > 0],
                     *windows_and_singles(x, packed, read_as, bias))
    return out


def path_cases() -> dict:
    """Every weight type: blocks as `quantize` writes them (twelve full tiles and a tail of 11) under
    45 rows (windows of 8, 4 and 1 rows) of very different scales; random bytes (every code, Q8_0's
    -128 too); codes at the ends of their ranges under +-127 activations; 208 rows that pack; rows of
    4864 inputs (a down projection's: several chunks of the AVX2 strip); and parts of mixed types."""
    cases, g = {}, torch.Generator().manual_seed(0)
    for i, name in enumerate(QUANTS):
        tid = BY_NAME[name].id
        x = torch.randn(45, 768, generator=torch.Generator().manual_seed(10 + i))
        x[3] *= 50.0
        x[4, ::7] = 0.0
        x[5, 64:96] = 0.0
        bias = torch.randn(203, generator=torch.Generator().manual_seed(20 + i))
        cases[f"{name} quantized"] = (x, [quantized(name, 203, 768, seed=30 + i)], [tid], bias)
        xr = torch.cat([extreme_rows(512, seed=40 + i), torch.randn(6, 512, generator=g) * 3])
        cases[f"{name} random bytes"] = (xr, [raw_blocks(name, 37, 512, seed=50 + i)], [tid], None)
        for byte in END_BYTES:
            cases[f"{name} codes {byte:#04x}"] = (xr[:8], [raw_blocks(name, 16, 512, 60 + i, byte)], [tid], None)
        bias208 = torch.randn(208, generator=torch.Generator().manual_seed(90 + i)) if i % 2 else None
        cases[f"{name} packable"] = (x[:9], [quantized(name, 208, 768, seed=80 + i)], [tid], bias208)
        # a down projection's K: several chunks of the AVX2 strip (32 blocks each) and a partial last one
        xl = torch.randn(9, 4864, generator=torch.Generator().manual_seed(100 + i))
        long_parts = [quantized(name, 32, 4864, seed=110 + i), raw_blocks(name, 11, 4864, seed=120 + i)]
        cases[f"{name} long rows"] = (xl, long_parts, [tid, tid], None)
    parts = [raw_blocks(n, 24 + 5 * j, 512, seed=70 + j) for j, n in enumerate(QUANTS)]
    bias = torch.randn(sum(len(p) for p in parts), generator=g)
    cases["mixed parts"] = (torch.randn(11, 512, generator=g), parts, [BY_NAME[n].id for n in QUANTS], bias)
    return cases


def run_path(path: str, cases_file: Path, out_file: Path, function: str = "test_native_int8.int8_outputs") -> dict:
    """`function` (module.name, in tests/) of the cases in a subprocess with a build of `path` (built
    once, ~30-60 s, then cached)."""
    env = {**os.environ, "TRIFORCE_NATIVE_ISA": path, "PYTHONPATH": str(Path(__file__).parent)}
    module, name = function.rsplit(".", 1)
    run = subprocess.run([sys.executable, "-c", PATH_SCRIPT, path, module, name, str(cases_file), str(out_file)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out_file)


def compiler_knows(flag: str) -> bool:
    """Whether the compiler the extension builds with accepts `flag` (a build it refuses falls back
    to the portable path)."""
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    try:
        return subprocess.run([*compiler, flag, "-x", "c++", "-E", "-"], input="", capture_output=True).returncode == 0
    except OSError:
        return False


def outputs_of_every_path(tmp_path_factory, cases: dict, here: str, outputs) -> dict:
    """{path: outputs(cases)} for every int8 path this CPU runs: this process's build computes with
    its own path (`here`), subprocesses with the others. Skips where the CPU runs fewer than two:
    there is nothing to compare."""
    flags = native._cpu_flags().split()
    runnable = [path for path, needs in INT8_PATHS.items()
                if all(f in flags for f in needs) and (path != "avx-vnni" or compiler_knows("-mavxvnni"))]
    if len(runnable) < 2:
        pytest.skip(f"this CPU runs {len(runnable)} of the int8 paths ({', '.join(runnable) or 'none'}): "
                    "there is no other path to compare with")
    folder = tmp_path_factory.mktemp("int8-paths")
    torch.save(cases, folder / "cases.pt")
    results = {here: outputs(cases)} if here in runnable else {}
    for path in runnable:
        if path not in results:
            results[path] = run_path(path, folder / "cases.pt", folder / f"{path}.pt",
                                     f"{outputs.__module__}.{outputs.__name__}")
    return results


@pytest.fixture(scope="module")
def int8_paths(tmp_path_factory) -> dict:
    """{path: outputs of `path_cases`} for every int8 path this CPU runs."""
    return outputs_of_every_path(tmp_path_factory, path_cases(), native.status().int8, int8_outputs)


@pytest.mark.parametrize("name", [*QUANTS, "mixed parts"])
def test_every_int8_path_gives_the_avx2_paths_bits(int8_paths, name):
    """Same inputs, same bits: the rounded activations, windows and rows computed alone, across the
    paths (and across 1 and 2 threads)."""
    for path, outputs in int8_paths.items():
        if path != "avx2":
            assert_same_int8_outputs(int8_paths["avx2"], outputs, name)


def assert_same_int8_outputs(avx2: dict, other: dict, name: str) -> None:
    names = [case for case in avx2 if case.split(" ")[0] == name or case == name]
    assert names and other.keys() == avx2.keys()
    packed_somewhere = False
    for case in names:
        (q, d, window, singles, packed, *over_packed), (q2, d2, window2, singles2, packed2, *over_packed2) = (
            avx2[case], other[case])
        assert torch.equal(q, q2) and torch.equal(d, d2), case
        assert torch.equal(window, window2), case
        assert torch.equal(singles, singles2), case
        assert torch.equal(window2, singles2), case  # and each path's windows are its single rows
        # both paths pack the same parts into the same bytes, and packing changes no output bit
        assert len(packed) == len(packed2), case
        assert all(torch.equal(a, b) for a, b in zip(packed, packed2, strict=True)), case
        for outputs in (over_packed, over_packed2):
            assert torch.equal(outputs[0], window) and torch.equal(outputs[1], singles), case
        packed_somewhere |= bool(packed)
    assert packed_somewhere == (name in PACKED)


def test_the_avx_vnni_build_compiles_and_reports_its_paths(tmp_path):
    """Intel's client cores get the AVX-VNNI paths from -march=native: a compile error there would
    drop them to the portable path. So the build is made on any x86-64 host whose compiler knows
    AVX-VNNI, and loaded (which runs no kernel; the kernels run where the CPU has `avx_vnni`, and
    their source runs here as `avx-vnni-evex`, above)."""
    if not all(f in native._cpu_flags().split() for f in _AVX2_FLAGS):
        pytest.skip("not an x86-64 host with AVX2")
    if not compiler_knows("-mavxvnni"):
        pytest.skip(f"the compiler ({os.environ.get('CXX', 'c++')}) does not know -mavxvnni")
    script = "from triforce_chat.kernels import native; st = native.status(); print(st.isa, st.int8, st.int8_attention)"
    env = {**os.environ, "TRIFORCE_NATIVE_ISA": "avx-vnni"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["avx2", "avx-vnni", "avx-vnni"]


# -- the whole forward ------------------------------------------------------------------------------------

# the quant types of the default model (Q5_0, Q8_0 output, Q4_K / Q6_K down projections) and of
# the 1.5B (head_dim 128), as in test_model.py
INT8_CASES = {
    "qwen2-q5_0-gqa7": ("qwen2", dict(dim=896, n_heads=14, n_kv_heads=2, qtype="Q5_0", ffn=1024,
                                      qtypes={"attn_v": "Q8_0", "ffn_down": "Q6_K", "output": "Q8_0"})),
    "qwen2-q4_k-d128-gqa6": ("qwen2", dict(dim=768, n_heads=6, n_kv_heads=1, head_dim=128, qtype="Q4_K",
                                           ffn=1024, qtypes={"attn_v": "Q6_K", "ffn_down": "Q4_K"})),
}


@pytest.fixture(scope="module", params=sorted(INT8_CASES))
def int8_model(request, tmp_path_factory):
    if not has_int8():
        pytest.skip(NO_INT8)
    arch, kwargs = INT8_CASES[request.param]
    path = write_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", arch, **kwargs)
    model = load_gguf(path)
    model.set_activations("int8")
    return model


def test_int8_windows_are_bitwise_equal_to_single_steps(int8_model, threads):
    from test_model import assert_windows_equal_steps

    assert all(lin.int8 for lin in int8_model.linears())
    for lin in int8_model.linears():  # where the path packs, the steps and windows below run on packed tiles
        want = [ops().int8_packed_type(t, p.shape[0]) for p, t in zip(lin.parts, lin.types, strict=True)]
        assert lin.int8_types == [w if w > 0 else t for w, t in zip(want, lin.types, strict=True)]
    assert int8_model.packed_weights  # every weight type of these two models packs, on both paths
    assert_windows_equal_steps(int8_model, random_ids(600, int8_model.args.vocab_size, seed=5), starts=(250, 257))


def test_int8_prefill_is_the_same_at_any_thread_count(int8_model):
    """In the int8 mode a prefill chunk (more than MAX_WINDOW tokens) runs through the same native
    kernels as a window, never a vendor GEMM: its keys, values and logits do not depend on the
    thread count either (the fp32 mode's prefill GEMM may part in the last bits)."""
    from triforce_chat.decoding.cache import KVCache

    assert int8_model.thread_invariant  # what the document cache's key relies on (decoding/store/doccache.py)
    ids = random_ids(300, int8_model.args.vocab_size, seed=9)
    previous = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            cache = KVCache.for_model(int8_model, max_len=320)
            logits = int8_model(ids[:200], cache)
            logits = torch.cat([logits, int8_model(ids[200:300], cache)])
            runs.append((logits, cache.k[:, :, :300].clone()))
    finally:
        torch.set_num_threads(previous)
    for logits, k in runs[1:]:
        assert torch.equal(logits, runs[0][0]) and torch.equal(k, runs[0][1])


def test_int8_forward_stays_close_to_fp32(int8_model):
    from triforce_chat.decoding.cache import KVCache

    ids = random_ids(80, int8_model.args.vocab_size, seed=7)
    got = int8_model(ids, KVCache.for_model(int8_model, max_len=96))
    int8_model.set_activations("fp32")
    try:
        assert not int8_model.thread_invariant  # fp32 prefill chunks go through a vendor GEMM
        want = int8_model(ids, KVCache.for_model(int8_model, max_len=96))
    finally:
        int8_model.set_activations("int8")
    rel = (got - want).norm() / want.norm()
    # random weights amplify the rounding layer by layer (the default model: perplexity +0.1%);
    # a broken product (a lost offset, a wrong lane) gives an error of order 1
    assert 1e-5 < rel < 0.2


def test_self_check_catches_a_row_count_dependent_int8_kernel(int8_model):
    from triforce_chat.decoding.models.loading import self_check

    assert self_check(int8_model) == ""
    native.set_row_skew(True)
    try:
        assert "differed" in self_check(int8_model)
    finally:
        native.set_row_skew(False)


@needs_int8
def test_load_model_picks_int8_and_falls_back_to_fp32_when_its_self_check_fails(smollm2_path):
    from triforce_chat.decoding.models.loading import load_model
    from triforce_chat.decoding.session import kernels_label

    lm = load_model("smollm2-135m", log=lambda m: None)
    assert lm.model.activations == "int8" and not lm.notices
    label = kernels_label(lm.model.device, lm.model.activations, lm.model.attention, lm.model.packed_weights)
    assert f"int8 activations ({native.status().int8})" in label
    assert ("packed weights" in label) == lm.model.packed_weights
    assert "-int8" in lm.model.numerics
    assert load_model("smollm2-135m", log=lambda m: None, activations="fp32").model.activations == "fp32"
    native.set_row_skew(True)  # both modes broken: int8 -> fp32 -> token by token
    try:
        lm = load_model("smollm2-135m", log=lambda m: None, activations="int8")
    finally:
        native.set_row_skew(False)
    assert (lm.model.activations, lm.model.attention) == ("fp32", "fp32") and lm.model.sequential_windows
    assert "self-check of the fast mode" in lm.notices[0] and "token by token" in lm.notices[-1]


@needs_int8
def test_dense_weights_keep_fp32_activations(tiny_model_dir):
    from triforce_chat.decoding.models.loading import load_model

    lm = load_model(str(tiny_model_dir), log=lambda m: None)
    assert lm.model.activations == "fp32" and not lm.notices
    lm = load_model(str(tiny_model_dir), log=lambda m: None, activations="int8")
    assert lm.model.activations == "fp32" and "dense" in lm.notices[0]
