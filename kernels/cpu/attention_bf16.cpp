// Blocked attention with bf16 products (see attention_bf16.h for what it computes and why it is
// exact). The walk over segments and blocks, the online softmax and the merge are those of
// attention.cpp; per block of 32 keys, the keys are rounded to bf16 and transposed once (lanes =
// keys, one vector per pair of dimensions) and the values interleaved by pairs of keys (lanes =
// dimensions), for every query row of the block to share. A row then pays D/2 `vdpbf16ps` per
// 16 keys for its scores and 16 * D/16 for its values, against twice as many FMAs in fp32.
// Making a block (prepare_block) cost about as much as a decode step's 7 query rows spent on it;
// the KV cache therefore keeps its full blocks made (prepare_kv_bf16, decoding/cache.py) and the
// kernel makes only the others, with the same routine: the same bits either way.
#include "attention_bf16.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_merge.h"
#include "simd.h"

#if defined(TF_AVX512) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define TF_BF16_ATTENTION 1
#endif

namespace tf {

#if defined(TF_BF16_ATTENTION)

const char* attention_bf16_path() { return "avx512-bf16"; }

namespace {

// r[i] lane j <- r[j] lane i (16 x 16 dwords).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  // r[4i + c], 128-bit lane L: rows 4i .. 4i + 3 of column 4L + c
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  __m512i out[16];
  for (int c = 0; c < 4; c++) {
    const __m512i a = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), b = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i a2 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD), b2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    out[c] = _mm512_shuffle_i32x4(a, b, 0x88);
    out[8 + c] = _mm512_shuffle_i32x4(a, b, 0xDD);
    out[4 + c] = _mm512_shuffle_i32x4(a2, b2, 0x88);
    out[12 + c] = _mm512_shuffle_i32x4(a2, b2, 0xDD);
  }
  for (int i = 0; i < 16; i++) r[i] = out[i];
}

// 32 values of row j (stride sp elements, the cache's storage type) from column c, as bf16 (round
// to nearest even); rows at or past n are zeros.
inline __m512i row_bf16(const void* base, int kv_type, int64_t sp, int64_t j, int64_t n, int c) {
  if (j >= n) return _mm512_setzero_si512();
  if (kv_type == KV_BF16) return _mm512_loadu_si512(static_cast<const uint16_t*>(base) + j * sp + c);
  __m512 lo, hi;
  if (kv_type == KV_F16) {
    const uint16_t* src = static_cast<const uint16_t*>(base) + j * sp + c;
    lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16)));
  } else {
    const float* src = static_cast<const float*>(base) + j * sp + c;
    lo = _mm512_loadu_ps(src);
    hi = _mm512_loadu_ps(src + 16);
  }
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// Value lanes: vector c of a row holds dimension 32 (c / 2) + 8 (l / 4) + 4 (c % 2) + l % 4 in
// lane l (the order of unpacklo / unpackhi on 16-bit elements).
inline int value_dim(int c, int l) { return 32 * (c / 2) + 8 * (l / 4) + 4 * (c % 2) + l % 4; }

// o_r = o_r * c_r, then per pair of keys in order o_r += e_r[2p] v[2p] + e_r[2p+1] v[2p+1] (one
// vdpbf16ps), for RT rows sharing the number of pairs and every value load.
template <int RT, int NC>
inline void update_values(float* const* o, const float* c, const uint32_t* const* e, int64_t pairs, const __m512i* vp) {
  __m512 acc[RT][NC];
  for (int r = 0; r < RT; r++)
    for (int ch = 0; ch < NC; ch++) acc[r][ch] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + 16 * ch), _mm512_set1_ps(c[r]));
  for (int64_t p = 0; p < pairs; p++) {
    __m512i vv[NC];
    for (int ch = 0; ch < NC; ch++) vv[ch] = _mm512_load_si512(vp + p * NC + ch);
    for (int r = 0; r < RT; r++) {
      const __m512i ev = _mm512_set1_epi32(int32_t(e[r][p]));
      for (int ch = 0; ch < NC; ch++) acc[r][ch] = dp(acc[r][ch], vv[ch], ev);
    }
  }
  for (int r = 0; r < RT; r++)
    for (int ch = 0; ch < NC; ch++) _mm512_storeu_ps(o[r] + 16 * ch, acc[r][ch]);
}

