// The int8-activation matrix products on AVX512-VNNI (see linear_int8.h for what they compute; the
// AVX2 path, linear_int8_avx2.cpp, gives the same bits without VNNI).
//
// Layout: a thread takes a tile of 16 weight rows and decodes it once, over the whole of K, into a
// strip: for each block of 32 inputs, 8 vectors whose lane p holds 4 consecutive codes of weight
// row perm(p) (the codes offset by +128 so that they are unsigned bytes, as `vpdpbusd` wants them),
// plus one scale and one min per lane and group. Every input row of the call then runs over the
// strip: per block, 8 `vpdpbusd` with the row's 4 int8 values broadcast give the 16 rows' integer
// dot products, exact in int32; the +128 is taken back in integers, then one fp32 multiply-add per
// block applies the scales. A window of T rows decodes the weights once and pays ~12 vector
// instructions per row and block of 16 x 32 weights (the fp32 mode pays 32 FMAs).
//
// Packed tiles (linear_int8.h, built at load for the types below) skip the strip: the transposes
// were done once, so each block's 8 lines are a few loads and bit operations away, made in
// registers while up to 8 rows use them. At one row the file-order decode cost ~1.5x the packed.
// Both routes run `row_block` per row and block, so they give the same bits.
#include "linear_int8.h"
#include "linear_int8_tiles.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "blocks.h"
#include "quant.h"
#include "simd.h"

namespace tf {

#if defined(TF_INT8_VNNI)

const char* int8_path() { return "avx512-vnni"; }

namespace {

using int8::kBlock;
using int8::kLanes;
using int8::Prefetch;
using int8::perm;
using int8::PackedLayout;
using int8::kQ4kQs;
using int8::kQ6kQh;
using int8::kQ6kSc;
using int8::kQ6kD;

struct alignas(64) Line {
  uint8_t b[64];
};

// Step 1 of the header for one block of 32 inputs; returns the sums of q over its two halves.
inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* half_sums) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  // a NaN among the inputs makes the block's outputs NaN, as the fp32 mode's would be
  const bool nan = (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q)) != 0;
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  *d = nan ? NAN : amax / 127.0f;
  const __m512 iv = _mm512_set1_ps(id);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512i qa = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a, iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512i qb = _mm512_cvt_roundps_epi32(_mm512_mul_ps(b, iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  qa = _mm512_max_epi32(_mm512_min_epi32(qa, hi), lo);
  qb = _mm512_max_epi32(_mm512_min_epi32(qb, hi), lo);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
  half_sums[0] = _mm512_reduce_add_epi32(qa);  // integers: exact in any order
  half_sums[1] = _mm512_reduce_add_epi32(qb);
}

// The rounded activations of a call, and the per-block integers and floats the products need.
struct Acts {
  int64_t K = 0, nc = 0;
  std::vector<int8_t> q;     // [T, K]
  std::vector<float> d;      // [T, nc]  scale of each block
  std::vector<int32_t> c16;  // [T, 2 nc] 128 * sum of q over each half block (the code offset, Q6_K)
  std::vector<int32_t> c32;  // [T, nc]  128 * sum of q over the block (the code offset)
  std::vector<float> dsum;   // [T, nc]  d * sum of q over the block (what a min multiplies)

  void build(const float* x, int64_t T, int64_t ldx, int64_t K_) {
    K = K_, nc = K_ / kBlock;
    q.resize(T * K), d.resize(T * nc), c16.resize(2 * T * nc), c32.resize(T * nc), dsum.resize(T * nc);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        for (int64_t c = 0; c < nc; c++) {
          int32_t s[2];
          const int64_t i = t * nc + c;
          quantize_block(x + t * ldx + c * kBlock, q.data() + t * K + c * kBlock, &d[i], s);
          c16[2 * i] = 128 * s[0];
          c16[2 * i + 1] = 128 * s[1];
          c32[i] = 128 * (s[0] + s[1]);
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

// Rows i < nr of a tile at `base` (row stride `stride`), decoded into the strip.
template <int TYPE>
void decode_tile(const uint8_t* base, int64_t stride, int nr, int64_t K, Strip& s, Prefetch& pf) {
  const int64_t nb = K / block_elems(TYPE), ng = K / kGroup;
  const int bb = block_bytes(TYPE);
  uint8_t* stage = s.codes[0].b;  // first row-major per group ([g][row][16 codes]), transposed below
  const __m128i flip = _mm_set1_epi8(char(0x80));
  for (int i = 0; i < nr; i++) {
    pf.part();
    const int p = perm(i);
    const uint8_t* row = base + i * stride;
    int64_t g = 0;
    for (int64_t b = 0; b < nb; b++) {
      visit_block<TYPE>(row + b * bb, [&](__m128i q, float scale, float min) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(stage + (g * kLanes + i) * 16), _mm_xor_si128(q, flip));
        s.sc[g * kLanes + p] = scale;
        if ((g & 1) == 0) s.mn[(g >> 1) * kLanes + p] = min;
        g++;
      });
    }
  }
  for (int i = nr; i < kLanes; i++) {  // lanes without a row: scale 0, their codes never matter
    const int p = perm(i);
    for (int64_t g = 0; g < ng; g++) s.sc[g * kLanes + p] = 0.0f;
    for (int64_t c = 0; c < ng / 2; c++) s.mn[c * kLanes + p] = 0.0f;
  }
  for (int64_t g = 0; g < ng; g++) {  // 16 rows x 4 dwords -> 4 vectors of one dword per row
    __m512i* v = reinterpret_cast<__m512i*>(stage + g * 256);
    const __m512i a = _mm512_load_si512(v), b = _mm512_load_si512(v + 1);
    const __m512i c = _mm512_load_si512(v + 2), d = _mm512_load_si512(v + 3);
    const __m512i ab0 = _mm512_unpacklo_epi32(a, b), ab1 = _mm512_unpackhi_epi32(a, b);
    const __m512i cd0 = _mm512_unpacklo_epi32(c, d), cd1 = _mm512_unpackhi_epi32(c, d);
    _mm512_store_si512(v, _mm512_unpacklo_epi64(ab0, cd0));
    _mm512_store_si512(v + 1, _mm512_unpackhi_epi64(ab0, cd0));
    _mm512_store_si512(v + 2, _mm512_unpacklo_epi64(ab1, cd1));
    _mm512_store_si512(v + 3, _mm512_unpackhi_epi64(ab1, cd1));
  }
}

// 16 rows' 16 bytes at p + i * stride -> 4 vectors; vector j, lane perm(i): dword j of row i.
inline void load_transposed(const uint8_t* p, int64_t stride, __m512i out[4]) {
  __m512i r[4];
  for (int m = 0; m < 4; m++) {
    const uint8_t* q = p + 4 * m * stride;
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + stride)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 2 * stride)), 2);
    r[m] = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 3 * stride)), 3);
  }
  const __m512i ab0 = _mm512_unpacklo_epi32(r[0], r[1]), ab1 = _mm512_unpackhi_epi32(r[0], r[1]);
  const __m512i cd0 = _mm512_unpacklo_epi32(r[2], r[3]), cd1 = _mm512_unpackhi_epi32(r[2], r[3]);
  out[0] = _mm512_unpacklo_epi64(ab0, cd0);
  out[1] = _mm512_unpackhi_epi64(ab0, cd0);
  out[2] = _mm512_unpacklo_epi64(ab1, cd1);
  out[3] = _mm512_unpackhi_epi64(ab1, cd1);
}

