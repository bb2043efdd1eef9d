// The int8-activation mode of the matrix products: y[t, n] = sum_k x[t, k] * W[n, k] (+ bias[n])
// with x rounded to int8 first, per row and per block of 32 inputs, and the weights' integer codes
// multiplied by those int8 values in int32. Two paths compute it: AVX512-VNNI `vpdpbusd`
// (linear_int8.cpp) and, in builds with AVX2 but not AVX512-VNNI, `vpmaddubsw` + `vpmaddwd`
// (linear_int8_avx2.cpp, which bounds every sequence below int16 saturation), or 256-bit `vpdpbusd`
// where the build has AVX-VNNI (simd.h: TF_DPBUSD256). All give the same integer sums and then
// follow the same float sequence, so their outputs are the same bits.
//
// What the mode computes, exactly (the float64 references of the tests follow these words):
//  1. each row of x, each block of 32 inputs: amax = max |x|, d = amax / 127, q = round-to-even
//     (x * (127 / amax)) clamped to [-127, 127] (all zeros, d = 0, when amax is 0). Row-local.
//  2. each weight group of 16 (decoded from its GGUF block as in the fp32 mode): w = c * s + m
//     with an integer code c, a float scale s and a float min m.
//  3. output (t, n) = sum over blocks b, in order, of  d_b * (s * sum_k c_k q_k  +  m * sum_k q_k),
//     the integer sums exact in int32, the rest fp32 in one fixed sequence per block (below).
//
// Row- and thread-invariance: the lanes of every vector are 16 *output columns* (weight rows); an
// input row never shares a lane with another input row and no lane is ever reduced across, so an
// output's operations are the same whether its row runs alone or in a window, in any tile, and
// whichever thread owns its column tile. There is no horizontal sum at all. (The AVX2 path reads
// each 16-lane vector as two 8-lane halves; the lanes are still output columns.)
#pragma once

#include <cstdint>
#include <vector>

#include "linear.h"
#include "simd.h"

// Which path this build compiles (exactly one of them, or none: the scalar build has no mode).
#if defined(TF_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TF_INT8_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)  // AVX2, or AVX-512 without VNNI
#define TF_INT8_AVX2 1
#endif

namespace tf {

// "avx512-vnni", "avx2" or "avx-vnni" (its EVEX stand-in: "avx-vnni-evex"): the path this build
// has; "" when it has none (then the calls below throw).
const char* int8_path();

// The activations as the mode rounds them (step 1): q [T, K] int8, d [T, K / 32]. For tests.
void quantize_rows_int8(const float* x, int64_t T, int64_t ldx, int64_t K, int8_t* q, float* d);

// Tile-packed weights. A step of decode is bound by how fast the kernel turns GGUF blocks into its
// lanes' codes: from the file's row order that is a transpose of 16 rows per block. Packing does
// it once, at load: each tile of 16 rows becomes, per block of 32 inputs, the vectors the decode
// would have built (codes in lane order, Q5_0's fifth bits as bit planes, the 16 f16 scales in lane
// order), the same bytes per row as the file. Both paths write and read the same layout
// (linear_int8_tiles.h). The codes and scales, so the outputs' bits, are the file's. Packed type
// id: kPacked + the ggml type.
constexpr int kPacked = 1000;

// kPacked + `type` where this build packs `type` for a weight of `n` rows, else -1 (then the file's
// order is what linear_int8 reads).
int int8_packed_type(int type, int64_t n);

// w (file order, n rows, n a multiple of 16) into out: n * w.row_bytes bytes, packed.
void pack_int8(const WeightSpec& w, int64_t K, uint8_t* out);

// Like `linear` (same arguments, quantized weight types only, packed ones too), in the
// int8-activation mode.
void linear_int8(const float* x, int64_t T, int64_t ldx, int64_t K, const std::vector<WeightSpec>& weights,
                 const float* bias, float* y, int64_t ldy);

}  // namespace tf