// Scores of R query rows (bf16 pairs, `qrows`) against the block's keys (kp: per half of 16 keys,
// one vector per pair of dimensions, lanes = keys). Per row and half, exactly as one row alone:
// even pairs in order into one accumulator, odd pairs into another, added at the end; keys at or
// past nk are -inf. The R rows and two halves only interleave their chains (vdpbf16ps's latency
// hidden behind independent work) and share each key vector's load.
template <int R, int DH>
inline void scores(const __m512i* kp, const uint32_t* const* qrows, int64_t nk, __m512 (*sv)[2]) {
  const bool two = nk > 16;
  __m512 a0[R][2], a1[R][2];
  for (int r = 0; r < R; r++)
    for (int hf = 0; hf < 2; hf++) a0[r][hf] = a1[r][hf] = _mm512_setzero_ps();
  if (two) {
    for (int i = 0; i < DH; i += 2) {
      const __m512i k00 = kp[i], k01 = kp[i + 1], k10 = kp[DH + i], k11 = kp[DH + i + 1];
      for (int r = 0; r < R; r++) {
        const __m512i q0 = _mm512_set1_epi32(int32_t(qrows[r][i])), q1 = _mm512_set1_epi32(int32_t(qrows[r][i + 1]));
        a0[r][0] = dp(a0[r][0], k00, q0);
        a1[r][0] = dp(a1[r][0], k01, q1);
        a0[r][1] = dp(a0[r][1], k10, q0);
        a1[r][1] = dp(a1[r][1], k11, q1);
      }
    }
  } else {
    for (int i = 0; i < DH; i += 2) {
      const __m512i k00 = kp[i], k01 = kp[i + 1];
      for (int r = 0; r < R; r++) {
        a0[r][0] = dp(a0[r][0], k00, _mm512_set1_epi32(int32_t(qrows[r][i])));
        a1[r][0] = dp(a1[r][0], k01, _mm512_set1_epi32(int32_t(qrows[r][i + 1])));
      }
    }
  }
  for (int r = 0; r < R; r++) {
    sv[r][0] = V::keep_first(_mm512_add_ps(a0[r][0], a1[r][0]), int(nk), -INFINITY);
    sv[r][1] = two ? V::keep_first(_mm512_add_ps(a0[r][1], a1[r][1]), int(nk - 16), -INFINITY)
                   : _mm512_set1_ps(-INFINITY);
  }
}

// The online-softmax step of R rows over one block, given their scores: per row, the new running
// max m, the correction exp(m_old - m) of what the row has so far, the weights exp(s - m) rounded
// to bf16 (stored in e, 16 dwords = 32 weights per row) and the running sum of the rounded weights
// (fp32, one fixed tree per block). Each row's arithmetic is what it has alone; the rows go through
// each step together so that their dependency chains overlap, and their corrections come from one
// vector exp (a lane-wise function: lane r is what exp of that row's value alone gives).
template <int R, int D>
inline void softmax_rows(__m512 (*sv)[2], float* const* p, int64_t nk, uint32_t* e, float* corr) {
  alignas(64) float m_new[16], diff[16] = {};
  for (int r = 0; r < R; r++) {
    // as one row alone, NaNs included: std::max(-inf, NaN) is -inf
    float bm = std::max(-INFINITY, V::hmax(sv[r][0]));
    if (nk > 16) bm = std::max(bm, V::hmax(sv[r][1]));
    m_new[r] = std::max(p[r][D], bm);
    diff[r] = p[r][D] - m_new[r];
  }
  _mm512_store_ps(diff, V::exp(_mm512_load_ps(diff)));
  __m512i e16[R];
  for (int r = 0; r < R; r++) {
    const __m512 mv = _mm512_set1_ps(m_new[r]);
    const __m512 e0 = V::keep_first(V::exp(_mm512_sub_ps(sv[r][0], mv)), int(nk), 0.0f);
    const __m512 e1 =
        nk > 16 ? V::keep_first(V::exp(_mm512_sub_ps(sv[r][1], mv)), int(nk - 16), 0.0f) : _mm512_setzero_ps();
    e16[r] = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);
    _mm512_storeu_si512(e + r * 16, e16[r]);
  }
  for (int r = 0; r < R; r++) {
    // the weights as rounded, back in fp32 (exact), for the denominator
    const __m512 r0 =
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(e16[r])), 16));
    const __m512 r1 =
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(e16[r], 1)), 16));
    corr[r] = diff[r];
    p[r][D + 1] = p[r][D + 1] * diff[r] + V::hsum(_mm512_add_ps(r0, r1));
    p[r][D] = m_new[r];
  }
}

