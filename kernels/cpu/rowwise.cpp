#include "rowwise.h"

#include <cmath>

#include "simd.h"

namespace tf {

void rmsnorm(const float* x, int64_t T, int64_t ldx, int64_t dim, const float* weight, float eps, float* out) {
  const int64_t main = dim - dim % V::W;
  for (int64_t t = 0; t < T; t++) {
    const float* row = x + t * ldx;
    float* dst = out + t * dim;
    V::reg acc = V::zero();
    for (int64_t i = 0; i < main; i += V::W) {
      const V::reg v = V::load(row + i);
      acc = V::fma(v, v, acc);
    }
    float tail = 0.0f;
    for (int64_t i = main; i < dim; i++) tail = tail + row[i] * row[i];
    const float ss = V::hsum(acc) + tail;
    const float r = 1.0f / std::sqrt(ss / float(dim) + eps);
    const V::reg rv = V::set1(r);
    for (int64_t i = 0; i < main; i += V::W) V::store(dst + i, V::mul(V::mul(V::load(row + i), rv), V::load(weight + i)));
    for (int64_t i = main; i < dim; i++) dst[i] = (row[i] * r) * weight[i];
  }
}

void swiglu(const float* gate_up, int64_t T, int64_t I, float* out) {
  const int64_t main = I - I % V::W;
  const V::reg one = V::set1(1.0f), zero = V::zero();
  for (int64_t t = 0; t < T; t++) {
    const float* g = gate_up + t * 2 * I;
    const float* u = g + I;
    float* dst = out + t * I;
    for (int64_t i = 0; i < main; i += V::W) {
      const V::reg gv = V::load(g + i);
      const V::reg silu = V::div(gv, V::add(one, V::exp(V::sub(zero, gv))));
      V::store(dst + i, V::mul(silu, V::load(u + i)));
    }
    for (int64_t i = main; i < I; i++) {
      float lanes[V::W];
      V::store(lanes, V::exp(V::set1(-g[i])));
      dst[i] = (g[i] / (1.0f + lanes[0])) * u[i];
    }
  }
}

void rope(const float* x, int64_t T, int64_t H, int64_t D, int64_t ldt, int64_t ldh, const float* cos,
          const float* sin, bool interleaved, float* out) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; t++) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < H; h++) {
      const float* src = x + t * ldt + h * ldh;
      float* dst = out + (t * H + h) * D;
      for (int64_t i = 0; i < half; i++) {
        const int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
        const float a = src[ia], b = src[ib];
        dst[ia] = a * c[i] - b * s[i];
        dst[ib] = b * c[i] + a * s[i];
      }
    }
  }
}

}  // namespace tf
