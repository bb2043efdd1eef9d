// Blocked attention with int8 products (see attention_int8.h for what it computes and why a row's
// bits do not depend on its window). The walk over segments and blocks, the online softmax and the
// merge are those of attention_bf16.cpp; what changes is the products. Per block of 32 keys, the keys'
// codes are laid out with lanes = keys (one vector per 4 dimensions) and the values' codes with
// lanes = dimensions (one vector per 4 keys), so that a row pays D/4 `vpdpbusd` per 16 keys for its
// scores and D/16 per 4 keys for its values: half the instructions of the bf16 products, and a
// prepared block is half their bytes. The KV cache keeps its full blocks prepared (decoding/cache.py);
// the kernel prepares the others with the same routine: the same bits either way.
#include "attention_int8.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_merge.h"
#include "simd.h"

#if defined(TF_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TF_INT8_ATTENTION 1
#endif

namespace tf {

#if defined(TF_INT8_ATTENTION)

const char* attention_int8_path() { return "avx512-vnni"; }

namespace {

// 16 values of row j (stride sp elements, the cache's storage type) from column c, as fp32.
inline __m512 row16(const void* base, int kv_type, int64_t sp, int64_t j, int c) {
  if (kv_type == KV_F16)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + j * sp + c)));
  if (kv_type == KV_BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + j * sp + c));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(static_cast<const float*>(base) + j * sp + c);
}

// Codes of the D values in x (round(x * 127 / a), a the largest |x|) into `codes`; returns the
// scale a / 127. A row of zeros, or with a NaN or an infinity, gets zero codes and scale.
template <int D>
inline float quantize_row(const __m512* x, int8_t* codes) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int c = 0; c < D / 16; c++) {
    amax = _mm512_max_ps(amax, _mm512_abs_ps(x[c]));
    bad |= _mm512_fpclass_ps_mask(x[c], 0x99);  // QNaN | +inf | -inf | SNaN
  }
  const float a = _mm512_reduce_max_ps(amax);
  if (bad || !(a > 0.0f)) {
    std::memset(codes, 0, D);
    return 0.0f;
  }
  const __m512 inv = _mm512_set1_ps(127.0f / a);
  for (int c = 0; c < D / 16; c++)  // nearest even (the default rounding); |x * inv| <= 127 rounds within range
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16 * c), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x[c], inv))));
  return a / 127.0f;
}