// 4 bytes at p + i * stride for the 16 rows, in lane perm(i): plain loads (gathers are slow on
// some CPUs, Zen 4 among them).
inline __m512i load_dwords(const uint8_t* p, int64_t stride) {
  __m128i x[4];
  for (int L = 0; L < 4; L++) {  // lanes 4L .. 4L + 3 hold rows L, 4 + L, 8 + L, 12 + L
    int32_t v[4];
    for (int m = 0; m < 4; m++) std::memcpy(&v[m], p + (4 * m + L) * stride, 4);
    x[L] = _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(_mm_cvtsi32_si128(v[0]), v[1], 1), v[2], 2), v[3], 3);
  }
  const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(x[0]), x[1], 1);
  const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(x[2]), x[3], 1);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// The f16 in the low (high: `upper`) half of each lane's dword, as 16 floats.
inline __m512 f16_of(__m512i v, bool upper) {
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(upper ? _mm512_srli_epi32(v, 16) : v));
}

// Q8_0 and Q5_0 (most of the default model's bytes) and Q4_0 (of many other GGUF files), all 16
// rows of a tile at once, in two steps that the wide decode and the packed tiles share (so both give
// the codes the per-row decode gives):
//  read_block: one block of the 16 rows, transposed. Returns the head (lane perm(i): row i's d in
//    its low 16 bits). Q8_0: codes[0..7], the 8 lines (code + 128). Q5_0 / Q4_0: codes[0..3], the qs
//    nibble vectors t[j] (lane perm(i): qs bytes 4j .. 4j + 3 of row i); Q5_0 also masks[0..7], line
//    4h + j's "fifth bit set" mask, bit 4 lane + q.
//  block_lines: those into the block's 8 lines (Q4_0: nibble + 120 = code - 8 + 128; Q5_0:
//    (nibble | 0x70) + 16 * fifth bit = code - 16 + 128; low nibbles are elements 4j .. 4j + 3,
//    high ones 16 + 4j ..).
template <int TYPE>
inline __m512i read_block(const uint8_t* blk, int64_t stride, __m512i* codes, uint64_t* masks) {
  static_assert(TYPE == Q8_0 || TYPE == Q5_0 || TYPE == Q4_0, "wide decode");
  if constexpr (TYPE == Q8_0) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    for (int h = 0; h < 2; h++) {
      load_transposed(blk + 2 + 16 * h, stride, codes + 4 * h);
      for (int j = 0; j < 4; j++) codes[4 * h + j] = _mm512_xor_si512(codes[4 * h + j], flip);
    }
    return load_dwords(blk, stride);
  } else if constexpr (TYPE == Q4_0) {
    load_transposed(blk + 2, stride, codes);
    return load_dwords(blk, stride);
  } else {
    // d and the low half of qh, then qh's high half: the block's first 8 bytes in one transposed
    // load, cheaper than two passes of 16 dword loads
    __m512i first[4];
    load_transposed(blk, stride, first);
    load_transposed(blk + 6, stride, codes);
    const __m512i qh = _mm512_or_si512(_mm512_srli_epi32(first[0], 16), _mm512_slli_epi32(first[1], 16));
    for (int j = 0; j < 4; j++) {
      for (int h = 0; h < 2; h++) {
        // byte q of each lane: bit 16h + 4j + q of qh, i.e. bit 4(j & 1) + q of qh's byte 2h + j / 2
        const int src = 2 * h + j / 2;
        const __m512i bytes = _mm512_shuffle_epi8(
            qh, _mm512_set4_epi32(0x0C0C0C0C + src * 0x01010101, 0x08080808 + src * 0x01010101,
                                  0x04040404 + src * 0x01010101, src * 0x01010101));
        const __m512i bit = _mm512_set1_epi32(int32_t(uint32_t(0x08040201u) << (4 * (j & 1))));
        masks[4 * h + j] = _mm512_test_epi8_mask(bytes, bit);
      }
    }
    return first[0];
  }
}

