// A tile of rows of one sequence, as the prefill kernels see it: row r is the pair (query token
// q_begin + r / group, query head kv_head * group + r % group), so a GQA group shares every K/V
// byte; and the keys that any row of the tile can see (bottom-right causal, sliding window).
#pragma once

#include "common/attention_params.h"

namespace fireattn {

struct RowTile {
  int group, q_begin, seq_len, num_rows;
  int context;               // keys before this step's queries (bottom-right alignment)
  int first_pos, last_pos;   // positions of the tile's first and last valid row
  int kv_begin, kv_end;      // keys any row of the tile can see
  bool empty;                // the tile starts past the sequence's rows

  __device__ __forceinline__ RowTile(const AttentionParams& p, int seq, int row0, int rows) {
    group = p.num_q_heads / p.num_kv_heads;
    q_begin = p.cu_seqlens_q[seq];
    const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
    seq_len = p.seq_lens[seq];
    num_rows = q_len * group;
    empty = row0 >= num_rows;
    context = seq_len - q_len;
    const int last_row = min(row0 + rows, num_rows) - 1;
    first_pos = context + row0 / group;
    last_pos = context + last_row / group;
    kv_end = p.causal ? min(seq_len, last_pos + 1) : seq_len;
    kv_begin = p.window_left >= 0 ? max(0, first_pos - p.window_left) : 0;
  }
};

}  // namespace fireattn
