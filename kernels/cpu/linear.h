// y[t, n] = sum_k x[t, k] * W[n, k] (+ bias[n]) for a few rows t, over quantized or dense weights.
//
// Exact by construction: output (t, n) is always computed by one thread, as one accumulator vector
// walked over k in order (for each group of 16 weights: w = q * scale + min, acc = x * w + acc),
// then reduced by V::hsum. Rows are processed in register tiles whose row count depends on the call
// (linear.cpp), each running that same sequence per row, so a row's result does not depend on how many rows share the call; threads split the
// output columns n only, so it does not depend on the thread count either.
#pragma once

#include <cstdint>
#include <vector>

namespace tf {

struct WeightSpec {
  const uint8_t* data;  // row-major [n, row_bytes]
  int type;             // GgmlType
  int64_t n;            // output rows
  int64_t row_bytes;
};

void linear(const float* x, int64_t T, int64_t ldx, int64_t K, const std::vector<WeightSpec>& weights,
            const float* bias, float* y, int64_t ldy);

// Dense float32 rows of a weight (rows [r0, r1)), with the very values `linear` multiplies by.
void dequantize_rows(const WeightSpec& w, int64_t K, const int64_t* rows, int64_t n_rows, float* out);

// Test hook: when on, outputs of calls with more than one row are nudged by one ulp (a kernel made
// row-count dependent on purpose, for the load-time self-check's tests).
void set_row_skew(bool on);
bool row_skew();

}  // namespace tf
