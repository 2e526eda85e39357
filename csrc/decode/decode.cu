// fireattn::decode: paged attention for decode and spec-decode verification rows (query
// length 1..max_query_len per sequence, bottom-right causal). The launch depends only on
// num_seqs and the static max_query_len bound, never on sequence lengths, so a CUDA graph
// captured once replays correctly with new seq_lens / block tables; padded rows (seq_len 0)
// produce zeros. Runs the simple kernel until the split-KV decode kernel (issue 4) lands.
#include "attention/paged_attention.h"

namespace fireattn {

void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
            const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& q_scale,
            const at::Tensor& k_scale, const at::Tensor& v_scale, double softmax_scale, int64_t max_query_len,
            bool causal, int64_t window_left, double softcap, const std::optional<at::Tensor>& sinks,
            const std::optional<at::Tensor>& lse) {
  paged_attention("decode", out, query, kv_cache, block_table, cu_seqlens_q, seq_lens, q_scale, k_scale, v_scale,
                  softmax_scale, max_query_len, causal, window_left, softcap, sinks, lse);
}

}  // namespace fireattn