template <int TYPE>
inline void block_lines(const __m512i* codes, const uint64_t* masks, __m512i* v) {
  if constexpr (TYPE == Q8_0) {
    for (int j = 0; j < 8; j++) v[j] = codes[j];
  } else {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++) {
      const __m512i lo = codes[j], hi = _mm512_srli_epi16(codes[j], 4);
      if constexpr (TYPE == Q4_0) {
        const __m512i offset = _mm512_set1_epi8(120);
        v[j] = _mm512_add_epi8(_mm512_and_si512(lo, low4), offset);
        v[4 + j] = _mm512_add_epi8(_mm512_and_si512(hi, low4), offset);
      } else {
        const __m512i c70 = _mm512_set1_epi8(0x70), sixteen = _mm512_set1_epi8(0x10);
        const __m512i lo70 = _mm512_ternarylogic_epi32(lo, low4, c70, 0xEA);  // (a & b) | c
        const __m512i hi70 = _mm512_ternarylogic_epi32(hi, low4, c70, 0xEA);
        v[j] = _mm512_mask_add_epi8(lo70, __mmask64(masks[j]), lo70, sixteen);
        v[4 + j] = _mm512_mask_add_epi8(hi70, __mmask64(masks[4 + j]), hi70, sixteen);
      }
    }
  }
}

template <int TYPE>
void decode_tile_wide(const uint8_t* base, int64_t stride, int64_t K, Strip& s, Prefetch& pf) {
  for (int64_t b = 0; b < K / 32; b++) {
    pf.part();
    __m512i codes[8], v[8];
    uint64_t masks[8];
    const __m512 d = f16_of(read_block<TYPE>(base + b * block_bytes(TYPE), stride, codes, masks), false);
    _mm512_storeu_ps(&s.sc[2 * b * kLanes], d);
    _mm512_storeu_ps(&s.sc[(2 * b + 1) * kLanes], d);
    block_lines<TYPE>(codes, masks, v);
    __m512i* lines = reinterpret_cast<__m512i*>(s.codes[8 * b].b);
    for (int j = 0; j < 8; j++) _mm512_store_si512(lines + j, v[j]);
  }
}

// Byte `byte` of every dword lane, as 16 unsigned ints.
inline __m512i byte_of(__m512i v, int byte) {
  return _mm512_and_si512(_mm512_srli_epi32(v, 8 * byte), _mm512_set1_epi32(0xFF));
}