// One block of nb <= kBlock keys quantized and laid out for the products (header: the bytes). Keys:
// per half of 16 keys, D/4 vectors, vector i lane l = the codes of dimensions 4i .. 4i + 3 of key
// 16 half + l. Values: per quad of keys, D/16 vectors, vector ch lane l = the codes of dimension
// 16 ch + l of the quad's 4 keys. Keys past nb: zero codes and scales.
template <int D>
inline void prepare_block(const void* kblk, const void* vblk, int kv_type, int64_t k_sp, int64_t v_sp, int64_t nb,
                          const float* inv_c, uint8_t* kp, uint8_t* vp) {
  constexpr int NC = D / 16, G4 = D / 4;
  alignas(64) int8_t kc[kBlock][D], vc[kBlock][D];
  float* ks = reinterpret_cast<float*>(kp + kBlock * D);
  int32_t* kcorr = reinterpret_cast<int32_t*>(kp + kBlock * D + 128);
  float* vs = reinterpret_cast<float*>(vp + kBlock * D);
  for (int j = 0; j < kBlock; j++) {
    if (j >= nb) {
      std::memset(kc[j], 0, D);
      std::memset(vc[j], 0, D);
      ks[j] = vs[j] = 0.0f;
      kcorr[j] = 0;
      continue;
    }
    __m512 x[NC];
    for (int c = 0; c < NC; c++) x[c] = _mm512_mul_ps(row16(kblk, kv_type, k_sp, j, 16 * c), _mm512_loadu_ps(inv_c + 16 * c));
    ks[j] = quantize_row<D>(x, kc[j]);
    int32_t sum = 0;
    for (int d = 0; d < D; d++) sum += kc[j][d];
    kcorr[j] = 128 * sum;
    for (int c = 0; c < NC; c++) x[c] = row16(vblk, kv_type, v_sp, j, 16 * c);
    vs[j] = quantize_row<D>(x, vc[j]);
  }
  float vmax = 0.0f;  // (the same max as the kernel's over 16 lanes: max is order-free)
  for (int j = 0; j < kBlock; j++) vmax = std::max(vmax, vs[j]);
  vs[kBlock] = vmax;  // (the block's spare bytes) the weights' bound (softmax_rows)
  vs[kBlock + 1] = vmax > 0.0f ? 1.0f / vmax : 0.0f;
  std::memset(vs + kBlock + 2, 0, (64 - kBlock - 2) * sizeof(float));  // the rest: zeros, as in every block
  for (int half = 0; half < 2; half++)
    for (int i = 0; i < G4; i++) {
      uint8_t* dst = kp + (half * G4 + i) * 64;
      for (int l = 0; l < 16; l++) std::memcpy(dst + 4 * l, &kc[16 * half + l][4 * i], 4);
    }
  for (int p = 0; p < kBlock / 4; p++)
    for (int ch = 0; ch < NC; ch++) {
      uint8_t* dst = vp + (p * NC + ch) * 64;
      for (int l = 0; l < 16; l++)
        for (int b = 0; b < 4; b++) dst[4 * l + b] = uint8_t(vc[4 * p + b][16 * ch + l]);
    }
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
inline void scores(const uint8_t* kb, const uint8_t* const* qrows, const float* qsc, int64_t nk, __m512 (*sv)[2]) {
  constexpr int G4 = D / 4;
  const bool two = nk > 16;
  const __m512i* kv = reinterpret_cast<const __m512i*>(kb);
  __m512i acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  if (two) {
    for (int i = 0; i < G4; i++) {
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
    const __m512 inv = _mm512_set1_ps(far[r] ? 0.0f : 255.0f * st[10 + r] * inv_vmax);
    uint32_t* er = e + r * 8;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(er),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(e0, vs0), inv))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(er + 4),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(e1, vs1), inv))));
    wsc[r] = far[r] ? 0.0f : st[5 + r] * vmax / 255.0f;
  }
}

// o_r = o_r * c_r + wsc_r * (the exact integer sum over quads of keys of weight codes times value
// codes), for RT rows sharing every value load.
template <int RT, int NC>
inline void update_values(float* const* o, const float* c, const float* wsc, const uint32_t* const* e, int64_t quads,
                          const __m512i* vq) {
  __m512i acc[RT][NC];
  for (int r = 0; r < RT; r++)
    for (int ch = 0; ch < NC; ch++) acc[r][ch] = _mm512_setzero_si512();
  for (int64_t p = 0; p < quads; p++) {
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

constexpr int kScoreRows = 8;    // 8 rows x 2 halves = 16 chains in flight, sharing each key load
constexpr int kSoftmaxRows = 4;  // rows per softmax_rows call

struct Scratch {
  std::vector<uint32_t> e;
  std::vector<uint8_t> blk;  // a block prepared here: keys then values, 64-byte aligned inside
  std::vector<float> corr, wsc;
  std::vector<int64_t> nk;
  std::vector<float*> out;
  uint8_t* kp = nullptr;
  uint8_t* vp = nullptr;
  void reserve(int D, int64_t rows) {
    const int64_t bytes = int8_block_bytes(D);
    if (int64_t(blk.size()) < 2 * bytes + 64) {
      blk.assign(2 * bytes + 64, 0);
      kp = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(blk.data()) + 63) & ~uintptr_t(63));
      vp = kp + bytes;
    }
    if (int64_t(corr.size()) < rows) {
      e.assign(rows * 8, 0u);
      corr.assign(rows, 0.0f);
      wsc.assign(rows, 0.0f);
      nk.assign(rows, 0);
      out.assign(rows, nullptr);
    }
  }
};

