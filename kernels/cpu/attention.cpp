// One-pass blocked attention with an online softmax (see attention.h for why it is exact).
#include "attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace tf {

namespace {

// Convert n rows of D values (stride sp elements) from the cache's storage type to fp32.
inline void load_rows(const void* base, int kv_type, int64_t sp, int64_t n, int64_t D, float* dst) {
  const int64_t main = D - D % V::W;
  for (int64_t j = 0; j < n; j++) {
    float* out = dst + j * D;
    if (kv_type == KV_F32) {
      const float* src = static_cast<const float*>(base) + j * sp;
      std::copy(src, src + D, out);
      continue;
    }
    const uint16_t* src = static_cast<const uint16_t*>(base) + j * sp;
    if (kv_type == KV_F16) {
      for (int64_t d = 0; d < main; d += V::W) V::store(out + d, V::load_f16(src + d));
      for (int64_t d = main; d < D; d++) out[d] = f16_to_f32(src[d]);
    } else {
      for (int64_t d = 0; d < main; d += V::W) V::store(out + d, V::load_bf16(src + d));
      for (int64_t d = main; d < D; d++) out[d] = bf16_to_f32(src[d]);
    }
  }
}

inline float dot(const float* a, const float* b, int64_t D) {
  const int64_t main = D - D % V::W;
  V::reg acc = V::zero();
  for (int64_t d = 0; d < main; d += V::W) acc = V::fma(V::load(a + d), V::load(b + d), acc);
  float tail = 0.0f;
  for (int64_t d = main; d < D; d++) tail = tail + a[d] * b[d];
  return V::hsum(acc) + tail;
}

// Four keys at once: the same operations per key as `dot`, in four independent chains.
inline void dot4(const float* a, const float* k, int64_t D, float* out) {
  const int64_t main = D - D % V::W;
  V::reg acc0 = V::zero(), acc1 = V::zero(), acc2 = V::zero(), acc3 = V::zero();
  for (int64_t d = 0; d < main; d += V::W) {
    const V::reg q = V::load(a + d);
    acc0 = V::fma(q, V::load(k + d), acc0);
    acc1 = V::fma(q, V::load(k + D + d), acc1);
    acc2 = V::fma(q, V::load(k + 2 * D + d), acc2);
    acc3 = V::fma(q, V::load(k + 3 * D + d), acc3);
  }
  float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t d = main; d < D; d++)
    for (int i = 0; i < 4; i++) tail[i] = tail[i] + a[d] * k[i * D + d];
  out[0] = V::hsum(acc0) + tail[0];
  out[1] = V::hsum(acc1) + tail[1];
  out[2] = V::hsum(acc2) + tail[2];
  out[3] = V::hsum(acc3) + tail[3];
}

// Scores of W consecutive keys (rows of k, D apart) against a: lane i is key i. Per key: one
// accumulator over d in register-wide chunks, then the fixed reduce_keys tree. D % W == 0.
inline V::reg dot_keys(const float* a, const float* k, int64_t D) {
  V::reg acc[V::W];
  for (int i = 0; i < V::W; i++) acc[i] = V::zero();
  for (int64_t d = 0; d < D; d += V::W) {
    const V::reg q = V::load(a + d);
    for (int i = 0; i < V::W; i++) acc[i] = V::fma(q, V::load(k + i * D + d), acc[i]);
  }
  return V::reduce_keys(acc);
}

inline float exp1(float x) {
  float lanes[V::W];
  V::store(lanes, V::exp(V::set1(x)));
  return lanes[0];
}

// Key registers per block, and query rows per score group.
constexpr int kKeyRegs = int(kBlock) / V::W;
constexpr int kScoreRows = 4;

