// What the two int8-activation paths (linear_int8.cpp: AVX512-VNNI, linear_int8_avx2.cpp: AVX2)
// share: how the weights are cut into tiles of 16 rows and spread over threads, and the prefetch of
// the next tile. Each path brings its own decode and row kernels (`work` below).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "linear.h"
#include "quant.h"

namespace tf::int8 {

constexpr int kBlock = 32;  // inputs per activation scale
constexpr int kLanes = 16;  // weight rows per tile (one per lane)

inline void check_inputs(int64_t K) {
  TORCH_CHECK(K % kBlock == 0, "int8 activations need K to be a multiple of ", kBlock);
}

// Software prefetch of the next tile's bytes (contiguous), spread over the parts of this one: the
// hardware prefetcher does not follow 16 interleaved row streams. Into the outer caches: fetched
// into L1 (T0), a tile ahead evicts the strip being computed on.
struct Prefetch {
  const uint8_t* next = nullptr;
  int64_t bytes = 0, done = 0, step = 0;  // step: bytes to cover per part of the current tile
  void spread(int64_t parts) { step = (bytes + parts - 1) / std::max<int64_t>(parts, 1); }
  inline void part() {  // the share of the next tile for one part of this one
    const int64_t until = std::min(bytes, done + step);
    for (; done < until; done += 64) _mm_prefetch(reinterpret_cast<const char*>(next + done), _MM_HINT_T2);
  }
};

// Runs work(w, rows, nr, col, pf) for every tile of kLanes weight rows: `w` its weight, `rows` its
// first row's bytes, `nr` its rows, `col` its first output column, `pf` the prefetch of the next
// tile of the same task. Tasks of at least ~64K weights (fewer only pays the thread hand-off). Which
// thread runs a tile never changes what it computes: tiles own disjoint output columns. Then the
// test hook `row_skew` nudges rows 1.. (the self-check must catch a row-dependent kernel).
template <class Work>
void for_each_tile(const std::vector<WeightSpec>& weights, int64_t K, int64_t T, float* y, int64_t ldy,
                   Work work) {
  struct Tile {
    int part;
    int64_t n0;   // first row within the part
    int64_t col;  // first output column
    int nr;
  };
  std::vector<Tile> tiles;
  int64_t col = 0;
  for (size_t wi = 0; wi < weights.size(); wi++) {
    TORCH_CHECK(!is_dense(weights[wi].type), "int8 activations: dense weights run in the fp32 mode");
    for (int64_t n0 = 0; n0 < weights[wi].n; n0 += kLanes)
      tiles.push_back(Tile{int(wi), n0, col + n0, int(std::min<int64_t>(kLanes, weights[wi].n - n0))});
    col += weights[wi].n;
  }
  const int64_t grain = std::max<int64_t>(1, 65536 / (kLanes * K));
  at::parallel_for(0, int64_t(tiles.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ti++) {
      const Tile& tile = tiles[ti];
      const WeightSpec& w = weights[tile.part];
      Prefetch pf;
      if (ti + 1 < end) {  // the next tile of this task, wherever it is
        const Tile& nt = tiles[ti + 1];
        const WeightSpec& nw = weights[nt.part];
        pf.next = nw.data + nt.n0 * nw.row_bytes;
        pf.bytes = nt.nr * nw.row_bytes;
      }
      work(w, w.data + tile.n0 * w.row_bytes, tile.nr, tile.col, pf);
    }
  });
  if (T > 1 && row_skew()) {
    for (int64_t t = 1; t < T; t++) y[t * ldy] = std::nextafter(y[t * ldy], INFINITY);
  }
}

}  // namespace tf::int8
