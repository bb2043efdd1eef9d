// The int8-activation matrix products on AVX2 (see linear_int8.h for what they compute): the same
// outputs, bit for bit, as the AVX512-VNNI path of linear_int8.cpp, for CPUs without VNNI (Zen 3,
// AVX2-only Xeons, AVX-512 CPUs before VNNI).
//
// Without `vpdpbusd`, a dot product of unsigned bytes by int8 activations is `vpmaddubsw` (pairs of
// products summed into *saturating* int16) then `vpmaddwd` by ones (pairs of int16 into int32). A
// saturation would lose bits, so every int16 here is bounded below 32767 by construction (|q| <= 127
// after the rounding of step 1):
//  - 4-, 5- and 6-bit codes are stored unsigned, u = c + offset in [0, 2^b - 1] (the offset taken
//    back in integers afterwards, as the VNNI path takes back its +128). A pair of products is at
//    most 2 * 127 * (2^b - 1), so the results of 8 (4-bit), 4 (5-bit) or 2 (6-bit) `vpmaddubsw` are
//    added in int16 before one `vpmaddwd`: at most 30480, 31496 and 32004 (`kCodes`, checked below).
//  - 8-bit codes (Q8_0: -128 .. 127, the full int8 range) as |c| <= 128, unsigned, with the
//    activations given c's sign (`vpsignb`: -q never overflows since |q| <= 127): a pair is at most
//    2 * 128 * 127 = 32512, and each `vpmaddubsw` result is widened on its own.
// So the integer dot products are exact, the integers `vpdpbusd` gives, and the float part of each
// block is the header's fixed sequence, the VNNI path's, lane by lane: the outputs are the same bits.
//
// Layout: as in linear_int8.cpp, a thread decodes a tile of 16 weight rows over the whole of K into a
// strip of 64-byte lines (lane p: 4 consecutive codes of weight row perm(p)), with the same scales and
// mins. Here a line is two 256-bit halves of 8 lanes, and each half runs over the strip on its own
// (8 row accumulators fit the 16 registers of AVX2; 16 would not).
#include "linear_int8.h"

#if defined(TF_INT8_AVX2)

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>

#include "blocks.h"
#include "quant.h"

namespace tf {

const char* int8_path() { return "avx2"; }

namespace {

constexpr int kBlock = 32;  // inputs per activation scale
constexpr int kLanes = 16;  // weight rows per tile (one per lane of a line)
constexpr int kHalf = 8;    // lanes per 256-bit half of a line

// The 4x4 transposes of the decode put weight row 4m + L in lane 4L + m (its own inverse).
constexpr int perm(int i) { return 4 * (i % 4) + i / 4; }

struct alignas(64) Line {
  uint8_t b[64];
};

// How a weight type's codes c go into `vpmaddubsw`.
struct Codes {
  int offset;  // stored u = c + offset (unsigned types: 0)
  int max_u;   // largest stored byte
  int sums;    // `vpmaddubsw` results added in int16 before one `vpmaddwd`
  bool sign;   // Q8_0: |c| stored, c's sign moved onto the activations
};

constexpr Codes kCodes(int type) {
  switch (type) {
    case Q4_0: return {8, 15, 8, false};
    case Q4_1: case Q4_K: return {0, 15, 8, false};
    case Q5_0: return {16, 31, 4, false};
    case Q5_1: case Q5_K: return {0, 31, 4, false};
    case Q6_K: return {32, 63, 2, false};
    default: return {0, 128, 1, true};  // Q8_0
  }
}

// The bound of the header comment: no int16 of any sequence can saturate.
constexpr bool fits_int16(int type) { return kCodes(type).sums * 2 * 127 * kCodes(type).max_u <= 32767; }
static_assert(fits_int16(Q4_0) && fits_int16(Q4_1) && fits_int16(Q4_K) && fits_int16(Q5_0), "int16 bound");
static_assert(fits_int16(Q5_1) && fits_int16(Q5_K) && fits_int16(Q6_K) && fits_int16(Q8_0), "int16 bound");

// Step 1 of the header for one block of 32 inputs (the VNNI path's operations on 8 lanes); returns
// the sums of q over its two halves.
inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* half_sums) {
  __m256 v[4];
  for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + 8 * i);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                           _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));  // max is order-free (no NaN)
  // a NaN among the inputs makes the block's outputs NaN, as the fp32 mode's would be
  int nan = 0;
  for (int i = 0; i < 4; i++) nan |= _mm256_movemask_ps(_mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  *d = nan ? NAN : amax / 127.0f;
  const __m256 iv = _mm256_set1_ps(id);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i qi[4];
  for (int i = 0; i < 4; i++) {
    // round to nearest even explicitly (not through MXCSR), then an exact conversion; out of range
    // and NaN give INT_MIN, as the VNNI path's conversion does, clamped alike
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    qi[i] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvttps_epi32(r), hi), lo);
  }
  // int32 -> int8 (in range: the packs never saturate); the packs interleave 128-bit lanes, the
  // permute puts the 8 dwords back in element order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  for (int half = 0; half < 2; half++) {  // integers: exact in any order
    const __m256i s = _mm256_add_epi32(qi[2 * half], qi[2 * half + 1]);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    half_sums[half] = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
  }
}