// The online-softmax step of nr rows over one block, given their scores (lanes = keys): per row,
// the new running max m, the correction exp(m_old - m) of what it has so far, the weights
// exp(s - m) (stored in e, ld apart) and the running sum of the weights (their registers added in
// key order, then one fixed tree). Each row's arithmetic is what it has alone; the rows take each
// step together so that their dependency chains overlap, and their corrections come from one
// vector exp per register of rows (a lane-wise function: lane r is what the row's value alone gives).
inline void softmax_rows(V::reg (*sv)[kKeyRegs], int nr, float* const* p, int64_t D, int64_t nk, float* e, int64_t ld,
                         float* corr) {
  constexpr int kPad = (kScoreRows + V::W - 1) / V::W * V::W;
  float m_new[kScoreRows], diff[kPad] = {};
  for (int r = 0; r < nr; r++) {
    float bm = -INFINITY;
    for (int c = 0; c < kKeyRegs; c++) bm = std::max(bm, V::hmax(sv[r][c]));
    m_new[r] = std::max(p[r][D], bm);
    diff[r] = p[r][D] - m_new[r];
  }
  for (int i = 0; i < kPad; i += V::W) V::store(diff + i, V::exp(V::load(diff + i)));
  V::reg total[kScoreRows];
  for (int r = 0; r < nr; r++) {
    const V::reg mv = V::set1(m_new[r]);
    for (int c = 0; c < kKeyRegs; c++) {
      const int64_t j0 = c * V::W;
      const V::reg ev = j0 < nk ? V::keep_first(V::exp(V::sub(sv[r][c], mv)), int(nk - j0), 0.0f) : V::zero();
      V::store(e + r * ld + j0, ev);
      total[r] = c == 0 ? ev : V::add(total[r], ev);
    }
  }
  for (int r = 0; r < nr; r++) {
    corr[r] = diff[r];
    p[r][D + 1] = p[r][D + 1] * diff[r] + V::hsum(total[r]);
    p[r][D] = m_new[r];
  }
}

// For each row of a tile: o_r = o_r * c_r + sum_{j < nk} e_r[j] * vf[j], keys in order. The rows
// of a tile share nk and every V row load; each row's operations are those it has alone.
template <int RT>
inline void update_values(float* const* o, const float* c, const float* const* e, int64_t nk, const float* vf,
                          int64_t D) {
  constexpr int CH = 4;  // registers of one row kept across the key loop
  constexpr int64_t step = CH * V::W;
  const int64_t main = D - D % step;
  for (int64_t d0 = 0; d0 < main; d0 += step) {
    V::reg acc[RT][CH];
    for (int r = 0; r < RT; r++)
      for (int ch = 0; ch < CH; ch++) acc[r][ch] = V::mul(V::load(o[r] + d0 + ch * V::W), V::set1(c[r]));
    for (int64_t j = 0; j < nk; j++) {
      V::reg vv[CH];
      for (int ch = 0; ch < CH; ch++) vv[ch] = V::load(vf + j * D + d0 + ch * V::W);
      for (int r = 0; r < RT; r++) {
        const V::reg ev = V::set1(e[r][j]);
        for (int ch = 0; ch < CH; ch++) acc[r][ch] = V::fma(ev, vv[ch], acc[r][ch]);
      }
    }
    for (int r = 0; r < RT; r++)
      for (int ch = 0; ch < CH; ch++) V::store(o[r] + d0 + ch * V::W, acc[r][ch]);
  }
  for (int r = 0; r < RT; r++) {  // widths that are not a multiple of CH registers: scalar
    for (int64_t d = main; d < D; d++) {
      float acc = o[r][d] * c[r];
      for (int64_t j = 0; j < nk; j++) acc = acc + e[r][j] * vf[j * D + d];
      o[r][d] = acc;
    }
  }
}

// Rows per value tile: as many accumulators as the registers hold (4 per row, V rows loaded once).
constexpr int kValueRows = V::W == 16 ? 6 : 2;

struct Scratch {
  std::vector<float> kf, vf, s, e, corr;
  std::vector<int64_t> nk;
  std::vector<float*> out;
  void reserve(int64_t D, int64_t rows) {
    if (int64_t(kf.size()) < kBlock * D) {
      kf.assign(kBlock * D, 0.0f);
      vf.assign(kBlock * D, 0.0f);
    }
    if (int64_t(corr.size()) < rows) {
      s.assign(rows * (kBlock + V::W), 0.0f);
      e.assign(rows * (kBlock + V::W), 0.0f);
      corr.assign(rows, 0.0f);
      nk.assign(rows, 0);
      out.assign(rows, nullptr);
    }
  }
};

}  // namespace

