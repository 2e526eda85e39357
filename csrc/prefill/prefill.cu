// fireattn::prefill: varlen paged attention for prefill and chunked-prefill rows (any query
// length, cached context before the new tokens, bottom-right causal) on the warp-specialized
// Hopper tensor-core kernel of prefill_kernel.cuh, for every cache dtype: FP8 MMAs for FP8
// caches, 16-bit MMAs for BF16/FP16 caches.
#include <c10/cuda/CUDAGuard.h>
#include <cstdlib>
#include <c10/cuda/CUDAStream.h>

#include "common/attention_host.h"
#include "common/torch_checks.h"
#include "generated/configs.h"
#include "prefill/prefill_kernel.cuh"

namespace fireattn {

#define FIREATTN_DECLARE_PREFILL(QT, FP8, D) \
  extern template void launch_prefill<QT, FP8, D>(const AttentionParams&, int, int, bool, cudaStream_t);
FIREATTN_ATTENTION_CONFIGS(FIREATTN_DECLARE_PREFILL)
#undef FIREATTN_DECLARE_PREFILL

// FP8 head_dim 64 takes 256-key tiles (PrefillConfig::kWide) when the batch's longest query has at
// least FIREATTN_PREFILL_WIDE_MIN_QUERY tokens (default 8192; 0 = always, for tests and A/B runs):
// long queries gain ~10%, short causal ones lose up to 13% to the diagonal's wasted keys.
constexpr int64_t kWideMinQueryDefault = 8192;
int64_t prefill_wide_min_query() {
  const char* e = std::getenv("FIREATTN_PREFILL_WIDE_MIN_QUERY");
  if (e == nullptr || *e == '\0') return kWideMinQueryDefault;
  char* end = nullptr;
  const long long v = std::strtoll(e, &end, 10);
  TORCH_CHECK(*end == '\0' && v >= 0, "FIREATTN_PREFILL_WIDE_MIN_QUERY must be a non-negative integer (query tokens; ",
              "default ", num(kWideMinQueryDefault), ", 0 = always), got '", e, "'");
  return v;
}
// Also an op (fireattn.prefill_wide_tiles), so tests can tell which loop a launch takes. The wide
// loop promotes every tile, so another promote_every keeps the 128-key tiles.
bool prefill_wide_tiles(int64_t head_dim, bool fp8, int64_t max_query_len, int64_t promote_every) {
  return fp8 && head_dim == 64 && promote_every == 1 && max_query_len >= prefill_wide_min_query();
}

void prefill(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& q_scale,
             const at::Tensor& k_scale, const at::Tensor& v_scale, double softmax_scale, int64_t max_query_len,
             bool causal, int64_t window_left, double softcap, const std::optional<at::Tensor>& sinks,
             const std::optional<at::Tensor>& lse, int64_t promote_every) {
  const bool fp8 = is_fp8_cache(kv_cache);
  const AttentionParams p = make_attention_params("prefill", out, query, kv_cache, block_table, cu_seqlens_q,
                                                  seq_lens, q_scale, k_scale, v_scale, softmax_scale, max_query_len,
                                                  causal, window_left, softcap, sinks, lse);
  const int64_t head_dim = kv_cache.size(4);
  TORCH_CHECK(promote_every >= 0 && promote_every <= 1024, "fireattn.prefill: promote_every must be in [0, 1024] ",
              "(0: promote only at the end), got ", num(promote_every));
  TORCH_CHECK(head_dim != 256 || promote_every <= 1, "fireattn.prefill: head_dim 256 promotes every tile or never; ",
              "promote_every must be 0 or 1, got ", num(promote_every));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(query.data_ptr()) % 16 == 0 && query.stride(0) % 8 == 0 &&
                  query.stride(1) % 8 == 0,
              "fireattn.prefill: query rows must be 16-byte aligned (token and head strides multiples of 8)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0 && out.stride(0) % 2 == 0 && out.stride(1) % 2 == 0,
              "fireattn.prefill: out rows must be 4-byte aligned (token and head strides even)");
  const at::cuda::OptionalCUDAGuard guard(query.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType qt = query.scalar_type();
  const bool wide = prefill_wide_tiles(head_dim, fp8, max_query_len, promote_every);
#define FIREATTN_TRY_PREFILL(QT, FP8, D)                                                                     \
  if (qt == scalar_type_of<QT>() && fp8 == FP8 && head_dim == D) {                                           \
    launch_prefill<QT, FP8, D>(p, static_cast<int>(max_query_len), static_cast<int>(promote_every), wide, stream); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                          \
    return;                                                                                                  \
  }
  FIREATTN_ATTENTION_CONFIGS(FIREATTN_TRY_PREFILL)
#undef FIREATTN_TRY_PREFILL
  fail_no_kernel("prefill", head_dim, qt, fp8);
}

// Keys per tile of the prefill kernel for (head_dim, cache kind): the tile in which P is rounded
// against its own max, so the tests' emulation (the reference's precision="fp8_mma") takes it
// from the build instead of restating it. (The 256-key loop of FP8 head_dim 64 rounds P per
// 128-key half, PrefillConfig<64, 1>'s tile.)
int64_t prefill_key_tile(int64_t head_dim, bool fp8) {
  switch (head_dim) {
    case 64: return fp8 ? PrefillConfig<64, 1>::kBlockN : PrefillConfig<64, 2>::kBlockN;
    case 128: return fp8 ? PrefillConfig<128, 1>::kBlockN : PrefillConfig<128, 2>::kBlockN;
    case 256: return fp8 ? PrefillConfig<256, 1>::kBlockN : PrefillConfig<256, 2>::kBlockN;
    default: TORCH_CHECK(false, "fireattn.prefill_key_tile: head_dim must be 64, 128 or 256, got ", num(head_dim));
  }
  return 0;
}

}  // namespace fireattn
