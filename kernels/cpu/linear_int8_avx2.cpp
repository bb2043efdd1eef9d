// The int8-activation matrix products on AVX2 (see linear_int8.h for what they compute): the same
// outputs, bit for bit, as the AVX512-VNNI path of linear_int8.cpp, for CPUs without VNNI (Zen 3,
// AVX2-only Xeons, AVX-512 CPUs before VNNI).
//
// Without `vpdpbusd`, a dot product of unsigned bytes by int8 activations is `vpmaddubsw` (pairs of
// products summed into *saturating* int16) then `vpmaddwd` by ones (pairs of int16 into int32). A
// saturation would lose bits, so every int16 here is bounded below 32767 by construction (|q| <= 127
// after the rounding of step 1):
//  - 4-, 5- and 6-bit codes are stored unsigned, u = c + offset in [0, 2^b - 1] (the offset taken
//    back in integers afterwards, as the VNNI path takes back its +128). A pair of products is at
//    most 2 * 127 * (2^b - 1), so the results of 8 (4-bit), 4 (5-bit) or 2 (6-bit) `vpmaddubsw` are
//    added in int16 before one `vpmaddwd`: at most 30480, 31496 and 32004 (`kCodes`, checked below).
//  - 8-bit codes (Q8_0: -128 .. 127, the full int8 range) are stored as they are and multiplied as
//    |c| <= 128, unsigned, by the activations given c's sign (`vpsignb`: -q never overflows since
//    |q| <= 127): a pair is at most 2 * 128 * 127 = 32512, each `vpmaddubsw` result widened on its own.
// So the integer dot products are exact, the integers `vpdpbusd` gives, and the float part of each
// block is the header's fixed sequence, the VNNI path's, lane by lane: the outputs are the same bits.
//
// Where the build has `vpdpbusd` on 256 bits (AVX-VNNI: simd.h's TF_DPBUSD256), each line half is
// one `vpdpbusd` into int32 instead (16 per row and block of 16 x 32 weights, nothing else): no
// int16 step, so no bound, and Q8_0 is stored as c + 128 with the offset taken back as the VNNI path
// does. The same integers again, so the same bits.
//
// Layout: as in linear_int8.cpp, a thread decodes a tile of 16 weight rows into a strip of 64-byte
// lines (lane p: 4 consecutive codes of weight row perm(p)), with the same scales and mins, in
// chunks of K that stay in L1. Here a line is two 256-bit halves of 8 lanes; rows run over the
// strip 4 at a time (8 accumulators of the 16 registers), each broadcast of 4 activations serving
// both halves. Per row and block of 16 x 32 weights: 16 `vpmaddubsw` and 2 to 16 `vpmaddwd` (Q8_0:
// 16 of each, and the signs), where the VNNI path pays 8 `vpdpbusd`. A single row over a packed
// tile (a decode step, or a window of up to 4) skips the strip: each block's lines are made in
// registers and used at once.
#include "linear_int8.h"
#include "linear_int8_tiles.h"

#if defined(TF_INT8_AVX2)

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cassert>
#include <cmath>
#include <cstring>

#include "blocks.h"
#include "quant.h"

namespace tf {

#if defined(TF_DPBUSD256)
const char* int8_path() { return kDpbusd256Path; }
#else
const char* int8_path() { return "avx2"; }
#endif

namespace {

using int8::kBlock;
using int8::kLanes;
using int8::Prefetch;
using int8::perm;
constexpr int kHalf = 8;    // lanes per 256-bit half of a line

struct alignas(64) Line {
  uint8_t b[64];
};

// How a weight type's codes c go into `vpmaddubsw`.
struct Codes {
  int offset;  // stored u = c + offset (unsigned types: 0)
  int max_u;   // largest stored byte
  int sums;    // `vpmaddubsw` results added in int16 before one `vpmaddwd`
  bool sign;   // Q8_0: c stored as it is, multiplied as |c| with c's sign moved onto the activations
};

constexpr Codes kCodes(int type) {
  switch (type) {
    case Q4_0: return {8, 15, 8, false};
    case Q4_1: case Q4_K: return {0, 15, 8, false};
    case Q5_0: return {16, 31, 4, false};
    case Q5_1: case Q5_K: return {0, 31, 4, false};
    case Q6_K: return {32, 63, 2, false};
#if defined(TF_DPBUSD256)
    default: return {128, 255, 1, false};  // Q8_0 as c + 128, the VNNI path's way (`vpdpbusd` has no int16 step)
#else
    default: return {0, 128, 1, true};  // Q8_0
#endif
  }
}

// The bound of the header comment: no int16 of any sequence can saturate. (`vpdpbusd` has no int16
// step.)
#if !defined(TF_DPBUSD256)
constexpr bool fits_int16(int type) { return kCodes(type).sums * 2 * 127 * kCodes(type).max_u <= 32767; }
static_assert(fits_int16(Q4_0) && fits_int16(Q4_1) && fits_int16(Q4_K) && fits_int16(Q5_0), "int16 bound");
static_assert(fits_int16(Q5_1) && fits_int16(Q5_K) && fits_int16(Q6_K) && fits_int16(Q8_0), "int16 bound");
#endif

// Step 1 of the header for one block of 32 inputs (the VNNI path's operations on 8 lanes); returns
// the sums of q over its two halves.
inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* half_sums) {
  __m256 v[4];
  for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + 8 * i);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                           _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));  // max is order-free (no NaN)
  // a NaN among the inputs makes the block's outputs NaN, as the fp32 mode's would be
  int nan = 0;
  for (int i = 0; i < 4; i++) nan |= _mm256_movemask_ps(_mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  *d = nan ? NAN : amax / 127.0f;
  const __m256 iv = _mm256_set1_ps(id);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i qi[4];
  for (int i = 0; i < 4; i++) {
    // round to nearest even explicitly (not through MXCSR), then an exact conversion; out of range
    // and NaN give INT_MIN, as the VNNI path's conversion does, clamped alike
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    qi[i] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvttps_epi32(r), hi), lo);
  }
  // int32 -> int8 (in range: the packs never saturate); the packs interleave 128-bit lanes, the
  // permute puts the 8 dwords back in element order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  for (int half = 0; half < 2; half++) {  // integers: exact in any order
    const __m256i s = _mm256_add_epi32(qi[2 * half], qi[2 * half + 1]);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    half_sums[half] = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
  }
}

// The rounded activations of a call, and the per-block integers and floats the products need.
struct Acts {
  int64_t K = 0, nc = 0;
  std::vector<int8_t> q;     // [T, K]
  std::vector<float> d;      // [T, nc]  scale of each block
  std::vector<int32_t> s16;  // [T, 2 nc] sum of q over each half block (Q6_K's offset)
  std::vector<int32_t> s32;  // [T, nc]  sum of q over the block (the other offsets)
  std::vector<float> dsum;   // [T, nc]  d * sum of q over the block (what a min multiplies)