// Q4_K: super-blocks of 256, sub-blocks of 32 with 6-bit scales and mins (scale_min_k4), 16 rows
// at once; scale = d * sc and min = -(dmin * m), as the per-row decode computes them. `head`: the
// super-block's first 16 bytes transposed (d and dmin, scales 0-3, 4-7, 8-11).
inline void q4k_scale_min(const __m512i* head, int j, __m512& scale, __m512& min) {
  const __m512i m6 = _mm512_set1_epi32(63), m4 = _mm512_set1_epi32(15);
  const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head[0]));
  const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head[0], 16)));
  __m512i sc, mn;
  if (j < 4) {
    sc = _mm512_and_si512(byte_of(head[1], j), m6);
    mn = _mm512_and_si512(byte_of(head[2], j), m6);
  } else {
    const __m512i hi = byte_of(head[3], j - 4);
    sc = _mm512_or_si512(_mm512_and_si512(hi, m4), _mm512_slli_epi32(_mm512_srli_epi32(byte_of(head[1], j - 4), 6), 4));
    mn = _mm512_or_si512(_mm512_srli_epi32(hi, 4), _mm512_slli_epi32(_mm512_srli_epi32(byte_of(head[2], j - 4), 6), 4));
  }
  scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
  min = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn)));
}

// Q4_K sub-block 2jj + high's 8 lines, from the 8 transposed vectors of qs bytes 32 jj ..
inline void q4k_lines(const __m512i* t, bool high, __m512i* v) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(char(0x80));
  for (int j = 0; j < 8; j++)
    v[j] = _mm512_ternarylogic_epi32(high ? _mm512_srli_epi16(t[j], 4) : t[j], low4, flip, 0xEA);  // (a & b) | c
}

void decode_tile_q4k(const uint8_t* base, int64_t stride, int64_t K, Strip& s, Prefetch& pf) {
  const int64_t nb = K / 256;
  const int bb = block_bytes(Q4_K);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = base + b * bb;
    __m512i head[4];
    load_transposed(blk, stride, head);
    for (int j = 0; j < 8; j++) {  // sub-block j = chunk 8b + j
      const int64_t c = 8 * b + j;
      __m512 scale, min;
      q4k_scale_min(head, j, scale, min);
      _mm512_storeu_ps(&s.sc[2 * c * kLanes], scale);
      _mm512_storeu_ps(&s.sc[(2 * c + 1) * kLanes], scale);
      _mm512_storeu_ps(&s.mn[c * kLanes], min);
    }
    for (int jj = 0; jj < 4; jj++) {  // 32 bytes of qs: low nibbles are sub-block 2jj, high 2jj + 1
      pf.part();
      __m512i t[8];
      load_transposed(blk + 16 + 32 * jj, stride, t);
      load_transposed(blk + 16 + 32 * jj + 16, stride, t + 4);
      __m512i* lo = reinterpret_cast<__m512i*>(s.codes[8 * (8 * b + 2 * jj)].b);
      __m512i v[8];
      for (int high = 0; high < 2; high++) {
        q4k_lines(t, high, v);
        for (int j = 0; j < 8; j++) _mm512_store_si512(lo + 8 * high + j, v[j]);
      }
    }
  }
}

// Q6_K: super-blocks of 256 in two halves of 128; code = 4 bits of ql | 2 bits of qh << 4, minus
// 32, stored + 128; one signed 8-bit scale per group of 16, times d. `sc`: the 16 scale bytes
// transposed; group g's scale:
inline __m512 q6k_scale(const __m512i* sc, __m512 d, int g) {
  const __m512i v = _mm512_srai_epi32(_mm512_slli_epi32(sc[g / 4], 24 - 8 * (g % 4)), 24);
  return _mm512_mul_ps(d, _mm512_cvtepi32_ps(v));
}

// Chunk k (of 32) of a half's lines: `ql` its 16 transposed vectors of ql, `qh` its 8 of qh; ql
// bytes 32 (k & 1) + l, nibble k / 2, qh bits 2k.
inline void q6k_lines(const __m512i* ql, const __m512i* qh, int k, __m512i* v) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x30), bias = _mm512_set1_epi8(96);
  for (int j = 0; j < 8; j++) {
    const __m512i l = ql[8 * (k & 1) + j];
    const __m512i nib = k < 2 ? l : _mm512_srli_epi16(l, 4);
    const __m512i hv = qh[j];
    const __m512i hb = k == 0 ? _mm512_slli_epi16(hv, 4)
                     : k == 1 ? _mm512_slli_epi16(hv, 2)
                     : k == 2 ? hv
                              : _mm512_srli_epi16(hv, 2);
    const __m512i code = _mm512_ternarylogic_epi32(nib, low4, _mm512_and_si512(hb, two), 0xEA);
    v[j] = _mm512_add_epi8(code, bias);
  }
}

