// Blocked attention with int8 products on AVX512-VNNI (see attention_int8.h for what it computes and
// why a row's bits do not depend on its window; attention_int8_walk.h for the walk over segments and
// blocks, shared with the AVX2 kernel). Per block of 32 keys, the keys' codes are laid out with
// lanes = keys (one vector per 4 dimensions) and the values' codes with lanes = dimensions (one vector
// per 4 keys), so that a row pays D/4 `vpdpbusd` per 16 keys for its scores and D/16 per 4 keys for
// its values: half the instructions of the bf16 products, and a prepared block is half their bytes.
// The KV cache keeps its full blocks prepared (decoding/cache.py); the kernel prepares the others
// with the same routine: the same bits either way.
#include "attention_int8.h"

#include <cfloat>

#include <c10/util/Exception.h>

#include "attention_int8_walk.h"

namespace tf {

#if defined(TF_INT8_ATTENTION_VNNI)

namespace {

using int8att::kScoreRows;

// Codes of the D values in x (round(x * 127 / a), a the largest |x|) into `codes`; returns the
// scale a / 127. A row of zeros, or with a NaN or an infinity, gets zero codes and scale.
template <int D>
inline float quantize_row(const float* xs, int8_t* codes) {
  __m512 x[D / 16];
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int c = 0; c < D / 16; c++) {
    x[c] = _mm512_loadu_ps(xs + 16 * c);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(x[c]));
    bad |= _mm512_fpclass_ps_mask(x[c], 0x99);  // QNaN | +inf | -inf | SNaN
  }
  const float a = _mm512_reduce_max_ps(amax);
  const float inv_a = 127.0f / a;  // (a row so small that this overflows counts as zeros)
  if (bad || !(a > 0.0f) || !(inv_a <= FLT_MAX)) {
    std::memset(codes, 0, D);
    return 0.0f;
  }
  const __m512 inv = _mm512_set1_ps(inv_a);
  for (int c = 0; c < D / 16; c++)  // nearest even (the default rounding); |x * inv| <= 127 rounds within range
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16 * c), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x[c], inv))));
  return a / 127.0f;
}

// exp(x) for x <= 0 (a score minus the running max; -inf gives ~1e-38) to ~5e-5 relative: Cody-Waite
// reduction and a degree-4 polynomial, 10 instructions where V::exp takes 15. The weights are
// quantized to 8 bits next; the denominator's relative error stays under the bf16 products' 2^-9.
inline __m512 exp_weights(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpLo));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(1.0f / 24);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Scores of R query rows (unsigned codes, `qrows`; scales `qsc`) against a prepared block's keys,
// per half of 16 keys; keys at or past nk are -inf. The integer sums are exact in any order: the R
// rows and the two halves only share each key vector's load.
template <int R, int D>
inline void scores(const uint8_t* kb, const uint8_t* const* qrows, const float* qsc, int64_t nk, __m512 (*sv)[2],
                   const int8att::Ahead& ahead) {
  constexpr int G4 = D / 4;
  const bool two = nk > 16;
  const __m512i* kv = reinterpret_cast<const __m512i*>(kb);
  __m512i acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  if (two) {
    for (int i = 0; i < G4; i++) {
      ahead.share<D, G4>(i);
      const __m512i k0 = _mm512_load_si512(kv + i), k1 = _mm512_load_si512(kv + G4 + i);
      for (int r = 0; r < R; r++) {
        int32_t q4;
        std::memcpy(&q4, qrows[r] + 4 * i, 4);
        const __m512i qb = _mm512_set1_epi32(q4);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], qb, k0);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], qb, k1);
      }
    }
  } else {
    for (int i = 0; i < G4; i++) {
      ahead.share<D, G4>(i);
      const __m512i k0 = _mm512_load_si512(kv + i);
      for (int r = 0; r < R; r++) {
        int32_t q4;
        std::memcpy(&q4, qrows[r] + 4 * i, 4);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_set1_epi32(q4), k0);
      }
    }
  }
  const float* ks = reinterpret_cast<const float*>(kb + kBlock * D);
  const int32_t* kcorr = reinterpret_cast<const int32_t*>(kb + kBlock * D + 128);
  for (int r = 0; r < R; r++) {
    const __m512 qs = _mm512_set1_ps(qsc[r]);
    const __m512 s0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][0], _mm512_loadu_si512(kcorr))),
                                    _mm512_mul_ps(_mm512_loadu_ps(ks), qs));
    sv[r][0] = nk >= 16 ? s0 : V::keep_first(s0, int(nk), -INFINITY);
    if (two) {
      const __m512 s1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][1], _mm512_loadu_si512(kcorr + 16))),
                                      _mm512_mul_ps(_mm512_loadu_ps(ks + 16), qs));
      sv[r][1] = nk >= kBlock ? s1 : V::keep_first(s1, int(nk - 16), -INFINITY);
    } else {
      sv[r][1] = _mm512_set1_ps(-INFINITY);
    }
  }
}