// One block of nb <= kBlock keys made ready for every query row that reads it: keys rounded to bf16
// and transposed (per half of 16 keys, one vector per pair of dimensions, lanes = keys; halves past
// nb are not written), values rounded to bf16 with pairs of keys interleaved (lanes = dimensions in
// value_dim order; a missing odd key is zero). kp and vp each take D vectors.
template <int D>
inline void prepare_block(const void* kblk, const void* vblk, int kv_type, int64_t k_sp, int64_t v_sp, int64_t nb,
                          __m512i* kp, __m512i* vp) {
  constexpr int DH = D / 2, NC = D / 16;
  for (int half = 0; half < 2 && 16 * half < nb; half++) {
    for (int cb = 0; cb < DH; cb += 16) {  // dwords cb .. cb + 15 = dimensions 2 cb .. 2 cb + 31
      __m512i r[16];
      for (int l = 0; l < 16; l++) r[l] = row_bf16(kblk, kv_type, k_sp, 16 * half + l, nb, 2 * cb);
      transpose16(r);
      for (int i = 0; i < 16; i++) _mm512_store_si512(kp + half * DH + cb + i, r[i]);
    }
  }
  for (int64_t p = 0; p < (nb + 1) / 2; p++) {
    for (int q = 0; q < D / 32; q++) {
      const __m512i r0 = row_bf16(vblk, kv_type, v_sp, 2 * p, nb, 32 * q);
      const __m512i r1 = row_bf16(vblk, kv_type, v_sp, 2 * p + 1, nb, 32 * q);
      _mm512_store_si512(vp + p * NC + 2 * q, _mm512_unpacklo_epi16(r0, r1));
      _mm512_store_si512(vp + p * NC + 2 * q + 1, _mm512_unpackhi_epi16(r0, r1));
    }
  }
}

// Query rows per score group: 4 rows x 2 halves x 2 accumulators = 16 chains in flight.
constexpr int kScoreRows = 4;

struct alignas(64) Vec {
  __m512i v;
};

struct Scratch {
  std::vector<uint32_t> e;
  std::vector<Vec> kp, vp;
  std::vector<float> corr;
  std::vector<int64_t> nk;
  std::vector<float*> out;
  void reserve(int D, int64_t rows) {
    if (int64_t(kp.size()) < D) {
      kp.resize(D);  // 2 halves of 16 keys x D / 2 pairs of dimensions
      vp.resize(D);  // 16 pairs of keys x D / 16 vectors
    }
    if (int64_t(corr.size()) < rows) {
      e.assign(rows * 16, 0u);
      corr.assign(rows, 0.0f);
      nk.assign(rows, 0);
      out.assign(rows, nullptr);
    }
  }
};

