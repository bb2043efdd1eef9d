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
// Layout: as in linear_int8.cpp, a thread decodes a tile of 16 weight rows over the whole of K into a
// strip of 64-byte lines (lane p: 4 consecutive codes of weight row perm(p)), with the same scales and
// mins. Here a line is two 256-bit halves of 8 lanes; rows run over the strip 4 at a time (8
// accumulators of the 16 registers), each broadcast of 4 activations serving both halves. Per row
// and block of 16 x 32 weights: 16 `vpmaddubsw`, 2 to 16 `vpmaddwd` (Q8_0: 16 of each, and the signs),
// where the VNNI path pays 8 `vpdpbusd`.
#include "linear_int8.h"
#include "linear_int8_tiles.h"

#if defined(TF_INT8_AVX2)

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>

#include "blocks.h"
#include "quant.h"

namespace tf {

const char* int8_path() { return "avx2"; }

// This path reads the files' row order (its decode is not what bounds it yet).
int int8_packed_type(int, int64_t) { return -1; }

void pack_int8(const WeightSpec&, int64_t, uint8_t*) { TORCH_CHECK(false, "the AVX2 int8 path packs no weights"); }

namespace {

using int8::kBlock;
using int8::kLanes;
using int8::Prefetch;
constexpr int kHalf = 8;    // lanes per 256-bit half of a line

// The 4x4 transposes of the decode put weight row 4m + L in lane 4L + m (its own inverse).
constexpr int perm(int i) { return 4 * (i % 4) + i / 4; }

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
    default: return {0, 128, 1, true};  // Q8_0
  }
}

// The bound of the header comment: no int16 of any sequence can saturate.
constexpr bool fits_int16(int type) { return kCodes(type).sums * 2 * 127 * kCodes(type).max_u <= 32767; }
static_assert(fits_int16(Q4_0) && fits_int16(Q4_1) && fits_int16(Q4_K) && fits_int16(Q5_0), "int16 bound");
static_assert(fits_int16(Q5_1) && fits_int16(Q5_K) && fits_int16(Q6_K) && fits_int16(Q8_0), "int16 bound");

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
// kCodes cancel the types' own: the stored byte is the code as the block holds it.

// Bytes [0, 16) at p + row * stride for the 8 rows of one half, transposed: out[j], lane 4l + m
// holds dword j of row 4m + 2 half + l.
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

// The f16 at p + row * stride for the 8 rows of one half, as floats (F16C: exact).
inline __m256 load_f16(const uint8_t* p, int64_t stride, int half) {
  uint16_t v[8];
  for (int i = 0; i < 8; i++) std::memcpy(&v[i], p + half_row(half, i) * stride, 2);
  __m128i h = _mm_cvtsi32_si128(v[0]);
  h = _mm_insert_epi16(h, v[1], 1), h = _mm_insert_epi16(h, v[2], 2), h = _mm_insert_epi16(h, v[3], 3);
  h = _mm_insert_epi16(h, v[4], 4), h = _mm_insert_epi16(h, v[5], 5), h = _mm_insert_epi16(h, v[6], 6);
  return _mm256_cvtph_ps(_mm_insert_epi16(h, v[7], 7));
}

inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high_nibbles(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

// Q8_0 and Q5_0 (most of the default model's bytes) and Q4_0 (of many other GGUF files).
template <int TYPE>
void decode_tile_wide(const uint8_t* base, int64_t stride, int64_t K, View s, Prefetch& pf) {
  static_assert(TYPE == Q8_0 || TYPE == Q5_0 || TYPE == Q4_0, "wide decode");
  const int64_t nb = K / 32;
  const int bb = block_bytes(TYPE);
  for (int64_t b = 0; b < nb; b++) {
    pf.part();
    const uint8_t* blk = base + b * bb;
    for (int half = 0; half < 2; half++) {
      const __m256 d = load_f16(blk, stride, half);
      _mm256_storeu_ps(&s.sc[2 * b * kLanes + half * kHalf], d);
      _mm256_storeu_ps(&s.sc[(2 * b + 1) * kLanes + half * kHalf], d);
      __m256i t[4];
      if constexpr (TYPE == Q8_0) {
        for (int h = 0; h < 2; h++) {  // bytes 16h .. 16h + 15 of the codes: group h
          load_transposed(blk + 2 + 16 * h, stride, half, t);
          for (int j = 0; j < 4; j++) _mm256_store_si256(s.half_line(8 * b + 4 * h + j, half), t[j]);
        }
      } else if constexpr (TYPE == Q4_0) {  // u = the nibble (the code + 8, as kCodes stores it)
        load_transposed(blk + 2, stride, half, t);
        for (int j = 0; j < 4; j++) {
          _mm256_store_si256(s.half_line(8 * b + j, half), low_nibbles(t[j]));
          _mm256_store_si256(s.half_line(8 * b + 4 + j, half), high_nibbles(t[j]));
        }
      } else {
        // u = nibble | 16 * bit e of qh (the code + 16, as kCodes stores it)
        load_transposed(blk + 6, stride, half, t);
        const __m256i qh = load_dwords(blk + 2, stride, half);
        for (int j = 0; j < 4; j++) {
          for (int h = 0; h < 2; h++) {  // h = 0: low nibbles, elements 4j .. 4j + 3; 1: high, 16 + 4j ..
            const __m256i nib = h == 0 ? low_nibbles(t[j]) : high_nibbles(t[j]);
            // byte q of each lane: bit 16h + 4j + q of qh, i.e. bit 4(j & 1) + q of qh's byte 2h + j / 2
            const char src = char(2 * h + j / 2);
            const __m256i bytes = _mm256_shuffle_epi8(
                qh, _mm256_setr_epi8(src, src, src, src, src + 4, src + 4, src + 4, src + 4, src + 8, src + 8,
                                     src + 8, src + 8, src + 12, src + 12, src + 12, src + 12, src, src, src, src,
                                     src + 4, src + 4, src + 4, src + 4, src + 8, src + 8, src + 8, src + 8,
                                     src + 12, src + 12, src + 12, src + 12));
            const __m256i bit = _mm256_set1_epi32(int32_t(uint32_t(0x08040201u) << (4 * (j & 1))));
            const __m256i has = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
            _mm256_store_si256(s.half_line(8 * b + 4 * h + j, half),
                               _mm256_or_si256(nib, _mm256_and_si256(has, _mm256_set1_epi8(0x10))));
          }
        }
      }
    }
  }
}

// Byte `byte` of every dword lane, as 8 unsigned ints.
inline __m256i byte_of(__m256i v, int byte) {
  return _mm256_and_si256(_mm256_srli_epi32(v, 8 * byte), _mm256_set1_epi32(0xFF));
}

// Q4_K: super-blocks of 256, sub-blocks of 32 with 6-bit scales and mins (scale_min_k4); scale =
// d * sc and min = 0 - dmin * m, as the VNNI path's wide decoder computes them.
void decode_tile_q4k(const uint8_t* base, int64_t stride, int64_t K, View s, Prefetch& pf) {
  const int64_t nb = K / 256;
  const int bb = block_bytes(Q4_K);
  const __m256i m6 = _mm256_set1_epi32(63), m4 = _mm256_set1_epi32(15);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = base + b * bb;
    for (int half = 0; half < 2; half++) {
      __m256i head[4];  // d and dmin, scales 0-3, 4-7, 8-11
      load_transposed(blk, stride, half, head);
      const __m256 d = load_f16(blk, stride, half), dmin = load_f16(blk + 2, stride, half);
      for (int j = 0; j < 8; j++) {  // sub-block j = chunk 8b + j
        __m256i sc, mn;
        if (j < 4) {
          sc = _mm256_and_si256(byte_of(head[1], j), m6);
          mn = _mm256_and_si256(byte_of(head[2], j), m6);
        } else {
          const __m256i hi = byte_of(head[3], j - 4);
          sc = _mm256_or_si256(_mm256_and_si256(hi, m4), _mm256_slli_epi32(_mm256_srli_epi32(byte_of(head[1], j - 4), 6), 4));
          mn = _mm256_or_si256(_mm256_srli_epi32(hi, 4), _mm256_slli_epi32(_mm256_srli_epi32(byte_of(head[2], j - 4), 6), 4));
        }
        const int64_t c = 8 * b + j;
        const __m256 scale = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
        _mm256_storeu_ps(&s.sc[2 * c * kLanes + half * kHalf], scale);
        _mm256_storeu_ps(&s.sc[(2 * c + 1) * kLanes + half * kHalf], scale);
        _mm256_storeu_ps(&s.mn[c * kLanes + half * kHalf],
                         _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn))));
      }
      for (int jj = 0; jj < 4; jj++) {  // 32 bytes of qs: low nibbles are sub-block 2jj, high 2jj + 1
        if (half == 0) pf.part();
        __m256i t[8];
        load_transposed(blk + 16 + 32 * jj, stride, half, t);
        load_transposed(blk + 16 + 32 * jj + 16, stride, half, t + 4);
        for (int j = 0; j < 8; j++) {
          _mm256_store_si256(s.half_line(8 * (8 * b + 2 * jj) + j, half), low_nibbles(t[j]));
          _mm256_store_si256(s.half_line(8 * (8 * b + 2 * jj + 1) + j, half), high_nibbles(t[j]));
        }
      }
    }
  }
}

