// What the int8 attention's two kernels share (attention_int8.cpp with AVX512-VNNI `vpdpbusd`,
// attention_int8_avx2.cpp with AVX2 `vpmaddubsw`): the layout of a prepared block, the walk over
// segments and blocks, and the merge. A kernel is a policy class K that supplies the products:
//
//   K::quantize<D>(x, codes) -> scale     a row's codes and scale (attention_int8.h: nearest even,
//                                         zero codes for a row of zeros or with a NaN or infinity)
//   K::kQueryBytes                        bytes per dimension of a query row's codes as K reads them
//   K::query_codes<D>(codes, dst)         a query row's codes in that form
//   K::kWeightBytes                       bytes of a row's weight codes for one block
//   K::rows<D>(...)                       scores and the online-softmax step of up to kScoreRows rows,
//                                         fetching st.kahead's lines a share per step of its loop
//   K::block_values<D>(vb, aux)           what a block's values need before the rows' products
//   K::values<D>(..., ahead)              the values step of up to K::kValueRows rows of equal nk,
//                                         fetching ahead's lines likewise
//
// Both kernels compute the same numbers (attention_int8.h), bit for bit: the integer sums are the
// same integers, and every floating-point step is the same lane-wise IEEE operation in the same
// order. The prepared blocks are the same bytes, so the document cache and the tests do not depend
// on which one a CPU runs.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_int8.h"
#include "attention_merge.h"
#include "simd.h"

