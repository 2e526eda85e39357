// The torch op library. Loaded with torch.ops.load_library, so the shared object needs no
// Python symbols; Python wrappers and fake kernels live in vllm_fireattn/ops/.
#include <torch/all.h>
#include <torch/library.h>

#include "common/attention_host.h"

namespace fireattn {
void cache_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                 const at::Tensor& slot_mapping, const at::Tensor& k_scale, const at::Tensor& v_scale);
void prefill(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& q_scale,
             const at::Tensor& k_scale, const at::Tensor& v_scale, double softmax_scale, int64_t max_query_len,
             bool causal, int64_t window_left, double softcap, const std::optional<at::Tensor>& sinks,
             const std::optional<at::Tensor>& lse, int64_t promote_every, int64_t max_seq_len);
void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
            const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& q_scale,
            const at::Tensor& k_scale, const at::Tensor& v_scale, double softmax_scale, int64_t max_query_len,
            bool causal, int64_t window_left, double softcap, const std::optional<at::Tensor>& sinks,
            const std::optional<at::Tensor>& lse, int64_t num_splits);
int64_t decode_ctas_per_sm(int64_t head_dim, bool fp8, bool fp16);
int64_t prefill_key_tile(int64_t head_dim, bool fp8);
int64_t prefill_persistent_grid(int64_t max_query_len, int64_t num_tokens, int64_t num_seqs, int64_t num_q_heads,
                                int64_t num_kv_heads);
bool prefill_wide_tiles(int64_t head_dim, bool fp8, int64_t max_query_len, int64_t max_seq_len, int64_t promote_every);
}  // namespace fireattn

#define FIREATTN_ATTENTION_ARGS                                                                             \
  "(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_table, Tensor cu_seqlens_q, Tensor seq_lens, " \
  "Tensor q_scale, Tensor k_scale, Tensor v_scale, float softmax_scale, int max_query_len, bool causal, "     \
  "int window_left, float softcap, Tensor? sinks, Tensor(b!)? lse"

TORCH_LIBRARY(fireattn, m) {
  m.def(
      "cache_write(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, Tensor k_scale, "
      "Tensor v_scale) -> ()");
  // promote_every: KV tiles between promotions of the FP8 PV accumulator (0: only at the end).
  m.def("prefill" FIREATTN_ATTENTION_ARGS ", int promote_every=1, int max_seq_len=0) -> ()");
  // num_splits: the most splits of one sequence's keys (the plan; see vllm_fireattn/ops/plan.py).
  m.def("decode" FIREATTN_ATTENTION_ARGS ", int num_splits=1) -> ()");
  m.def("compiled_head_dims() -> int[]", &fireattn::compiled_head_dims);
  // Resident decode CTAs per SM on the current device (the split plan's wave size).
  m.def("decode_ctas_per_sm(int head_dim, bool fp8, bool fp16) -> int", &fireattn::decode_ctas_per_sm);
  // Keys per prefill tile (the tests' numerics emulation follows the build).
  m.def("prefill_key_tile(int head_dim, bool fp8) -> int", &fireattn::prefill_key_tile);
  m.def("prefill_persistent_grid(int max_query_len, int num_tokens, int num_seqs, int num_q_heads, int num_kv_heads) -> int",
        &fireattn::prefill_persistent_grid);
  m.def("prefill_wide_tiles(int head_dim, bool fp8, int max_query_len, int max_seq_len=0, int promote_every=1) -> bool",
        &fireattn::prefill_wide_tiles);
}

TORCH_LIBRARY_IMPL(fireattn, CUDA, m) {
  m.impl("cache_write", &fireattn::cache_write);
  m.impl("prefill", &fireattn::prefill);
  m.impl("decode", &fireattn::decode);
}
