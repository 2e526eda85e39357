#pragma once
#include <torch/all.h>

#include <string>

namespace fireattn {

// Error messages are built from strings only. Formatting numbers through std::ostream inside
// this library crashed (SIGSEGV in ostream::_M_insert<long>) on the GPU image, whose runtime
// libstdc++ differs from the compiler's headers; std::to_string does not touch locales.
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string dims(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}
inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

inline bool is_fp8_cache(const at::Tensor& kv_cache) {
  return kv_cache.scalar_type() == at::kByte || kv_cache.scalar_type() == at::kFloat8_e4m3fn;
}

// A scale is a float32 tensor with one value (per-tensor) or one per KV head.
// Returns the element stride the kernels use: 0 broadcasts a per-tensor scale.
inline int scale_stride(const at::Tensor& s, int64_t num_kv_heads, const char* name) {
  TORCH_CHECK(s.scalar_type() == at::kFloat, "fireattn: ", name, " must be float32, got ", dtype_name(s.scalar_type()));
  TORCH_CHECK(s.is_cuda(), "fireattn: ", name, " must be a CUDA tensor");
  TORCH_CHECK(s.numel() == 1 || (s.dim() == 1 && s.numel() == num_kv_heads && s.stride(0) == 1),
              "fireattn: ", name, " must have 1 element or shape [num_kv_heads=", num(num_kv_heads), "], got ",
              dims(s.sizes()));
  return s.numel() == 1 ? 0 : 1;
}

// kv_cache[num_blocks, 2, Hkv, block_size, D] with compact inner dims.
inline void check_kv_cache(const at::Tensor& kv_cache) {
  TORCH_CHECK(kv_cache.is_cuda(), "fireattn: kv_cache must be a CUDA tensor");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(1) == 2,
              "fireattn: kv_cache must have shape [num_blocks, 2, num_kv_heads, block_size, head_dim], got ",
              dims(kv_cache.sizes()));
  const int64_t D = kv_cache.size(4), B = kv_cache.size(3), H = kv_cache.size(2);
  TORCH_CHECK(kv_cache.stride(4) == 1 && kv_cache.stride(3) == D && kv_cache.stride(2) == B * D &&
                  kv_cache.stride(1) == H * B * D && kv_cache.stride(0) >= 2 * H * B * D,
              "fireattn: kv_cache inner dims must be contiguous (block dim may be padded), strides ",
              dims(kv_cache.strides()));
}

}  // namespace fireattn
