// Row-wise operations of a transformer block, written so that a row's result never depends on the
// other rows of the call: RMSNorm (one fixed-order sum of squares per row), the SwiGLU gate
// (silu(gate) * up, element-wise with the one exp of simd.h) and the rotary embedding.
#pragma once

#include <cstdint>

namespace tf {

void rmsnorm(const float* x, int64_t T, int64_t ldx, int64_t dim, const float* weight, float eps, float* out);

// gate_up [T, 2I] (gate first) -> out [T, I]
void swiglu(const float* gate_up, int64_t T, int64_t I, float* out);

// x [T, H, D] (row t at x + t * ldt, head h at + h * ldh; D contiguous), cos / sin [T, D / 2] ->
// out [T, H, D] contiguous: pairs (i, i + D/2), or (2i, 2i + 1) when `interleaved`, rotated as
// (a c - b s, b c + a s), each product and sum rounded once: model.apply_rope's torch operations
// one for one, so the same bits, in one call instead of a dozen.
void rope(const float* x, int64_t T, int64_t H, int64_t D, int64_t ldt, int64_t ldh, const float* cos,
          const float* sin, bool interleaved, float* out);

}  // namespace tf