  void build(const float* x, int64_t T, int64_t ldx, int64_t K_) {
    K = K_, nc = K_ / kBlock;
    q.resize(T * K), d.resize(T * nc), s16.resize(2 * T * nc), s32.resize(T * nc), dsum.resize(T * nc);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        for (int64_t c = 0; c < nc; c++) {
          int32_t s[2];
          const int64_t i = t * nc + c;
          quantize_block(x + t * ldx + c * kBlock, q.data() + t * K + c * kBlock, &d[i], s);
          s16[2 * i] = s[0];
          s16[2 * i + 1] = s[1];
          s32[i] = s[0] + s[1];
          dsum[i] = d[i] * float(s[0] + s[1]);
        }
      }
    });
  }
};

// One tile of up to 16 weight rows, decoded over all of K.
struct Strip {
  std::vector<Line> codes;  // group g of 16 inputs: lines 4g .. 4g + 3 (dword j of the group in line 4g + j)
  std::vector<float> sc;    // [K / 16][16] scale of each group and lane
  std::vector<float> mn;    // [K / 32][16] min of each block and lane

  void reserve(int64_t K) {
    if (int64_t(codes.size()) < K / 4) {
      codes.resize(K / 4);
      sc.resize(K);
      mn.resize(K / 2);
    }
  }
};

// A strip's arrays as plain pointers, taken once per tile: through the vectors, the compiler would
// reload their data pointers after every vector store (which may alias anything).
struct View {
  Line* codes;
  float* sc;
  float* mn;
  explicit View(Strip& s) : codes(s.codes.data()), sc(s.sc.data()), mn(s.mn.data()) {}
  __m256i* half_line(int64_t line, int half) const { return reinterpret_cast<__m256i*>(codes[line].b) + half; }
};

// 16 rows x 4 dwords of each group (row-major, 16 bytes a row) -> 4 lines, dword j of row i in line
// j, lane perm(i): the VNNI path's 4x4 transposes within 128-bit lanes, on the two halves of a line.
void transpose_groups(Line* lines, int64_t ng) {
  for (int64_t g = 0; g < ng; g++) {
    __m256i* v = reinterpret_cast<__m256i*>(lines + 4 * g);  // in: v[k] rows 2k, 2k + 1; out: v[2j + half]
    __m256i r[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_load_si256(v + k);
    for (int half = 0; half < 2; half++) {  // rows 4m + L, L = 2 half, 2 half + 1: lanes 8 half .. 8 half + 7
      const __m256i a = r[half], b = r[2 + half], c = r[4 + half], d = r[6 + half];
      const __m256i ab0 = _mm256_unpacklo_epi32(a, b), ab1 = _mm256_unpackhi_epi32(a, b);
      const __m256i cd0 = _mm256_unpacklo_epi32(c, d), cd1 = _mm256_unpackhi_epi32(c, d);
      _mm256_store_si256(v + half, _mm256_unpacklo_epi64(ab0, cd0));
      _mm256_store_si256(v + 2 + half, _mm256_unpackhi_epi64(ab0, cd0));
      _mm256_store_si256(v + 4 + half, _mm256_unpacklo_epi64(ab1, cd1));
      _mm256_store_si256(v + 6 + half, _mm256_unpackhi_epi64(ab1, cd1));
    }
  }
}

// Rows i < nr of a tile at `base` (row stride `stride`), decoded into the strip.
template <int TYPE>
void decode_tile(const uint8_t* base, int64_t stride, int nr, int64_t K, View s, Prefetch& pf) {
  const int64_t nb = K / block_elems(TYPE), ng = K / kGroup;
  const int bb = block_bytes(TYPE);
  uint8_t* stage = s.codes[0].b;  // first row-major per group ([g][row][16 codes]), transposed below
  const __m128i offset = _mm_set1_epi8(char(kCodes(TYPE).offset));
  for (int i = 0; i < nr; i++) {
    pf.part();
    const int p = perm(i);
    const uint8_t* row = base + i * stride;
    int64_t g = 0;
    for (int64_t b = 0; b < nb; b++) {
      visit_block<TYPE>(row + b * bb, [&](__m128i q, float scale, float min) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(stage + (g * kLanes + i) * 16), _mm_add_epi8(q, offset));
        s.sc[g * kLanes + p] = scale;
        if ((g & 1) == 0) s.mn[(g >> 1) * kLanes + p] = min;
        g++;
      });
    }
  }
  // lanes without a row: scale 0; their codes (left from another tile) never matter, since no lane
  // of `vpmaddubsw` / `vpmaddwd` reads another, even where such codes would saturate
  for (int i = nr; i < kLanes; i++) {
    const int p = perm(i);
    for (int64_t g = 0; g < ng; g++) s.sc[g * kLanes + p] = 0.0f;
    for (int64_t c = 0; c < ng / 2; c++) s.mn[c * kLanes + p] = 0.0f;
  }
  transpose_groups(s.codes, ng);
}

// The wide decoders below take a full tile of 16 rows at once, half by half (the rows of lanes
// 8 half .. 8 half + 7: rows 4m + L for L = 2 half, 2 half + 1), with the codes, scales and mins
// the per-row decode gives (the VNNI path's wide decoders, operation for operation). The offsets of
// kCodes cancel the types' own: the stored byte is the code as the block holds it. They read the
// tile through a reader: `FileTile` transposes the file's rows as it goes, `PackedTile` reads the
// packed layout of linear_int8_tiles.h, where those transposes were done at load.

// Bytes [0, 16) at p + row * stride for the 8 rows of one half, transposed: out[j], lane 4l + m
// holds dword j of row 4m + 2 half + l (half `half` of the packed layout's transposed vector j).
inline void load_transposed(const uint8_t* p, int64_t stride, int half, __m256i out[4]) {
  __m256i r[4];
  for (int m = 0; m < 4; m++) {
    const uint8_t* q = p + (4 * m + 2 * half) * stride;
    r[m] = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(q + stride), reinterpret_cast<const __m128i*>(q));
  }
  const __m256i ab0 = _mm256_unpacklo_epi32(r[0], r[1]), ab1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i cd0 = _mm256_unpacklo_epi32(r[2], r[3]), cd1 = _mm256_unpackhi_epi32(r[2], r[3]);
  out[0] = _mm256_unpacklo_epi64(ab0, cd0);
  out[1] = _mm256_unpackhi_epi64(ab0, cd0);
  out[2] = _mm256_unpacklo_epi64(ab1, cd1);
  out[3] = _mm256_unpackhi_epi64(ab1, cd1);
}

// Row of lane i of a half (i = 4l + m: row 4m + 2 half + l).
inline int half_row(int half, int i) { return 4 * (i % 4) + 2 * half + i / 4; }