namespace tf::int8att {

constexpr int kScoreRows = 8;  // rows of one (t, g) group whose scores share each key load

// x[0 .. D) = row j of a cache tensor (its storage type), times mul[d] when mul is given.
template <int D>
inline void load_row(const void* base, int kv_type, int64_t sp, int64_t j, const float* mul, float* x) {
  for (int c = 0; c < D; c += V::W) {
    V::reg r;
    if (kv_type == KV_F16)
      r = V::load_f16(static_cast<const uint16_t*>(base) + j * sp + c);
    else if (kv_type == KV_BF16)
      r = V::load_bf16(static_cast<const uint16_t*>(base) + j * sp + c);
    else
      r = V::load(static_cast<const float*>(base) + j * sp + c);
    V::store(x + c, mul ? V::mul(r, V::load(mul + c)) : r);
  }
}

// One block of nb <= kBlock keys quantized and laid out (attention_int8.h: the bytes). Keys: per half
// of 16 keys, D/4 vectors of 64 bytes, vector i lane l = the codes of dimensions 4i .. 4i + 3 of key
// 16 half + l. Values: per quad of keys, D/16 vectors, vector ch lane l = the codes of dimension
// 16 ch + l of the quad's 4 keys. Keys past nb: zero codes and scales. (A 32-byte half of a 64-byte
// vector is 8 whole lanes, which is how the AVX2 kernel reads the same bytes.)
template <class K, int D>
inline void prepare_block(const void* kblk, const void* vblk, int kv_type, int64_t k_sp, int64_t v_sp, int64_t nb,
                          const float* inv_c, uint8_t* kp, uint8_t* vp) {
  constexpr int NC = D / 16, G4 = D / 4;
  alignas(64) int8_t kc[kBlock][D], vc[kBlock][D];
  alignas(64) float x[D];
  float* ks = reinterpret_cast<float*>(kp + kBlock * D);
  int32_t* kcorr = reinterpret_cast<int32_t*>(kp + kBlock * D + 128);
  float* vs = reinterpret_cast<float*>(vp + kBlock * D);
  for (int j = 0; j < kBlock; j++) {
    if (j >= nb) {
      std::memset(kc[j], 0, D);
      std::memset(vc[j], 0, D);
      ks[j] = vs[j] = 0.0f;
      kcorr[j] = 0;
      continue;
    }
    load_row<D>(kblk, kv_type, k_sp, j, inv_c, x);
    ks[j] = K::template quantize<D>(x, kc[j]);
    int32_t sum = 0;
    for (int d = 0; d < D; d++) sum += kc[j][d];
    kcorr[j] = 128 * sum;
    load_row<D>(vblk, kv_type, v_sp, j, nullptr, x);
    vs[j] = K::template quantize<D>(x, vc[j]);
  }
  float vmax = 0.0f;  // (max is order-free: the same as any kernel's reduction)
  for (int j = 0; j < kBlock; j++) vmax = std::max(vmax, vs[j]);
  vs[kBlock] = vmax;  // (the block's spare bytes) the weights' bound
  vs[kBlock + 1] = vmax > 0.0f ? 1.0f / vmax : 0.0f;
  std::memset(vs + kBlock + 2, 0, (64 - kBlock - 2) * sizeof(float));  // the rest: zeros, as in every block
  for (int half = 0; half < 2; half++)
    for (int i = 0; i < G4; i++) {
      uint8_t* dst = kp + (half * G4 + i) * 64;
      for (int l = 0; l < 16; l++) std::memcpy(dst + 4 * l, &kc[16 * half + l][4 * i], 4);
    }
  for (int p = 0; p < kBlock / 4; p++)
    for (int ch = 0; ch < NC; ch++) {
      uint8_t* dst = vp + (p * NC + ch) * 64;
      for (int l = 0; l < 16; l++)
        for (int b = 0; b < 4; b++) dst[4 * l + b] = uint8_t(vc[4 * p + b][16 * ch + l]);
    }
}

// A query row's codes + 128, `vpdpbusd`'s unsigned side (the kernels that use it take back 128 times
// each key's sum of codes, prepared with the block).
template <int D>
inline void offset_query_codes(const int8_t* codes, uint8_t* dst) {
  for (int d = 0; d < D; d++) dst[d] = uint8_t(codes[d]) ^ 0x80u;
}

// The largest value scale among the first nk keys of a block (its stored largest for a full one).
inline void block_vmax(const float* vs, int64_t nk, float& vmax, float& inv_vmax) {
  vmax = vs[kBlock];
  inv_vmax = vs[kBlock + 1];
  if (nk >= kBlock) return;
  vmax = 0.0f;
  for (int64_t j = 0; j < nk; j++) vmax = std::max(vmax, vs[j]);
  inv_vmax = vmax > 0.0f ? 1.0f / vmax : 0.0f;
}

// A prepared block two blocks ahead of the walk (in the same KV head), fetched into L2 a few lines at
// a time from inside a kernel's loops over the current block. Why: a decode step's few rows per KV
// head go through a block in well under a microsecond, and the hardware prefetchers do not follow
// the walk's order (the keys' two halves interleaved, a block's scales read before its codes), so
// without these a step's attention at long contexts waits on memory for much of its time
// (docs/performance.md, "The int8 attention reads ahead"). A few lines between the products, not a
// whole block at once: a burst takes the load queue from the demand loads (see attention_bf16.cpp).
// An asm statement, not _mm_prefetch: GCC 12 deleted the intrinsic's loop once it was inlined into
// a kernel (a loop whose only effects are prefetches).
constexpr int64_t kAheadBlocks = 2;

struct Ahead {
  const uint8_t* p = nullptr;  // a prepared block (D dimensions); nullptr: nothing to fetch
  // Share i of N, N the steps of the kernel's loop over a block: lines i * ceil(lines / N) onwards.
  // Constants, so that the statements unroll with the kernel's loop.
  template <int D, int64_t N>
  inline void share(int64_t i) const {
#if defined(TF_AVX512) || defined(TF_AVX2)
    constexpr int64_t lines = int8_block_bytes(D) / 64, per = (lines + N - 1) / N;
    if (!p) return;
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t k = 0; k < per; k++)
      if (i * per + k < lines) asm volatile("prefetcht2 %0" : : "m"(c[64 * (i * per + k)]));
#else
    (void)i;
#endif
  }
};