void decode_tile_q6k(const uint8_t* base, int64_t stride, int64_t K, Strip& s, Prefetch& pf) {
  const int64_t nb = K / 256;
  const int bb = block_bytes(Q6_K);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = base + b * bb;
    const __m512 d = f16_of(load_dwords(blk + 206, stride), true);  // the block's last 2 bytes
    __m512i sc[4];
    load_transposed(blk + 192, stride, sc);
    for (int g = 0; g < 16; g++) _mm512_storeu_ps(&s.sc[(16 * b + g) * kLanes], q6k_scale(sc, d, g));  // chunk 8b + g / 2
    for (int h = 0; h < 2; h++) {
      pf.part();
      __m512i ql[16], qh[8];  // ql bytes 64h + 16i .. (i = 0..3), qh bytes 32h + 16i .. (i = 0, 1)
      for (int i = 0; i < 4; i++) load_transposed(blk + 64 * h + 16 * i, stride, ql + 4 * i);
      for (int i = 0; i < 2; i++) load_transposed(blk + 128 + 32 * h + 16 * i, stride, qh + 4 * i);
      for (int k = 0; k < 4; k++) {
        __m512i v[8];
        q6k_lines(ql, qh, k, v);
        __m512i* lines = reinterpret_cast<__m512i*>(s.codes[8 * (8 * b + 4 * h + k)].b);
        for (int j = 0; j < 8; j++) _mm512_store_si512(lines + j, v[j]);
      }
    }
  }
}

void decode(int type, const uint8_t* base, int64_t stride, int nr, int64_t K, Strip& s, Prefetch pf) {
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

inline __m512i bcast4(const int8_t* p) {  // 4 int8 activations in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One input row t over one block c of a tile's 16 weight rows (their codes in v, as unsigned
// bytes): the integer dot products, minus the offset; acc = float(dot) * (scale * d) + acc (for
// Q6_K: its two halves, first then second); then, for types with mins, acc = min * (d * sum q) +
// acc. Every path to a tile's outputs (strip or packed, any R) runs this sequence per row and block.
template <bool HALVES, bool MINS>
inline __m512 row_block(const __m512i* v, __m512 sa, __m512 sb, __m512 mn, const Acts& a, int64_t t, int64_t c,
                        __m512 acc) {
  const int64_t nc = a.nc;
  const __m512i zero = _mm512_setzero_si512();
  const int8_t* xq = a.q.data() + t * a.K + c * kBlock;
  const __m512 dv = _mm512_set1_ps(a.d[t * nc + c]);
  // two chains of 4 (the integer sums are exact, so how they are split is free)
  __m512i i0 = _mm512_dpbusd_epi32(zero, v[0], bcast4(xq));
  __m512i i1 = _mm512_dpbusd_epi32(zero, v[1], bcast4(xq + 4));
  i0 = _mm512_dpbusd_epi32(i0, v[2], bcast4(xq + 8));
  i1 = _mm512_dpbusd_epi32(i1, v[3], bcast4(xq + 12));
  if (HALVES) {
    const __m512i h0 = _mm512_sub_epi32(_mm512_add_epi32(i0, i1), _mm512_set1_epi32(a.c16[2 * (t * nc + c)]));
    __m512i j0 = _mm512_dpbusd_epi32(zero, v[4], bcast4(xq + 16));
    __m512i j1 = _mm512_dpbusd_epi32(zero, v[5], bcast4(xq + 20));
    j0 = _mm512_dpbusd_epi32(j0, v[6], bcast4(xq + 24));
    j1 = _mm512_dpbusd_epi32(j1, v[7], bcast4(xq + 28));
    const __m512i h1 = _mm512_sub_epi32(_mm512_add_epi32(j0, j1), _mm512_set1_epi32(a.c16[2 * (t * nc + c) + 1]));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h0), _mm512_mul_ps(sa, dv), acc);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h1), _mm512_mul_ps(sb, dv), acc);
  } else {
    i0 = _mm512_dpbusd_epi32(i0, v[4], bcast4(xq + 16));
    i1 = _mm512_dpbusd_epi32(i1, v[5], bcast4(xq + 20));
    i0 = _mm512_dpbusd_epi32(i0, v[6], bcast4(xq + 24));
    i1 = _mm512_dpbusd_epi32(i1, v[7], bcast4(xq + 28));
    const __m512i h = _mm512_sub_epi32(_mm512_add_epi32(i0, i1), _mm512_set1_epi32(a.c32[t * nc + c]));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_mul_ps(sa, dv), acc);
  }
  if (MINS) acc = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.dsum[t * nc + c]), acc);
  return acc;
}

