// torch.ops.triforce.*: argument checks and the glue between tensors and the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "attention.h"
#include "attention_bf16.h"
#include "attention_int8.h"
#include "linear.h"
#include "linear_int8.h"
#include "quant.h"
#include "rowwise.h"
#include "simd.h"

namespace {

using at::Tensor;

void check_f32_rows(const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

int dense_type_of(const Tensor& w) {
  switch (w.scalar_type()) {
    case at::kFloat: return tf::F32;
    case at::kHalf: return tf::F16;
    case at::kBFloat16: return tf::BF16;
    default: return -1;
  }
}

// `packed_ok`: the int8 mode's packed tiles are accepted (only its products read them).
tf::WeightSpec weight_spec(const Tensor& w, int64_t type, int64_t K, bool packed_ok = false) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), "weights must be contiguous 2-D CPU tensors");
  if (type > tf::kPacked) {  // packed tiles (linear_int8.h): the file type's bytes, 16 rows at a time
    TORCH_CHECK(packed_ok, "packed weights (type ", type, ") are read by the int8 mode's products only");
    const int base = int(type) - tf::kPacked;
    TORCH_CHECK(tf::int8_packed_type(base, w.size(0)) == type, "weight type ", type, " is not packed by this build");
    const int be = tf::block_elems(base);
    TORCH_CHECK(w.scalar_type() == at::kByte && K % be == 0 && w.size(1) == K / be * tf::block_bytes(base),
                "packed weight of the wrong width");
    return tf::WeightSpec{w.data_ptr<uint8_t>(), int(type), w.size(0), w.size(1)};
  }
  const int be = tf::block_elems(int(type)), bb = tf::block_bytes(int(type));
  TORCH_CHECK(be > 0, "unsupported weight type ", type);
  TORCH_CHECK(K % be == 0 && K % tf::kGroup == 0 || tf::is_dense(int(type)), "K = ", K,
              " is not a multiple of the block size ", be);
  if (tf::is_dense(int(type))) {
    TORCH_CHECK(dense_type_of(w) == type && w.size(1) == K, "dense weight of the wrong dtype or width");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) == K / be * bb, "quantized weight rows must hold ",
                K / be * bb, " bytes, not ", w.size(1));
  }
  return tf::WeightSpec{static_cast<const uint8_t*>(w.data_ptr()), int(type), w.size(0), w.size(1) * w.element_size()};
}

// y = x @ W^T (+ bias) over the concatenated weights, in the fp32 mode or (int8 = true) the
// int8-activation mode of linear_int8.h, which takes quantized weights only.
static Tensor linear_mode(const Tensor& x, at::TensorList weights, c10::IntArrayRef types,
                          const std::optional<Tensor>& bias, bool int8) {
  check_f32_rows(x, "x");
  TORCH_CHECK(weights.size() == types.size() && !weights.empty(), "one type per weight");
  const int64_t K = x.size(1);
  std::vector<tf::WeightSpec> specs;
  int64_t n = 0;
  for (size_t i = 0; i < weights.size(); i++) {
    TORCH_CHECK(!int8 || !tf::is_dense(int(types[i])), "int8 activations: dense weights run in the fp32 mode");
    specs.push_back(weight_spec(weights[i], types[i], K, int8));
    n += specs.back().n;
  }
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n, "bias must be float32 [N]");
    b = bias->data_ptr<float>();
  }
  Tensor y = at::empty({x.size(0), n}, x.options());
  if (int8)
    tf::linear_int8(x.data_ptr<float>(), x.size(0), x.stride(0), K, specs, b, y.data_ptr<float>(), n);
  else
    tf::linear(x.data_ptr<float>(), x.size(0), x.stride(0), K, specs, b, y.data_ptr<float>(), n);
  return y;
}

Tensor linear(const Tensor& x, at::TensorList weights, c10::IntArrayRef types, const std::optional<Tensor>& bias) {
  return linear_mode(x, weights, types, bias, false);
}

Tensor linear_int8(const Tensor& x, at::TensorList weights, c10::IntArrayRef types, const std::optional<Tensor>& bias) {
  return linear_mode(x, weights, types, bias, true);
}

// The packed type id of a weight of `type` with n rows, -1 where this build reads the file's order.
int64_t int8_packed_type(int64_t type, int64_t n) { return tf::int8_packed_type(int(type), n); }

// w (file order) packed for the int8 mode: same shape and bytes, in the tiles' order.
Tensor pack_int8(const Tensor& w, int64_t type, int64_t K) {
  const tf::WeightSpec spec = weight_spec(w, type, K);
  TORCH_CHECK(tf::int8_packed_type(int(type), spec.n) > 0, "type ", type, " with ", spec.n, " rows is not packed");
  Tensor out = at::empty_like(w);
  tf::pack_int8(spec, K, out.data_ptr<uint8_t>());
  return out;
}