// The rows of one block step: per row its partial (o[D], m, 16 denominators), its query codes and
// scale, and what the softmax step leaves for the values step.
struct RowsStep {
  float* const* parts;
  const uint8_t* const* qrows;
  const float* qsc;
  uint8_t* e;  // K::kWeightBytes per row
  float* wsc;
  float* corr;
  Ahead kahead;  // the keys of a block ahead, to fetch during this step (walk: only a block's first)
};

template <class K>
struct Scratch {
  std::vector<uint32_t> e;  // the rows' weight codes (uint32_t storage: the VNNI kernel reads them so)
  std::vector<uint8_t> blk;  // a block prepared here: keys then values, 64-byte aligned inside
  std::vector<float> corr, wsc;
  std::vector<int64_t> nk;
  std::vector<float*> out;
  uint8_t* kp = nullptr;
  uint8_t* vp = nullptr;
  alignas(64) int32_t aux[4 * 128];  // K::block_values' output
  uint8_t* codes() { return reinterpret_cast<uint8_t*>(e.data()); }  // row r's at r * K::kWeightBytes
  void reserve(int D, int64_t rows) {
    const int64_t bytes = int8_block_bytes(D);
    if (int64_t(blk.size()) < 2 * bytes + 64) {
      blk.assign(2 * bytes + 64, 0);
      kp = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(blk.data()) + 63) & ~uintptr_t(63));
      vp = kp + bytes;
    }
    if (int64_t(corr.size()) < rows) {
      e.assign(rows * K::kWeightBytes / 4, 0u);
      corr.assign(rows, 0.0f);
      wsc.assign(rows, 0.0f);
      nk.assign(rows, 0);
      out.assign(rows, nullptr);
    }
  }
};