// R input rows over one strip.
template <int R, bool HALVES, bool MINS>
void rows_over_strip(const Strip& s, const Acts& a, const int64_t* ts, __m512* out) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < a.nc; c++) {
    const __m512i* lines = reinterpret_cast<const __m512i*>(s.codes[8 * c].b);
    __m512i v[8];
    for (int j = 0; j < 8; j++) v[j] = _mm512_load_si512(lines + j);
    const __m512 sa = _mm512_loadu_ps(&s.sc[2 * c * kLanes]);
    const __m512 sb = HALVES ? _mm512_loadu_ps(&s.sc[(2 * c + 1) * kLanes]) : sa;
    const __m512 mn = MINS ? _mm512_loadu_ps(&s.mn[c * kLanes]) : sa;
    for (int r = 0; r < R; r++) acc[r] = row_block<HALVES, MINS>(v, sa, sb, mn, a, ts[r], c, acc[r]);
  }
  for (int r = 0; r < R; r++) out[r] = acc[r];
}

// Every input row of the call, 8, 4, 2 or 1 at a time through rows(R, ts, out), into y's nr columns.
template <class Rows>
void all_rows(Rows rows, int64_t T, int nr, const float* bias, float* y, int64_t ldy) {
  int64_t ts[8];
  __m512 out[8];
  alignas(64) float lanes[kLanes];
  for (int64_t t = 0; t < T;) {
    const int R = T - t >= 8 ? 8 : T - t >= 4 ? 4 : T - t >= 2 ? 2 : 1;
    for (int r = 0; r < R; r++) ts[r] = t + r;
    if (R == 8)
      rows(std::integral_constant<int, 8>(), ts, out);
    else if (R == 4)
      rows(std::integral_constant<int, 4>(), ts, out);
    else if (R == 2)
      rows(std::integral_constant<int, 2>(), ts, out);
    else
      rows(std::integral_constant<int, 1>(), ts, out);
    for (int r = 0; r < R; r++) {
      _mm512_store_ps(lanes, out[r]);
      float* dst = y + (t + r) * ldy;
      for (int i = 0; i < nr; i++) dst[i] = bias ? lanes[perm(i)] + bias[i] : lanes[perm(i)];
    }
    t += R;
  }
}

// One file-order tile (16 rows at `base`, row stride `stride`) packed into `out`.
template <int TYPE>
void pack_tile(const uint8_t* base, int64_t stride, int64_t nb, uint8_t* out) {
  using L = PackedLayout<TYPE>;
  uint8_t* planes = out + L::masks_at(nb);
  uint16_t* scales = reinterpret_cast<uint16_t*>(out + L::scales_at(nb));
  for (int64_t b = 0; b < nb; b++) {
    __m512i codes[8];
    uint64_t m[8];
    const __m512i head = read_block<TYPE>(base + b * block_bytes(TYPE), stride, codes, m);
    __m512i* dst = reinterpret_cast<__m512i*>(out) + b * L::kCodes;
    for (int j = 0; j < L::kCodes; j++) _mm512_storeu_si512(dst + j, codes[j]);
    if constexpr (TYPE == Q5_0) {  // the 8 masks as bit planes: bit L of byte i is bit i of mask L
      __m512i f = _mm512_setzero_si512();
      for (int line = 0; line < 8; line++) f = _mm512_or_si512(f, _mm512_maskz_mov_epi8(m[line], _mm512_set1_epi8(char(1 << line))));
      _mm512_storeu_si512(planes + 64 * b, f);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(scales + 16 * b), _mm512_cvtepi32_epi16(head));
  }
}

template <int TYPE>
void pack_tile_k(const uint8_t* base, int64_t stride, int64_t nsb, uint8_t* out) {
  for (int64_t b = 0; b < nsb; b++) {
    const uint8_t* blk = base + b * block_bytes(TYPE);
    uint8_t* dst = out + b * kLanes * block_bytes(TYPE);  // Q6_K's super-blocks are not all 64-byte aligned
    auto put = [&](int64_t at, int64_t from) {  // 16 bytes at `from` of each row, transposed, to dst + at
      __m512i t[4];
      load_transposed(blk + from, stride, t);
      for (int j = 0; j < 4; j++) _mm512_storeu_si512(dst + at + 64 * j, t[j]);
    };
    if constexpr (TYPE == Q4_K) {
      for (int i = 0; i < 8; i++) put(256 * i, 16 + 16 * i);  // the 128 qs bytes
      put(kQ4kQs, 0);
    } else {
      for (int i = 0; i < 8; i++) put(256 * i, 16 * i);  // ql
      for (int i = 0; i < 4; i++) put(kQ6kQh + 256 * i, 128 + 16 * i);  // qh
      put(kQ6kSc, 192);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kQ6kD),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(load_dwords(blk + 206, stride), 16)));
    }
  }
}

