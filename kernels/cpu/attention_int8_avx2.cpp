// The int8 attention on AVX2 (`vpmaddubsw`): the numbers of attention_int8.cpp's AVX512-VNNI kernel,
// bit for bit, on CPUs without VNNI (attention_int8.h says what is computed and how the integers stay
// exact without saturating; attention_int8_walk.h has the walk). It reads the same prepared blocks:
// a 64-byte vector of that layout is two 32-byte halves of 8 whole lanes. Also the kernel of an
// AVX-512 build without VNNI (Skylake-X), on 8 lanes.
//
// Per block of 32 keys and query row: the scores take D/4 x 4 groups of 8 keys x 4 instructions
// (sign, vpmaddubsw, vpmaddwd, add), the values 8 quads x D/8 x the same 4; every product is an
// integer one, and a prepared block is half the bytes of the fp16 cache it replaces.
//
// Where the build has 256-bit `vpdpbusd` (AVX-VNNI; simd.h's TF_DPBUSD256), the policy `Dpbusd256`
// computes the same integers as the VNNI kernel does, on 8 lanes: a query's codes + 128 (unsigned) by
// the keys' codes, less the block's prepared 128 * (sum of a key's codes); weight codes 0 .. 255 by
// the values' codes. One instruction per 32 products where the `vpmaddubsw` route takes four.
#include "attention_int8.h"

#include <cfloat>

#if defined(TF_INT8_ATTENTION_AVX2)

#include "attention_int8_walk.h"

namespace tf {

namespace {

// 8 int32 in -128 .. 127 as 8 bytes, in order.
inline void store8_i8(int8_t* dst, __m256i x) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(w, w));
}

// Codes of the D values in x (round(x * 127 / a), a the largest |x|; attention_int8.cpp's quantize_row
// on 8 lanes); returns the scale a / 127. A row of zeros, or with a NaN or an infinity: zero codes and scale.
template <int D>
inline float quantize_row(const float* xs, int8_t* codes) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
  __m256 x[D / 8];
  __m256 amax = _mm256_setzero_ps();
  int bad = 0;
  for (int c = 0; c < D / 8; c++) {
    x[c] = _mm256_loadu_ps(xs + 8 * c);
    const __m256 ax = _mm256_and_ps(x[c], abs_mask);
    amax = _mm256_max_ps(amax, ax);
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(ax, inf, _CMP_NLT_UQ));  // NaN (unordered) or infinite
  }
  const float a = hmax8(amax);
  const float inv_a = 127.0f / a;  // (a row so small that this overflows counts as zeros)
  if (bad || !(a > 0.0f) || !(inv_a <= FLT_MAX)) {
    std::memset(codes, 0, D);
    return 0.0f;
  }
  const __m256 inv = _mm256_set1_ps(inv_a);
  for (int c = 0; c < D / 8; c++)  // nearest even (the default rounding), within -127 .. 127
    store8_i8(codes + 8 * c, _mm256_cvtps_epi32(_mm256_mul_ps(x[c], inv)));
  return a / 127.0f;
}

// attention_int8.cpp's exp_weights on 8 lanes: x >= kExpLo, so 2^n is a normal number and one
// product rounds as scalef does.
inline __m256 exp_weights(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpLo));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(1.0f / 24);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// sum over byte pairs of a (unsigned) times b (signed), then over int16 pairs: 8 int32 lanes, each
// the sum of its 4 byte products (exact: the callers keep every pair under 2^15)
inline __m256i dot4(__m256i a, __m256i b) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}

constexpr int kRows = 4;  // rows whose scores share each key load: 4 rows x 2 groups of 8 keys in registers