// Q6_K: super-blocks of 256 in two halves of 128; u = 4 bits of ql | 2 bits of qh << 4 (the code
// + 32, as kCodes stores it); one signed 8-bit scale per group of 16, times d.
void decode_tile_q6k(const uint8_t* base, int64_t stride, int64_t K, View s, Prefetch& pf) {
  const int64_t nb = K / 256;
  const int bb = block_bytes(Q6_K);
  const __m256i two = _mm256_set1_epi8(0x30);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = base + b * bb;
    for (int half = 0; half < 2; half++) {
      const __m256 d = load_f16(blk + 208, stride, half);
      __m256i sc[4];
      load_transposed(blk + 192, stride, half, sc);
      for (int g = 0; g < 16; g++) {  // group g of the super-block: chunk 8b + g / 2
        const __m256i v = _mm256_srai_epi32(_mm256_slli_epi32(sc[g / 4], 24 - 8 * (g % 4)), 24);
        _mm256_storeu_ps(&s.sc[(16 * b + g) * kLanes + half * kHalf], _mm256_mul_ps(d, _mm256_cvtepi32_ps(v)));
      }
      for (int h = 0; h < 2; h++) {
        if (half == 0) pf.part();
        __m256i ql[16], qh[8];  // ql bytes 64h + 16i .. (i = 0..3), qh bytes 32h + 16i .. (i = 0, 1)
        for (int i = 0; i < 4; i++) load_transposed(blk + 64 * h + 16 * i, stride, half, ql + 4 * i);
        for (int i = 0; i < 2; i++) load_transposed(blk + 128 + 32 * h + 16 * i, stride, half, qh + 4 * i);
        for (int k = 0; k < 4; k++) {  // chunk of 32: ql bytes 32 (k & 1) + l, nibble k / 2, qh bits 2k
          for (int j = 0; j < 8; j++) {
            const __m256i l = ql[8 * (k & 1) + j];
            const __m256i nib = k < 2 ? low_nibbles(l) : high_nibbles(l);
            const __m256i hv = qh[j];
            const __m256i hb = k == 0 ? _mm256_slli_epi16(hv, 4)
                             : k == 1 ? _mm256_slli_epi16(hv, 2)
                             : k == 2 ? hv
                                      : _mm256_srli_epi16(hv, 2);
            _mm256_store_si256(s.half_line(8 * (8 * b + 4 * h + k) + j, half),
                               _mm256_or_si256(nib, _mm256_and_si256(hb, two)));
          }
        }
      }
    }
  }
}

void decode(int type, const uint8_t* base, int64_t stride, int nr, int64_t K, View s, Prefetch pf) {
  if (nr == kLanes) {
    switch (type) {
      case Q8_0: pf.spread(K / 32); return decode_tile_wide<Q8_0>(base, stride, K, s, pf);
      case Q5_0: pf.spread(K / 32); return decode_tile_wide<Q5_0>(base, stride, K, s, pf);
      case Q4_0: pf.spread(K / 32); return decode_tile_wide<Q4_0>(base, stride, K, s, pf);
      case Q4_K: pf.spread(K / 64); return decode_tile_q4k(base, stride, K, s, pf);
      case Q6_K: pf.spread(K / 128); return decode_tile_q6k(base, stride, K, s, pf);
      default: break;
    }
  }
  pf.spread(nr);
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

// Integer dot products, lines j0 .. j0 + n - 1 of a block by the row's activations xq[4 j ..], for
// both halves of the lines (lanes 0-7, 8-15; each broadcast of 4 activations serves both): sum over
// them of u * q, or c * q for Q8_0, in int32.
template <int TYPE>
inline void dot(const __m256i* u, const int8_t* xq, int j0, int n, __m256i sum[2]) {
  constexpr Codes code = kCodes(TYPE);
  const __m256i ones = _mm256_set1_epi16(1);
  sum[0] = sum[1] = _mm256_setzero_si256();
  for (int j = j0; j < j0 + n; j += code.sums) {
    __m256i p[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int k = j; k < j + code.sums && k < j0 + n; k++) {
      const __m256i x = bcast4(xq + 4 * k);
      for (int h = 0; h < 2; h++) {
        const __m256i a = _mm256_load_si256(u + 2 * k + h);
        if constexpr (code.sign)  // |c| (-128 -> 128, unsigned) by q with c's sign
          p[h] = _mm256_add_epi16(p[h], _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(x, a)));
        else
          p[h] = _mm256_add_epi16(p[h], _mm256_maddubs_epi16(a, x));  // within the bound of kCodes
      }
    }
    for (int h = 0; h < 2; h++) sum[h] = _mm256_add_epi32(sum[h], _mm256_madd_epi16(p[h], ones));
  }
}