// The online-softmax step of R <= 5 rows over one block, given their scores (as attention_bf16.cpp):
// per row the new running max m, the correction of what it has so far (`corr`), the denominator
// updated with the fp32 weights, and the weights times the keys' value scales quantized to 0..255
// against their bound pb * vmax (32 bytes per row in e; the bound / 255 in wsc), where pb = exp(bm -
// m) is the row's largest weight in the block (bm its largest score) and vmax the block's largest
// value scale. The bound, not the weights' own largest, so that no reduction runs per row: no
// product can exceed it (exp and rounding are monotonic). A block whose best score is more than
// -kExpLo (~87) nats under the running max, where exp is clamped, gets no weight (its codes and
// scale are zero: it would add less than 1e-37 of the row's weight). The three exponentials of the
// rows' statistics share one vector exp.
template <int R, int D>
inline void softmax_rows(__m512 (*sv)[2], float* const* p, int64_t nk, const float* vs, float vmax, float inv_vmax,
                         uint32_t* e, float* wsc, float* corr) {
  static_assert(R <= 5, "the rows' three statistics share one vector of 16 lanes");
  alignas(64) float m_new[16], st[16] = {};
  bool far[R];
  for (int r = 0; r < R; r++) {
    const float bm = std::max(-INFINITY, V::hmax(_mm512_max_ps(sv[r][0], sv[r][1])));  // as one row alone
    m_new[r] = std::max(p[r][D], bm);
    st[r] = p[r][D] - m_new[r];  // -> the correction
    st[5 + r] = bm - m_new[r];   // -> pb
    st[10 + r] = m_new[r] - bm;  // -> 1 / pb
    far[r] = !(st[5 + r] >= kExpLo);
  }
  _mm512_store_ps(st, V::exp(_mm512_load_ps(st)));
  const __m512 vs0 = _mm512_loadu_ps(vs), vs1 = _mm512_loadu_ps(vs + 16);
  for (int r = 0; r < R; r++) {
    const __m512 mv = _mm512_set1_ps(m_new[r]);
    __m512 e0 = exp_weights(_mm512_sub_ps(sv[r][0], mv)), e1 = exp_weights(_mm512_sub_ps(sv[r][1], mv));
    if (nk < kBlock) {
      e0 = V::keep_first(e0, int(nk), 0.0f);
      e1 = nk > 16 ? V::keep_first(e1, int(nk - 16), 0.0f) : _mm512_setzero_ps();
    }
    corr[r] = st[r];
    // the denominator per lane (16 running sums, added up when the segments merge)
    _mm512_storeu_ps(p[r] + D + 1, _mm512_fmadd_ps(_mm512_loadu_ps(p[r] + D + 1), _mm512_set1_ps(st[r]), _mm512_add_ps(e0, e1)));
    p[r][D] = m_new[r];
    // codes: nearest even of w * inv, in 0 .. 255 (w <= pb * vmax)
    // a bound so small that 255 / bound overflows (~80 nats under the running max with small values)
    // counts as far too
    const float inv_bound = 255.0f * st[10 + r] * inv_vmax;
    far[r] = far[r] || !(inv_bound <= FLT_MAX);
    const __m512 inv = _mm512_set1_ps(far[r] ? 0.0f : inv_bound);
    uint32_t* er = e + r * 8;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(er),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(e0, vs0), inv))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(er + 4),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(e1, vs1), inv))));
    wsc[r] = far[r] ? 0.0f : st[5 + r] * vmax / 255.0f;
  }
}

// o_r = o_r * c_r + wsc_r * (the exact integer sum over the block's quads of keys of weight codes
// times value codes), for RT rows sharing every value load. Always all 8 quads: the keys a row does
// not see have weight code 0 and add nothing, and a constant count lets the loop unroll (2% of a
// window's attention here).
template <int RT, int NC>
inline void update_values(float* const* o, const float* c, const float* wsc, const uint32_t* const* e,
                          const __m512i* vq, const int8att::Ahead& ahead) {
  __m512i acc[RT][NC];
  for (int r = 0; r < RT; r++)
    for (int ch = 0; ch < NC; ch++) acc[r][ch] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int p = 0; p < kBlock / 4; p++) {
    ahead.share<NC * 16, kBlock / 4>(p);
    __m512i vv[NC];
    for (int ch = 0; ch < NC; ch++) vv[ch] = _mm512_load_si512(vq + p * NC + ch);
    for (int r = 0; r < RT; r++) {
      const __m512i eb = _mm512_set1_epi32(int32_t(e[r][p]));
      for (int ch = 0; ch < NC; ch++) acc[r][ch] = _mm512_dpbusd_epi32(acc[r][ch], eb, vv[ch]);
    }
  }
  for (int r = 0; r < RT; r++) {
    const __m512 cr = _mm512_set1_ps(c[r]), wr = _mm512_set1_ps(wsc[r]);
    for (int ch = 0; ch < NC; ch++)
      _mm512_storeu_ps(o[r] + 16 * ch,
                       _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][ch]), wr, _mm512_mul_ps(_mm512_loadu_ps(o[r] + 16 * ch), cr)));
  }
}

constexpr int kSoftmaxRows = 4;  // rows per softmax_rows call