// x's rows as the int8 mode rounds them: q [T, K] int8 and d [T, K / 32] float32.
std::tuple<Tensor, Tensor> quantize_int8(const Tensor& x) {
  check_f32_rows(x, "x");
  TORCH_CHECK(x.size(1) % 32 == 0, "K must be a multiple of 32");
  Tensor q = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  Tensor d = at::empty({x.size(0), x.size(1) / 32}, x.options());
  tf::quantize_rows_int8(x.data_ptr<float>(), x.size(0), x.stride(0), x.size(1), q.data_ptr<int8_t>(),
                         d.data_ptr<float>());
  return {q, d};
}

Tensor dequantize(const Tensor& w, int64_t type, int64_t K, const Tensor& rows) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rows must be int64 [n]");
  Tensor r = rows.contiguous();
  const tf::WeightSpec spec = weight_spec(w, type, K);
  const int64_t* idx = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < r.numel(); i++) TORCH_CHECK(idx[i] >= 0 && idx[i] < spec.n, "row ", idx[i], " out of range");
  Tensor out = at::empty({r.numel(), K}, at::kFloat);
  tf::dequantize_rows(spec, K, idx, r.numel(), out.data_ptr<float>());
  return out;
}

// All rows of w, dequantized into out [n, K] (float32, rows contiguous): prefill's GEMM operand.
void dequantize_into(const Tensor& w, int64_t type, int64_t K, const Tensor& out) {
  const tf::WeightSpec spec = weight_spec(w, type, K);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == spec.n && out.size(1) == K &&
                  out.stride(1) == 1 && out.stride(0) == K,
              "out must be a contiguous float32 [n, K]");
  std::vector<int64_t> rows(spec.n);
  for (int64_t i = 0; i < spec.n; i++) rows[i] = i;
  tf::dequantize_rows(spec, K, rows.data(), spec.n, out.data_ptr<float>());
}

Tensor rmsnorm(const Tensor& x, const Tensor& weight, double eps) {
  check_f32_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "norm weight must be float32 [dim]");
  Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  tf::rmsnorm(x.data_ptr<float>(), x.size(0), x.stride(0), x.size(1), weight.data_ptr<float>(), float(eps),
              out.data_ptr<float>());
  return out;
}

// x [T, H, D] float32 (D contiguous), cos / sin [T, D / 2] float32 contiguous -> [T, H, D] contiguous.
Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "x must be float32 [T, H, D] with D even and contiguous");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  for (const Tensor* c : {&cos, &sin})
    TORCH_CHECK(c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 2 && c->size(0) == T &&
                    c->size(1) == D / 2,
                "cos and sin must be contiguous float32 [T, D / 2]");
  Tensor out = at::empty({T, H, D}, x.options());
  tf::rope(x.data_ptr<float>(), T, H, D, x.stride(0), x.stride(1), cos.data_ptr<float>(), sin.data_ptr<float>(),
           interleaved, out.data_ptr<float>());
  return out;
}

Tensor swiglu(const Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() == 2 && gate_up.is_contiguous() &&
                  gate_up.size(1) % 2 == 0,
              "gate_up must be contiguous float32 [T, 2I]");
  const int64_t I = gate_up.size(1) / 2;
  Tensor out = at::empty({gate_up.size(0), I}, gate_up.options());
  tf::swiglu(gate_up.data_ptr<float>(), gate_up.size(0), I, out.data_ptr<float>());
  return out;
}

int kv_type_of(const Tensor& k) {
  switch (k.scalar_type()) {
    case at::kFloat: return tf::KV_F32;
    case at::kHalf: return tf::KV_F16;
    case at::kBFloat16: return tf::KV_BF16;
    default: TORCH_CHECK(false, "k/v must be float32, float16 or bfloat16");
  }
}

// kp / vp of prepared bf16 blocks: [Hkv, blocks, kBlock * D] 16-bit, contiguous, 64-byte aligned.
void check_prepared(const Tensor& kp, const Tensor& vp, int64_t Hkv, int64_t D) {
  for (const Tensor* t : {&kp, &vp})
    TORCH_CHECK(t->dim() == 3 && t->is_contiguous() && t->element_size() == 2 && t->size(0) == Hkv &&
                    t->size(2) == tf::kBlock * D && reinterpret_cast<uintptr_t>(t->data_ptr()) % 64 == 0,
                "prepared blocks must be contiguous 16-bit [Hkv, blocks, 32 * D], 64-byte aligned");
  TORCH_CHECK(kp.size(1) == vp.size(1), "prepared k and v must hold the same blocks");
}

