// Host side shared by the attention ops (prefill, decode): argument checks into AttentionParams,
// the dtype mapping and the 'no kernel compiled' error their dispatchers use.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/all.h>

#include <optional>
#include <vector>

#include "common/attention_params.h"

namespace fireattn {

template <typename T>
constexpr at::ScalarType scalar_type_of();
template <>
constexpr at::ScalarType scalar_type_of<__nv_bfloat16>() { return at::kBFloat16; }
template <>
constexpr at::ScalarType scalar_type_of<__half>() { return at::kHalf; }

// Checks every argument (clear errors naming the bad one) and returns the kernel parameters.
AttentionParams make_attention_params(const char* op, at::Tensor& out, const at::Tensor& query,
                                      const at::Tensor& kv_cache, const at::Tensor& block_table,
                                      const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                                      const at::Tensor& q_scale, const at::Tensor& k_scale, const at::Tensor& v_scale,
                                      double softmax_scale, int64_t max_query_len, bool causal, int64_t window_left,
                                      double softcap, const std::optional<at::Tensor>& sinks,
                                      const std::optional<at::Tensor>& lse);

// Raises the 'no kernel compiled for this configuration' error.
[[noreturn]] void fail_no_kernel(const char* op, int64_t head_dim, at::ScalarType qt, bool fp8);

// Head dims this build was compiled for (FIREATTN_HEAD_DIMS at build time).
std::vector<int64_t> compiled_head_dims();

}  // namespace fireattn
