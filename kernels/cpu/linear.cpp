// Quantized and dense matrix products for decode steps and verification windows (see linear.h).
#include "linear.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>

#include "blocks.h"
#include "quant.h"
#include "simd.h"

namespace tf {

namespace {

std::atomic<bool> g_row_skew{false};

// Rows of x in one tile: every row's accumulator sees the same operations in the same order.
template <int R>
inline void dot_quant(const int8_t* q, const float* sc, const float* mn, int64_t K, const float* const* xs,
                      float* out) {
  V::reg acc[R];
  for (int r = 0; r < R; r++) acc[r] = V::zero();
  const int64_t groups = K / kGroup;
  for (int64_t g = 0; g < groups; g++) {
    const V::reg s = V::set1(sc[g]), m = V::set1(mn[g]);
    const int8_t* qg = q + g * kGroup;
    for (int c = 0; c < kGroup; c += V::W) {
      const V::reg w = V::fma(V::load_i8(qg + c), s, m);
      for (int r = 0; r < R; r++) acc[r] = V::fma(V::load(xs[r] + g * kGroup + c), w, acc[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r] = V::hsum(acc[r]);
}

inline float scalar_weight(int type, const uint8_t* row, int64_t k) {
  uint16_t h;
  switch (type) {
    case F32: {
      float f;
      std::memcpy(&f, row + 4 * k, 4);
      return f;
    }
    case F16:
      std::memcpy(&h, row + 2 * k, 2);
      return f16_to_f32(h);
    default:
      std::memcpy(&h, row + 2 * k, 2);
      return bf16_to_f32(h);
  }
}

inline V::reg vector_weight(int type, const uint8_t* row, int64_t k) {
  switch (type) {
    case F32: return V::load(reinterpret_cast<const float*>(row) + k);
    case F16: return V::load_f16(reinterpret_cast<const uint16_t*>(row) + k);
    default: return V::load_bf16(reinterpret_cast<const uint16_t*>(row) + k);
  }
}

template <int R>
inline void dot_dense(int type, const uint8_t* row, int64_t K, const float* const* xs, float* out) {
  V::reg acc[R];
  for (int r = 0; r < R; r++) acc[r] = V::zero();
  const int64_t main = K - K % V::W;
  for (int64_t k = 0; k < main; k += V::W) {
    const V::reg w = vector_weight(type, row, k);
    for (int r = 0; r < R; r++) acc[r] = V::fma(V::load(xs[r] + k), w, acc[r]);
  }
  for (int r = 0; r < R; r++) {
    float tail = 0.0f;
    for (int64_t k = main; k < K; k++) tail = tail + xs[r][k] * scalar_weight(type, row, k);
    out[r] = V::hsum(acc[r]) + tail;
  }
}

#if defined(TF_AVX512) || defined(TF_AVX2)
// One pass over NR weight rows' blocks, weights decoded in registers (blocks.h), R input rows:
// NR * R independent accumulators (the latency of one chain of FMAs would leave the core idle).
// Each output still sees exactly the operations of dot_quant over an unpacked row, in order.
template <int TYPE, int NR, int R>
inline void dot_blocks_t(const uint8_t* const* rows, int64_t K, const float* const* xs, float* out) {
  V::reg acc[NR][R];
  for (int i = 0; i < NR; i++)
    for (int r = 0; r < R; r++) acc[i][r] = V::zero();
  const int64_t nb = K / block_elems(TYPE);
  const int bb = block_bytes(TYPE);
  // the next tile's rows (they follow these in memory), fetched while these are computed: the
  // hardware prefetcher alone kept a decode step at about half the memory bandwidth
  const int64_t ahead = NR * nb * bb;
  int64_t next_line = 0;  // offset in a row of the next cache line to fetch
  for (int64_t b = 0; b < nb; b++) {
    for (; next_line < (b + 1) * bb; next_line += 64)
      for (int i = 0; i < NR; i++) _mm_prefetch(reinterpret_cast<const char*>(rows[i] + ahead + next_line), _MM_HINT_T0);
    for (int i = 0; i < NR; i++) {
      int64_t base = b * block_elems(TYPE);
      visit_block<TYPE>(rows[i] + b * bb, [&](__m128i q, float s, float m) {
        V::reg w[kRegsPerGroup];
        group_weights(q, s, m, w);
        for (int c = 0; c < kRegsPerGroup; c++)
          for (int r = 0; r < R; r++) acc[i][r] = V::fma(V::load(xs[r] + base + c * V::W), w[c], acc[i][r]);
        base += kGroup;
      });
    }
  }
  for (int i = 0; i < NR; i++)
    for (int r = 0; r < R; r++) out[i * R + r] = V::hsum(acc[i][r]);
}

template <int NR, int R>
inline void dot_blocks(int type, const uint8_t* const* rows, int64_t K, const float* const* xs, float* out) {
  switch (type) {
    case Q4_0: return dot_blocks_t<Q4_0, NR, R>(rows, K, xs, out);
    case Q4_1: return dot_blocks_t<Q4_1, NR, R>(rows, K, xs, out);
    case Q5_0: return dot_blocks_t<Q5_0, NR, R>(rows, K, xs, out);
    case Q5_1: return dot_blocks_t<Q5_1, NR, R>(rows, K, xs, out);
    case Q8_0: return dot_blocks_t<Q8_0, NR, R>(rows, K, xs, out);
    case Q4_K: return dot_blocks_t<Q4_K, NR, R>(rows, K, xs, out);
    case Q5_K: return dot_blocks_t<Q5_K, NR, R>(rows, K, xs, out);
    case Q6_K: return dot_blocks_t<Q6_K, NR, R>(rows, K, xs, out);
    default: return;
  }
}

template <int TYPE>
inline void dequant_row_t(const uint8_t* row, int64_t K, float* dst) {
  const int64_t nb = K / block_elems(TYPE);
  const int bb = block_bytes(TYPE);
  int64_t base = 0;
  for (int64_t b = 0; b < nb; b++) {
    visit_block<TYPE>(row + b * bb, [&](__m128i q, float s, float m) {
      V::reg w[kRegsPerGroup];
      group_weights(q, s, m, w);
      for (int c = 0; c < kRegsPerGroup; c++) V::store(dst + base + c * V::W, w[c]);
      base += kGroup;
    });
  }
}

inline void dequant_row(int type, const uint8_t* row, int64_t K, float* dst) {
  switch (type) {
    case Q4_0: return dequant_row_t<Q4_0>(row, K, dst);
    case Q4_1: return dequant_row_t<Q4_1>(row, K, dst);
    case Q5_0: return dequant_row_t<Q5_0>(row, K, dst);
    case Q5_1: return dequant_row_t<Q5_1>(row, K, dst);
    case Q8_0: return dequant_row_t<Q8_0>(row, K, dst);
    case Q4_K: return dequant_row_t<Q4_K>(row, K, dst);
    case Q5_K: return dequant_row_t<Q5_K>(row, K, dst);
    case Q6_K: return dequant_row_t<Q6_K>(row, K, dst);
    default: return;
  }
}
constexpr bool kRegisterDecode = true;
// Register tiles (weight rows x input rows), chosen by the number of input rows: one decode of a
// weight group serves every input row of the tile. AVX2 has 16 registers, AVX-512 32.
constexpr int kWeightRows = 4;
constexpr int kInputRows = V::W == 16 ? 4 : 2;
constexpr int kWideInputRows = 8;  // windows of 8+ rows: decode each group once for 8 rows
constexpr int kWideWeightRows = V::W == 16 ? 2 : 1;

// One tile of nr weight rows x r input rows (the shapes above; any other runs as 1 x 1 tiles).
inline void dot_tile(int type, int nr, int r, const uint8_t* const* rows, int64_t K, const float* const* xs,
                     float* out) {
  if (nr == kWeightRows && r == kInputRows) return dot_blocks<kWeightRows, kInputRows>(type, rows, K, xs, out);
  if (nr == kWeightRows && r == 1) return dot_blocks<kWeightRows, 1>(type, rows, K, xs, out);
  if (nr == kWideWeightRows && r == kWideInputRows)
    return dot_blocks<kWideWeightRows, kWideInputRows>(type, rows, K, xs, out);
  if (nr == kWideWeightRows && r == kInputRows) return dot_blocks<kWideWeightRows, kInputRows>(type, rows, K, xs, out);
  if (nr == kWideWeightRows && r == 1) return dot_blocks<kWideWeightRows, 1>(type, rows, K, xs, out);
  if (nr == 1 && r == kWideInputRows) return dot_blocks<1, kWideInputRows>(type, rows, K, xs, out);
  if (nr == 1 && r == kInputRows) return dot_blocks<1, kInputRows>(type, rows, K, xs, out);
  return dot_blocks<1, 1>(type, rows, K, xs, out);
}
#else
constexpr int kWeightRows = 1;
constexpr int kInputRows = 1;
constexpr int kWideInputRows = 1;
constexpr int kWideWeightRows = 1;
inline void dot_tile(int, int, int, const uint8_t* const*, int64_t, const float* const*, float*) {}
inline void dequant_row(int, const uint8_t*, int64_t, float*) {}
constexpr bool kRegisterDecode = false;
#endif

struct Unpacked {
  std::vector<int8_t> q;
  std::vector<float> sc, mn;
  void reserve(int64_t K) {
    if (int64_t(q.size()) < K) {
      q.resize(K);
      sc.resize(K / kGroup + 1);
      mn.resize(K / kGroup + 1);
    }
  }
};

}  // namespace

void set_row_skew(bool on) { g_row_skew.store(on); }
bool row_skew() { return g_row_skew.load(); }

void linear(const float* x, int64_t T, int64_t ldx, int64_t K, const std::vector<WeightSpec>& weights,
            const float* bias, float* y, int64_t ldy) {
  std::vector<int64_t> starts(weights.size() + 1, 0);
  for (size_t i = 0; i < weights.size(); i++) starts[i + 1] = starts[i] + weights[i].n;
  const int64_t total = starts.back();
  // a task of at least ~64K weight elements: fewer only pays the thread hand-off
  const int64_t grain = std::max<int64_t>(8, 65536 / std::max<int64_t>(K, 1));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    thread_local Unpacked un;
    un.reserve(K);
    size_t wi = 0;
    const float* xs[8];
    float out[32];
    const uint8_t* rows[kWeightRows];
    for (int64_t n = begin; n < end;) {
      while (n >= starts[wi + 1]) wi++;
      const WeightSpec& w = weights[wi];
      const uint8_t* row = w.data + (n - starts[wi]) * w.row_bytes;
      const bool dense = is_dense(w.type);
      if (!dense && kRegisterDecode) {
        const bool wide = T >= kWideInputRows;
        const int nrb = wide ? kWideWeightRows : kWeightRows;
        const int nr = std::min(end, starts[wi + 1]) - n >= nrb ? nrb : 1;
        for (int i = 0; i < nr; i++) rows[i] = row + i * w.row_bytes;
        int64_t t = 0;
        while (t < T) {
          const int r_tile = wide && T - t >= kWideInputRows ? kWideInputRows : (T - t >= kInputRows ? kInputRows : 1);
          for (int r = 0; r < r_tile; r++) xs[r] = x + (t + r) * ldx;
          dot_tile(w.type, nr, r_tile, rows, K, xs, out);
          for (int i = 0; i < nr; i++)
            for (int r = 0; r < r_tile; r++)
              y[(t + r) * ldy + n + i] = bias ? out[i * r_tile + r] + bias[n + i] : out[i * r_tile + r];
          t += r_tile;
        }
        n += nr;
        continue;
      }
      if (!dense) unpack_row(w.type, row, K, un.q.data(), un.sc.data(), un.mn.data());
      const float b = bias ? bias[n] : 0.0f;
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) {
        for (int r = 0; r < 4; r++) xs[r] = x + (t + r) * ldx;
        if (dense)
          dot_dense<4>(w.type, row, K, xs, out);
        else
          dot_quant<4>(un.q.data(), un.sc.data(), un.mn.data(), K, xs, out);
        for (int r = 0; r < 4; r++) y[(t + r) * ldy + n] = bias ? out[r] + b : out[r];
      }
      for (; t < T; t++) {
        xs[0] = x + t * ldx;
        if (dense)
          dot_dense<1>(w.type, row, K, xs, out);
        else
          dot_quant<1>(un.q.data(), un.sc.data(), un.mn.data(), K, xs, out);
        y[t * ldy + n] = bias ? out[0] + b : out[0];
      }
      n++;
    }
  });
  if (T > 1 && g_row_skew.load()) {
    for (int64_t t = 1; t < T; t++) y[t * ldy] = std::nextafter(y[t * ldy], INFINITY);
  }
}

void dequantize_rows(const WeightSpec& w, int64_t K, const int64_t* rows, int64_t n_rows, float* out) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    thread_local Unpacked un;
    un.reserve(K);
    for (int64_t i = begin; i < end; i++) {
      const uint8_t* row = w.data + rows[i] * w.row_bytes;
      float* dst = out + i * K;
      if (is_dense(w.type)) {
        for (int64_t k = 0; k < K; k++) dst[k] = scalar_weight(w.type, row, k);
        continue;
      }
      if (kRegisterDecode) {
        dequant_row(w.type, row, K, dst);
        continue;
      }
      unpack_row(w.type, row, K, un.q.data(), un.sc.data(), un.mn.data());
      for (int64_t g = 0; g < K / kGroup; g++) {
        const V::reg s = V::set1(un.sc[g]), m = V::set1(un.mn[g]);
        for (int c = 0; c < kGroup; c += V::W)
          V::store(dst + g * kGroup + c, V::fma(V::load_i8(un.q.data() + g * kGroup + c), s, m));
      }
    }
  });
}

}  // namespace tf