// c [Hkv, D]: the int8 attention's key smoothing (attention_int8.h), float32, positive.
void check_key_smooth(const Tensor& c, int64_t Hkv, int64_t D) {
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.is_contiguous() && c.dim() == 2 && c.size(0) == Hkv && c.size(1) == D,
              "key smoothing must be contiguous float32 [Hkv, D]");
  const float* p = c.data_ptr<float>();
  for (int64_t i = 0; i < Hkv * D; i++)
    TORCH_CHECK(std::isfinite(p[i]) && p[i] > 0.0f, "key smoothing must be finite and positive");
}

// kp / vp of prepared int8 blocks: [Hkv, blocks, int8_block_bytes(D)] uint8, contiguous, 64-byte aligned.
void check_prepared_int8(const Tensor& kp, const Tensor& vp, int64_t Hkv, int64_t D) {
  for (const Tensor* t : {&kp, &vp})
    TORCH_CHECK(t->dim() == 3 && t->is_contiguous() && t->scalar_type() == at::kByte && t->size(0) == Hkv &&
                    t->size(2) == tf::int8_block_bytes(D) && reinterpret_cast<uintptr_t>(t->data_ptr()) % 64 == 0,
                "prepared int8 blocks must be contiguous uint8 [Hkv, blocks, 32 * D + 256], 64-byte aligned");
  TORCH_CHECK(kp.size(1) == vp.size(1), "prepared k and v must hold the same blocks");
}

enum class Products { F32, BF16, INT8 };

// The attention kernels' shared checks and dispatch; kp / vp / prepared: blocks made ahead (bf16 or
// int8 products), key_smooth: the int8 products' smoothing.
Tensor attention_with(const Tensor& q, const Tensor& k, const Tensor& v, int64_t length, double scale,
                      Products products, const Tensor* kp = nullptr, const Tensor* vp = nullptr, int64_t prepared = 0,
                      const Tensor* key_smooth = nullptr) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.stride(2) == 1, "q must be float32 [T, Hq, D]");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(2) == 1 && v.stride(2) == 1, "k, v must be [Hkv, L, D]");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v must share a dtype");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(0);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && k.size(2) == D && v.size(2) == D && v.size(0) == Hkv, "head shapes");
  TORCH_CHECK(length >= T && length <= k.size(1) && length <= v.size(1), "length ", length, " out of range");
  const int kv_type = kv_type_of(k);
  Tensor out = at::empty({T, Hq, D}, q.options());
  tf::AttentionArgs a{q.data_ptr<float>(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0),
                      k.stride(1), v.stride(0), v.stride(1), kv_type, T, Hq, Hkv, D, length, float(scale),
                      out.data_ptr<float>()};
  if (kp != nullptr) {
    if (products == Products::INT8)
      check_prepared_int8(*kp, *vp, Hkv, D);
    else
      check_prepared(*kp, *vp, Hkv, D);
    TORCH_CHECK(prepared >= 0 && prepared % tf::kBlock == 0 && prepared / tf::kBlock <= kp->size(1),
                "prepared must be a multiple of 32 keys within the prepared blocks");
    a.kprep = kp->data_ptr();
    a.vprep = vp->data_ptr();
    a.prep_sh = kp->size(1);
    a.prepared = prepared;
  }
  switch (products) {
    case Products::F32: tf::attention(a); break;
    case Products::BF16: tf::attention_bf16(a); break;
    case Products::INT8:
      check_key_smooth(*key_smooth, Hkv, D);
      tf::attention_int8(a, key_smooth->data_ptr<float>());
      break;
  }
  return out;
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t length, double scale) {
  return attention_with(q, k, v, length, scale, Products::F32);
}

// The bf16-product attention (attention_bf16.h): head_dim 64 or 128.
Tensor attention_bf16(const Tensor& q, const Tensor& k, const Tensor& v, int64_t length, double scale) {
  return attention_with(q, k, v, length, scale, Products::BF16);
}

// attention_bf16 reading keys 0 .. prepared - 1 from blocks prepare_kv_bf16 made (same bits).
Tensor attention_bf16_prepared(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kp, const Tensor& vp,
                               int64_t prepared, int64_t length, double scale) {
  return attention_with(q, k, v, length, scale, Products::BF16, &kp, &vp, prepared);
}

// The int8-product attention (attention_int8.h), reading keys 0 .. prepared - 1 from blocks
// prepare_kv_int8 made (same bits as making them here); head_dim 64 or 128.
Tensor attention_int8(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kp, const Tensor& vp,
                      int64_t prepared, int64_t length, double scale, const Tensor& key_smooth) {
  return attention_with(q, k, v, length, scale, Products::INT8, &kp, &vp, prepared, &key_smooth);
}