// The rounded activations of a call, and the per-block integers and floats the products need.
struct Acts {
  int64_t K = 0, nc = 0;
  std::vector<int8_t> q;     // [T, K]
  std::vector<float> d;      // [T, nc]  scale of each block
  std::vector<int32_t> s16;  // [T, 2 nc] sum of q over each half block (Q6_K's offset)
  std::vector<int32_t> s32;  // [T, nc]  sum of q over the block (the other offsets)
  std::vector<float> dsum;   // [T, nc]  d * sum of q over the block (what a min multiplies)

  void build(const float* x, int64_t T, int64_t ldx, int64_t K_) {
    K = K_, nc = K_ / kBlock;
    q.resize(T * K), d.resize(T * nc), s16.resize(2 * T * nc), s32.resize(T * nc), dsum.resize(T * nc);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; t++) {
        for (int64_t c = 0; c < nc; c++) {
          int32_t s[2];
          const int64_t i = t * nc + c;
          quantize_block(x + t * ldx + c * kBlock, q.data() + t * K + c * kBlock, &d[i], s);
          s16[2 * i] = s[0];
          s16[2 * i + 1] = s[1];
          s32[i] = s[0] + s[1];
          dsum[i] = d[i] * float(s[0] + s[1]);
        }
      }
    });
  }
};

// One tile of up to 16 weight rows, decoded over all of K.
struct Strip {
  std::vector<Line> codes;  // group g of 16 inputs: lines 4g .. 4g + 3 (dword j of the group in line 4g + j)
  std::vector<Line> signs;  // Q8_0: the codes c themselves, laid out alike (`vpsignb` reads their signs)
  std::vector<float> sc;    // [K / 16][16] scale of each group and lane
  std::vector<float> mn;    // [K / 32][16] min of each block and lane

  void reserve(int64_t K) {
    if (int64_t(codes.size()) < K / 4) {
      codes.resize(K / 4);
      signs.resize(K / 4);
      sc.resize(K);
      mn.resize(K / 2);
    }
  }
};

// Software prefetch of the next tile's bytes, spread over this one's rows (as in linear_int8.cpp).
struct Prefetch {
  const uint8_t* next = nullptr;
  int64_t bytes = 0, done = 0, step = 0;  // step: bytes to cover per part of the current tile
  void spread(int64_t parts) { step = (bytes + parts - 1) / std::max<int64_t>(parts, 1); }
  inline void part() {  // the share of the next tile for one part of this one
    const int64_t until = std::min(bytes, done + step);
    for (; done < until; done += 64) _mm_prefetch(reinterpret_cast<const char*>(next + done), _MM_HINT_T2);
  }
};

