// Attention with int8 products: the blocked online softmax of attention.h (absolute segments of 256
// and blocks of 32 keys, segments merged in order, threads over (KV head, segment) items), for CPUs
// whose vector units are the bound of a window's attention. Two kernels compute it, bit for bit the
// same (attention_int8_walk.h): AVX512-VNNI `vpdpbusd`, 64 byte products per instruction, twice what
// `vdpbf16ps` does (Zen 4, Ice Lake, Sapphire Rapids); and AVX2 `vpmaddubsw`, 32 per instruction,
// for every other x86-64 CPU of the last decade (Zen 2 and 3, Intel's desktop and laptop cores),
// whose fp32 attention converts every key and value and pays one multiply-add per product. Where
// the AVX2 build has 256-bit `vpdpbusd` (AVX-VNNI: Intel's client cores from Alder Lake), its
// kernel computes the VNNI kernel's integers with it, 32 products per instruction.
//
// What it computes (tests/test_native_int8_attention.py follows these words):
// - Keys are smoothed and quantized per key. c [Hkv, D] (> 0, per KV head and dimension, the same
//   for every key: decoding/model.py derives it from the weights) divides each key and multiplies
//   each query, which leaves q.k unchanged in exact arithmetic and moves the large dimensions of the
//   keys (Qwen's biased keys) into the queries, where a row is quantized once. A key's codes are
//   round(k_d * (1/c_d) * 127 / a) with a the largest |k_d * (1/c_d)| of the key, its scale a / 127.
// - A query row: x_d = (q_d * scale) * c_d, codes round(x_d * 127 / a) with a its largest |x_d|,
//   scale a / 127. A score is the exact integer sum of the codes' products, as fp32, times
//   (key scale * query scale).
// - Values are quantized per key as the keys (without c). A row's softmax weight p = exp(s - m), m its
//   running max, comes from a degree-4 polynomial (~5e-5 relative: attention_int8.cpp, exp_weights)
//   and is summed into the denominator as is (16 running sums, one per lane, added up when the
//   segments merge). For the values it is multiplied by the key's value scale, and the products
//   w of a block are quantized to 0..255 against their bound pb * vmax: pb = exp(bm - m) (bm the
//   row's largest score in the block), vmax the largest value scale among the keys the row sees in
//   the block. The block adds (pb * vmax / 255) * (the exact integer sum of weight codes times
//   value codes) to the running values.
// All rounding is to nearest even. A key or row of zeros, with a NaN or an infinity, or so small that
// 127 / a overflows (a under ~4e-37), gets zero codes and scale (so no code is -128); a block more
// than ~87 nats under a row's running max, or whose bound pb * vmax is so small that 255 / (pb * vmax)
// overflows, gets no weight from it.
//
// On AVX2, `vpmaddubsw` multiplies unsigned by signed bytes and adds pairs into int16 with
// saturation, so the same integers come another way: a score sums |q_d| * (k_d with q_d's sign), pairs
// at most 2 * 127 * 127; a value product sums |w - 128| * (v with w - 128's sign), pairs at most
// 2 * 128 * 127, plus 128 times the block's sum of value codes. No pair saturates.
//
// Row-invariance: every quantization step is a function of one key or of one row alone, and the
// integer sums are exact whatever their order, so a query's bits depend on its position and the keys
// at or before it alone, as in attention.h: not on the window it shares, nor on the thread count.
// Keys past a row's position get weight zero (their codes add nothing).
#pragma once

#include "attention.h"
#include "simd.h"

#if defined(TF_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TF_INT8_ATTENTION_VNNI 1
#elif defined(TF_AVX512) || defined(TF_AVX2)
#define TF_INT8_ATTENTION_AVX2 1
#endif

namespace tf {

// "avx512-vnni", "avx2" or "avx-vnni" ("avx-vnni-evex"): the kernel this build has; "" when it has
// none (then it throws).
const char* attention_int8_path();

// Bytes of one prepared block of kBlock keys (keys and values alike): codes (32 * D bytes), then 32
// fp32 scales, then for keys 32 int32 sums of each key's codes times 128 (the unsigned query's
// offset), for values the block's largest scale and its inverse (fp32).
constexpr int64_t int8_block_bytes(int64_t D) { return kBlock * D + 256; }

// Blocks block_begin .. block_end - 1 of k/v quantized into kprep / vprep (int8_block_bytes(D) per
// block, prep_sh blocks between KV heads), smoothing the keys by key_smooth [Hkv, D].
struct Int8PrepareArgs {
  const void* k;
  const void* v;
  int64_t k_sh, k_sp, v_sh, v_sp;
  int kv_type;
  int64_t Hkv, D, block_begin, block_end;
  const float* key_smooth;
  void* kprep;
  void* vprep;
  int64_t prep_sh;
};
void prepare_kv_int8(const Int8PrepareArgs& a);

// The arguments of `attention` (kprep / vprep / prepared as prepare_kv_int8 made them) and c;
// a.D must be 64 or 128.
void attention_int8(const AttentionArgs& a, const float* key_smooth);

#if defined(TF_INT8_ATTENTION_AVX2)
void prepare_kv_int8_avx2(const Int8PrepareArgs& a);  // attention_int8_avx2.cpp
void attention_int8_avx2(const AttentionArgs& a, const float* key_smooth);
#endif

}  // namespace tf
