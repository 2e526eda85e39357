// FP8 (e4m3) conversions shared by every kernel. The numerics contract (DESIGN.md) is
// "stored = sat_rne(x / scale)": IEEE division, round-to-nearest-even, saturate to +-448.
// __nv_cvt_float_to_fp8 with __NV_SATFINITE is exactly that, and matches
// torch's x.clamp(-448, 448).to(torch.float8_e4m3fn) bit for bit on finite inputs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace fireattn {

__device__ __forceinline__ uint8_t float_to_e4m3(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float e4m3_to_float(uint8_t v) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v), __NV_E4M3);
  return __half2float(__half(h));
}

// x -> e4m3 -> float: the value the FP8 tensor cores see for a quantized operand.
__device__ __forceinline__ float round_through_e4m3(float x) { return e4m3_to_float(float_to_e4m3(x)); }

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

}  // namespace fireattn