// 16 rows x 4 dwords of each group (row-major, 16 bytes a row) -> 4 lines, dword j of row i in line
// j, lane perm(i): the VNNI path's 4x4 transposes within 128-bit lanes, on the two halves of a line.
void transpose_groups(Line* lines, int64_t ng) {
  for (int64_t g = 0; g < ng; g++) {
    __m256i* v = reinterpret_cast<__m256i*>(lines + 4 * g);  // in: v[k] rows 2k, 2k + 1; out: v[2j + half]
    __m256i r[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_load_si256(v + k);
    for (int half = 0; half < 2; half++) {  // rows 4m + L, L = 2 half, 2 half + 1: lanes 8 half .. 8 half + 7
      const __m256i a = r[half], b = r[2 + half], c = r[4 + half], d = r[6 + half];
      const __m256i ab0 = _mm256_unpacklo_epi32(a, b), ab1 = _mm256_unpackhi_epi32(a, b);
      const __m256i cd0 = _mm256_unpacklo_epi32(c, d), cd1 = _mm256_unpackhi_epi32(c, d);
      _mm256_store_si256(v + half, _mm256_unpacklo_epi64(ab0, cd0));
      _mm256_store_si256(v + 2 + half, _mm256_unpackhi_epi64(ab0, cd0));
      _mm256_store_si256(v + 4 + half, _mm256_unpacklo_epi64(ab1, cd1));
      _mm256_store_si256(v + 6 + half, _mm256_unpackhi_epi64(ab1, cd1));
    }
  }
}

// Rows i < nr of a tile at `base` (row stride `stride`), decoded into the strip.
template <int TYPE>
void decode_tile(const uint8_t* base, int64_t stride, int nr, int64_t K, Strip& s, Prefetch& pf) {
  constexpr Codes code = kCodes(TYPE);
  const int64_t nb = K / block_elems(TYPE), ng = K / kGroup;
  const int bb = block_bytes(TYPE);
  uint8_t* stage = s.codes[0].b;  // first row-major per group ([g][row][16 codes]), transposed below
  uint8_t* stage_signs = s.signs[0].b;
  const __m128i offset = _mm_set1_epi8(char(code.offset));
  for (int i = 0; i < nr; i++) {
    pf.part();
    const int p = perm(i);
    const uint8_t* row = base + i * stride;
    int64_t g = 0;
    for (int64_t b = 0; b < nb; b++) {
      visit_block<TYPE>(row + b * bb, [&](__m128i q, float scale, float min) {
        const int64_t at = (g * kLanes + i) * 16;
        if constexpr (code.sign) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(stage + at), _mm_abs_epi8(q));  // -128 -> 128, unsigned
          _mm_storeu_si128(reinterpret_cast<__m128i*>(stage_signs + at), q);
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(stage + at), _mm_add_epi8(q, offset));
        }
        s.sc[g * kLanes + p] = scale;
        if ((g & 1) == 0) s.mn[(g >> 1) * kLanes + p] = min;
        g++;
      });
    }
  }
  for (int i = nr; i < kLanes; i++) {  // lanes without a row: scale 0, their codes never matter
    const int p = perm(i);
    for (int64_t g = 0; g < ng; g++) s.sc[g * kLanes + p] = 0.0f;
    for (int64_t c = 0; c < ng / 2; c++) s.mn[c * kLanes + p] = 0.0f;
  }
  transpose_groups(s.codes.data(), ng);
  if constexpr (code.sign) transpose_groups(s.signs.data(), ng);
}

void decode(int type, const uint8_t* base, int64_t stride, int nr, int64_t K, Strip& s, Prefetch pf) {
  pf.spread(nr);
  switch (type) {
    case Q4_0: return decode_tile<Q4_0>(base, stride, nr, K, s, pf);
    case Q4_1: return decode_tile<Q4_1>(base, stride, nr, K, s, pf);
    case Q5_0: return decode_tile<Q5_0>(base, stride, nr, K, s, pf);
    case Q5_1: return decode_tile<Q5_1>(base, stride, nr, K, s, pf);
    case Q8_0: return decode_tile<Q8_0>(base, stride, nr, K, s, pf);
    case Q4_K: return decode_tile<Q4_K>(base, stride, nr, K, s, pf);
    case Q5_K: return decode_tile<Q5_K>(base, stride, nr, K, s, pf);
    case Q6_K: return decode_tile<Q6_K>(base, stride, nr, K, s, pf);
    default: TORCH_CHECK(false, "int8 activations: unsupported weight type ", type);
  }
}