// R input rows over one strip. Per block and row, in this order (the VNNI path's, lane by lane):
// the integer dot products, minus the offset; acc = float(dot) * (scale * d) + acc (for Q6_K: its
// two halves, first then second); then, for types with mins, acc = min * (d * sum q) + acc.
template <int R, int TYPE>
void rows_over_strip(const View& s, const Acts& a, const int64_t* ts, __m256 out[][2]) {
  constexpr Codes code = kCodes(TYPE);
  constexpr bool halves = TYPE == Q6_K;
  constexpr bool mins = TYPE == Q4_1 || TYPE == Q5_1 || TYPE == Q4_K || TYPE == Q5_K;
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const int64_t nc = a.nc, K = a.K;
  for (int64_t c = 0; c < nc; c++) {
    const __m256i* u = reinterpret_cast<const __m256i*>(s.codes[8 * c].b);
    const float* sa = &s.sc[2 * c * kLanes];
    const float* sb = halves ? &s.sc[(2 * c + 1) * kLanes] : sa;
    const float* mn = &s.mn[c * kLanes];
    for (int r = 0; r < R; r++) {
      const int64_t t = ts[r], i = t * nc + c;
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
  for (int r = 0; r < R; r++) out[r][0] = acc[r][0], out[r][1] = acc[r][1];
}

template <int TYPE>
void all_rows(const View& s, const Acts& a, int64_t T, int nr, const float* bias, float* y, int64_t ldy) {
  int64_t ts[4];
  __m256 out[4][2];
  alignas(64) float lanes[kLanes];
  for (int64_t t = 0; t < T;) {
    const int R = T - t >= 4 ? 4 : 1;  // 4 rows: 8 accumulators of the 16 registers
    for (int r = 0; r < R; r++) ts[r] = t + r;
    if (R == 4)
      rows_over_strip<4, TYPE>(s, a, ts, out);
    else
      rows_over_strip<1, TYPE>(s, a, ts, out);
    for (int r = 0; r < R; r++) {
      _mm256_store_ps(lanes, out[r][0]);
      _mm256_store_ps(lanes + kHalf, out[r][1]);
      float* dst = y + (t + r) * ldy;
      for (int i = 0; i < nr; i++) dst[i] = bias ? lanes[perm(i)] + bias[i] : lanes[perm(i)];
    }
    t += R;
  }
}

void rows(int type, const View& s, const Acts& a, int64_t T, int nr, const float* bias, float* y, int64_t ldy) {
  switch (type) {
    case Q4_0: return all_rows<Q4_0>(s, a, T, nr, bias, y, ldy);
    case Q4_1: return all_rows<Q4_1>(s, a, T, nr, bias, y, ldy);
    case Q5_0: return all_rows<Q5_0>(s, a, T, nr, bias, y, ldy);
    case Q5_1: return all_rows<Q5_1>(s, a, T, nr, bias, y, ldy);
    case Q8_0: return all_rows<Q8_0>(s, a, T, nr, bias, y, ldy);
    case Q4_K: return all_rows<Q4_K>(s, a, T, nr, bias, y, ldy);
    case Q5_K: return all_rows<Q5_K>(s, a, T, nr, bias, y, ldy);
    default: return all_rows<Q6_K>(s, a, T, nr, bias, y, ldy);
  }
}

}  // namespace

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
    strip.reserve(K);
    const View view(strip);
    decode(w.type, tile, w.row_bytes, nr, K, view, pf);
    rows(w.type, view, a, T, nr, bias ? bias + col : nullptr, y + col, ldy);
  });
}

}  // namespace tf

#endif  // TF_INT8_AVX2
