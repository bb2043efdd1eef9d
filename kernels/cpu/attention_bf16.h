// Attention with bf16 products (AVX512-BF16 `vdpbf16ps`): the same blocked online softmax as
// attention.h (absolute segments of 256 and blocks of 32 keys, segments merged in order, threads
// over (KV head, segment) items), with the dot products in bf16 pairs accumulated in fp32.
//
// What it computes, exactly (the float64 references of the tests follow these words): the scaled
// query (q * scale, fp32) and every key and value are rounded to bf16 (round to nearest even);
// a score is the fp32 sum, over pairs of dimensions in order, of the pair's products (two
// accumulators, even and odd pairs, added at the end); a softmax weight exp(s - m) is rounded to
// bf16 and that rounded weight is both summed (fp32) and multiplied by the values, two keys at a
// time in key order. Denormal bf16 inputs count as zero (the instruction's rule).
//
// Row-invariance: in the score step the 16 lanes are 16 keys and the query's pair is broadcast;
// in the value step the lanes are 16 dimensions and a pair of weights is broadcast. No lane is
// summed with another except in the fixed per-row reductions (max, and the sum of weights), so a
// query's arithmetic depends on its position and the keys alone, as in attention.h.
#pragma once

#include "attention.h"

namespace tf {

// "avx512-bf16" when this build has the bf16 attention, "" when it does not (then it throws).
const char* attention_bf16_path();

// Blocks block_begin .. block_end - 1 (kBlock keys each, all present) of k/v made ready for
// attention_bf16 (AttentionArgs::kprep / vprep): per block, D vectors of 64 bytes for the keys and D
// for the values, the bf16 bytes the kernel would otherwise make on each call. Same bits either way.
struct PrepareArgs {
  const void* k;
  const void* v;
  int64_t k_sh, k_sp, v_sh, v_sp;
  int kv_type;
  int64_t Hkv, D, block_begin, block_end;
  void* kprep;
  void* vprep;
  int64_t prep_sh;  // blocks between KV heads
};
void prepare_kv_bf16(const PrepareArgs& a);

// Same arguments as `attention`; a.D must be 64 or 128.
void attention_bf16(const AttentionArgs& a);

}  // namespace tf
