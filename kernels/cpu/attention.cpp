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

// For each row r of a tile: o_r = o_r * c_r + sum_{j < nk_r} e_r[j] * vf[j], keys in order. The
// rows of a tile share each V row load; each row's sequence is the one-row sequence.
template <int RT>
inline void update_values(float* const* o, const float* c, const float* const* e, const int64_t* nk, const float* vf,
                          int64_t D) {
  constexpr int CH = 4;  // registers of one row kept across the key loop
  constexpr int64_t step = CH * V::W;
  const int64_t main = D - D % step;
  int64_t nk_max = 0;
  for (int r = 0; r < RT; r++) nk_max = std::max(nk_max, nk[r]);
  for (int64_t d0 = 0; d0 < main; d0 += step) {
    V::reg acc[RT][CH];
    for (int r = 0; r < RT; r++)
      for (int ch = 0; ch < CH; ch++) acc[r][ch] = V::mul(V::load(o[r] + d0 + ch * V::W), V::set1(c[r]));
    for (int64_t j = 0; j < nk_max; j++) {
      V::reg vv[CH];
      for (int ch = 0; ch < CH; ch++) vv[ch] = V::load(vf + j * D + d0 + ch * V::W);
      for (int r = 0; r < RT; r++) {
        if (j >= nk[r]) continue;
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
      for (int64_t j = 0; j < nk[r]; j++) acc = acc + e[r][j] * vf[j * D + d];
      o[r][d] = acc;
    }
  }
}

struct Scratch {
  std::vector<float> kf, vf, s, e, corr;
  std::vector<int64_t> nk;
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
    }
  }
};

}  // namespace

namespace {

// Queries [0, a.T) of `a` (the last T of a.length positions); see attention().
void attention_queries(const AttentionArgs& a) {
  const int64_t T = a.T, Hq = a.Hq, Hkv = a.Hkv, D = a.D, L = a.length;
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
        load_rows(kbase + b0 * a.k_sp * elem, a.kv_type, a.k_sp, nb, D, sc.kf.data());
        load_rows(vbase + b0 * a.v_sp * elem, a.kv_type, a.v_sp, nb, D, sc.vf.data());
        const int64_t tb = std::max(t0, b0 - first_pos);  // first query that reaches the block
        // scores and softmax statistics, row by row; rows listed in `active`
        int64_t n_active = 0;
        const int64_t ld = kBlock + V::W;
        for (int64_t g = 0; g < G; g++) {
          const float* qg = qsp + (h * rows + g * T) * D;
          for (int64_t t = tb; t < T; t++, n_active++) {
            const int64_t nk = std::min(b1, first_pos + t + 1) - b0;
            const float* qrow = qg + t * D;
            float* p = seg_part + (g * T + t) * stride;
            float* srow = sc.s.data() + n_active * ld;
            float* erow = sc.e.data() + n_active * ld;
            float corr;
            if (D % V::W == 0) {
              // lanes = keys: scores, max, exp and their sum all vectorised; lanes >= nk masked
              constexpr int NV = kBlock / V::W;
              V::reg sv[NV];
              float bm = -INFINITY;
              for (int c = 0; c < NV; c++) {
                const int64_t j0 = c * V::W;
                sv[c] = j0 < nk ? V::keep_first(dot_keys(qrow, sc.kf.data() + j0 * D, D), int(nk - j0), -INFINITY)
                                : V::set1(-INFINITY);
                bm = std::max(bm, V::hmax(sv[c]));
              }
              const float m_old = p[D];
              const float m_new = std::max(m_old, bm);
              corr = exp1(m_old - m_new);
              const V::reg mv = V::set1(m_new);
              V::reg total = V::zero();
              for (int c = 0; c < NV; c++) {
                const int64_t j0 = c * V::W;
                const V::reg ev = j0 < nk ? V::keep_first(V::exp(V::sub(sv[c], mv)), int(nk - j0), 0.0f) : V::zero();
                V::store(erow + j0, ev);
                total = c == 0 ? ev : V::add(total, ev);
              }
              p[D + 1] = p[D + 1] * corr + V::hsum(total);
              p[D] = m_new;
            } else {  // head widths that are not a multiple of the register: one key at a time
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
            }
            sc.corr[n_active] = corr;
            sc.nk[n_active] = nk;
          }
        }
        // weighted values, in tiles of rows that share each V row
        int64_t i = 0;
        const int64_t n_t = T - tb;
        auto row_out = [&](int64_t idx) {
          const int64_t g = idx / n_t, t = tb + idx % n_t;
          return seg_part + (g * T + t) * stride;
        };
        for (; i + 4 <= n_active; i += 4) {
          float* o[4] = {row_out(i), row_out(i + 1), row_out(i + 2), row_out(i + 3)};
          const float* e[4] = {sc.e.data() + i * ld, sc.e.data() + (i + 1) * ld, sc.e.data() + (i + 2) * ld,
                               sc.e.data() + (i + 3) * ld};
          update_values<4>(o, sc.corr.data() + i, e, sc.nk.data() + i, sc.vf.data(), D);
        }
        for (; i < n_active; i++) {
          float* o[1] = {row_out(i)};
          const float* e[1] = {sc.e.data() + i * ld};
          update_values<1>(o, sc.corr.data() + i, e, sc.nk.data() + i, sc.vf.data(), D);
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

}  // namespace

// Long calls (prefill chunks) run in slices of kQueryChunk queries, which bounds the partials to a
// few MB; a query's own arithmetic does not depend on the slice it is in.
constexpr int64_t kQueryChunk = 64;

void attention(const AttentionArgs& a) {
  for (int64_t t0 = 0; t0 < a.T; t0 += kQueryChunk) {
    AttentionArgs part = a;
    part.T = std::min(kQueryChunk, a.T - t0);
    part.q = a.q + t0 * a.q_st;
    part.out = a.out + t0 * a.Hq * a.D;
    part.length = a.length - a.T + t0 + part.T;  // the slice's last query sits at position length - 1
    attention_queries(part);
  }
}

}  // namespace tf