// Scores of R rows (|codes| then codes, `qrows`; scales `qsc`) against a prepared block's keys, in 4
// groups of 8 keys (sv[r][g]); keys at or past nk are -inf. DPBUSD: the rows' codes + 128 by the
// keys' codes, less the block's 128 * (sum of a key's codes), as attention_int8.cpp's `scores`.
template <int R, int D, bool DPBUSD>
inline void scores(const uint8_t* kb, const uint8_t* const* qrows, const float* qsc, int64_t nk, __m256 (*sv)[4],
                   const int8att::Ahead& ahead) {
  constexpr int G4 = D / 4;
  const float* ks = reinterpret_cast<const float*>(kb + kBlock * D);
  const int32_t* kcorr = reinterpret_cast<const int32_t*>(kb + kBlock * D + 128);
  for (int half = 0; half < 2; half++) {
    if (half == 1 && nk <= 16) {
      for (int r = 0; r < R; r++) sv[r][2] = sv[r][3] = _mm256_set1_ps(-INFINITY);
      break;
    }
    __m256i acc[R][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const uint8_t* kh = kb + half * G4 * 64;
    for (int i = 0; i < G4; i++) {
      ahead.share<D, 2 * G4>(half * G4 + i);
      const __m256i k0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(kh + i * 64));
      const __m256i k1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(kh + i * 64 + 32));
      for (int r = 0; r < R; r++) {
        int32_t a4;
        std::memcpy(&a4, qrows[r] + 4 * i, 4);
        const __m256i qa = _mm256_set1_epi32(a4);
        if constexpr (DPBUSD) {
#if defined(TF_DPBUSD256)
          acc[r][0] = dpbusd256(acc[r][0], qa, k0);
          acc[r][1] = dpbusd256(acc[r][1], qa, k1);
#endif
        } else {
          int32_t s4;
          std::memcpy(&s4, qrows[r] + D + 4 * i, 4);
          const __m256i qs = _mm256_set1_epi32(s4);
          acc[r][0] = _mm256_add_epi32(acc[r][0], dot4(qa, _mm256_sign_epi8(k0, qs)));
          acc[r][1] = _mm256_add_epi32(acc[r][1], dot4(qa, _mm256_sign_epi8(k1, qs)));
        }
      }
    }
    for (int r = 0; r < R; r++) {
      const __m256 qs = _mm256_set1_ps(qsc[r]);
      for (int s = 0; s < 2; s++) {
        const int first = 16 * half + 8 * s;
        __m256i dot = acc[r][s];
        if constexpr (DPBUSD) dot = _mm256_sub_epi32(dot, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kcorr + first)));
        const __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_loadu_ps(ks + first), qs));
        sv[r][2 * half + s] = keep_first8(x, nk - first, -INFINITY);
      }
    }
  }
}

// 8 int32 in 0 .. 255 as 8 bytes, in order.
inline void store8_u8(uint8_t* dst, __m256i x) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w, w));
}

// attention_int8.cpp's softmax_rows for R <= kRows rows, on 8 lanes: the same operations per lane. The
// weight codes go out as w - 128 (e + 32: signed bytes) and |w - 128| (e: the unsigned side), or
// (UNSIGNED, for `vpdpbusd`) as w, 0 .. 255.
template <int R, int D, bool UNSIGNED = false>
inline void softmax_rows(__m256 (*sv)[4], float* const* p, int64_t nk, const float* vs, float vmax, float inv_vmax,
                         uint8_t* e, float* wsc, float* corr) {
  alignas(32) float m_new[kRows], st[16] = {};
  bool far[R];
  for (int r = 0; r < R; r++) {
    const float bm = std::max(-INFINITY, hmax8(_mm256_max_ps(_mm256_max_ps(sv[r][0], sv[r][1]),
                                                             _mm256_max_ps(sv[r][2], sv[r][3]))));
    m_new[r] = std::max(p[r][D], bm);
    st[r] = p[r][D] - m_new[r];  // -> the correction
    st[5 + r] = bm - m_new[r];   // -> pb
    st[10 + r] = m_new[r] - bm;  // -> 1 / pb
    far[r] = !(st[5 + r] >= kExpLo);
  }
  _mm256_store_ps(st, exp8(_mm256_load_ps(st)));
  _mm256_store_ps(st + 8, exp8(_mm256_load_ps(st + 8)));
  for (int r = 0; r < R; r++) {
    const __m256 mv = _mm256_set1_ps(m_new[r]);
    __m256 w[4];
    for (int g = 0; g < 4; g++) w[g] = keep_first8(exp_weights(_mm256_sub_ps(sv[r][g], mv)), nk - 8 * g, 0.0f);
    corr[r] = st[r];
    // the denominator per lane: lane l of 16 sums keys l and 16 + l, as the 16-lane kernel does
    const __m256 cr = _mm256_set1_ps(st[r]);
    float* den = p[r] + D + 1;
    _mm256_storeu_ps(den, _mm256_fmadd_ps(_mm256_loadu_ps(den), cr, _mm256_add_ps(w[0], w[2])));
    _mm256_storeu_ps(den + 8, _mm256_fmadd_ps(_mm256_loadu_ps(den + 8), cr, _mm256_add_ps(w[1], w[3])));
    p[r][D] = m_new[r];
    // codes: nearest even of w * inv, in 0 .. 255 (w <= pb * vmax), stored less 128
    // a bound so small that 255 / bound overflows (~80 nats under the running max with small values)
    // counts as far too
    const float inv_bound = 255.0f * st[10 + r] * inv_vmax;
    far[r] = far[r] || !(inv_bound <= FLT_MAX);
    const __m256 inv = _mm256_set1_ps(far[r] ? 0.0f : inv_bound);
    uint8_t* er = e + r * (UNSIGNED ? 32 : 64);
    for (int g = 0; g < 4; g++) {
      const __m256i code = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(w[g], _mm256_loadu_ps(vs + 8 * g)), inv));
      if constexpr (UNSIGNED)
        store8_u8(er + 8 * g, code);
      else
        store8_i8(reinterpret_cast<int8_t*>(er + 32 + 8 * g), _mm256_sub_epi32(code, _mm256_set1_epi32(128)));
    }
    if constexpr (!UNSIGNED) {
      const __m256i centred = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(er + 32));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(er), _mm256_abs_epi8(centred));  // |-128| is 128 unsigned
    }
    wsc[r] = far[r] ? 0.0f : st[5 + r] * vmax / 255.0f;
  }
}