inline __m256i bcast4(const int8_t* p) {  // 4 int8 activations in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Integer dot products, lines j0 .. j0 + n - 1 of a block (one half: 8 lanes, every line's half at
// stride 2) by the row's activations xq[4 j ..]: sum over them of u * q, or c * q for Q8_0, in int32.
template <int TYPE>
inline __m256i dot(const __m256i* u, const __m256i* sg, const int8_t* xq, int j0, int n) {
  constexpr Codes code = kCodes(TYPE);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i sum = _mm256_setzero_si256();
  for (int j = j0; j < j0 + n; j += code.sums) {
    __m256i p = _mm256_setzero_si256();
    for (int k = j; k < j + code.sums && k < j0 + n; k++) {
      const __m256i a = _mm256_load_si256(u + 2 * k);
      const __m256i x = code.sign ? _mm256_sign_epi8(bcast4(xq + 4 * k), _mm256_load_si256(sg + 2 * k))
                                  : bcast4(xq + 4 * k);
      p = _mm256_add_epi16(p, _mm256_maddubs_epi16(a, x));  // within the bound of kCodes
    }
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
  }
  return sum;
}

// R input rows over one half of a strip. Per block and row, in this order (the VNNI path's, lane
// by lane): the integer dot products, minus the offset; acc = float(dot) * (scale * d) + acc (for
// Q6_K: its two halves, first then second); then, for types with mins, acc = min * (d * sum q) + acc.
template <int R, int TYPE>
void rows_over_half(const Strip& s, const Acts& a, const int64_t* ts, int half, __m256* out) {
  constexpr Codes code = kCodes(TYPE);
  constexpr bool halves = TYPE == Q6_K;
  constexpr bool mins = TYPE == Q4_1 || TYPE == Q5_1 || TYPE == Q4_K || TYPE == Q5_K;
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  const int64_t nc = a.nc, K = a.K;
  for (int64_t c = 0; c < nc; c++) {
    const __m256i* u = reinterpret_cast<const __m256i*>(s.codes[8 * c].b) + half;
    const __m256i* sg = reinterpret_cast<const __m256i*>(s.signs[8 * c].b) + half;
    const __m256 sa = _mm256_loadu_ps(&s.sc[2 * c * kLanes + half * kHalf]);
    const __m256 sb = halves ? _mm256_loadu_ps(&s.sc[(2 * c + 1) * kLanes + half * kHalf]) : sa;
    const __m256 mn = mins ? _mm256_loadu_ps(&s.mn[c * kLanes + half * kHalf]) : sa;
    for (int r = 0; r < R; r++) {
      const int64_t t = ts[r], i = t * nc + c;
      const int8_t* xq = a.q.data() + t * K + c * kBlock;
      const __m256 dv = _mm256_set1_ps(a.d[i]);
      if constexpr (halves) {
        const __m256i h0 = _mm256_sub_epi32(dot<TYPE>(u, sg, xq, 0, 4), _mm256_set1_epi32(code.offset * a.s16[2 * i]));
        const __m256i h1 = _mm256_sub_epi32(dot<TYPE>(u, sg, xq, 4, 4), _mm256_set1_epi32(code.offset * a.s16[2 * i + 1]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h0), _mm256_mul_ps(sa, dv), acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h1), _mm256_mul_ps(sb, dv), acc[r]);
      } else {
        const __m256i h = _mm256_sub_epi32(dot<TYPE>(u, sg, xq, 0, 8), _mm256_set1_epi32(code.offset * a.s32[i]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(sa, dv), acc[r]);
      }
      if constexpr (mins) acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a.dsum[i]), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r] = acc[r];
}

template <int TYPE>
void all_rows(const Strip& s, const Acts& a, int64_t T, int nr, const float* bias, float* y, int64_t ldy) {
  int64_t ts[8];
  __m256 out[2][8];
  alignas(64) float lanes[kLanes];
  for (int64_t t = 0; t < T;) {
    const int R = T - t >= 8 ? 8 : (T - t >= 4 ? 4 : 1);
    for (int r = 0; r < R; r++) ts[r] = t + r;
    for (int half = 0; half < 2; half++) {
      if (R == 8)
        rows_over_half<8, TYPE>(s, a, ts, half, out[half]);
      else if (R == 4)
        rows_over_half<4, TYPE>(s, a, ts, half, out[half]);
      else
        rows_over_half<1, TYPE>(s, a, ts, half, out[half]);
    }
    for (int r = 0; r < R; r++) {
      _mm256_store_ps(lanes, out[0][r]);
      _mm256_store_ps(lanes + kHalf, out[1][r]);
      float* dst = y + (t + r) * ldy;
      for (int i = 0; i < nr; i++) dst[i] = bias ? lanes[perm(i)] + bias[i] : lanes[perm(i)];
    }
    t += R;
  }
}

void rows(int type, const Strip& s, const Acts& a, int64_t T, int nr, const float* bias, float* y, int64_t ldy) {
  switch (type) {
    case Q4_0: return all_rows<Q4_0>(s, a, T, nr, bias, y, ldy);
    case Q4_1: return all_rows<Q4_1>(s, a, T, nr, bias, y, ldy);
    case Q5_0: return all_rows<Q5_0>(s, a, T, nr, bias, y, ldy);
    case Q5_1: return all_rows<Q5_1>(s, a, T, nr, bias, y, ldy);
    case Q8_0: return all_rows<Q8_0>(s, a, T, nr, bias, y, ldy);
    case Q4_K: return all_rows<Q4_K>(s, a, T, nr, bias, y, ldy);
    case Q5_K: return all_rows<Q5_K>(s, a, T, nr, bias, y, ldy);
    default: return all_rows<Q6_K>(s, a, T, nr, bias, y, ldy);
  }
}

struct Tile {
  int part;
  int64_t n0;   // first row within the part
  int64_t col;  // first output column
  int nr;
};

}  // namespace

