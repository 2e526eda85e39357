// fireattn::decode: paged attention for decode and spec-decode verification rows (query
// length 1..max_query_len per sequence, bottom-right causal), on the split-KV tensor-core kernel
// of decode_kernel.cuh. The launch depends only on num_seqs, max_query_len and num_splits (all
// static for a captured batch size), never on sequence lengths, so a CUDA graph captured once
// replays correctly with new seq_lens / block tables; padded rows (seq_len 0) produce zeros.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/attention_host.h"
#include "common/torch_checks.h"
#include "decode/decode_kernel.cuh"
#include "generated/configs.h"

namespace fireattn {

#define FIREATTN_DECLARE_DECODE(QT, FP8, D)                                          \
  extern template void launch_decode<QT, FP8, D>(const DecodeParams&, cudaStream_t); \
  extern template int decode_ctas_per_sm<QT, FP8, D>();
FIREATTN_ATTENTION_CONFIGS(FIREATTN_DECLARE_DECODE)
#undef FIREATTN_DECLARE_DECODE

void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
            const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& q_scale,
            const at::Tensor& k_scale, const at::Tensor& v_scale, double softmax_scale, int64_t max_query_len,
            bool causal, int64_t window_left, double softcap, const std::optional<at::Tensor>& sinks,
            const std::optional<at::Tensor>& lse, int64_t num_splits) {
  DecodeParams dp{};
  dp.a = make_attention_params("decode", out, query, kv_cache, block_table, cu_seqlens_q, seq_lens, q_scale, k_scale,
                               v_scale, softmax_scale, max_query_len, causal, window_left, softcap, sinks, lse);
  TORCH_CHECK(num_splits >= 1 && num_splits <= kDecodeMaxSplits, "fireattn.decode: num_splits must be in [1, ",
              num(kDecodeMaxSplits), "], got ", num(num_splits));
  TORCH_CHECK(dp.a.kv.block_size % 16 == 0, "fireattn.decode: block_size must be a multiple of 16, got ",
              num(dp.a.kv.block_size));
  const int64_t head_dim = kv_cache.size(4);
  dp.group = dp.a.num_q_heads / dp.a.num_kv_heads;
  dp.row_tiles = static_cast<int>((dp.group * max_query_len + 7) / 8);
  dp.num_splits = static_cast<int>(num_splits);
  const int bs = dp.a.kv.block_size;
  dp.block_shift = (bs & (bs - 1)) == 0 ? __builtin_ctz(static_cast<unsigned>(bs)) : -1;
  if (dp.a.num_seqs == 0 || dp.row_tiles == 0) return;

  const at::cuda::OptionalCUDAGuard guard(query.device());
  at::Tensor workspace;
  if (num_splits > 1) {
    // Split partials: 8 rows x (head_dim outputs + 1 LSE) per (seq, kv head, row tile, split).
    const int64_t slots = int64_t{dp.a.num_seqs} * dp.a.num_kv_heads * dp.row_tiles * num_splits;
    workspace = at::empty({slots * 8 * (head_dim + 1)}, query.options().dtype(at::kFloat));
    dp.part_out = workspace.data_ptr<float>();
    dp.part_lse = dp.part_out + slots * 8 * head_dim;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType qt = query.scalar_type();
  const bool fp8 = is_fp8_cache(kv_cache);
#define FIREATTN_TRY_DECODE(QT, FP8, D)                            \
  if (qt == scalar_type_of<QT>() && fp8 == FP8 && head_dim == D) { \
    launch_decode<QT, FP8, D>(dp, stream);                         \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                \
    return;                                                        \
  }
  FIREATTN_ATTENTION_CONFIGS(FIREATTN_TRY_DECODE)
#undef FIREATTN_TRY_DECODE
  fail_no_kernel("decode", head_dim, qt, fp8);
}

int64_t decode_ctas_per_sm(int64_t head_dim, bool fp8, bool fp16) {
  const at::ScalarType qt = fp16 ? at::kHalf : at::kBFloat16;
#define FIREATTN_TRY_OCCUPANCY(QT, FP8, D) \
  if (qt == scalar_type_of<QT>() && fp8 == FP8 && head_dim == D) return decode_ctas_per_sm<QT, FP8, D>();
  FIREATTN_ATTENTION_CONFIGS(FIREATTN_TRY_OCCUPANCY)
#undef FIREATTN_TRY_OCCUPANCY
  fail_no_kernel("decode_ctas_per_sm", head_dim, qt, fp8);
}

}  // namespace fireattn