// The kernel's policy for attention_int8_walk.h.
struct Vnni {
  static constexpr int kQueryBytes = 1;   // codes + 128: vpdpbusd's unsigned side
  static constexpr int kWeightBytes = 32;  // 0 .. 255 per key
  template <int D>
  static constexpr int value_rows() {
    return D == 64 ? 4 : 2;  // accumulators the registers hold (no spills), V loaded once
  }
  template <int D>
  static float quantize(const float* x, int8_t* codes) {
    return quantize_row<D>(x, codes);
  }
  template <int D>
  static void query_codes(const int8_t* codes, uint8_t* dst) {
    int8att::offset_query_codes<D>(codes, dst);
  }
  // 8 rows x 2 halves = 16 chains in flight, sharing each key load
  template <int D>
  static void rows(const uint8_t* kb, const float* vs, float vmax, float inv_vmax, int64_t nk, int nr,
                   const int8att::RowsStep& st) {
    __m512 sv[kScoreRows][2];
    switch (nr) {
      case 1: scores<1, D>(kb, st.qrows, st.qsc, nk, sv, st.kahead); break;
      case 2: scores<2, D>(kb, st.qrows, st.qsc, nk, sv, st.kahead); break;
      case 3: scores<3, D>(kb, st.qrows, st.qsc, nk, sv, st.kahead); break;
      case 4: scores<4, D>(kb, st.qrows, st.qsc, nk, sv, st.kahead); break;
      case 5: scores<5, D>(kb, st.qrows, st.qsc, nk, sv, st.kahead); break;
      case 6: scores<6, D>(kb, st.qrows, st.qsc, nk, sv, st.kahead); break;
      case 7: scores<7, D>(kb, st.qrows, st.qsc, nk, sv, st.kahead); break;
      default: scores<kScoreRows, D>(kb, st.qrows, st.qsc, nk, sv, st.kahead); break;
    }
    for (int r0 = 0; r0 < nr; r0 += kSoftmaxRows) {
      const int m = std::min(kSoftmaxRows, nr - r0);
      uint32_t* e = reinterpret_cast<uint32_t*>(st.e + r0 * kWeightBytes);
      float* const* p = st.parts + r0;
      switch (m) {
        case 1: softmax_rows<1, D>(sv + r0, p, nk, vs, vmax, inv_vmax, e, st.wsc + r0, st.corr + r0); break;
        case 2: softmax_rows<2, D>(sv + r0, p, nk, vs, vmax, inv_vmax, e, st.wsc + r0, st.corr + r0); break;
        case 3: softmax_rows<3, D>(sv + r0, p, nk, vs, vmax, inv_vmax, e, st.wsc + r0, st.corr + r0); break;
        default: softmax_rows<kSoftmaxRows, D>(sv + r0, p, nk, vs, vmax, inv_vmax, e, st.wsc + r0, st.corr + r0); break;
      }
    }
  }
  template <int D>
  static void block_values(const uint8_t*, int32_t*) {}
  template <int D>
  static void values(float* const* o, const float* c, const float* w, const uint8_t* e, int n, int64_t /*nk*/,
                     const uint8_t* vb, const int32_t*, const int8att::Ahead& ahead) {
    constexpr int NC = D / 16, RT = value_rows<D>();
    const uint32_t* er[RT];
    for (int r = 0; r < n; r++) er[r] = reinterpret_cast<const uint32_t*>(e + r * kWeightBytes);
    const __m512i* vq = reinterpret_cast<const __m512i*>(vb);
    switch (n) {
      case 1: update_values<1, NC>(o, c, w, er, vq, ahead); break;
      case 2: update_values<2, NC>(o, c, w, er, vq, ahead); break;
      case 3: update_values<(RT >= 3 ? 3 : 1), NC>(o, c, w, er, vq, ahead); break;
      default: update_values<RT, NC>(o, c, w, er, vq, ahead); break;
    }
  }
};

}  // namespace

const char* attention_int8_path() { return "avx512-vnni"; }
void prepare_kv_int8(const Int8PrepareArgs& a) { int8att::prepare<Vnni>(a); }
void attention_int8(const AttentionArgs& a, const float* key_smooth) { int8att::attention<Vnni>(a, key_smooth); }

#elif defined(TF_INT8_ATTENTION_AVX2)

// attention_int8_avx2.cpp
#if defined(TF_DPBUSD256)
const char* attention_int8_path() { return kDpbusd256Path; }
#else
const char* attention_int8_path() { return "avx2"; }
#endif
void prepare_kv_int8(const Int8PrepareArgs& a) { prepare_kv_int8_avx2(a); }
void attention_int8(const AttentionArgs& a, const float* key_smooth) { attention_int8_avx2(a, key_smooth); }

#else

const char* attention_int8_path() { return ""; }

void prepare_kv_int8(const Int8PrepareArgs&) {
  TORCH_CHECK(false, "int8 attention needs AVX2 or AVX512-VNNI, which this build of the kernels does not have");
}

void attention_int8(const AttentionArgs&, const float*) {
  TORCH_CHECK(false, "int8 attention needs AVX2 or AVX512-VNNI, which this build of the kernels does not have");
}

#endif

}  // namespace tf