template <int D>
void attention_queries(const AttentionArgs& a) {
  constexpr int DH = D / 2, NC = D / 16;
  constexpr int kValueRows = NC == 4 ? 6 : 2;  // accumulators the registers hold, V loaded once
  const int64_t T = a.T, Hq = a.Hq, Hkv = a.Hkv, L = a.length;
  const int64_t G = Hq / Hkv, rows = G * T, first_pos = L - T;
  const int64_t nseg = (L + kSegment - 1) / kSegment;
  const int64_t stride = D + 2;  // a partial: o[D] (in value lane order), m, l
  thread_local std::vector<uint32_t> qs;
  thread_local std::vector<float> part;
  if (int64_t(qs.size()) < Hkv * rows * DH) qs.resize(Hkv * rows * DH);
  if (int64_t(part.size()) < Hkv * nseg * rows * stride) part.resize(Hkv * nseg * rows * stride);
  uint32_t* qsp = qs.data();
  float* pp = part.data();
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t t = 0; t < T; t++) {  // scaled queries in bf16, rows r = g * T + t of KV head h
    for (int64_t hq = 0; hq < Hq; hq++) {
      const float* src = a.q + t * a.q_st + hq * a.q_sh;
      uint32_t* dst = qsp + ((hq / G) * rows + (hq % G) * T + t) * DH;
      for (int d = 0; d < D; d += 32) {
        const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(src + d), scale);
        const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(src + d + 16), scale);
        _mm512_storeu_si512(dst + d / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  }
  const int elem = a.kv_type == KV_F32 ? 4 : 2;
  const char* kprep = static_cast<const char*>(a.kprep);
  const char* vprep = static_cast<const char*>(a.vprep);
  at::parallel_for(0, Hkv * nseg, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch sc;
    sc.reserve(D, rows);
    __m512i* kp = &sc.kp[0].v;
    __m512i* vp = &sc.vp[0].v;
    for (int64_t item = begin; item < end; item++) {
      const int64_t h = item / nseg, s = item % nseg;
      const int64_t seg0 = s * kSegment, seg1 = std::min(L, seg0 + kSegment);
      const int64_t t0 = std::max<int64_t>(0, seg0 - first_pos);
      if (t0 >= T) continue;
      float* seg_part = pp + (h * nseg + s) * rows * stride;
      for (int64_t g = 0; g < G; g++) {
        for (int64_t t = t0; t < T; t++) {
          float* p = seg_part + (g * T + t) * stride;
          std::fill(p, p + D, 0.0f);
          p[D] = -INFINITY;
          p[D + 1] = 0.0f;
        }
      }
      const char* kbase = static_cast<const char*>(a.k) + h * a.k_sh * elem;
      const char* vbase = static_cast<const char*>(a.v) + h * a.v_sh * elem;
      for (int64_t b0 = seg0; b0 < seg1; b0 += kBlock) {
        const int64_t b1 = std::min(b0 + kBlock, seg1), nb = b1 - b0;
        // The block after next is fetched ahead when this call makes it from the cache's rows. Not
        // when it is prepared: those are two sequential streams per KV head, which the hardware
        // prefetcher follows; software prefetches on top made a 1-thread step at 7K-29K 1.6x slower
        // (fill buffers taken by lines already on their way). (Whole blocks at once: the int8 walk
        // fetches a few lines at a time between its products, and gains; attention_int8_walk.h.)
        const int64_t pf = b0 + 2 * kBlock;
        if (pf + kBlock > a.prepared && pf < L)
          prefetch_kv_rows(kbase, vbase, pf, std::min(kBlock, L - pf), a.k_sp * elem, a.v_sp * elem, D * elem);
        const __m512i *kb = kp, *vb = vp;
        if (b1 - b0 == kBlock && b1 <= a.prepared) {  // a block the caller prepared (prepare_kv_bf16)
          kb = reinterpret_cast<const __m512i*>(kprep + (h * a.prep_sh + b0 / kBlock) * D * 64);
          vb = reinterpret_cast<const __m512i*>(vprep + (h * a.prep_sh + b0 / kBlock) * D * 64);
        } else {
          prepare_block<D>(kbase + b0 * a.k_sp * elem, vbase + b0 * a.v_sp * elem, a.kv_type, a.k_sp, a.v_sp, nb, kp, vp);
        }
        const int64_t tb = std::max(t0, b0 - first_pos);
        int64_t n_active = 0;
        for (int64_t t = tb; t < T; t++) {  // rows (t, g), g = 0 .. G - 1, share nk
          const int64_t nk = std::min(b1, first_pos + t + 1) - b0;
          for (int64_t g0 = 0; g0 < G; g0 += kScoreRows) {
            const int nr = int(std::min<int64_t>(kScoreRows, G - g0));
            const uint32_t* qrows[kScoreRows];
            for (int r = 0; r < nr; r++) qrows[r] = qsp + (h * rows + (g0 + r) * T + t) * DH;
            __m512 sv[kScoreRows][2];
            switch (nr) {
              case 1: scores<1, DH>(kb, qrows, nk, sv); break;
              case 2: scores<2, DH>(kb, qrows, nk, sv); break;
              case 3: scores<3, DH>(kb, qrows, nk, sv); break;
              default: scores<kScoreRows, DH>(kb, qrows, nk, sv); break;
            }
            float* parts[kScoreRows];
            for (int r = 0; r < nr; r++) {
              parts[r] = seg_part + ((g0 + r) * T + t) * stride;
              sc.out[n_active + r] = parts[r];
              sc.nk[n_active + r] = nk;
            }
            uint32_t* e = sc.e.data() + n_active * 16;
            float* corr = sc.corr.data() + n_active;
            switch (nr) {
              case 1: softmax_rows<1, D>(sv, parts, nk, e, corr); break;
              case 2: softmax_rows<2, D>(sv, parts, nk, e, corr); break;
              case 3: softmax_rows<3, D>(sv, parts, nk, e, corr); break;
              default: softmax_rows<kScoreRows, D>(sv, parts, nk, e, corr); break;
            }
            n_active += nr;
          }
        }
        ValueTiles tiles(sc.nk.data(), n_active, kValueRows);
        int64_t i = 0;
        while (i < n_active) {
          const int64_t n = tiles.rows(i);
          const uint32_t* e[kValueRows];
          for (int64_t r = 0; r < n; r++) e[r] = sc.e.data() + (i + r) * 16;
          float* const* o = sc.out.data() + i;
          const float* c = sc.corr.data() + i;
          const int64_t pairs = (sc.nk[i] + 1) / 2;
          switch (n) {
            case 1: update_values<1, NC>(o, c, e, pairs, vb); break;
            case 2: update_values<2, NC>(o, c, e, pairs, vb); break;
            case 3: update_values<(kValueRows >= 3 ? 3 : 1), NC>(o, c, e, pairs, vb); break;
            case 4: update_values<(kValueRows >= 4 ? 4 : 1), NC>(o, c, e, pairs, vb); break;
            case 5: update_values<(kValueRows >= 5 ? 5 : 1), NC>(o, c, e, pairs, vb); break;
            default: update_values<kValueRows, NC>(o, c, e, pairs, vb); break;
          }
          i += n;
        }
      }
    }
  });
  // Merge each query's segments in segment order, the dimensions put back in order.
  merge_segments<D>(
      a, pp, nseg, rows, stride, [](const float* p) { return p[D + 1]; },
      [](int i) { return value_dim(i / 16, i % 16); });
}

}  // namespace