// 4 bytes at p + row * stride for the 8 rows of one half, in their lanes: plain loads (gathers are
// slow on some CPUs, Zen among them).
// Inserted into registers one by one: through memory, 8 narrow stores then one wide load would
// stall on store forwarding.
inline __m256i load_dwords(const uint8_t* p, int64_t stride, int half) {
  __m128i x[2];
  for (int l = 0; l < 2; l++) {
    int32_t v[4];
    for (int m = 0; m < 4; m++) std::memcpy(&v[m], p + half_row(half, 4 * l + m) * stride, 4);
    x[l] = _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(_mm_cvtsi32_si128(v[0]), v[1], 1), v[2], 2), v[3], 3);
  }
  return _mm256_inserti128_si256(_mm256_castsi128_si256(x[0]), x[1], 1);
}

// The 2 bytes at p + row * stride for the 8 rows of one half, in lane order (f16 as they are).
inline __m128i load_u16(const uint8_t* p, int64_t stride, int half) {
  uint16_t v[8];
  for (int i = 0; i < 8; i++) std::memcpy(&v[i], p + half_row(half, i) * stride, 2);
  __m128i h = _mm_cvtsi32_si128(v[0]);
  h = _mm_insert_epi16(h, v[1], 1), h = _mm_insert_epi16(h, v[2], 2), h = _mm_insert_epi16(h, v[3], 3);
  h = _mm_insert_epi16(h, v[4], 4), h = _mm_insert_epi16(h, v[5], 5), h = _mm_insert_epi16(h, v[6], 6);
  return _mm_insert_epi16(h, v[7], 7);
}

// The f16 in the low 16 bits of each dword, as 8 floats (F16C: exact).
inline __m256 f16_low(__m256i v) {
  const __m256i lows = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                                               0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1));
  return _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(lows, 0x08)));
}

inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high_nibbles(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

// Q5_0's fifth bits from the file: byte q of each lane of line 4h + j (h = 0: low nibbles, elements
// 4j .. 4j + 3; 1: high, 16 + 4j ..) is bit 16h + 4j + q of the row's qh, i.e. bit 4(j & 1) + q of
// qh's byte 2h + j / 2. 0xFF where set.
inline __m256i fifth_bits(__m256i qh, int j, int h) {
  const char src = char(2 * h + j / 2);
  const __m256i bytes = _mm256_shuffle_epi8(
      qh, _mm256_setr_epi8(src, src, src, src, src + 4, src + 4, src + 4, src + 4, src + 8, src + 8, src + 8, src + 8,
                           src + 12, src + 12, src + 12, src + 12, src, src, src, src, src + 4, src + 4, src + 4,
                           src + 4, src + 8, src + 8, src + 8, src + 8, src + 12, src + 12, src + 12, src + 12));
  const __m256i bit = _mm256_set1_epi32(int32_t(uint32_t(0x08040201u) << (4 * (j & 1))));
  return _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
}

// A full tile as the file has it: 16 rows, `stride` bytes apart.
template <int TYPE>
struct FileTile {
  const uint8_t* base;
  int64_t stride;
  const uint8_t* block(int64_t b) const { return base + b * block_bytes(TYPE); }

  // Q8_0 / Q5_0 / Q4_0, block b, one half: the scales; the codes (Q8_0: the 8 line halves, codes
  // as they are; Q5_0 / Q4_0: the 4 qs vectors); Q5_0's fifth bits of line 4h + j.
  __m256 scales(int64_t b, int half) const { return _mm256_cvtph_ps(load_u16(block(b), stride, half)); }
  void codes(int64_t b, int half, __m256i* t) const {
    if constexpr (TYPE == Q8_0) {
      for (int h = 0; h < 2; h++) load_transposed(block(b) + 2 + 16 * h, stride, half, t + 4 * h);
    } else {
      load_transposed(block(b) + (TYPE == Q5_0 ? 6 : 2), stride, half, t);
    }
  }
  struct Fifth {  // line 4h + j's fifth bits: 0xFF where set (see fifth_bits)
    __m256i qh;
    __m256i operator()(int j, int h) const { return fifth_bits(qh, j, h); }
    __m256i sixteens(int j, int h) const { return _mm256_and_si256((*this)(j, h), _mm256_set1_epi8(0x10)); }
  };
  Fifth fifth(int64_t b, int half) const { return Fifth{load_dwords(block(b) + 2, stride, half)}; }

  // K-quants, super-block b, one half: 16 bytes at `from` of the block, transposed; the f16 at `from`.
  void transposed(int64_t b, int from, int half, __m256i out[4]) const {
    load_transposed(block(b) + from, stride, half, out);
  }
  __m256 f16(int64_t b, int from, int half) const { return _mm256_cvtph_ps(load_u16(block(b) + from, stride, half)); }
};

// A full tile in the packed layout (linear_int8_tiles.h); nb: its blocks (Q8_0 / Q5_0 / Q4_0).
template <int TYPE>
struct PackedTile {
  const uint8_t* tile;
  int64_t nb;
  using L = int8::PackedLayout<TYPE>;
  const __m256i* vectors(int64_t b) const { return reinterpret_cast<const __m256i*>(tile + b * 64 * L::kCodes); }

  __m256 scales(int64_t b, int half) const {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + L::scales_at(nb) + 32 * b + 16 * half)));
  }
  void codes(int64_t b, int half, __m256i* t) const {
    for (int j = 0; j < L::kCodes; j++) t[j] = _mm256_loadu_si256(vectors(b) + 2 * j + half);
    if constexpr (TYPE == Q8_0)  // stored + 128
      for (int j = 0; j < 8; j++) t[j] = _mm256_xor_si256(t[j], _mm256_set1_epi8(char(0x80)));
  }
  struct Fifth {  // this half of the block's bit planes
    __m256i planes;
    // 0x10 where line 4h + j has its fifth bit: plane L moved to bit 4 (within each byte: the
    // 16-bit shifts move no wanted bit across bytes), the rest masked off
    __m256i sixteens(int j, int h) const {
      const int line = 4 * h + j;
      const __m256i at4 = line < 4   ? _mm256_slli_epi16(planes, 4 - line)
                          : line > 4 ? _mm256_srli_epi16(planes, line - 4)
                                     : planes;
      return _mm256_and_si256(at4, _mm256_set1_epi8(0x10));
    }
  };
  Fifth fifth(int64_t b, int half) const {
    return Fifth{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + L::masks_at(nb) + 64 * b + 32 * half))};
  }

  const uint8_t* super_block(int64_t b) const { return tile + b * kLanes * block_bytes(TYPE); }
  void transposed(int64_t b, int from, int half, __m256i out[4]) const {
    // the parts the decoders read: Q4_K's head (0) and qs (16 .. 143); Q6_K's ql, qh, scales (0 .. 207)
    assert(TYPE == Q4_K ? from == 0 || (from >= 16 && from < 144) : from < 208);
    const int64_t at = TYPE == Q4_K ? (from == 0 ? int8::kQ4kQs : 16 * (from - 16)) : 16 * from;
    const uint8_t* p = super_block(b) + at + 32 * half;
    for (int j = 0; j < 4; j++) out[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * j));
  }
  __m256 f16(int64_t b, int from, int half) const {
    if constexpr (TYPE == Q6_K)  // d, the block's last f16, in lane order
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(super_block(b) + int8::kQ6kD + 16 * half)));
    // Q4_K: d (from 0) and dmin (from 2), the two halves of the head's first dword
    assert(TYPE == Q6_K ? from == 208 : from == 0 || from == 2);
    const __m256i head = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(super_block(b) + int8::kQ4kQs + 32 * half));
    return f16_low(from == 0 ? head : _mm256_srli_epi32(head, 16));
  }
};