template <int D>
void attention_queries(const AttentionArgs& a, const float* key_smooth) {
  constexpr int NC = D / 16;
  constexpr int kValueRows = NC == 4 ? 4 : 2;  // accumulators the registers hold (no spills), V loaded once
  const int64_t T = a.T, Hq = a.Hq, Hkv = a.Hkv, L = a.length;
  const int64_t G = Hq / Hkv, rows = G * T, first_pos = L - T;
  const int64_t nseg = (L + kSegment - 1) / kSegment;
  const int64_t stride = D + 17;  // a partial: o[D], m, l per lane [16]
  const int64_t bbytes = int8_block_bytes(D);
  thread_local std::vector<uint8_t> qc;
  thread_local std::vector<float> qs, part, inv_c;
  if (int64_t(qc.size()) < Hkv * rows * D) qc.resize(Hkv * rows * D);
  if (int64_t(qs.size()) < Hkv * rows) qs.resize(Hkv * rows);
  if (int64_t(part.size()) < Hkv * nseg * rows * stride) part.resize(Hkv * nseg * rows * stride);
  if (int64_t(inv_c.size()) < Hkv * D) inv_c.resize(Hkv * D);
  for (int64_t i = 0; i < Hkv * D; i++) inv_c[i] = 1.0f / key_smooth[i];
  uint8_t* qcp = qc.data();
  float* qsp = qs.data();
  float* pp = part.data();
  const float* invc = inv_c.data();  // (the workers' own thread_local vectors are other objects)
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t t = 0; t < T; t++) {  // smoothed, scaled queries as unsigned codes, rows r = g * T + t of KV head h
    for (int64_t hq = 0; hq < Hq; hq++) {
      const int64_t h = hq / G, r = h * rows + (hq % G) * T + t;
      const float* src = a.q + t * a.q_st + hq * a.q_sh;
      __m512 x[NC];
      for (int c = 0; c < NC; c++)
        x[c] = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(src + 16 * c), scale), _mm512_loadu_ps(key_smooth + h * D + 16 * c));
      int8_t codes[D];
      qsp[r] = quantize_row<D>(x, codes);
      for (int d = 0; d < D; d++) qcp[r * D + d] = uint8_t(codes[d]) ^ 0x80u;  // + 128: vpdpbusd's unsigned side
    }
  }
  const int elem = a.kv_type == KV_F32 ? 4 : 2;
  const uint8_t* kprep = static_cast<const uint8_t*>(a.kprep);
  const uint8_t* vprep = static_cast<const uint8_t*>(a.vprep);
  at::parallel_for(0, Hkv * nseg, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch sc;
    sc.reserve(D, rows);
    for (int64_t item = begin; item < end; item++) {
      const int64_t h = item / nseg, s = item % nseg;
      const int64_t seg0 = s * kSegment, seg1 = std::min(L, seg0 + kSegment);
      const int64_t t0 = std::max<int64_t>(0, seg0 - first_pos);
      if (t0 >= T) continue;
      float* seg_part = pp + (h * nseg + s) * rows * stride;
      for (int64_t g = 0; g < G; g++) {
        for (int64_t t = t0; t < T; t++) {
          float* p = seg_part + (g * T + t) * stride;
          std::fill(p, p + stride, 0.0f);
          p[D] = -INFINITY;
        }
      }
      const char* kbase = static_cast<const char*>(a.k) + h * a.k_sh * elem;
      const char* vbase = static_cast<const char*>(a.v) + h * a.v_sh * elem;
      for (int64_t b0 = seg0; b0 < seg1; b0 += kBlock) {
        const int64_t b1 = std::min(b0 + kBlock, seg1), nb = b1 - b0;
        const int64_t pf = b0 + 2 * kBlock;  // see attention_bf16.cpp: rows fetched ahead, prepared blocks not
        if (pf + kBlock > a.prepared && pf < L)
          prefetch_kv_rows(kbase, vbase, pf, std::min(kBlock, L - pf), a.k_sp * elem, a.v_sp * elem, D * elem);
        const uint8_t *kb = sc.kp, *vb = sc.vp;
        if (nb == kBlock && b1 <= a.prepared) {  // a block the caller prepared (prepare_kv_int8)
          kb = kprep + (h * a.prep_sh + b0 / kBlock) * bbytes;
          vb = vprep + (h * a.prep_sh + b0 / kBlock) * bbytes;
        } else {
          prepare_block<D>(kbase + b0 * a.k_sp * elem, vbase + b0 * a.v_sp * elem, a.kv_type, a.k_sp, a.v_sp, nb,
                           invc + h * D, sc.kp, sc.vp);
        }
        const float* vs = reinterpret_cast<const float*>(vb + kBlock * D);
        const int64_t tb = std::max(t0, b0 - first_pos);
        int64_t n_active = 0;
        for (int64_t t = tb; t < T; t++) {  // rows (t, g), g = 0 .. G - 1, share nk
          const int64_t nk = std::min(b1, first_pos + t + 1) - b0;
          for (int64_t g0 = 0; g0 < G; g0 += kScoreRows) {
            const int nr = int(std::min<int64_t>(kScoreRows, G - g0));
            const uint8_t* qrows[kScoreRows];
            float qsc[kScoreRows];
            for (int r = 0; r < nr; r++) {
              const int64_t row = h * rows + (g0 + r) * T + t;
              qrows[r] = qcp + row * D;
              qsc[r] = qsp[row];
            }
            __m512 sv[kScoreRows][2];
            switch (nr) {
              case 1: scores<1, D>(kb, qrows, qsc, nk, sv); break;
              case 2: scores<2, D>(kb, qrows, qsc, nk, sv); break;
              case 3: scores<3, D>(kb, qrows, qsc, nk, sv); break;
              case 4: scores<4, D>(kb, qrows, qsc, nk, sv); break;
              case 5: scores<5, D>(kb, qrows, qsc, nk, sv); break;
              case 6: scores<6, D>(kb, qrows, qsc, nk, sv); break;
              case 7: scores<7, D>(kb, qrows, qsc, nk, sv); break;
              default: scores<kScoreRows, D>(kb, qrows, qsc, nk, sv); break;
            }
            float* parts[kScoreRows];
            for (int r = 0; r < nr; r++) {
              parts[r] = seg_part + ((g0 + r) * T + t) * stride;
              sc.out[n_active + r] = parts[r];
              sc.nk[n_active + r] = nk;
            }
            // the weights' bound reads the value scales of keys the rows see, no others: a full block's
            // stored largest, else the largest of the first nk (the same bits where both exist)
            float vmax = vs[kBlock], inv_vmax = vs[kBlock + 1];
            if (nk < kBlock) {
              vmax = std::max(0.0f, V::hmax(V::keep_first(_mm512_loadu_ps(vs), int(nk), 0.0f)));
              if (nk > 16) vmax = std::max(vmax, V::hmax(V::keep_first(_mm512_loadu_ps(vs + 16), int(nk - 16), 0.0f)));
              inv_vmax = vmax > 0.0f ? 1.0f / vmax : 0.0f;
            }
            for (int r0 = 0; r0 < nr; r0 += kSoftmaxRows) {
              const int m = std::min(kSoftmaxRows, nr - r0);
              uint32_t* e = sc.e.data() + (n_active + r0) * 8;
              float* corr = sc.corr.data() + n_active + r0;
              float* wsc = sc.wsc.data() + n_active + r0;
              switch (m) {
                case 1: softmax_rows<1, D>(sv + r0, parts + r0, nk, vs, vmax, inv_vmax, e, wsc, corr); break;
                case 2: softmax_rows<2, D>(sv + r0, parts + r0, nk, vs, vmax, inv_vmax, e, wsc, corr); break;
                case 3: softmax_rows<3, D>(sv + r0, parts + r0, nk, vs, vmax, inv_vmax, e, wsc, corr); break;
                default: softmax_rows<kSoftmaxRows, D>(sv + r0, parts + r0, nk, vs, vmax, inv_vmax, e, wsc, corr); break;
              }
            }
            n_active += nr;
          }
        }
        const __m512i* vq = reinterpret_cast<const __m512i*>(vb);
        int64_t i = 0;
        while (i < n_active) {
          const int64_t n = value_tile_rows(sc.nk.data(), i, n_active, kValueRows);
          const uint32_t* e[kValueRows];
          for (int64_t r = 0; r < n; r++) e[r] = sc.e.data() + (i + r) * 8;
          float* const* o = sc.out.data() + i;
          const float* c = sc.corr.data() + i;
          const float* w = sc.wsc.data() + i;
          const int64_t quads = (sc.nk[i] + 3) / 4;
          switch (n) {
            case 1: update_values<1, NC>(o, c, w, e, quads, vq); break;
            case 2: update_values<2, NC>(o, c, w, e, quads, vq); break;
            case 3: update_values<(kValueRows >= 3 ? 3 : 1), NC>(o, c, w, e, quads, vq); break;
            default: update_values<kValueRows, NC>(o, c, w, e, quads, vq); break;
          }
          i += n;
        }
      }
    }
  });
  // Merge each query's segments in segment order (their denominators: 16 lanes each).
  merge_segments<D>(
      a, pp, nseg, rows, stride, [](const float* p) { return V::hsum(_mm512_loadu_ps(p + D + 1)); },
      [](int i) { return i; });
}

}  // namespace