namespace {

// Queries [0, a.T) of `a` (the last T of a.length positions); see attention(). DT: the head width
// when it is a compile-time constant (64, 128: every offset folds into the instructions), else 0.
template <int DT>
void attention_queries_t(const AttentionArgs& a) {
  const int64_t T = a.T, Hq = a.Hq, Hkv = a.Hkv, D = DT > 0 ? DT : a.D, L = a.length;
  const int64_t G = Hq / Hkv, rows = G * T, first_pos = L - T;
  const int64_t nseg = (L + kSegment - 1) / kSegment;
  const int64_t stride = D + 2;  // a partial: o[D], m, l
  // Scratch kept by the calling thread from call to call (no page faults per call).
  thread_local std::vector<float> qs, part;
  if (int64_t(qs.size()) < Hkv * rows * D) qs.resize(Hkv * rows * D);
  if (int64_t(part.size()) < Hkv * nseg * rows * stride) part.resize(Hkv * nseg * rows * stride);
  float* qsp = qs.data();
  float* pp = part.data();
  const V::reg scale = V::set1(a.scale);
  const int64_t dmain = D - D % V::W;
  for (int64_t t = 0; t < T; t++) {  // scaled queries, rows r = g * T + t of KV head h
    for (int64_t hq = 0; hq < Hq; hq++) {
      const float* src = a.q + t * a.q_st + hq * a.q_sh;
      float* dst = qsp + ((hq / G) * rows + (hq % G) * T + t) * D;
      for (int64_t d = 0; d < dmain; d += V::W) V::store(dst + d, V::mul(V::load(src + d), scale));
      for (int64_t d = dmain; d < D; d++) dst[d] = src[d] * a.scale;
    }
  }
  const int elem = a.kv_type == KV_F32 ? 4 : 2;
  at::parallel_for(0, Hkv * nseg, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch sc;
    sc.reserve(D, rows);
    for (int64_t item = begin; item < end; item++) {
      const int64_t h = item / nseg, s = item % nseg;
      const int64_t seg0 = s * kSegment, seg1 = std::min(L, seg0 + kSegment);
      const int64_t t0 = std::max<int64_t>(0, seg0 - first_pos);  // first query that reaches the segment
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
        const int64_t b1 = std::min(b0 + kBlock, seg1);
        // keys of this block reached by any query: up to the last query's position
        const int64_t nb = b1 - b0;
        const int64_t pf = b0 + 2 * kBlock;
        if (pf < L)
          prefetch_kv_rows(kbase, vbase, pf, std::min(kBlock, L - pf), a.k_sp * elem, a.v_sp * elem, D * elem);
        load_rows(kbase + b0 * a.k_sp * elem, a.kv_type, a.k_sp, nb, D, sc.kf.data());
        load_rows(vbase + b0 * a.v_sp * elem, a.kv_type, a.v_sp, nb, D, sc.vf.data());
        const int64_t tb = std::max(t0, b0 - first_pos);  // first query that reaches the block
        // scores and softmax statistics, row by row; rows listed in `active`
        int64_t n_active = 0;
        const int64_t ld = kBlock + V::W;
        // rows in (query, head) order: the heads of one query share nk, so they form value tiles
        for (int64_t t = tb; t < T; t++) {
          const int64_t nk = std::min(b1, first_pos + t + 1) - b0;
          if (D % V::W == 0) {
            // lanes = keys: scores, max, exp and their sum all vectorised; lanes >= nk masked. The
            // heads go through in groups that take each step together (see softmax_rows).
            for (int64_t g0 = 0; g0 < G; g0 += kScoreRows) {
              const int nr = int(std::min<int64_t>(kScoreRows, G - g0));
              V::reg sv[kScoreRows][kKeyRegs];
              float* parts[kScoreRows];
              for (int r = 0; r < nr; r++) {
                const float* qrow = qsp + (h * rows + (g0 + r) * T + t) * D;
                for (int c = 0; c < kKeyRegs; c++) {
                  const int64_t j0 = c * V::W;
                  sv[r][c] = j0 < nk ? V::keep_first(dot_keys(qrow, sc.kf.data() + j0 * D, D), int(nk - j0), -INFINITY)
                                     : V::set1(-INFINITY);
                }
                parts[r] = seg_part + ((g0 + r) * T + t) * stride;
                sc.out[n_active + r] = parts[r];
                sc.nk[n_active + r] = nk;
              }
              softmax_rows(sv, nr, parts, D, nk, sc.e.data() + n_active * ld, ld, sc.corr.data() + n_active);
              n_active += nr;
            }
            continue;
          }
          for (int64_t g = 0; g < G; g++, n_active++) {  // head widths that are not a multiple of the register
            const float* qrow = qsp + (h * rows + g * T + t) * D;
            float* p = seg_part + (g * T + t) * stride;
            sc.out[n_active] = p;
            float* srow = sc.s.data() + n_active * ld;
            float* erow = sc.e.data() + n_active * ld;
            float corr;
            int64_t j = 0;
            for (; j + 4 <= nk; j += 4) dot4(qrow, sc.kf.data() + j * D, D, srow + j);
            for (; j < nk; j++) srow[j] = dot(qrow, sc.kf.data() + j * D, D);
            float bm = -INFINITY;
            for (j = 0; j < nk; j++) bm = std::max(bm, srow[j]);
            const float m_old = p[D];
            const float m_new = std::max(m_old, bm);
            corr = exp1(m_old - m_new);
            for (j = nk; j < (nk + V::W - 1) / V::W * V::W; j++) srow[j] = m_new;  // padding lanes
            const V::reg mv = V::set1(m_new);
            for (j = 0; j < nk; j += V::W) V::store(erow + j, V::exp(V::sub(V::load(srow + j), mv)));
            float lsum = 0.0f;
            for (j = 0; j < nk; j++) lsum = lsum + erow[j];
            p[D + 1] = p[D + 1] * corr + lsum;
            p[D] = m_new;
            sc.corr[n_active] = corr;
            sc.nk[n_active] = nk;
          }
        }
        // weighted values, in tiles of rows that share nk and each V row
        ValueTiles tiles(sc.nk.data(), n_active, kValueRows);
        int64_t i = 0;
        while (i < n_active) {
          const int64_t n = tiles.rows(i);
          const float* e[kValueRows];
          for (int64_t r = 0; r < n; r++) e[r] = sc.e.data() + (i + r) * ld;
          float* const* o = sc.out.data() + i;
          const float* c = sc.corr.data() + i;
          const int64_t nk = sc.nk[i];
          switch (n) {
            case 1: update_values<1>(o, c, e, nk, sc.vf.data(), D); break;
            case 2: update_values<2>(o, c, e, nk, sc.vf.data(), D); break;
            case 3: update_values<3>(o, c, e, nk, sc.vf.data(), D); break;
            case 4: update_values<4>(o, c, e, nk, sc.vf.data(), D); break;
            case 5: update_values<5>(o, c, e, nk, sc.vf.data(), D); break;
            default: update_values<kValueRows>(o, c, e, nk, sc.vf.data(), D); break;
          }
          i += n;
        }
      }
    }
  });
  // Merge each query's segments in segment order.
  at::parallel_for(0, T * Hq, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; row++) {
      const int64_t t = row / Hq, hq = row % Hq, h = hq / G, r = (hq % G) * T + t;
      const int64_t last = (first_pos + t) / kSegment;
      float M = -INFINITY;
      for (int64_t s = 0; s <= last; s++) M = std::max(M, pp[((h * nseg + s) * rows + r) * stride + D]);
      float* out = a.out + (t * Hq + hq) * D;
      std::fill(out, out + D, 0.0f);
      float den = 0.0f;
      for (int64_t s = 0; s <= last; s++) {
        const float* p = pp + ((h * nseg + s) * rows + r) * stride;
        const float w = exp1(p[D] - M);
        den = den + w * p[D + 1];
        const V::reg wv = V::set1(w);
        for (int64_t d = 0; d < dmain; d += V::W) V::store(out + d, V::fma(wv, V::load(p + d), V::load(out + d)));
        for (int64_t d = dmain; d < D; d++) out[d] = out[d] + w * p[d];
      }
      const V::reg dv = V::set1(den);
      for (int64_t d = 0; d < dmain; d += V::W) V::store(out + d, V::div(V::load(out + d), dv));
      for (int64_t d = dmain; d < D; d++) out[d] = out[d] / den;
    }
  });
}

void attention_queries(const AttentionArgs& a) {
  switch (a.D) {
    case 64: return attention_queries_t<64>(a);
    case 128: return attention_queries_t<128>(a);
    default: return attention_queries_t<0>(a);
  }
}

}  // namespace

void prefetch_kv_rows(const void* k, const void* v, int64_t first, int64_t n, int64_t k_stride, int64_t v_stride,
                      int64_t row_bytes) {
#if defined(TF_AVX512) || defined(TF_AVX2)
  const char* kc = static_cast<const char*>(k);
  const char* vc = static_cast<const char*>(v);
  for (int64_t j = 0; j < n; j++) {
    for (int64_t off = 0; off < row_bytes; off += 64) {
      _mm_prefetch(kc + (first + j) * k_stride + off, _MM_HINT_T1);
      _mm_prefetch(vc + (first + j) * v_stride + off, _MM_HINT_T1);
    }
  }
#else
  (void)k, (void)v, (void)first, (void)n, (void)k_stride, (void)v_stride, (void)row_bytes;
#endif
}

void attention(const AttentionArgs& a) {
  for_query_slices(a, [](const AttentionArgs& part) { attention_queries(part); });
}

}  // namespace tf