// Q8_0 and Q5_0 (most of the default model's bytes) and Q4_0 (of many other GGUF files): the 8
// line halves of block b (line 4h + j: bytes 16h + 4j .. of the codes; Q5_0 / Q4_0: h = 0 the low
// nibbles of qs vector j, h = 1 the high ones).
template <int TYPE, class Tile>
__attribute__((always_inline)) inline void half_lines(const Tile& tile, int64_t b, int half, __m256i v[8]) {
  static_assert(TYPE == Q8_0 || TYPE == Q5_0 || TYPE == Q4_0, "wide decode");
  __m256i t[8];
  tile.codes(b, half, t);
  if constexpr (TYPE == Q8_0) {  // the codes as they are, or + 128 where kCodes says so
    for (int j = 0; j < 8; j++) v[j] = kCodes(Q8_0).offset ? _mm256_xor_si256(t[j], _mm256_set1_epi8(char(0x80))) : t[j];
  } else if constexpr (TYPE == Q4_0) {  // u = the nibble (the code + 8, as kCodes stores it)
    for (int j = 0; j < 4; j++) v[j] = low_nibbles(t[j]), v[4 + j] = high_nibbles(t[j]);
  } else {  // u = nibble | 16 * fifth bit (the code + 16, as kCodes stores it)
    const auto fifth = tile.fifth(b, half);
    for (int j = 0; j < 4; j++) {
      v[j] = _mm256_or_si256(low_nibbles(t[j]), fifth.sixteens(j, 0));
      v[4 + j] = _mm256_or_si256(high_nibbles(t[j]), fifth.sixteens(j, 1));
    }
  }
}

// Blocks [b0, b1) of the tile into the strip (block b at b - b0).
template <int TYPE, class Tile>
void decode_tile_wide(const Tile& tile, int64_t b0, int64_t b1, View s) {
  for (int64_t b = b0; b < b1; b++) {
    const int64_t at = b - b0;
    for (int half = 0; half < 2; half++) {
      const __m256 d = tile.scales(b, half);
      _mm256_storeu_ps(&s.sc[2 * at * kLanes + half * kHalf], d);
      _mm256_storeu_ps(&s.sc[(2 * at + 1) * kLanes + half * kHalf], d);
      __m256i v[8];
      half_lines<TYPE>(tile, b, half, v);
      for (int j = 0; j < 8; j++) _mm256_store_si256(s.half_line(8 * at + j, half), v[j]);
    }
  }
}

// Byte `byte` of every dword lane, as 8 unsigned ints.
inline __m256i byte_of(__m256i v, int byte) {
  return _mm256_and_si256(_mm256_srli_epi32(v, 8 * byte), _mm256_set1_epi32(0xFF));
}

// Q4_K: super-blocks of 256, sub-blocks of 32 with 6-bit scales and mins (scale_min_k4); scale =
// d * sc and min = 0 - dmin * m, as the VNNI path's wide decoder computes them. `head`: the
// super-block's first 16 bytes transposed (d and dmin, scales 0-3, 4-7, 8-11), one half.
__attribute__((always_inline)) inline void q4k_scale_min(const __m256i head[4], __m256 d, __m256 dmin, int j,
                                                         __m256& scale, __m256& min) {
  const __m256i m6 = _mm256_set1_epi32(63), m4 = _mm256_set1_epi32(15);
  __m256i sc, mn;
  if (j < 4) {
    sc = _mm256_and_si256(byte_of(head[1], j), m6);
    mn = _mm256_and_si256(byte_of(head[2], j), m6);
  } else {
    const __m256i hi = byte_of(head[3], j - 4);
    sc = _mm256_or_si256(_mm256_and_si256(hi, m4), _mm256_slli_epi32(_mm256_srli_epi32(byte_of(head[1], j - 4), 6), 4));
    mn = _mm256_or_si256(_mm256_srli_epi32(hi, 4), _mm256_slli_epi32(_mm256_srli_epi32(byte_of(head[2], j - 4), 6), 4));
  }
  scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
  min = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn)));
}

// Super-blocks [b0, b1) of the tile into the strip (super-block b at b - b0).
template <class Tile>
void decode_tile_q4k(const Tile& tile, int64_t b0, int64_t b1, View s) {
  for (int64_t b = b0; b < b1; b++) {
    for (int half = 0; half < 2; half++) {
      __m256i head[4];
      tile.transposed(b, 0, half, head);
      const __m256 d = tile.f16(b, 0, half), dmin = tile.f16(b, 2, half);
      for (int j = 0; j < 8; j++) {  // sub-block j = chunk 8b + j
        const int64_t c = 8 * (b - b0) + j;
        __m256 scale, min;
        q4k_scale_min(head, d, dmin, j, scale, min);
        _mm256_storeu_ps(&s.sc[2 * c * kLanes + half * kHalf], scale);
        _mm256_storeu_ps(&s.sc[(2 * c + 1) * kLanes + half * kHalf], scale);
        _mm256_storeu_ps(&s.mn[c * kLanes + half * kHalf], min);
      }
      for (int jj = 0; jj < 4; jj++) {  // 32 bytes of qs: low nibbles are sub-block 2jj, high 2jj + 1
        __m256i t[8];
        tile.transposed(b, 16 + 32 * jj, half, t);
        tile.transposed(b, 16 + 32 * jj + 16, half, t + 4);
        for (int j = 0; j < 8; j++) {
          _mm256_store_si256(s.half_line(8 * (8 * (b - b0) + 2 * jj) + j, half), low_nibbles(t[j]));
          _mm256_store_si256(s.half_line(8 * (8 * (b - b0) + 2 * jj + 1) + j, half), high_nibbles(t[j]));
        }
      }
    }
  }
}

// Q6_K: super-blocks of 256 in two halves of 128; u = 4 bits of ql | 2 bits of qh << 4 (the code
// + 32, as kCodes stores it); one signed 8-bit scale per group of 16, times d. Group g's scale, from
// the 16 scale bytes transposed (`sc`, one half):
__attribute__((always_inline)) inline __m256 q6k_scale(const __m256i sc[4], __m256 d, int g) {
  const __m256i v = _mm256_srai_epi32(_mm256_slli_epi32(sc[g / 4], 24 - 8 * (g % 4)), 24);
  return _mm256_mul_ps(d, _mm256_cvtepi32_ps(v));
}