void prepare_kv_int8(const Int8PrepareArgs& a) {
  TORCH_CHECK(a.D == 64 || a.D == 128, "int8 attention: head_dim must be 64 or 128, not ", a.D);
  const int elem = a.kv_type == KV_F32 ? 4 : 2;
  const int64_t nblk = a.block_end - a.block_begin, bbytes = int8_block_bytes(a.D);
  at::parallel_for(0, a.Hkv * nblk, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float inv_c[128];
    int64_t inv_h = -1;
    for (int64_t item = begin; item < end; item++) {
      const int64_t h = item / nblk, b = a.block_begin + item % nblk;
      if (h != inv_h) {
        for (int64_t d = 0; d < a.D; d++) inv_c[d] = 1.0f / a.key_smooth[h * a.D + d];
        inv_h = h;
      }
      const char* kblk = static_cast<const char*>(a.k) + (h * a.k_sh + b * kBlock * a.k_sp) * elem;
      const char* vblk = static_cast<const char*>(a.v) + (h * a.v_sh + b * kBlock * a.v_sp) * elem;
      uint8_t* kp = static_cast<uint8_t*>(a.kprep) + (h * a.prep_sh + b) * bbytes;
      uint8_t* vp = static_cast<uint8_t*>(a.vprep) + (h * a.prep_sh + b) * bbytes;
      if (a.D == 64)
        prepare_block<64>(kblk, vblk, a.kv_type, a.k_sp, a.v_sp, kBlock, inv_c, kp, vp);
      else
        prepare_block<128>(kblk, vblk, a.kv_type, a.k_sp, a.v_sp, kBlock, inv_c, kp, vp);
    }
  });
}

void attention_int8(const AttentionArgs& a, const float* key_smooth) {
  TORCH_CHECK(a.D == 64 || a.D == 128, "int8 attention: head_dim must be 64 or 128, not ", a.D);
  for_query_slices(a, [key_smooth](const AttentionArgs& part) {
    if (part.D == 64)
      attention_queries<64>(part, key_smooth);
    else
      attention_queries<128>(part, key_smooth);
  });
}

#else

const char* attention_int8_path() { return ""; }

void prepare_kv_int8(const Int8PrepareArgs&) {
  TORCH_CHECK(false, "int8 attention needs AVX512-VNNI, which this build of the kernels does not have");
}

void attention_int8(const AttentionArgs&, const float*) {
  TORCH_CHECK(false, "int8 attention needs AVX512-VNNI, which this build of the kernels does not have");
}

#endif

}  // namespace tf