void quantize_rows_int8(const float* x, int64_t T, int64_t ldx, int64_t K, int8_t* q, float* d) {
  TORCH_CHECK(K % kBlock == 0, "int8 activations need K to be a multiple of ", kBlock);
  thread_local Acts a;
  a.build(x, T, ldx, K);
  std::memcpy(q, a.q.data(), T * K);
  std::memcpy(d, a.d.data(), T * a.nc * sizeof(float));
}

void linear_int8(const float* x, int64_t T, int64_t ldx, int64_t K, const std::vector<WeightSpec>& weights,
                 const float* bias, float* y, int64_t ldy) {
  TORCH_CHECK(K % kBlock == 0, "int8 activations need K to be a multiple of ", kBlock);
  std::vector<Tile> tiles;
  int64_t col = 0;
  for (size_t wi = 0; wi < weights.size(); wi++) {
    TORCH_CHECK(!is_dense(weights[wi].type), "int8 activations: dense weights run in the fp32 mode");
    for (int64_t n0 = 0; n0 < weights[wi].n; n0 += kLanes)
      tiles.push_back(Tile{int(wi), n0, col + n0, int(std::min<int64_t>(kLanes, weights[wi].n - n0))});
    col += weights[wi].n;
  }
  thread_local Acts acts;
  acts.build(x, T, ldx, K);
  const Acts& a = acts;
  // a task of at least ~64K weights: fewer only pays the thread hand-off
  const int64_t grain = std::max<int64_t>(1, 65536 / (kLanes * K));
  at::parallel_for(0, int64_t(tiles.size()), grain, [&](int64_t begin, int64_t end) {
    thread_local Strip strip;
    strip.reserve(K);
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
      decode(w.type, w.data + tile.n0 * w.row_bytes, w.row_bytes, tile.nr, K, strip, pf);
      rows(w.type, strip, a, T, tile.nr, bias ? bias + tile.col : nullptr, y + tile.col, ldy);
    }
  });
  if (T > 1 && row_skew()) {
    for (int64_t t = 1; t < T; t++) y[t * ldy] = std::nextafter(y[t * ldy], INFINITY);
  }
}

}  // namespace tf

#endif  // TF_INT8_AVX2
