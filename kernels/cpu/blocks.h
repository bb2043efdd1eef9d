// Decoding GGUF blocks straight into registers: for each group of 16 weights, in element order,
// `visit(q, scale, min)` gets the group's 16 int8 codes in an SSE register, so that weight i is
// q[i] * scale + min exactly as quant.h's scalar `unpack_row` defines it. The kernels build on
// this so a weight row is read once per call and never stored unpacked.
//
// x86 only (the AVX2 and AVX-512 builds); the portable build uses `unpack_row`.
#pragma once

#include "quant.h"
#include "simd.h"

#if defined(TF_AVX512) || defined(TF_AVX2)

namespace tf {

namespace blocks {

inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m128i low_nibbles(__m128i x) { return _mm_and_si128(x, _mm_set1_epi8(0x0F)); }
inline __m128i high_nibbles(__m128i x) { return _mm_and_si128(_mm_srli_epi16(x, 4), _mm_set1_epi8(0x0F)); }

// 16 bits -> 16 bytes holding 0x10 where the bit is set (bit i -> byte i).
#if defined(__AVX512BW__) && defined(__AVX512VL__)
inline __m128i bits_to_0x10(uint32_t bits16) {  // one masked move
  return _mm_maskz_mov_epi8(__mmask16(bits16 & 0xFFFF), _mm_set1_epi8(0x10));
}
#else
inline __m128i bits_to_0x10(uint32_t bits16) {
  __m128i v = _mm_set1_epi16(short(bits16 & 0xFFFF));
  v = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
  const __m128i mask = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  v = _mm_cmpeq_epi8(_mm_and_si128(v, mask), mask);
  return _mm_and_si128(v, _mm_set1_epi8(0x10));
}
#endif

// bytes holding 0x10 where (h & u) != 0
inline __m128i flag_0x10(__m128i h, int u) {
  const __m128i uv = _mm_set1_epi8(char(u));
  return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(h, uv), uv), _mm_set1_epi8(0x10));
}

inline float half(const uint8_t* p) {  // F16C: one instruction, exact
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

}  // namespace blocks

// Visit every group of one block of type TYPE at p, in element order.
template <int TYPE, typename F>
inline void visit_block(const uint8_t* p, F&& visit) {
  using namespace blocks;
  switch (TYPE) {
    case Q4_0: {
      const float d = half(p);
      const __m128i qs = load16(p + 2), eight = _mm_set1_epi8(8);
      visit(_mm_sub_epi8(low_nibbles(qs), eight), d, 0.0f);
      visit(_mm_sub_epi8(high_nibbles(qs), eight), d, 0.0f);
      break;
    }
    case Q4_1: {
      const float d = half(p), m = half(p + 2);
      const __m128i qs = load16(p + 4);
      visit(low_nibbles(qs), d, m);
      visit(high_nibbles(qs), d, m);
      break;
    }
    case Q5_0:
    case Q5_1: {
      constexpr bool with_min = TYPE == Q5_1;
      const float d = half(p), m = with_min ? half(p + 2) : 0.0f;
      const uint8_t* q = p + (with_min ? 4 : 2);
      uint32_t qh;
      std::memcpy(&qh, q, 4);
      const __m128i qs = load16(q + 4);
      __m128i lo = _mm_or_si128(low_nibbles(qs), bits_to_0x10(qh & 0xFFFF));
      __m128i hi = _mm_or_si128(high_nibbles(qs), bits_to_0x10(qh >> 16));
      if constexpr (!with_min) {
        lo = _mm_sub_epi8(lo, _mm_set1_epi8(16));
        hi = _mm_sub_epi8(hi, _mm_set1_epi8(16));
      }
      visit(lo, d, m);
      visit(hi, d, m);
      break;
    }
    case Q8_0: {
      const float d = half(p);
      visit(load16(p + 2), d, 0.0f);
      visit(load16(p + 18), d, 0.0f);
      break;
    }
    case Q4_K:
    case Q5_K: {
      constexpr bool five = TYPE == Q5_K;
      const float d = half(p), dmin = half(p + 2);
      const uint8_t* scales = p + 4;
      const uint8_t* qh = p + 16;
      const uint8_t* qs = p + (five ? 48 : 16);
      __m128i ha = _mm_setzero_si128(), hb = _mm_setzero_si128();
      if constexpr (five) {
        ha = load16(qh);
        hb = load16(qh + 16);
      }
      for (int j = 0; j < 4; j++) {
        int s1, m1, s2, m2;
        scale_min_k4(2 * j, scales, &s1, &m1);
        scale_min_k4(2 * j + 1, scales, &s2, &m2);
        const float sc1 = d * float(s1), mn1 = -(dmin * float(m1));
        const float sc2 = d * float(s2), mn2 = -(dmin * float(m2));
        const __m128i a = load16(qs + 32 * j), b = load16(qs + 32 * j + 16);
        __m128i la = low_nibbles(a), lb = low_nibbles(b), ua = high_nibbles(a), ub = high_nibbles(b);
        if constexpr (five) {
          const int u1 = 1 << (2 * j), u2 = 2 << (2 * j);
          la = _mm_or_si128(la, flag_0x10(ha, u1));
          lb = _mm_or_si128(lb, flag_0x10(hb, u1));
          ua = _mm_or_si128(ua, flag_0x10(ha, u2));
          ub = _mm_or_si128(ub, flag_0x10(hb, u2));
        }
        visit(la, sc1, mn1);
        visit(lb, sc1, mn1);
        visit(ua, sc2, mn2);
        visit(ub, sc2, mn2);
      }
      break;
    }
    case Q6_K: {
      const uint8_t* ql = p;
      const uint8_t* qh = p + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
      const float d = half(p + 208);
      const __m128i three = _mm_set1_epi8(3), offset = _mm_set1_epi8(32);
      for (int h = 0; h < 2; h++) {
        const uint8_t* l = ql + 64 * h;
        const uint8_t* hh = qh + 32 * h;
        for (int k = 0; k < 4; k++) {  // quarters of 32 weights: ql low/high nibbles, qh bit pair k
          for (int l0 = 0; l0 < 32; l0 += 16) {
            const __m128i lv = load16(l + (k & 1) * 32 + l0);
            const __m128i nib = k < 2 ? low_nibbles(lv) : high_nibbles(lv);
            const __m128i hv = load16(hh + l0);
            const __m128i hbits = _mm_and_si128(_mm_srli_epi16(hv, 2 * k), three);
            const __m128i q = _mm_sub_epi8(_mm_or_si128(nib, _mm_slli_epi16(hbits, 4)), offset);
            visit(q, d * float(sc[8 * h + 2 * k + l0 / 16]), 0.0f);
          }
        }
      }
      break;
    }
    default:
      break;
  }
}

// 16 int8 codes -> W-lane float vectors, and the weights w = q * s + m.
#if defined(TF_AVX512)
constexpr int kRegsPerGroup = 1;
inline void group_weights(__m128i q, float s, float m, V::reg* w) {
  w[0] = V::fma(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), V::set1(s), V::set1(m));
}
#else
constexpr int kRegsPerGroup = 2;
inline void group_weights(__m128i q, float s, float m, V::reg* w) {
  const V::reg sv = V::set1(s), mv = V::set1(m);
  w[0] = V::fma(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), sv, mv);
  w[1] = V::fma(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), sv, mv);
}
#endif

}  // namespace tf

#endif