// Scores and the softmax step of nr rows, kRows at a time: `vpmaddubsw`'s forms of the query and
// weight codes, or (DPBUSD) `vpdpbusd`'s.
template <int D, bool DPBUSD>
void rows_of(const uint8_t* kb, const float* vs, float vmax, float inv_vmax, int64_t nk, int nr,
             const int8att::RowsStep& st) {
  constexpr int kWeightBytes = DPBUSD ? 32 : 64;
  for (int r0 = 0; r0 < nr; r0 += kRows) {
    __m256 sv[kRows][4];
    const uint8_t* const* q = st.qrows + r0;
    float* const* p = st.parts + r0;
    uint8_t* e = st.e + r0 * kWeightBytes;
    auto run = [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      scores<R, D, DPBUSD>(kb, q, st.qsc + r0, nk, sv, r0 == 0 ? st.kahead : int8att::Ahead{});
      softmax_rows<R, D, DPBUSD>(sv, p, nk, vs, vmax, inv_vmax, e, st.wsc + r0, st.corr + r0);
    };
    switch (std::min(kRows, nr - r0)) {
      case 1: run(std::integral_constant<int, 1>()); break;
      case 2: run(std::integral_constant<int, 2>()); break;
      case 3: run(std::integral_constant<int, 3>()); break;
      default: run(std::integral_constant<int, kRows>()); break;
    }
  }
}

// o = o * c + w * (the exact integer sum of weight codes times value codes) for n rows, one at a
// time. `vpmaddubsw`: |w - 128| by the value codes given w - 128's sign, over all 8 quads of keys
// (keys a row does not see have weight code 0: their w - 128 is undone by aux, 128 * the block's
// sums of value codes). DPBUSD: the weight codes 0 .. 255 by the value codes, over the quads of keys
// the rows see.
template <int D, bool DPBUSD>
void values_of(float* const* o, const float* c, const float* w, const uint8_t* e, int n, int64_t nk,
               const uint8_t* vb, const int32_t* aux, const int8att::Ahead& ahead) {
  constexpr int kChannels = 8;  // of 8 dimensions each, per pass
  constexpr int kWeightBytes = DPBUSD ? 32 : 64;
  const int64_t quads = DPBUSD ? (nk + 3) / 4 : kBlock / 4;
  for (int r = 0; r < n; r++) {
    const uint8_t* er = e + r * kWeightBytes;
    const __m256 cr = _mm256_set1_ps(c[r]), wr = _mm256_set1_ps(w[r]);
    for (int c0 = 0; c0 < D / 8; c0 += kChannels) {
      __m256i acc[kChannels];
      for (int ch = 0; ch < kChannels; ch++) acc[ch] = _mm256_setzero_si256();
      for (int64_t p = 0; p < quads; p++) {
        if (r == 0 && c0 == 0) ahead.share<D, kBlock / 4>(p);
        int32_t a4;
        std::memcpy(&a4, er + 4 * p, 4);
        const __m256i wa = _mm256_set1_epi32(a4);
        const uint8_t* vq = vb + p * 4 * D + 32 * c0;
        if constexpr (DPBUSD) {
#if defined(TF_DPBUSD256)
          for (int ch = 0; ch < kChannels; ch++)
            acc[ch] = dpbusd256(acc[ch], wa, _mm256_load_si256(reinterpret_cast<const __m256i*>(vq + 32 * ch)));
#endif
        } else {
          int32_t s4;
          std::memcpy(&s4, er + 32 + 4 * p, 4);
          const __m256i ws = _mm256_set1_epi32(s4);
          for (int ch = 0; ch < kChannels; ch++) {
            const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(vq + 32 * ch));
            acc[ch] = _mm256_add_epi32(acc[ch], dot4(wa, _mm256_sign_epi8(v, ws)));
          }
        }
      }
      for (int ch = 0; ch < kChannels; ch++) {
        const int d = 8 * (c0 + ch);
        __m256i total = acc[ch];
        if constexpr (!DPBUSD) total = _mm256_add_epi32(total, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aux + d)));
        _mm256_storeu_ps(o[r] + d, _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), wr, _mm256_mul_ps(_mm256_loadu_ps(o[r] + d), cr)));
      }
    }
  }
}