// R input rows over a packed K-quant tile: per super-block, its scales (and mins) into `sc` / `mn`,
// then each chunk of 32 unpacked into registers and run by the rows.
template <int TYPE, int R>
void rows_over_packed_k(const uint8_t* tile, const Acts& a, const int64_t* ts, __m512* out, Prefetch& pf) {
  constexpr bool Q6 = TYPE == Q6_K;
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  __m512 sc[16], mn[8];  // Q6_K: a scale per group of 16; Q4_K: a scale and a min per chunk of 32
  for (int64_t b = 0; b < a.K / 256; b++) {
    pf.part();
    const uint8_t* sb = tile + b * kLanes * block_bytes(TYPE);
    const __m512i* p = reinterpret_cast<const __m512i*>(sb);
    if constexpr (Q6) {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + kQ6kD)));
      __m512i scv[4];
      for (int i = 0; i < 4; i++) scv[i] = _mm512_loadu_si512(p + kQ6kSc / 64 + i);
      for (int g = 0; g < 16; g++) sc[g] = q6k_scale(scv, d, g);
      for (int h = 0; h < 2; h++) {
        __m512i ql[16], qh[8];
        for (int i = 0; i < 16; i++) ql[i] = _mm512_loadu_si512(p + 16 * h + i);
        for (int i = 0; i < 8; i++) qh[i] = _mm512_loadu_si512(p + kQ6kQh / 64 + 8 * h + i);
        for (int k = 0; k < 4; k++) {
          const int chunk = 4 * h + k;
          __m512i v[8];
          q6k_lines(ql, qh, k, v);
          for (int r = 0; r < R; r++)
            acc[r] = row_block<true, false>(v, sc[2 * chunk], sc[2 * chunk + 1], sc[0], a, ts[r], 8 * b + chunk, acc[r]);
        }
      }
    } else {
      __m512i head[4];
      for (int i = 0; i < 4; i++) head[i] = _mm512_loadu_si512(p + kQ4kQs / 64 + i);
      for (int j = 0; j < 8; j++) q4k_scale_min(head, j, sc[j], mn[j]);
      for (int jj = 0; jj < 4; jj++) {
        __m512i t[8];
        for (int i = 0; i < 8; i++) t[i] = _mm512_loadu_si512(p + 8 * jj + i);
        for (int high = 0; high < 2; high++) {
          const int j = 2 * jj + high;
          __m512i v[8];
          q4k_lines(t, high, v);
          for (int r = 0; r < R; r++) acc[r] = row_block<false, true>(v, sc[j], sc[j], mn[j], a, ts[r], 8 * b + j, acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; r++) out[r] = acc[r];
}

// R input rows over a packed tile, each block's lines made in registers (block_lines) as the rows
// reach it (no strip: at a few rows the decode's stores and loads were most of a step).
template <int TYPE, int R>
void rows_over_packed(const uint8_t* tile, const Acts& a, const int64_t* ts, __m512* out, Prefetch& pf) {
  using L = PackedLayout<TYPE>;
  const __m512i* codes = reinterpret_cast<const __m512i*>(tile);
  const uint8_t* planes = tile + L::masks_at(a.nc);
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(tile + L::scales_at(a.nc));
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < a.nc; c++) {
    pf.part();
    __m512i cv[8], v[8];
    for (int j = 0; j < L::kCodes; j++) cv[j] = _mm512_loadu_si512(codes + c * L::kCodes + j);
    uint64_t masks[8];
    if constexpr (TYPE == Q5_0) {
      const __m512i f = _mm512_loadu_si512(planes + 64 * c);
      for (int line = 0; line < 8; line++) masks[line] = _mm512_test_epi8_mask(f, _mm512_set1_epi8(char(1 << line)));
    }
    block_lines<TYPE>(cv, masks, v);
    const __m512 sa = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 16 * c)));
    for (int r = 0; r < R; r++) acc[r] = row_block<false, false>(v, sa, sa, sa, a, ts[r], c, acc[r]);
  }
  for (int r = 0; r < R; r++) out[r] = acc[r];
}

