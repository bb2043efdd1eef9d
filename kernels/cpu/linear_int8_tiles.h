// What the two int8-activation paths (linear_int8.cpp: AVX512-VNNI, linear_int8_avx2.cpp: AVX2)
// share: how the weights are cut into tiles of 16 rows and spread over threads, the prefetch of the
// next tile, and the byte layout of packed tiles. Each path brings its own decode and row kernels
// (`work` below).
#pragma once

#include "linear_int8.h"

// Only a build with one of the two paths has anything here (an ARM or scalar build has no
// immintrin.h to include).
#if defined(TF_INT8_VNNI) || defined(TF_INT8_AVX2)

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

// Both paths' lanes: the 4x4 transposes of their decode put weight row 4m + L in lane 4L + m (its
// own inverse). A 64-byte "line" or "transposed vector" has 16 lanes of 4 bytes; the AVX2 path reads
// it as two halves, lanes 0-7 and 8-15.
constexpr int perm(int i) { return 4 * (i % 4) + i / 4; }

// -- packed tiles (linear_int8.h): one layout, written and read by both paths -----------------------
// Each path packs at load with its own instructions; the bytes are the same (tested across builds).
// Transposed vector of bytes [o, o + 16) of a block: lane perm(i), dword j (j = 0..3) holds bytes
// o + 4j .. o + 4j + 3 of row i; stored as 4 vectors, the one of dword j first.
//
// Q8_0, Q5_0, Q4_0: a tile of 16 rows and nb blocks of 32 inputs, in three sections:
//   codes:  nb x (Q8_0: 8, Q5_0 and Q4_0: 4) vectors of 64 bytes. Q8_0: the codes (+ 128, as
//           unsigned bytes), vector 4h + j = dword j of codes 16h ..; Q5_0 / Q4_0: the qs bytes
//           transposed (the nibbles as the file has them);
//   masks:  Q5_0 only, nb x 64 bytes, the fifth bits as 8 bit planes: bit L of byte i is the fifth
//           bit of the code in byte i of the block's line L = 4h + j (h = 0: the low nibbles of
//           vector j, elements 4j ..; h = 1: the high ones, 16 + 4j ..). A line is made with a
//           shift and a mask of the plane vector, on both paths;
//   scales: nb x 16 f16 (2 bytes), lane order.
template <int TYPE>
struct PackedLayout {
  static constexpr int kCodes = TYPE == Q8_0 ? 8 : 4;  // vectors per block
  static constexpr int kMaskBytes = TYPE == Q5_0 ? 64 : 0;
  static_assert(64 * kCodes + kMaskBytes + 32 == 16 * int(TYPE == Q8_0   ? sizeof(block_q8_0)
                                                         : TYPE == Q5_0 ? sizeof(block_q5_0)
                                                                        : sizeof(block_q4_0)),
                "a packed tile holds the file's bytes");
  static int64_t masks_at(int64_t nb) { return nb * 64 * kCodes; }
  static int64_t scales_at(int64_t nb) { return nb * (64 * kCodes + kMaskBytes); }
};

// K-quant tiles: per super-block of 256 inputs, 16 x its block bytes, in this order:
//   Q4_K: the qs vectors (jj = 0..3: the 8 transposed vectors of qs bytes 32 jj ..), then the 4
//         transposed head vectors (d, dmin, scales).
//   Q6_K: per half h, the 16 ql vectors; per half, the 8 qh vectors; the 4 scale vectors; the 16
//         f16 d in lane order.
// So a transposed part of a super-block sits at 16 x its offset in the block, but Q4_K's head (after
// its qs) and Q6_K's d (16 f16, not 4 vectors).
constexpr int64_t kQ4kQs = 2048, kQ6kQh = 2048, kQ6kSc = 3072, kQ6kD = 3328;

// The weight types both paths pack.
constexpr bool packs(int type) {
  return type == Q8_0 || type == Q5_0 || type == Q4_0 || type == Q4_K || type == Q6_K;
}

// int8_packed_type of both paths.
inline int packed_type(int type, int64_t n) { return packs(type) && n % kLanes == 0 ? kPacked + type : -1; }

// pack_int8 of both paths: the checks, then the tiles over threads, each through
// pack_tile(src, stride, dst) (16 rows of the file at src, row stride apart, into dst).
template <class PackTile>
void pack_tiles(const WeightSpec& w, int64_t K, uint8_t* out, PackTile pack_tile) {
  TORCH_CHECK(packs(w.type) && w.n % kLanes == 0, "pack_int8: type ", w.type, " with ", w.n, " rows is not packed");
  const int be = block_elems(w.type);
  TORCH_CHECK(K % be == 0 && w.row_bytes == K / be * block_bytes(w.type), "pack_int8: rows of the wrong width");
  const int64_t tile_bytes = kLanes * w.row_bytes;
  at::parallel_for(0, w.n / kLanes, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) pack_tile(w.data + t * tile_bytes, w.row_bytes, out + t * tile_bytes);
  });
}

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

#endif  // TF_INT8_VNNI || TF_INT8_AVX2