// The kernel's policy for attention_int8_walk.h.
struct Avx2 {
  static constexpr int kQueryBytes = 2;   // |codes| (the unsigned side), then the codes (their signs)
  static constexpr int kWeightBytes = 64;  // |w - 128|, then w - 128, per key
  template <int D>
  static constexpr int value_rows() {
    return 1;  // D/8 accumulators of one row fill the 16 registers
  }
  template <int D>
  static float quantize(const float* x, int8_t* codes) {
    return quantize_row<D>(x, codes);
  }
  template <int D>
  static void query_codes(const int8_t* codes, uint8_t* dst) {
    for (int d = 0; d < D; d++) {
      dst[d] = uint8_t(codes[d] < 0 ? -codes[d] : codes[d]);
      dst[D + d] = uint8_t(codes[d]);
    }
  }
  template <int D>
  static void rows(const uint8_t* kb, const float* vs, float vmax, float inv_vmax, int64_t nk, int nr,
                   const int8att::RowsStep& st) {
    rows_of<D, false>(kb, vs, vmax, inv_vmax, nk, nr, st);
  }
  // aux[d] = 128 * (the sum of the block's 32 value codes of dimension d), in the lanes' order: a
  // row's products are sum (w - 128) v over all 32 keys, and this restores sum w v.
  template <int D>
  static void block_values(const uint8_t* vb, int32_t* aux) {
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int c = 0; c < D / 8; c++) {
      __m256i s = _mm256_setzero_si256();  // pairs of keys: at most 8 x 254 in magnitude
      for (int p = 0; p < kBlock / 4; p++)
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(ones8, _mm256_load_si256(reinterpret_cast<const __m256i*>(vb + p * 4 * D + 32 * c))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(aux + 8 * c), _mm256_slli_epi32(_mm256_madd_epi16(s, ones16), 7));
    }
  }
  template <int D>
  static void values(float* const* o, const float* c, const float* w, const uint8_t* e, int n, int64_t nk,
                     const uint8_t* vb, const int32_t* aux, const int8att::Ahead& ahead) {
    values_of<D, false>(o, c, w, e, n, nk, vb, aux, ahead);
  }
};

#if defined(TF_DPBUSD256)

// The kernel's policy where the build has 256-bit `vpdpbusd`: the VNNI kernel's integers on 8 lanes
// (Avx2's quantization and value rows).
struct Dpbusd256 : Avx2 {
  static constexpr int kQueryBytes = 1;    // codes + 128: vpdpbusd's unsigned side
  static constexpr int kWeightBytes = 32;  // 0 .. 255 per key
  template <int D>
  static void query_codes(const int8_t* codes, uint8_t* dst) {
    int8att::offset_query_codes<D>(codes, dst);
  }
  template <int D>
  static void rows(const uint8_t* kb, const float* vs, float vmax, float inv_vmax, int64_t nk, int nr,
                   const int8att::RowsStep& st) {
    rows_of<D, true>(kb, vs, vmax, inv_vmax, nk, nr, st);
  }
  template <int D>
  static void block_values(const uint8_t*, int32_t*) {}
  template <int D>
  static void values(float* const* o, const float* c, const float* w, const uint8_t* e, int n, int64_t nk,
                     const uint8_t* vb, const int32_t* aux, const int8att::Ahead& ahead) {
    values_of<D, true>(o, c, w, e, n, nk, vb, aux, ahead);
  }
};
using Kernel = Dpbusd256;
#else
using Kernel = Avx2;
#endif

}  // namespace

void prepare_kv_int8_avx2(const Int8PrepareArgs& a) { int8att::prepare<Kernel>(a); }
void attention_int8_avx2(const AttentionArgs& a, const float* key_smooth) { int8att::attention<Kernel>(a, key_smooth); }

}  // namespace tf

#endif  // TF_INT8_ATTENTION_AVX2