template <int TYPE>
void packed_rows(const uint8_t* tile, const Acts& a, int64_t T, const float* bias, float* y, int64_t ldy,
                 Prefetch& pf) {
  constexpr bool kquant = TYPE == Q4_K || TYPE == Q6_K;
  pf.spread(kquant ? a.K / 256 : a.nc);  // the next tile's prefetch goes with the first rows' pass
  all_rows([&](auto R, const int64_t* ts, __m512* out) {
    if constexpr (kquant)
      rows_over_packed_k<TYPE, R()>(tile, a, ts, out, pf);
    else
      rows_over_packed<TYPE, R()>(tile, a, ts, out, pf);
  }, T, kLanes, bias, y, ldy);
}

}  // namespace

void quantize_rows_int8(const float* x, int64_t T, int64_t ldx, int64_t K, int8_t* q, float* d) {
  TORCH_CHECK(K % kBlock == 0, "int8 activations need K to be a multiple of ", kBlock);
  thread_local Acts a;
  a.build(x, T, ldx, K);
  std::memcpy(q, a.q.data(), T * K);
  std::memcpy(d, a.d.data(), T * a.nc * sizeof(float));
}

int int8_packed_type(int type, int64_t n) { return int8::packed_type(type, n); }

void pack_int8(const WeightSpec& w, int64_t K, uint8_t* out) {
  int8::pack_tiles(w, K, out, [&](const uint8_t* src, int64_t stride, uint8_t* dst) {
    switch (w.type) {
      case Q8_0: return pack_tile<Q8_0>(src, stride, K / 32, dst);
      case Q5_0: return pack_tile<Q5_0>(src, stride, K / 32, dst);
      case Q4_0: return pack_tile<Q4_0>(src, stride, K / 32, dst);
      case Q4_K: return pack_tile_k<Q4_K>(src, stride, K / 256, dst);
      default: return pack_tile_k<Q6_K>(src, stride, K / 256, dst);
    }
  });
}

void linear_int8(const float* x, int64_t T, int64_t ldx, int64_t K, const std::vector<WeightSpec>& weights,
                 const float* bias, float* y, int64_t ldy) {
  int8::check_inputs(K);
  thread_local Acts acts;
  acts.build(x, T, ldx, K);
  const Acts& a = acts;
  int8::for_each_tile(weights, K, T, y, ldy, [&](const WeightSpec& w, const uint8_t* rows, int nr, int64_t col,
                                                 Prefetch& pf) {
    const float* b = bias ? bias + col : nullptr;
    float* dst = y + col;
    switch (w.type) {
      case kPacked + Q8_0: return packed_rows<Q8_0>(rows, a, T, b, dst, ldy, pf);
      case kPacked + Q5_0: return packed_rows<Q5_0>(rows, a, T, b, dst, ldy, pf);
      case kPacked + Q4_0: return packed_rows<Q4_0>(rows, a, T, b, dst, ldy, pf);
      case kPacked + Q4_K: return packed_rows<Q4_K>(rows, a, T, b, dst, ldy, pf);
      case kPacked + Q6_K: return packed_rows<Q6_K>(rows, a, T, b, dst, ldy, pf);
      default: break;
    }
    thread_local Strip strip;
    strip.reserve(K);
    decode(w.type, rows, w.row_bytes, nr, K, strip, pf);
    const bool halves = w.type == Q6_K;
    const bool mins = w.type == Q4_1 || w.type == Q5_1 || w.type == Q4_K || w.type == Q5_K;
    auto over_strip = [&](auto halves_c, auto mins_c) {
      all_rows([&](auto R, const int64_t* ts, __m512* out) {
        rows_over_strip<R(), decltype(halves_c)::value, decltype(mins_c)::value>(strip, a, ts, out);
      }, T, nr, b, dst, ldy);
    };
    if (halves)
      over_strip(std::true_type(), std::false_type());
    else if (mins)
      over_strip(std::false_type(), std::true_type());
    else
      over_strip(std::false_type(), std::false_type());
  });
}

#elif !defined(TF_INT8_AVX2)  // neither AVX512-VNNI nor AVX2 in this build: the mode does not exist here

const char* int8_path() { return ""; }

int int8_packed_type(int, int64_t) { return -1; }

void pack_int8(const WeightSpec&, int64_t, uint8_t*) { TORCH_CHECK(false, "this build packs no weights"); }

void quantize_rows_int8(const float*, int64_t, int64_t, int64_t, int8_t*, float*) {
  TORCH_CHECK(false, "int8 activations need AVX2 or AVX512-VNNI, which this build of the kernels does not have");
}

void linear_int8(const float*, int64_t, int64_t, int64_t, const std::vector<WeightSpec>&, const float*, float*,
                 int64_t) {
  TORCH_CHECK(false, "int8 activations need AVX2 or AVX512-VNNI, which this build of the kernels does not have");
}

#endif

}  // namespace tf