// Line j of chunk k (of 32) of a 128-half: `l` the ql vector 8 (k & 1) + j, `hv` the qh vector j.
__attribute__((always_inline)) inline __m256i q6k_line(__m256i l, __m256i hv, int k) {
  const __m256i nib = k < 2 ? low_nibbles(l) : high_nibbles(l);
  const __m256i hb = k == 0 ? _mm256_slli_epi16(hv, 4)
                   : k == 1 ? _mm256_slli_epi16(hv, 2)
                   : k == 2 ? hv
                            : _mm256_srli_epi16(hv, 2);
  return _mm256_or_si256(nib, _mm256_and_si256(hb, _mm256_set1_epi8(0x30)));
}

// Super-blocks [b0, b1) of the tile into the strip (super-block b at b - b0).
template <class Tile>
void decode_tile_q6k(const Tile& tile, int64_t b0, int64_t b1, View s) {
  for (int64_t b = b0; b < b1; b++) {
    for (int half = 0; half < 2; half++) {
      const __m256 d = tile.f16(b, 208, half);
      __m256i sc[4];
      tile.transposed(b, 192, half, sc);
      for (int g = 0; g < 16; g++)  // group g of the super-block: chunk 8b + g / 2
        _mm256_storeu_ps(&s.sc[(16 * (b - b0) + g) * kLanes + half * kHalf], q6k_scale(sc, d, g));
      for (int h = 0; h < 2; h++) {
        __m256i ql[16], qh[8];  // ql bytes 64h + 16i .. (i = 0..3), qh bytes 32h + 16i .. (i = 0, 1)
        for (int i = 0; i < 4; i++) tile.transposed(b, 64 * h + 16 * i, half, ql + 4 * i);
        for (int i = 0; i < 2; i++) tile.transposed(b, 128 + 32 * h + 16 * i, half, qh + 4 * i);
        for (int k = 0; k < 4; k++)  // chunk of 32: ql bytes 32 (k & 1) + l, nibble k / 2, qh bits 2k
          for (int j = 0; j < 8; j++)
            _mm256_store_si256(s.half_line(8 * (8 * (b - b0) + 4 * h + k) + j, half), q6k_line(ql[8 * (k & 1) + j], qh[j], k));
      }
    }
  }
}

// Blocks of 32 [c0, c1) of a full tile through `Tile`'s reader (the file's rows or a packed tile),
// for the types both read (K-quants: c0 and c1 multiples of 8, whole super-blocks). The next tile's
// prefetch goes with the rows' pass over each chunk (all_rows), not here.
template <template <int> class Tile, class... Args>
void decode_full(int type, int64_t c0, int64_t c1, View s, Args... args) {
  switch (type) {
    case Q8_0: return decode_tile_wide<Q8_0>(Tile<Q8_0>{args...}, c0, c1, s);
    case Q5_0: return decode_tile_wide<Q5_0>(Tile<Q5_0>{args...}, c0, c1, s);
    case Q4_0: return decode_tile_wide<Q4_0>(Tile<Q4_0>{args...}, c0, c1, s);
    case Q4_K: return decode_tile_q4k(Tile<Q4_K>{args...}, c0 / 8, c1 / 8, s);
    default: return decode_tile_q6k(Tile<Q6_K>{args...}, c0 / 8, c1 / 8, s);
  }
}

// How a tile is decoded: a full tile of a type both readers know in chunks of kChunk blocks (the
// strip of a chunk, 16 KiB of codes, stays in L1 while the rows run over it, and the next tile's
// prefetch spreads over the whole tile's work); any other in one pass, row by row.
constexpr int64_t kChunk = 32;  // blocks of 32 inputs; a multiple of 8 (K-quant super-blocks)

bool chunked(int type, int nr) {
  const int base = type > kPacked ? type - kPacked : type;
  return nr == kLanes && int8::packs(base);
}

// Blocks [c0, c1) of a tile (chunked ones) or all of it (the others, which take the next tile's
// prefetch in their one pass) into the strip.
void decode(int type, const uint8_t* base, int64_t stride, int nr, int64_t K, int64_t c0, int64_t c1, View s,
            Prefetch& pf) {
  if (type > kPacked) return decode_full<PackedTile>(type - kPacked, c0, c1, s, base, K / 32);
  if (chunked(type, nr)) return decode_full<FileTile>(type, c0, c1, s, base, stride);
  switch (type) {
    case Q4_0: return decode_tile<Q4_0>(base, stride, nr, K, s, pf);
    case Q4_1: return decode_tile<Q4_1>(base, stride, nr, K, s, pf);
    case Q5_0: return decode_tile<Q5_0>(base, stride, nr, K, s, pf);
    case Q5_1: return decode_tile<Q5_1>(base, stride, nr, K, s, pf);
    case Q8_0: return decode_tile<Q8_0>(base, stride, nr, K, s, pf);
    case Q4_K: return decode_tile<Q4_K>(base, stride, nr, K, s, pf);
    case Q5_K: return decode_tile<Q5_K>(base, stride, nr, K, s, pf);
    case Q6_K: return decode_tile<Q6_K>(base, stride, nr, K, s, pf);
    default: TORCH_CHECK(false, "int8 activations: unsupported weight type ", type);
  }
}

inline __m256i bcast4(const int8_t* p) {  // 4 int8 activations in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// One line half by 4 activations broadcast: pairs of products summed in int16 (`vpmaddubsw`).
template <int TYPE>
__attribute__((always_inline)) inline __m256i pair_sums(__m256i a, __m256i x) {
  if constexpr (kCodes(TYPE).sign)  // |c| (-128 -> 128, unsigned) by q with c's sign
    return _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(x, a));
  else
    return _mm256_maddubs_epi16(a, x);  // within the bound of kCodes
}

#if defined(TF_DPBUSD256)
// One line half by 4 activations broadcast, added to acc in int32 (`vpdpbusd`: no int16 step, so no
// bound to keep; the sums are the same exact integers).
template <int TYPE>
__attribute__((always_inline)) inline __m256i add_line(__m256i acc, __m256i a, __m256i x) {
  static_assert(!kCodes(TYPE).sign, "every type's codes are unsigned here (Q8_0 as c + 128)");
  return dpbusd256(acc, a, x);
}
#endif

