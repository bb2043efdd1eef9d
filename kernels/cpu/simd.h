// The vector type every kernel is written against, chosen for the host at compile time.
//
// Exactness rule for everything built on it: an output's arithmetic is a fixed sequence of these
// operations, decided by the shapes of the *problem* (K, head_dim, absolute key positions), never
// by how many rows share a call or how many threads run it. Each operation is lane-wise IEEE (or,
// for exp and the reductions, a fixed composition of lane-wise IEEE operations), so a lane's
// result does not depend on its neighbours. The build uses -ffp-contract=off and no fast-math, so
// the compiler cannot fuse or reorder what is written here.
//
// Three paths: AVX-512F (16 lanes), AVX2+FMA+F16C (8 lanes), and a portable scalar path (1 lane)
// for every other CPU (aarch64 included). Different paths give different last bits; one machine
// always runs one path for every call, which is what losslessness needs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(TF_FORCE_AVX2)
#define TF_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TF_AVX2 1
#include <immintrin.h>
// `vpdpbusd` on 256 bits (unsigned bytes times signed bytes, 4 products per int32 lane, no
// saturation) for the int8 kernels' AVX2 paths: AVX-VNNI (Intel's client cores from Alder Lake, no
// AVX-512) encodes it with VEX; AVX512-VNNI with AVX512VL has the same instruction with EVEX, which
// is what the `avx-vnni-evex` build (TF_FORCE_AVX2: the AVX2 kernels on an AVX-512 host) runs, so that
// a host without AVX-VNNI tests these paths.
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define TF_DPBUSD256 1
namespace tf {
inline __m256i dpbusd256(__m256i acc, __m256i u8, __m256i s8) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u8, s8);
#else
  return _mm256_dpbusd_epi32(acc, u8, s8);
#endif
}
// The name of the int8 paths of such a build.
#if defined(__AVXVNNI__)
constexpr const char* kDpbusd256Path = "avx-vnni";
#else
constexpr const char* kDpbusd256Path = "avx-vnni-evex";
#endif
}  // namespace tf
#endif
#else
#define TF_SCALAR 1
#endif

