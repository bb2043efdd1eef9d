// GGUF weight formats, described once as block structs, and the one operation every kernel needs
// from them: a row of blocks unpacked into int8 codes plus a (scale, min) pair per group of 16
// weights, so that weight i of group g is  q[i] * scale[g] + min[g].
//
// The layouts are those of ggml (llama.cpp's tensor library), as written into GGUF files. Dense
// rows (F32, F16, BF16) are not unpacked: the kernels read them directly.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace tf {

// ggml type ids (the numbers stored in a GGUF file's tensor infos)
enum GgmlType : int {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

constexpr int kGroup = 16;  // weights per (scale, min) pair after unpacking

struct block_q4_0 { uint16_t d; uint8_t qs[16]; };                        // 32 weights: d * (q - 8)
struct block_q4_1 { uint16_t d, m; uint8_t qs[16]; };                     // 32 weights: d * q + m
struct block_q5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };         // 32 weights: d * (q - 16), 5th bit in qh
struct block_q5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; };      // 32 weights: d * q + m
struct block_q8_0 { uint16_t d; int8_t qs[32]; };                         // 32 weights: d * q
struct block_q4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };                // 256 weights
struct block_q5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };  // 256 weights
struct block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };       // 256 weights

static_assert(sizeof(block_q4_0) == 18 && sizeof(block_q4_1) == 20 && sizeof(block_q5_0) == 22, "layout");
static_assert(sizeof(block_q5_1) == 24 && sizeof(block_q8_0) == 34, "layout");
static_assert(sizeof(block_q4_K) == 144 && sizeof(block_q5_K) == 176 && sizeof(block_q6_K) == 210, "layout");

// Weights per block and bytes per block; 0 for a type the kernels do not know.
inline int block_elems(int type) {
  switch (type) {
    case F32: case F16: case BF16: return 1;
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: return 32;
    case Q4_K: case Q5_K: case Q6_K: return 256;
    default: return 0;
  }
}

inline int block_bytes(int type) {
  switch (type) {
    case F32: return 4;
    case F16: case BF16: return 2;
    case Q4_0: return sizeof(block_q4_0);
    case Q4_1: return sizeof(block_q4_1);
    case Q5_0: return sizeof(block_q5_0);
    case Q5_1: return sizeof(block_q5_1);
    case Q8_0: return sizeof(block_q8_0);
    case Q4_K: return sizeof(block_q4_K);
    case Q5_K: return sizeof(block_q5_K);
    case Q6_K: return sizeof(block_q6_K);
    default: return 0;
  }
}

inline bool is_dense(int type) { return type == F32 || type == F16 || type == BF16; }