// The integer dot products of a block's 8 line halves in registers (v) by the row's activations
// xq, in int32: the sums `dot` below gives for that half (integers: exact in any order).
template <int TYPE, int J0 = 0, int N = 8>
__attribute__((always_inline)) inline __m256i dot_lines(const __m256i v[8], const int8_t* xq) {
  constexpr int sums = kCodes(TYPE).sums;
  static_assert(N % sums == 0 && J0 + N <= 8, "whole int16 groups of the 8 lines");
  __m256i sum = _mm256_setzero_si256();
#if defined(TF_DPBUSD256)
  // two chains (even and odd lines), so that a single row does not wait on each `vpdpbusd` in turn
  static_assert(N % 2 == 0, "pairs of lines");
  __m256i odd = _mm256_setzero_si256();
  for (int j = J0; j < J0 + N; j += 2) {
    sum = add_line<TYPE>(sum, v[j], bcast4(xq + 4 * j));
    odd = add_line<TYPE>(odd, v[j + 1], bcast4(xq + 4 * j + 4));
  }
  sum = _mm256_add_epi32(sum, odd);
#else
  for (int j = J0; j < J0 + N; j += sums) {
    __m256i p = pair_sums<TYPE>(v[j], bcast4(xq + 4 * j));
    for (int k = j + 1; k < j + sums; k++) p = _mm256_add_epi16(p, pair_sums<TYPE>(v[k], bcast4(xq + 4 * k)));
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
#endif
  return sum;
}

// Integer dot products, lines j0 .. j0 + n - 1 of a block by the row's activations xq[4 j ..], for
// both halves of the lines (lanes 0-7, 8-15; each broadcast of 4 activations serves both): sum over
// them of u * q, or c * q for Q8_0, in int32.
template <int TYPE>
__attribute__((always_inline)) inline void dot(const __m256i* u, const int8_t* xq, int j0, int n, __m256i sum[2]) {
  sum[0] = sum[1] = _mm256_setzero_si256();
#if defined(TF_DPBUSD256)
  for (int k = j0; k < j0 + n; k++) {
    const __m256i x = bcast4(xq + 4 * k);
    for (int h = 0; h < 2; h++) sum[h] = add_line<TYPE>(sum[h], _mm256_load_si256(u + 2 * k + h), x);
  }
#else
  constexpr Codes code = kCodes(TYPE);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int j = j0; j < j0 + n; j += code.sums) {
    __m256i p[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int k = j; k < j + code.sums && k < j0 + n; k++) {
      const __m256i x = bcast4(xq + 4 * k);
      for (int h = 0; h < 2; h++) p[h] = _mm256_add_epi16(p[h], pair_sums<TYPE>(_mm256_load_si256(u + 2 * k + h), x));
    }
    for (int h = 0; h < 2; h++) sum[h] = _mm256_add_epi32(sum[h], _mm256_madd_epi16(p[h], ones));
  }
#endif
}

// Input rows t0 .. t0 + R - 1 over the strip's blocks [c0, c1) (block c at c - c0), their
// accumulators in `acc`. Per block and row, in this order (the VNNI path's, lane by lane): the
// integer dot products, minus the offset; acc = float(dot) * (scale * d) + acc (for Q6_K: its two
// halves, first then second); then, for types with mins, acc = min * (d * sum q) + acc.
template <int R, int TYPE>
void rows_over_strip(const View& s, const Acts& a, int64_t t0, int64_t c0, int64_t c1, float* acc_lanes, Prefetch& pf) {
  constexpr Codes code = kCodes(TYPE);
  constexpr bool halves = TYPE == Q6_K;
  constexpr bool mins = TYPE == Q4_1 || TYPE == Q5_1 || TYPE == Q4_K || TYPE == Q5_K;
  __m256 acc[R][2];
  for (int r = 0; r < R; r++)  // from zero at the first chunk, else where the last one left them
    for (int h = 0; h < 2; h++)
      acc[r][h] = c0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_lanes + (t0 + r) * kLanes + h * kHalf);
  const int64_t nc = a.nc, K = a.K;
  for (int64_t c = c0; c < c1; c++) {
    pf.part();
    const __m256i* u = reinterpret_cast<const __m256i*>(s.codes[8 * (c - c0)].b);
    const float* sa = &s.sc[2 * (c - c0) * kLanes];
    const float* sb = halves ? &s.sc[(2 * (c - c0) + 1) * kLanes] : sa;
    const float* mn = &s.mn[(c - c0) * kLanes];
    for (int r = 0; r < R; r++) {
      const int64_t t = t0 + r, i = t * nc + c;
      const int8_t* xq = a.q.data() + t * K + c * kBlock;
      const __m256 dv = _mm256_set1_ps(a.d[i]);
      if constexpr (halves) {
        __m256i d0[2], d1[2];
        dot<TYPE>(u, xq, 0, 4, d0);
        dot<TYPE>(u, xq, 4, 4, d1);
        const __m256i o0 = _mm256_set1_epi32(code.offset * a.s16[2 * i]);
        const __m256i o1 = _mm256_set1_epi32(code.offset * a.s16[2 * i + 1]);
        for (int h = 0; h < 2; h++) {
          const __m256 ah = _mm256_mul_ps(_mm256_loadu_ps(sa + h * kHalf), dv);
          const __m256 bh = _mm256_mul_ps(_mm256_loadu_ps(sb + h * kHalf), dv);
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d0[h], o0)), ah, acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d1[h], o1)), bh, acc[r][h]);
        }
      } else {
        __m256i dd[2];
        dot<TYPE>(u, xq, 0, 8, dd);
        const __m256i o = _mm256_set1_epi32(code.offset * a.s32[i]);
        for (int h = 0; h < 2; h++) {
          const __m256 ah = _mm256_mul_ps(_mm256_loadu_ps(sa + h * kHalf), dv);
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(dd[h], o)), ah, acc[r][h]);
        }
      }
      if constexpr (mins) {
        const __m256 ds = _mm256_set1_ps(a.dsum[i]);
        for (int h = 0; h < 2; h++) acc[r][h] = _mm256_fmadd_ps(_mm256_loadu_ps(mn + h * kHalf), ds, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int h = 0; h < 2; h++) _mm256_storeu_ps(acc_lanes + (t0 + r) * kLanes + h * kHalf, acc[r][h]);
}

// Every input row over the strip's blocks [c0, c1), 4 rows at a time (8 accumulators of the 16
// registers), then 1; acc_lanes [T][16] carries each row's accumulators from chunk to chunk (floats
// stored and loaded: the sequence of each lane is the one pass's).
template <int TYPE>
void all_rows(const View& s, const Acts& a, int64_t T, int64_t c0, int64_t c1, float* acc_lanes, Prefetch& pf) {
  Prefetch none;
  for (int64_t t = 0; t < T;) {
    const int R = T - t >= 4 ? 4 : 1;
    if (R == 4)
      rows_over_strip<4, TYPE>(s, a, t, c0, c1, acc_lanes, t == 0 ? pf : none);
    else
      rows_over_strip<1, TYPE>(s, a, t, c0, c1, acc_lanes, t == 0 ? pf : none);
    t += R;
  }
}

