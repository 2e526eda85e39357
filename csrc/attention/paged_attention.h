// Host entry shared by the prefill and decode ops while both run the first (simple) kernel.
#pragma once
#include <torch/all.h>

#include <optional>
#include <vector>

namespace fireattn {

void paged_attention(const char* op, at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                     const at::Tensor& block_table, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                     const at::Tensor& q_scale, const at::Tensor& k_scale, const at::Tensor& v_scale,
                     double softmax_scale, int64_t max_query_len, bool causal, int64_t window_left, double softcap,
                     const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& lse);

// Head dims this build was compiled for (FIREATTN_HEAD_DIMS at build time).
std::vector<int64_t> compiled_head_dims();

}  // namespace fireattn
