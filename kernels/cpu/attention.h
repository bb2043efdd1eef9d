// Causal attention of T queries (the last T of `length` positions) over a KV buffer, for decode
// steps, verification windows, prefill chunks and the retrieval view's buffer alike.
//
// Exact by construction: keys are cut into absolute segments of kSegment positions and, inside a
// segment, absolute blocks of kBlock. The query at position p reads exactly the blocks holding keys
// 0..p, block by block in order, with an online softmax in fp32 (running max, running sum, running
// weighted sum of values); its segments are then merged in segment order. That sequence depends on
// p and the keys alone: not on how many queries share the call (a window or a single step), nor
// on the thread count (threads take whole (KV head, segment) items; each writes its own partials).
// The query heads of one KV head share every block read: K and V are converted once per block.
#pragma once

#include <cstdint>

namespace tf {

constexpr int64_t kSegment = 256;
constexpr int64_t kBlock = 32;

enum KvType : int { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

struct AttentionArgs {
  const float* q;  // [T, Hq, D] with strides q_st, q_sh (elements); inner dim contiguous
  int64_t q_st, q_sh;
  const void* k;  // [Hkv, >= length, D] with strides k_sh, k_sp; inner dim contiguous
  const void* v;
  int64_t k_sh, k_sp, v_sh, v_sp;
  int kv_type;
  int64_t T, Hq, Hkv, D, length;
  float scale;
  float* out;  // [T, Hq, D] contiguous
  // Optional (bf16 attention only): keys 0 .. prepared - 1 as prepare_kv_bf16 laid them out, per KV
  // head prep_sh blocks of kBlock keys apart; prepared is a multiple of kBlock.
  const void* kprep = nullptr;
  const void* vprep = nullptr;
  int64_t prep_sh = 0, prepared = 0;
};

void attention(const AttentionArgs& a);

// Long calls (prefill chunks) run in slices of kQueryChunk queries, which bounds the partials to a
// few MB; a query's own arithmetic does not depend on the slice it is in. run(slice) for each.
constexpr int64_t kQueryChunk = 64;
template <class Run>
inline void for_query_slices(const AttentionArgs& a, Run&& run) {
  for (int64_t t0 = 0; t0 < a.T; t0 += kQueryChunk) {
    AttentionArgs part = a;
    part.T = a.T - t0 < kQueryChunk ? a.T - t0 : kQueryChunk;
    part.q = a.q + t0 * a.q_st;
    part.out = a.out + t0 * a.Hq * a.D;
    part.length = a.length - a.T + t0 + part.T;  // the slice's last query sits at position length - 1
    run(part);
  }
}

// The value tiles of a block: from row i of n_active, the rows that share row i's nk (its run), cut
// into tiles of near-equal size of at most max_rows (a tile of one row has too few independent
// chains to hide the latency of its multiply-adds). Which rows share a tile never changes a row's
// arithmetic, only which value loads it shares. A run is scanned once: a prefill slice's block has
// one run of hundreds of rows, and rescanning what is left of it at every tile was quadratic.
class ValueTiles {
 public:
  ValueTiles(const int64_t* nk, int64_t n_active, int64_t max_rows) : nk_(nk), n_active_(n_active), max_rows_(max_rows) {}
  // Rows in the tile that starts at row i (i: 0, then each tile's end).
  int64_t rows(int64_t i) {
    if (i >= run_end_) {
      run_end_ = i + 1;
      while (run_end_ < n_active_ && nk_[run_end_] == nk_[i]) run_end_++;
    }
    const int64_t run = run_end_ - i, tiles = (run + max_rows_ - 1) / max_rows_;
    return (run + tiles - 1) / tiles;
  }

 private:
  const int64_t* nk_;
  int64_t n_active_, max_rows_, run_end_ = 0;
};

// Software prefetch of n key rows from `first` on, in K and V (row_bytes each, strides in bytes),
// into L2. The attention kernels fetch the block after next while one is computed, across segment
// edges (a segment's first blocks waited on memory otherwise): the K and V streams are read in
// bursts between long computations, which the hardware prefetcher alone does not follow. Into L2
// rather than L1: a block's 128 lines at once into L1 stall on its miss buffers.
void prefetch_kv_rows(const void* k, const void* v, int64_t first, int64_t n, int64_t k_stride, int64_t v_stride,
                      int64_t row_bytes);

}  // namespace tf