// Input rows t0 .. t0 + R - 1 over a packed Q8_0 / Q5_0 / Q4_0 tile, each block's line halves made
// in registers and used by the R rows at once: a decode step's or a short window's products without
// the strip's stores and loads. The integers and the float sequence per lane are rows_over_strip's.
template <int TYPE, int R>
void rows_over_packed(const uint8_t* tile, const Acts& a, int64_t t0, float* acc_lanes, Prefetch& pf) {
  const PackedTile<TYPE> pt{tile, a.nc};
  const int64_t nc = a.nc;
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; c++) {
    pf.part();
    for (int half = 0; half < 2; half++) {
      __m256i v[8];
      half_lines<TYPE>(pt, c, half, v);
      const __m256 sa = pt.scales(c, half);
      for (int r = 0; r < R; r++) {
        const int64_t i = (t0 + r) * nc + c;
        const __m256i dd = dot_lines<TYPE>(v, a.q.data() + (t0 + r) * a.K + c * kBlock);
        const __m256i o = _mm256_set1_epi32(kCodes(TYPE).offset * a.s32[i]);
        acc[r][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(dd, o)), _mm256_mul_ps(sa, _mm256_set1_ps(a.d[i])),
                                       acc[r][half]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int h = 0; h < 2; h++) _mm256_storeu_ps(acc_lanes + (t0 + r) * kLanes + h * kHalf, acc[r][h]);
}

// Every row of a call of up to kPackedRows rows over a packed tile. (Longer windows and prefill
// chunks go through the strip: past 4 rows, remaking the lines for each group of rows costs about
// what decoding them once into the strip does; docs/performance.md has the timings.)
constexpr int kPackedRows = 4;
template <int TYPE>
void all_rows_over_packed(const uint8_t* tile, const Acts& a, int64_t T, float* acc_lanes, Prefetch& pf) {
  constexpr bool kquant = TYPE == Q4_K || TYPE == Q6_K;
  Prefetch none;
  for (int64_t t = 0; t < T;) {
    const int64_t R = std::min<int64_t>(T - t, kPackedRows);
    Prefetch& p = t == 0 ? pf : none;
    auto run = [&](auto rows) {
      if constexpr (kquant)
        rows_over_packed_k<TYPE, decltype(rows)::value>(tile, a, t, acc_lanes, p);
      else
        rows_over_packed<TYPE, decltype(rows)::value>(tile, a, t, acc_lanes, p);
    };
    switch (R) {
      case 4: run(std::integral_constant<int, 4>()); break;
      case 3: run(std::integral_constant<int, 3>()); break;
      case 2: run(std::integral_constant<int, 2>()); break;
      default: run(std::integral_constant<int, 1>()); break;
    }
    t += R;
  }
}

// Input rows t0 .. t0 + R - 1 over a packed Q4_K / Q6_K tile, super-block by super-block and half by
// half (the halves are separate lanes, so each lane still runs its blocks in order), each chunk's
// lines made in registers and used by the R rows; the integers and the float sequence per lane are
// rows_over_strip's.
template <int TYPE, int R>
void rows_over_packed_k(const uint8_t* tile, const Acts& a, int64_t t0, float* acc_lanes, Prefetch& pf) {
  const PackedTile<TYPE> pt{tile, a.nc};
  const int64_t nc = a.nc;
  for (int half = 0; half < 2; half++) {
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.K / 256; b++) {
      if constexpr (TYPE == Q6_K) {
        const __m256 d = pt.f16(b, 208, half);
        __m256i sc[4];
        pt.transposed(b, 192, half, sc);
        for (int h = 0; h < 2; h++) {
          for (int k = 0; k < 4; k++) {  // chunk c = 8b + 4h + k
            const int64_t c = 8 * b + 4 * h + k;
            if (half == 0) pf.part();  // one part per block (pf.spread(nc)), all in the first half's pass
            __m256i ql[8], qh[4], v[8];
            pt.transposed(b, 64 * h + 32 * (k & 1), half, ql);
            pt.transposed(b, 64 * h + 32 * (k & 1) + 16, half, ql + 4);
            pt.transposed(b, 128 + 32 * h, half, qh);
            for (int j = 0; j < 4; j++) v[j] = q6k_line(ql[j], qh[j], k);
            pt.transposed(b, 128 + 32 * h + 16, half, qh);
            for (int j = 4; j < 8; j++) v[j] = q6k_line(ql[j], qh[j - 4], k);
            const __m256 sa = q6k_scale(sc, d, 2 * (4 * h + k)), sb = q6k_scale(sc, d, 2 * (4 * h + k) + 1);
            for (int r = 0; r < R; r++) {
              const int64_t t = t0 + r, i = t * nc + c;
              const int8_t* xq = a.q.data() + t * a.K + c * kBlock;
              const __m256i d0 = dot_lines<TYPE, 0, 4>(v, xq), d1 = dot_lines<TYPE, 4, 4>(v, xq);
              const __m256 dv = _mm256_set1_ps(a.d[i]);
              const __m256i o0 = _mm256_set1_epi32(kCodes(TYPE).offset * a.s16[2 * i]);
              const __m256i o1 = _mm256_set1_epi32(kCodes(TYPE).offset * a.s16[2 * i + 1]);
              acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d0, o0)), _mm256_mul_ps(sa, dv), acc[r]);
              acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(d1, o1)), _mm256_mul_ps(sb, dv), acc[r]);
            }
          }
        }
      } else {
        __m256i head[4];
        pt.transposed(b, 0, half, head);
        const __m256 d = pt.f16(b, 0, half), dmin = pt.f16(b, 2, half);
        for (int jj = 0; jj < 4; jj++) {
          __m256i t[8];
          pt.transposed(b, 16 + 32 * jj, half, t);
          pt.transposed(b, 16 + 32 * jj + 16, half, t + 4);
          for (int high = 0; high < 2; high++) {  // sub-block j = 2 jj + high = chunk 8b + j
            const int j = 2 * jj + high;
            const int64_t c = 8 * b + j;
            if (half == 0) pf.part();
            __m256i v[8];
            for (int n = 0; n < 8; n++) v[n] = high ? high_nibbles(t[n]) : low_nibbles(t[n]);
            __m256 scale, min;
            q4k_scale_min(head, d, dmin, j, scale, min);
            for (int r = 0; r < R; r++) {
              const int64_t i = (t0 + r) * nc + c;
              const __m256i dd = dot_lines<TYPE>(v, a.q.data() + (t0 + r) * a.K + c * kBlock);  // offset 0
              acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dd), _mm256_mul_ps(scale, _mm256_set1_ps(a.d[i])), acc[r]);
              acc[r] = _mm256_fmadd_ps(min, _mm256_set1_ps(a.dsum[i]), acc[r]);
            }
          }
        }
      }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(acc_lanes + (t0 + r) * kLanes + half * kHalf, acc[r]);
  }
}

// Whether a tile's rows skip the strip: up to kPackedRows over any packed tile (rows_over_packed,
// rows_over_packed_k).
bool in_registers(int type, int64_t T) { return type > kPacked && T <= kPackedRows; }