template <class K, int D>
void attention_queries(const AttentionArgs& a, const float* key_smooth) {
  const int64_t T = a.T, Hq = a.Hq, Hkv = a.Hkv, L = a.length;
  const int64_t G = Hq / Hkv, rows = G * T, first_pos = L - T;
  const int64_t nseg = (L + kSegment - 1) / kSegment;
  const int64_t stride = D + 17;  // a partial: o[D], m, l per lane [16]
  const int64_t bbytes = int8_block_bytes(D), qbytes = K::kQueryBytes * D;
  thread_local std::vector<uint8_t> qc;
  thread_local std::vector<float> qs, part, inv_c;
  if (int64_t(qc.size()) < Hkv * rows * qbytes) qc.resize(Hkv * rows * qbytes);
  if (int64_t(qs.size()) < Hkv * rows) qs.resize(Hkv * rows);
  if (int64_t(part.size()) < Hkv * nseg * rows * stride) part.resize(Hkv * nseg * rows * stride);
  if (int64_t(inv_c.size()) < Hkv * D) inv_c.resize(Hkv * D);
  for (int64_t i = 0; i < Hkv * D; i++) inv_c[i] = 1.0f / key_smooth[i];
  uint8_t* qcp = qc.data();
  float* qsp = qs.data();
  float* pp = part.data();
  const float* invc = inv_c.data();  // (the workers' own thread_local vectors are other objects)
  const V::reg scale = V::set1(a.scale);
  for (int64_t t = 0; t < T; t++) {  // smoothed, scaled queries as codes, rows r = g * T + t of KV head h
    for (int64_t hq = 0; hq < Hq; hq++) {
      const int64_t h = hq / G, r = h * rows + (hq % G) * T + t;
      const float* src = a.q + t * a.q_st + hq * a.q_sh;
      alignas(64) float x[D];
      for (int c = 0; c < D; c += V::W)
        V::store(x + c, V::mul(V::mul(V::load(src + c), scale), V::load(key_smooth + h * D + c)));
      alignas(64) int8_t codes[D];
      qsp[r] = K::template quantize<D>(x, codes);
      K::template query_codes<D>(codes, qcp + r * qbytes);
    }
  }
  const int elem = a.kv_type == KV_F32 ? 4 : 2;
  const uint8_t* kprep = static_cast<const uint8_t*>(a.kprep);
  const uint8_t* vprep = static_cast<const uint8_t*>(a.vprep);
  at::parallel_for(0, Hkv * nseg, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch<K> tls;
    Scratch<K>& sc = tls;  // (the address once: each thread_local access is a call in a shared library)
    sc.reserve(D, rows);
    for (int64_t item = begin; item < end; item++) {
      const int64_t h = item / nseg, s = item % nseg;
      const int64_t seg0 = s * kSegment, seg1 = std::min(L, seg0 + kSegment);
      const int64_t t0 = std::max<int64_t>(0, seg0 - first_pos);
      if (t0 >= T) continue;
      float* seg_part = pp + (h * nseg + s) * rows * stride;
      for (int64_t g = 0; g < G; g++) {
        for (int64_t t = t0; t < T; t++) {
          float* p = seg_part + (g * T + t) * stride;
          std::fill(p, p + stride, 0.0f);
          p[D] = -INFINITY;
        }
      }
      const char* kbase = static_cast<const char*>(a.k) + h * a.k_sh * elem;
      const char* vbase = static_cast<const char*>(a.v) + h * a.v_sh * elem;
      for (int64_t b0 = seg0; b0 < seg1; b0 += kBlock) {
        const int64_t b1 = std::min(b0 + kBlock, seg1), nb = b1 - b0;
        const int64_t pf = b0 + 2 * kBlock;  // see attention_bf16.cpp: rows fetched ahead, prepared blocks not
        if (pf + kBlock > a.prepared && pf < L)
          prefetch_kv_rows(kbase, vbase, pf, std::min(kBlock, L - pf), a.k_sp * elem, a.v_sp * elem, D * elem);
        const uint8_t *kb = sc.kp, *vb = sc.vp;
        Ahead kahead, vahead;  // (fetched by the block's first rows step and first values step)
        if (const int64_t ab = b0 + kAheadBlocks * kBlock; ab + kBlock <= a.prepared) {
          kahead = Ahead{kprep + (h * a.prep_sh + ab / kBlock) * bbytes};
          vahead = Ahead{vprep + (h * a.prep_sh + ab / kBlock) * bbytes};
        }
        if (nb == kBlock && b1 <= a.prepared) {  // a block the caller prepared (prepare_kv_int8)
          kb = kprep + (h * a.prep_sh + b0 / kBlock) * bbytes;
          vb = vprep + (h * a.prep_sh + b0 / kBlock) * bbytes;
        } else {
          prepare_block<K, D>(kbase + b0 * a.k_sp * elem, vbase + b0 * a.v_sp * elem, a.kv_type, a.k_sp, a.v_sp, nb,
                              invc + h * D, sc.kp, sc.vp);
        }
        const float* vs = reinterpret_cast<const float*>(vb + kBlock * D);
        const int64_t tb = std::max(t0, b0 - first_pos);
        int64_t n_active = 0;
        for (int64_t t = tb; t < T; t++) {  // rows (t, g), g = 0 .. G - 1, share nk
          const int64_t nk = std::min(b1, first_pos + t + 1) - b0;
          // the weights' bound reads the value scales of keys the rows see, no others
          float vmax, inv_vmax;
          block_vmax(vs, nk, vmax, inv_vmax);
          for (int64_t g0 = 0; g0 < G; g0 += kScoreRows) {
            const int nr = int(std::min<int64_t>(kScoreRows, G - g0));
            const uint8_t* qrows[kScoreRows];
            float qsc[kScoreRows];
            float* parts[kScoreRows];
            for (int r = 0; r < nr; r++) {
              const int64_t row = h * rows + (g0 + r) * T + t;
              qrows[r] = qcp + row * qbytes;
              qsc[r] = qsp[row];
              parts[r] = seg_part + ((g0 + r) * T + t) * stride;
              sc.out[n_active + r] = parts[r];
              sc.nk[n_active + r] = nk;
            }
            const RowsStep step{parts, qrows, qsc, sc.codes() + n_active * K::kWeightBytes, sc.wsc.data() + n_active,
                                sc.corr.data() + n_active, n_active == 0 ? kahead : Ahead{}};
            K::template rows<D>(kb, vs, vmax, inv_vmax, nk, nr, step);
            n_active += nr;
          }
        }
        K::template block_values<D>(vb, sc.aux);
        ValueTiles tiles(sc.nk.data(), n_active, K::template value_rows<D>());
        int64_t i = 0;
        while (i < n_active) {
          const int64_t n = tiles.rows(i);
          K::template values<D>(sc.out.data() + i, sc.corr.data() + i, sc.wsc.data() + i,
                                sc.codes() + i * K::kWeightBytes, int(n), sc.nk[i], vb, sc.aux, i == 0 ? vahead : Ahead{});
          i += n;
        }
      }
    }
  });
  // Merge each query's segments in segment order (their denominators: 16 lanes each, summed as
  // V::hsum sums 16 lanes: halves first).
  merge_segments<D>(
      a, pp, nseg, rows, stride,
      [](const float* p) {
        V::reg acc = V::load(p + D + 1);
        for (int i = V::W; i < 16; i += V::W) acc = V::add(acc, V::load(p + D + 1 + i));
        return V::hsum(acc);
      },
      [](int i) { return i; });
}