void prepare_kv_bf16(const PrepareArgs& a) {
  TORCH_CHECK(a.D == 64 || a.D == 128, "bf16 attention: head_dim must be 64 or 128, not ", a.D);
  const int elem = a.kv_type == KV_F32 ? 4 : 2;
  const int64_t nblk = a.block_end - a.block_begin;
  at::parallel_for(0, a.Hkv * nblk, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; item++) {
      const int64_t h = item / nblk, b = a.block_begin + item % nblk;
      const char* kblk = static_cast<const char*>(a.k) + (h * a.k_sh + b * kBlock * a.k_sp) * elem;
      const char* vblk = static_cast<const char*>(a.v) + (h * a.v_sh + b * kBlock * a.v_sp) * elem;
      __m512i* kp = reinterpret_cast<__m512i*>(static_cast<char*>(a.kprep) + (h * a.prep_sh + b) * a.D * 64);
      __m512i* vp = reinterpret_cast<__m512i*>(static_cast<char*>(a.vprep) + (h * a.prep_sh + b) * a.D * 64);
      if (a.D == 64)
        prepare_block<64>(kblk, vblk, a.kv_type, a.k_sp, a.v_sp, kBlock, kp, vp);
      else
        prepare_block<128>(kblk, vblk, a.kv_type, a.k_sp, a.v_sp, kBlock, kp, vp);
    }
  });
}

void attention_bf16(const AttentionArgs& a) {
  TORCH_CHECK(a.D == 64 || a.D == 128, "bf16 attention: head_dim must be 64 or 128, not ", a.D);
  for_query_slices(a, [](const AttentionArgs& part) {
    if (part.D == 64)
      attention_queries<64>(part);
    else
      attention_queries<128>(part);
  });
}

#else

const char* attention_bf16_path() { return ""; }

void prepare_kv_bf16(const PrepareArgs&) {
  TORCH_CHECK(false, "bf16 attention needs AVX512-BF16, which this build of the kernels does not have");
}

void attention_bf16(const AttentionArgs&) {
  TORCH_CHECK(false, "bf16 attention needs AVX512-BF16, which this build of the kernels does not have");
}

#endif

}  // namespace tf
