// The last step of the blocked attention kernels with dot-product units (attention_bf16.cpp,
// attention_int8*.cpp): each query's segment partials merged in segment order, as attention.cpp
// does, so that a query's result depends on its position and the keys alone. Lane-wise operations
// only, so a 16-lane and an 8-lane build give the same bits.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "attention.h"
#include "simd.h"

namespace tf {

inline float exp1(float x) {
  float lanes[V::W];
  V::store(lanes, V::exp(V::set1(x)));
  return lanes[0];
}

// Partials pp: per KV head, segment and row r = g * T + t, `stride` floats: o[D] (in the kernel's
// lane order), the running max m at o[D], and the denominator, which den(p) reads. Each query's
// segments are weighted by exp(m_s - M) (M their largest m) in order, divided by the weighted
// denominators' sum, and lane i goes to dimension dim(i) of a.out.
template <int D, class Den, class Dim>
void merge_segments(const AttentionArgs& a, const float* pp, int64_t nseg, int64_t rows, int64_t stride, Den den,
                    Dim dim) {
  const int64_t T = a.T, Hq = a.Hq, G = a.Hq / a.Hkv, first_pos = a.length - a.T;
  at::parallel_for(0, T * Hq, 8, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[D];
    for (int64_t row = begin; row < end; row++) {
      const int64_t t = row / Hq, hq = row % Hq, h = hq / G, r = (hq % G) * T + t;
      const int64_t last = (first_pos + t) / kSegment;
      float M = -INFINITY;
      for (int64_t s = 0; s <= last; s++) M = std::max(M, pp[((h * nseg + s) * rows + r) * stride + D]);
      std::fill(acc, acc + D, 0.0f);
      float total = 0.0f;
      for (int64_t s = 0; s <= last; s++) {
        const float* p = pp + ((h * nseg + s) * rows + r) * stride;
        const float w = exp1(p[D] - M);
        total = total + w * den(p);
        const V::reg wv = V::set1(w);
        for (int d = 0; d < D; d += V::W) V::store(acc + d, V::fma(wv, V::load(p + d), V::load(acc + d)));
      }
      const V::reg dv = V::set1(total);
      for (int d = 0; d < D; d += V::W) V::store(acc + d, V::div(V::load(acc + d), dv));
      float* out = a.out + (t * Hq + hq) * D;
      for (int i = 0; i < D; i++) out[dim(i)] = acc[i];
    }
  });
}

}  // namespace tf