template <class K>
void prepare(const Int8PrepareArgs& a) {
  TORCH_CHECK(a.D == 64 || a.D == 128, "int8 attention: head_dim must be 64 or 128, not ", a.D);
  const int elem = a.kv_type == KV_F32 ? 4 : 2;
  const int64_t nblk = a.block_end - a.block_begin, bbytes = int8_block_bytes(a.D);
  at::parallel_for(0, a.Hkv * nblk, 16, [&](int64_t begin, int64_t end) {
    alignas(64) float inv_c[128];
    int64_t inv_h = -1;
    for (int64_t item = begin; item < end; item++) {
      const int64_t h = item / nblk, b = a.block_begin + item % nblk;
      if (h != inv_h) {
        for (int64_t d = 0; d < a.D; d++) inv_c[d] = 1.0f / a.key_smooth[h * a.D + d];
        inv_h = h;
      }
      const char* kblk = static_cast<const char*>(a.k) + (h * a.k_sh + b * kBlock * a.k_sp) * elem;
      const char* vblk = static_cast<const char*>(a.v) + (h * a.v_sh + b * kBlock * a.v_sp) * elem;
      uint8_t* kp = static_cast<uint8_t*>(a.kprep) + (h * a.prep_sh + b) * bbytes;
      uint8_t* vp = static_cast<uint8_t*>(a.vprep) + (h * a.prep_sh + b) * bbytes;
      if (a.D == 64)
        prepare_block<K, 64>(kblk, vblk, a.kv_type, a.k_sp, a.v_sp, kBlock, inv_c, kp, vp);
      else
        prepare_block<K, 128>(kblk, vblk, a.kv_type, a.k_sp, a.v_sp, kBlock, inv_c, kp, vp);
    }
  });
}

template <class K>
void attention(const AttentionArgs& a, const float* key_smooth) {
  TORCH_CHECK(a.D == 64 || a.D == 128, "int8 attention: head_dim must be 64 or 128, not ", a.D);
  for_query_slices(a, [key_smooth](const AttentionArgs& part) {
    if (part.D == 64)
      attention_queries<K, 64>(part, key_smooth);
    else
      attention_queries<K, 128>(part, key_smooth);
  });
}

}  // namespace tf::int8att