void rows(int type, const View& s, const Acts& a, int64_t T, int64_t c0, int64_t c1, float* acc_lanes, Prefetch& pf) {
  switch (type) {
    case Q4_0: return all_rows<Q4_0>(s, a, T, c0, c1, acc_lanes, pf);
    case Q4_1: return all_rows<Q4_1>(s, a, T, c0, c1, acc_lanes, pf);
    case Q5_0: return all_rows<Q5_0>(s, a, T, c0, c1, acc_lanes, pf);
    case Q5_1: return all_rows<Q5_1>(s, a, T, c0, c1, acc_lanes, pf);
    case Q8_0: return all_rows<Q8_0>(s, a, T, c0, c1, acc_lanes, pf);
    case Q4_K: return all_rows<Q4_K>(s, a, T, c0, c1, acc_lanes, pf);
    case Q5_K: return all_rows<Q5_K>(s, a, T, c0, c1, acc_lanes, pf);
    default: return all_rows<Q6_K>(s, a, T, c0, c1, acc_lanes, pf);
  }
}

// -- packing (the layout of linear_int8_tiles.h, the VNNI path's bytes) ---------------------------------

// 16 bytes at `from` of each row of a block, transposed, into the 4 vectors at dst.
inline void put_transposed(const uint8_t* blk, int64_t stride, int64_t from, uint8_t* dst) {
  for (int half = 0; half < 2; half++) {
    __m256i t[4];
    load_transposed(blk + from, stride, half, t);
    for (int j = 0; j < 4; j++) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 64 * j + 32 * half), t[j]);
  }
}

template <int TYPE>
void pack_tile(const uint8_t* base, int64_t stride, int64_t K, uint8_t* out) {
  if constexpr (TYPE == Q4_K || TYPE == Q6_K) {
    for (int64_t b = 0; b < K / 256; b++) {
      const uint8_t* blk = base + b * block_bytes(TYPE);
      uint8_t* dst = out + b * kLanes * block_bytes(TYPE);
      if constexpr (TYPE == Q4_K) {
        for (int i = 0; i < 8; i++) put_transposed(blk, stride, 16 + 16 * i, dst + 256 * i);  // the 128 qs bytes
        put_transposed(blk, stride, 0, dst + int8::kQ4kQs);
      } else {
        for (int i = 0; i < 13; i++) put_transposed(blk, stride, 16 * i, dst + 256 * i);  // ql, qh, the scales
        for (int half = 0; half < 2; half++)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + int8::kQ6kD + 16 * half), load_u16(blk + 208, stride, half));
      }
    }
  } else {
    using L = int8::PackedLayout<TYPE>;
    const int64_t nb = K / 32;
    const FileTile<TYPE> tile{base, stride};
    for (int64_t b = 0; b < nb; b++) {
      uint8_t* codes = out + b * 64 * L::kCodes;
      for (int half = 0; half < 2; half++) {
        __m256i t[8];
        tile.codes(b, half, t);
        for (int j = 0; j < L::kCodes; j++) {
          const __m256i v = TYPE == Q8_0 ? _mm256_xor_si256(t[j], _mm256_set1_epi8(char(0x80))) : t[j];  // + 128
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 64 * j + 32 * half), v);
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + L::scales_at(nb) + 32 * b + 16 * half),
                         load_u16(tile.block(b), stride, half));
        if constexpr (TYPE == Q5_0) {  // bit planes: bit L of byte i, the fifth bit of line L's byte i
          const auto fifth = tile.fifth(b, half);
          __m256i planes = _mm256_setzero_si256();
          for (int line = 0; line < 8; line++)
            planes = _mm256_or_si256(planes, _mm256_and_si256(fifth(line % 4, line / 4), _mm256_set1_epi8(char(1 << line))));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + L::masks_at(nb) + 64 * b + 32 * half), planes);
        }
      }
    }
  }
}

}  // namespace

int int8_packed_type(int type, int64_t n) { return int8::packed_type(type, n); }

void pack_int8(const WeightSpec& w, int64_t K, uint8_t* out) {
  int8::pack_tiles(w, K, out, [&](const uint8_t* src, int64_t stride, uint8_t* dst) {
    switch (w.type) {
      case Q8_0: return pack_tile<Q8_0>(src, stride, K, dst);
      case Q5_0: return pack_tile<Q5_0>(src, stride, K, dst);
      case Q4_0: return pack_tile<Q4_0>(src, stride, K, dst);
      case Q4_K: return pack_tile<Q4_K>(src, stride, K, dst);
      default: return pack_tile<Q6_K>(src, stride, K, dst);
    }
  });
}

void quantize_rows_int8(const float* x, int64_t T, int64_t ldx, int64_t K, int8_t* q, float* d) {
  TORCH_CHECK(K % kBlock == 0, "int8 activations need K to be a multiple of ", kBlock);
  thread_local Acts a;
  a.build(x, T, ldx, K);
  std::memcpy(q, a.q.data(), T * K);
  std::memcpy(d, a.d.data(), T * a.nc * sizeof(float));
}

void linear_int8(const float* x, int64_t T, int64_t ldx, int64_t K, const std::vector<WeightSpec>& weights,
                 const float* bias, float* y, int64_t ldy) {
  int8::check_inputs(K);
  thread_local Acts acts;
  acts.build(x, T, ldx, K);
  const Acts& a = acts;
  int8::for_each_tile(weights, K, T, y, ldy, [&](const WeightSpec& w, const uint8_t* tile, int nr, int64_t col,
                                                 Prefetch& pf) {
    thread_local Strip strip;
    thread_local std::vector<float> acc;  // [T][16] in lane order, every entry written before it is read
    strip.reserve(K);
    acc.resize(T * kLanes);
    const View view(strip);
    const int type = w.type > kPacked ? w.type - kPacked : w.type;
    const bool chunks = chunked(w.type, nr);
    const int64_t nc = K / kBlock, step = chunks ? kChunk : nc;
    // the next tile's prefetch: in the first rows' pass over each chunk (between their products), or
    // in the one-pass decode
    pf.spread(chunks ? nc : nr);
    Prefetch none;
    if (in_registers(w.type, T)) {
      switch (type) {
        case Q8_0: all_rows_over_packed<Q8_0>(tile, a, T, acc.data(), pf); break;
        case Q5_0: all_rows_over_packed<Q5_0>(tile, a, T, acc.data(), pf); break;
        case Q4_0: all_rows_over_packed<Q4_0>(tile, a, T, acc.data(), pf); break;
        case Q4_K: all_rows_over_packed<Q4_K>(tile, a, T, acc.data(), pf); break;
        default: all_rows_over_packed<Q6_K>(tile, a, T, acc.data(), pf); break;
      }
    } else {
      for (int64_t c0 = 0; c0 < nc; c0 += step) {
        const int64_t c1 = std::min(nc, c0 + step);
        decode(w.type, tile, w.row_bytes, nr, K, c0, c1, view, chunks ? none : pf);
        rows(type, view, a, T, c0, c1, acc.data(), chunks ? pf : none);
      }
    }
    for (int64_t t = 0; t < T; t++) {
      float* dst = y + col + t * ldy;
      const float* lanes = acc.data() + t * kLanes;
      for (int i = 0; i < nr; i++) dst[i] = bias ? lanes[perm(i)] + bias[col + i] : lanes[perm(i)];
    }
  });
}

}  // namespace tf

#endif  // TF_INT8_AVX2
