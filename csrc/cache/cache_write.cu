// Writes new K/V rows into the paged cache at vLLM's slot_mapping positions.
// FP8 caches: stored = sat_rne(x / scale[kv_head]) (e4m3). BF16/FP16 caches: exact copy.
// Padded tokens (slot -1, as CUDA graphs produce them) are skipped.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include "common/fp8.cuh"
#include "common/pdl.cuh"
#include "common/torch_checks.h"

namespace fireattn {
namespace {

constexpr int kThreads = 128;
constexpr int kVec = 8;  // elements per thread per step: 16 bytes of bf16 input

template <typename T, bool kFp8>
__global__ void __launch_bounds__(kThreads) cache_write_kernel(
    const T* __restrict__ key, const T* __restrict__ value, int64_t key_tok_stride, int64_t key_head_stride,
    int64_t value_tok_stride, int64_t value_head_stride, uint8_t* __restrict__ cache, int64_t block_stride,
    int64_t kv_stride, const int64_t* __restrict__ slot_mapping, const float* __restrict__ k_scale,
    const float* __restrict__ v_scale, int k_scale_stride, int v_scale_stride, int num_kv_heads, int head_dim,
    int block_size) {
  // The decode kernel that follows a cache write is launched as its programmatic dependent: let
  // it be scheduled now (it waits for this grid to finish before it reads anything).
  pdl_launch_dependents();
  const int token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;
  const int64_t block = slot / block_size;
  const int offset = static_cast<int>(slot % block_size);
  constexpr int kOutBytes = kFp8 ? 1 : sizeof(T);
  const int vecs_per_head = head_dim / kVec;
  const int total = 2 * num_kv_heads * vecs_per_head;
  for (int i = threadIdx.x; i < total; i += kThreads) {
    const int which = i / (num_kv_heads * vecs_per_head);  // 0: K, 1: V
    const int rem = i % (num_kv_heads * vecs_per_head);
    const int head = rem / vecs_per_head;
    const int d0 = (rem % vecs_per_head) * kVec;
    const T* src = which == 0 ? key + token * key_tok_stride + head * key_head_stride
                              : value + token * value_tok_stride + head * value_head_stride;
    uint8_t* dst = cache + block * block_stride + which * kv_stride +
                   (static_cast<int64_t>(head) * block_size + offset) * head_dim * kOutBytes + d0 * kOutBytes;
    const uint4 raw = *reinterpret_cast<const uint4*>(src + d0);
    if constexpr (kFp8) {
      const T* x = reinterpret_cast<const T*>(&raw);
      const float scale = which == 0 ? k_scale[head * k_scale_stride] : v_scale[head * v_scale_stride];
      uint8_t q[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) q[j] = float_to_e4m3(to_float(x[j]) / scale);
      *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(q);
    } else {
      *reinterpret_cast<uint4*>(dst) = raw;
    }
  }
}

void check_rows(const at::Tensor& x, const char* name, int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.size(1) == num_kv_heads && x.size(2) == head_dim,
              "fireattn.cache_write: ", name, " must be a CUDA tensor [num_tokens, num_kv_heads=", num(num_kv_heads),
              ", head_dim=", num(head_dim), "], got ", dims(x.sizes()));
  TORCH_CHECK(x.stride(2) == 1, "fireattn.cache_write: ", name, " must be contiguous in head_dim");
  TORCH_CHECK(x.stride(0) % kVec == 0 && x.stride(1) % kVec == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "fireattn.cache_write: ", name, " must be 16-byte aligned per head row");
}

}  // namespace

void cache_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                 const at::Tensor& slot_mapping, const at::Tensor& k_scale, const at::Tensor& v_scale) {
  check_kv_cache(kv_cache);
  const int64_t num_kv_heads = kv_cache.size(2), block_size = kv_cache.size(3), head_dim = kv_cache.size(4);
  TORCH_CHECK(head_dim % kVec == 0, "fireattn.cache_write: head_dim must be a multiple of 8, got ", num(head_dim));
  check_rows(key, "key", num_kv_heads, head_dim);
  check_rows(value, "value", num_kv_heads, head_dim);
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "fireattn.cache_write: key and value dtypes differ");
  TORCH_CHECK(slot_mapping.is_cuda() && slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1,
              "fireattn.cache_write: slot_mapping must be a 1-D int64 CUDA tensor");
  const int64_t num_tokens = slot_mapping.size(0);
  TORCH_CHECK(key.size(0) >= num_tokens && value.size(0) >= num_tokens,
              "fireattn.cache_write: fewer key/value rows than slot_mapping entries");
  const bool fp8 = is_fp8_cache(kv_cache);
  TORCH_CHECK(fp8 || kv_cache.scalar_type() == key.scalar_type(), "fireattn.cache_write: cache dtype ",
              dtype_name(kv_cache.scalar_type()), " does not match key dtype ", dtype_name(key.scalar_type()),
              " (and is not FP8)");
  const int ks = scale_stride(k_scale, num_kv_heads, "k_scale");
  const int vs = scale_stride(v_scale, num_kv_heads, "v_scale");
  if (num_tokens == 0) return;

  const at::cuda::OptionalCUDAGuard guard(key.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t elem = kv_cache.element_size();
  uint8_t* cache = reinterpret_cast<uint8_t*>(kv_cache.data_ptr());
  const int64_t block_stride = kv_cache.stride(0) * elem, kv_stride = kv_cache.stride(1) * elem;

#define FIREATTN_LAUNCH_CACHE_WRITE(T, FP8)                                                                  \
  cache_write_kernel<T, FP8><<<num_tokens, kThreads, 0, stream>>>(                                        \
      reinterpret_cast<const T*>(key.data_ptr()), reinterpret_cast<const T*>(value.data_ptr()), key.stride(0), \
      key.stride(1), value.stride(0), value.stride(1), cache, block_stride, kv_stride,                      \
      slot_mapping.data_ptr<int64_t>(), k_scale.data_ptr<float>(), v_scale.data_ptr<float>(), ks, vs,     \
      num_kv_heads, head_dim, block_size)

  if (key.scalar_type() == at::kBFloat16) {
    if (fp8) FIREATTN_LAUNCH_CACHE_WRITE(__nv_bfloat16, true);
    else FIREATTN_LAUNCH_CACHE_WRITE(__nv_bfloat16, false);
  } else if (key.scalar_type() == at::kHalf) {
    if (fp8) FIREATTN_LAUNCH_CACHE_WRITE(__half, true);
    else FIREATTN_LAUNCH_CACHE_WRITE(__half, false);
  } else {
    TORCH_CHECK(false, "fireattn.cache_write: key dtype must be bfloat16 or float16, got ",
                dtype_name(key.scalar_type()));
  }
#undef FIREATTN_LAUNCH_CACHE_WRITE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fireattn