template <typename B>
inline B load_block(const uint8_t* p) {  // blocks sit at any byte offset in a file
  B b;
  std::memcpy(&b, p, sizeof(B));
  return b;
}

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K block.
inline void scale_min_k4(int j, const uint8_t* s, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Unpack one quantized row of K weights: q[K] codes, sc[K/16] scales, mn[K/16] mins.
inline void unpack_row(int type, const uint8_t* row, int64_t K, int8_t* q, float* sc, float* mn) {
  const int nb = int(K / block_elems(type));
  const int bb = block_bytes(type);
  for (int b = 0; b < nb; b++) {
    const uint8_t* p = row + int64_t(b) * bb;
    switch (type) {
      case Q4_0: {
        auto blk = load_block<block_q4_0>(p);
        const float d = f16_to_f32(blk.d);
        for (int j = 0; j < 16; j++) {
          q[j] = int8_t((blk.qs[j] & 0xF) - 8);
          q[j + 16] = int8_t((blk.qs[j] >> 4) - 8);
        }
        sc[0] = sc[1] = d;
        mn[0] = mn[1] = 0.0f;
        q += 32, sc += 2, mn += 2;
        break;
      }
      case Q4_1: {
        auto blk = load_block<block_q4_1>(p);
        const float d = f16_to_f32(blk.d), m = f16_to_f32(blk.m);
        for (int j = 0; j < 16; j++) {
          q[j] = int8_t(blk.qs[j] & 0xF);
          q[j + 16] = int8_t(blk.qs[j] >> 4);
        }
        sc[0] = sc[1] = d;
        mn[0] = mn[1] = m;
        q += 32, sc += 2, mn += 2;
        break;
      }
      case Q5_0:
      case Q5_1: {
        const bool with_min = type == Q5_1;
        uint16_t dh, mh = 0;
        uint32_t qh;
        const uint8_t* qs;
        if (with_min) {
          auto blk = load_block<block_q5_1>(p);
          dh = blk.d, mh = blk.m;
          std::memcpy(&qh, blk.qh, 4);
          qs = p + offsetof(block_q5_1, qs);
        } else {
          auto blk = load_block<block_q5_0>(p);
          dh = blk.d;
          std::memcpy(&qh, blk.qh, 4);
          qs = p + offsetof(block_q5_0, qs);
        }
        const int offset = with_min ? 0 : 16;
        for (int j = 0; j < 16; j++) {
          const int h0 = int(((qh >> j) << 4) & 0x10);
          const int h1 = int((qh >> (j + 12)) & 0x10);
          q[j] = int8_t(((qs[j] & 0xF) | h0) - offset);
          q[j + 16] = int8_t(((qs[j] >> 4) | h1) - offset);
        }
        const float d = f16_to_f32(dh), m = with_min ? f16_to_f32(mh) : 0.0f;
        sc[0] = sc[1] = d;
        mn[0] = mn[1] = m;
        q += 32, sc += 2, mn += 2;
        break;
      }
      case Q8_0: {
        auto blk = load_block<block_q8_0>(p);
        std::memcpy(q, blk.qs, 32);
        sc[0] = sc[1] = f16_to_f32(blk.d);
        mn[0] = mn[1] = 0.0f;
        q += 32, sc += 2, mn += 2;
        break;
      }
      case Q4_K:
      case Q5_K: {
        const bool five = type == Q5_K;
        uint16_t dh, dminh;
        const uint8_t *scales, *qs, *qh = nullptr;
        if (five) {
          auto blk = load_block<block_q5_K>(p);
          dh = blk.d, dminh = blk.dmin;
          scales = p + offsetof(block_q5_K, scales);
          qh = p + offsetof(block_q5_K, qh);
          qs = p + offsetof(block_q5_K, qs);
        } else {
          auto blk = load_block<block_q4_K>(p);
          dh = blk.d, dminh = blk.dmin;
          scales = p + offsetof(block_q4_K, scales);
          qs = p + offsetof(block_q4_K, qs);
        }
        const float d = f16_to_f32(dh), dmin = f16_to_f32(dminh);
        int u1 = 1, u2 = 2;
        for (int j = 0; j < 4; j++) {  // 64 weights: sub-blocks 2j (low nibbles) and 2j+1 (high)
          int s1, m1, s2, m2;
          scale_min_k4(2 * j, scales, &s1, &m1);
          scale_min_k4(2 * j + 1, scales, &s2, &m2);
          for (int l = 0; l < 32; l++) {
            int lo = qs[l] & 0xF, hi = qs[l] >> 4;
            if (five) {
              lo += (qh[l] & u1) ? 16 : 0;
              hi += (qh[l] & u2) ? 16 : 0;
            }
            q[l] = int8_t(lo);
            q[l + 32] = int8_t(hi);
          }
          sc[0] = sc[1] = d * float(s1);
          mn[0] = mn[1] = -(dmin * float(m1));
          sc[2] = sc[3] = d * float(s2);
          mn[2] = mn[3] = -(dmin * float(m2));
          qs += 32, q += 64, sc += 4, mn += 4;
          u1 <<= 2, u2 <<= 2;
        }
        break;
      }
      case Q6_K: {
        const uint8_t* ql = p + offsetof(block_q6_K, ql);
        const uint8_t* qh = p + offsetof(block_q6_K, qh);
        int8_t scales[16];
        std::memcpy(scales, p + offsetof(block_q6_K, scales), 16);
        uint16_t dh;
        std::memcpy(&dh, p + offsetof(block_q6_K, d), 2);
        const float d = f16_to_f32(dh);
        for (int half = 0; half < 2; half++) {  // 128 weights each
          for (int l = 0; l < 32; l++) {
            q[l] = int8_t(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
            q[l + 32] = int8_t(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
            q[l + 64] = int8_t(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            q[l + 96] = int8_t(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
          }
          for (int g = 0; g < 8; g++) {  // group g of 16 = scales[8 * half + g]
            sc[g] = d * float(scales[8 * half + g]);
            mn[g] = 0.0f;
          }
          ql += 64, qh += 32, q += 128, sc += 8, mn += 8;
        }
        break;
      }
      default:
        break;
    }
  }
}

}  // namespace tf