// What both prepare ops check: k / v [Hkv, L, D] alike, and blocks [block_begin, block_end) within
// both the rows and the prepared blocks.
void check_prepare(const Tensor& k, const Tensor& v, const Tensor& kp, int64_t block_begin, int64_t block_end) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(2) == 1 && v.stride(2) == 1 && k.sizes() == v.sizes(),
              "k, v must be [Hkv, L, D]");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v must share a dtype");
  TORCH_CHECK(0 <= block_begin && block_begin <= block_end && block_end <= kp.size(1) &&
                  block_end * tf::kBlock <= k.size(1),
              "blocks out of range");
}

// Blocks [block_begin, block_end) of k/v [Hkv, L, D] into kp / vp (see attention_bf16.h).
void prepare_kv_bf16(const Tensor& k, const Tensor& v, Tensor& kp, Tensor& vp, int64_t block_begin,
                     int64_t block_end) {
  check_prepared(kp, vp, k.size(0), k.size(2));
  check_prepare(k, v, kp, block_begin, block_end);
  tf::PrepareArgs a{k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1), kv_type_of(k),
                    k.size(0), k.size(2), block_begin, block_end, kp.data_ptr(), vp.data_ptr(), kp.size(1)};
  tf::prepare_kv_bf16(a);
}

// Blocks [block_begin, block_end) of k/v [Hkv, L, D] into kp / vp (see attention_int8.h).
void prepare_kv_int8(const Tensor& k, const Tensor& v, Tensor& kp, Tensor& vp, int64_t block_begin, int64_t block_end,
                     const Tensor& key_smooth) {
  check_prepared_int8(kp, vp, k.size(0), k.size(2));
  check_key_smooth(key_smooth, k.size(0), k.size(2));
  check_prepare(k, v, kp, block_begin, block_end);
  tf::Int8PrepareArgs a{k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), v.stride(0), v.stride(1), kv_type_of(k),
                        k.size(0), k.size(2), block_begin, block_end, key_smooth.data_ptr<float>(), kp.data_ptr(),
                        vp.data_ptr(), kp.size(1)};
  tf::prepare_kv_int8(a);
}

std::string attention_bf16_path() { return tf::attention_bf16_path(); }

std::string attention_int8_path() { return tf::attention_int8_path(); }

std::string isa() { return tf::isa_name(); }

std::string int8_path() { return tf::int8_path(); }

void set_row_skew(bool on) { tf::set_row_skew(on); }

}  // namespace

TORCH_LIBRARY(triforce, m) {
  m.def("linear(Tensor x, Tensor[] weights, int[] types, Tensor? bias) -> Tensor", &linear);
  m.def("dequantize(Tensor w, int type, int K, Tensor rows) -> Tensor", &dequantize);
  m.def("dequantize_into(Tensor w, int type, int K, Tensor(a!) out) -> ()", &dequantize_into);
  m.def("rmsnorm(Tensor x, Tensor weight, float eps) -> Tensor", &rmsnorm);
  m.def("swiglu(Tensor gate_up) -> Tensor", &swiglu);
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor", &rope);
  m.def("attention(Tensor q, Tensor k, Tensor v, int length, float scale) -> Tensor", &attention);
  m.def("linear_int8(Tensor x, Tensor[] weights, int[] types, Tensor? bias) -> Tensor", &linear_int8);
  m.def("quantize_int8(Tensor x) -> (Tensor, Tensor)", &quantize_int8);
  m.def("int8_packed_type(int type, int n) -> int", &int8_packed_type);
  m.def("pack_int8(Tensor w, int type, int K) -> Tensor", &pack_int8);
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, int length, float scale) -> Tensor", &attention_bf16);
  m.def("attention_bf16_path() -> str", &attention_bf16_path);
  m.def("attention_bf16_prepared(Tensor q, Tensor k, Tensor v, Tensor kp, Tensor vp, int prepared, int length, "
        "float scale) -> Tensor",
        &attention_bf16_prepared);
  m.def("prepare_kv_bf16(Tensor k, Tensor v, Tensor(a!) kp, Tensor(b!) vp, int block_begin, int block_end) -> ()",
        &prepare_kv_bf16);
  m.def("attention_int8(Tensor q, Tensor k, Tensor v, Tensor kp, Tensor vp, int prepared, int length, float scale, "
        "Tensor key_smooth) -> Tensor",
        &attention_int8);
  m.def("attention_int8_path() -> str", &attention_int8_path);
  m.def("prepare_kv_int8(Tensor k, Tensor v, Tensor(a!) kp, Tensor(b!) vp, int block_begin, int block_end, "
        "Tensor key_smooth) -> ()",
        &prepare_kv_int8);
  m.def("isa() -> str", &isa);
  m.def("int8_path() -> str", &int8_path);
  m.def("set_row_skew(bool on) -> ()", &set_row_skew);
}