namespace tf {

// fp16 / bf16 bit patterns to float, scalar (used by the block decoders and the scalar path).
inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        exp--;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Constants of the exp approximation (Cody-Waite range reduction + Cephes' degree-6 polynomial):
// relative error ~2 ulp over the clamped range, more than enough for softmax weights.
constexpr float kExpHi = 88.3762626647949f;
constexpr float kExpLo = -87.3365447504f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

#if defined(TF_AVX512) || defined(TF_AVX2)
// 8-lane helpers: the AVX2 build's V, and the 8-lane kernels of an AVX-512 build
// (attention_int8_avx2.cpp), use the same ones.

inline float hmax8(__m256 a) {
  __m128 q = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  q = _mm_max_ps(q, _mm_movehl_ps(q, q));
  q = _mm_max_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// lanes >= n (of 8) replaced by x
inline __m256 keep_first8(__m256 a, int64_t n, float x) {
  if (n >= 8) return a;
  const __m256 keep = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n < 0 ? 0 : n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  return _mm256_blendv_ps(_mm256_set1_ps(x), a, keep);
}

// exp of 8 lanes, the algorithm of V::exp below. Bit for bit the AVX-512 V::exp: scalef and the two
// power-of-two products below round once, the same way.
inline __m256 exp8(__m256 x) {
  const auto set1 = [](float v) { return _mm256_set1_ps(v); };
  x = _mm256_min_ps(_mm256_max_ps(x, set1(kExpLo)), set1(kExpHi));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, set1(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, set1(kLn2Lo), r);
  __m256 p = set1(kP0);
  p = _mm256_fmadd_ps(p, r, set1(kP1));
  p = _mm256_fmadd_ps(p, r, set1(kP2));
  p = _mm256_fmadd_ps(p, r, set1(kP3));
  p = _mm256_fmadd_ps(p, r, set1(kP4));
  p = _mm256_fmadd_ps(p, r, set1(kP5));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, set1(1.0f)));
  // 2^n: n is integral in [-127, 128]; build the exponent in two halves so 128 does not overflow
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i half = _mm256_srai_epi32(ni, 1);
  __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
#endif

#if defined(TF_AVX512)

struct V {
  using reg = __m512;
  static constexpr int W = 16;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static inline reg load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline reg load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline reg load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  // Fixed reduction order: halves of 512 -> 256 -> 128 -> 64 -> 32 bits.
  static inline float hsum(reg a) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
  static inline float hmax(reg a) { return _mm512_reduce_max_ps(a); }  // max is order-free
  // 16 accumulators -> one vector whose lane i is the sum of a[i]'s lanes (a fixed tree).
  static inline reg reduce_keys(const reg* a) {
    reg u[8], w[4], z[2];
    for (int i = 0; i < 8; i++)
      u[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
      w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)
      z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  }
  // lanes >= n replaced by x
  static inline reg keep_first(reg a, int n, float x) {
    const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    return _mm512_mask_blend_ps(m, set1(x), a);
  }
  static inline reg exp(reg x) {
    x = _mm512_min_ps(_mm512_max_ps(x, set1(kExpLo)), set1(kExpHi));
    reg n = _mm512_roundscale_ps(mul(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm512_fnmadd_ps(n, set1(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, set1(kLn2Lo), r);
    reg p = set1(kP0);
    p = fma(p, r, set1(kP1));
    p = fma(p, r, set1(kP2));
    p = fma(p, r, set1(kP3));
    p = fma(p, r, set1(kP4));
    p = fma(p, r, set1(kP5));
    p = fma(mul(p, r), r, add(r, set1(1.0f)));
    return _mm512_scalef_ps(p, n);
  }
};

#elif defined(TF_AVX2)

struct V {
  using reg = __m256;
  static constexpr int W = 8;
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static inline reg load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline reg load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static inline float hsum(reg a) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
  static inline reg reduce_keys(const reg* a) {
    reg u[4], w[2];
    for (int i = 0; i < 4; i++)
      u[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; i++)
      w[i] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm256_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
    return _mm256_add_ps(_mm256_permute2f128_ps(w[0], w[1], 0x20), _mm256_permute2f128_ps(w[0], w[1], 0x31));
  }
  static inline reg keep_first(reg a, int n, float x) { return keep_first8(a, n, x); }
  static inline float hmax(reg a) { return hmax8(a); }
  static inline reg exp(reg x) { return exp8(x); }
};

#else  // portable scalar path

struct V {
  using reg = float;
  static constexpr int W = 1;
  static inline reg zero() { return 0.0f; }
  static inline reg set1(float x) { return x; }
  static inline reg load(const float* p) { return *p; }
  static inline void store(float* p, reg a) { *p = a; }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }  // two roundings (no contraction)
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg sub(reg a, reg b) { return a - b; }
  static inline reg max(reg a, reg b) { return a > b ? a : b; }
  static inline reg div(reg a, reg b) { return a / b; }
  static inline reg load_i8(const int8_t* p) { return float(*p); }
  static inline reg load_f16(const uint16_t* p) { return f16_to_f32(*p); }
  static inline reg load_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
  static inline float hsum(reg a) { return a; }
  static inline float hmax(reg a) { return a; }
  static inline reg reduce_keys(const reg* a) { return a[0]; }
  static inline reg keep_first(reg a, int n, float x) { return n >= 1 ? a : x; }
  static inline reg exp(reg x) {
    x = x < kExpLo ? kExpLo : (x > kExpHi ? kExpHi : x);
    float n = std::nearbyint(x * kLog2e);
    float r = x - n * kLn2Hi;
    r = r - n * kLn2Lo;
    float p = kP0;
    p = p * r + kP1;
    p = p * r + kP2;
    p = p * r + kP3;
    p = p * r + kP4;
    p = p * r + kP5;
    p = (p * r) * r + (r + 1.0f);
    int ni = int(n);
    int half = ni >> 1;
    return std::ldexp(std::ldexp(p, half), ni - half);
  }
};

#endif

inline const char* isa_name() {
#if defined(TF_AVX512)
  return "avx512";
#elif defined(TF_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace tf
