// Arguments every paged attention kernel takes (prefill and decode), filled and checked once
// by make_attention_params() in csrc/common/attention_host.cu.
#pragma once
#include <stdint.h>

#include "common/paged_kv.h"

namespace fireattn {

struct AttentionParams {
  const void* q;
  void* out;
  float* lse;  // [num_q_heads, lse_stride] natural-log LSE per row, or nullptr
  int64_t lse_head_stride;
  int64_t q_tok_stride, q_head_stride, o_tok_stride, o_head_stride;  // elements
  PagedKV kv;
  const int32_t* cu_seqlens_q;  // [num_seqs + 1] absolute token offsets into q/out
  const int32_t* seq_lens;      // [num_seqs] keys per sequence, new tokens included
  const float* q_scale;
  const float* k_scale;
  const float* v_scale;
  int q_scale_stride, k_scale_stride, v_scale_stride;  // 0: per-tensor, 1: per kv head
  const float* sinks;  // [num_q_heads] or nullptr
  float softmax_scale;
  float softcap;    // 0: off
  int window_left;  // -1: off; else key j visible to query at position i iff j >= i - window_left
  bool causal;
  int num_seqs, num_q_heads, num_kv_heads;
};

}  // namespace fireattn
