// Row-wise operations of a transformer block, written so that a row's result never depends on the
// other rows of the call: RMSNorm (one fixed-order sum of squares per row) and the SwiGLU gate
// (silu(gate) * up, element-wise with the one exp of simd.h).
#pragma once

#include <cstdint>

namespace tf {

void rmsnorm(const float* x, int64_t T, int64_t ldx, int64_t dim, const float* weight, float eps, float* out);

// gate_up [T, 2I] (gate first) -> out [T, I]
void swiglu(const float* gate_up, int64_t T, int64_t I, float* out);

}  // namespace tf
