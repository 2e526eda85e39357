// fireattn::prefill: varlen paged attention for prefill and chunked-prefill rows (any query
// length, cached context before the new tokens, bottom-right causal). Runs the simple kernel
// until the Hopper FP8 prefill kernel (issue 3) lands behind this signature.
#include "attention/paged_attention.h"

namespace fireattn {

void prefill(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& q_scale,
             const at::Tensor& k_scale, const at::Tensor& v_scale, double softmax_scale, int64_t max_query_len,
             bool causal, int64_t window_left, double softcap, const std::optional<at::Tensor>& sinks,
             const std::optional<at::Tensor>& lse) {
  paged_attention("prefill", out, query, kv_cache, block_table, cu_seqlens_q, seq_lens, q_scale, k_scale, v_scale,
                  softmax_scale, max_query_len, causal, window_left, softcap, sinks, lse);
}

}  // namespace fireattn
