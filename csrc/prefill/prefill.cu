// fireattn::prefill: varlen paged attention for prefill and chunked-prefill rows (any query
// length, cached context before the new tokens, bottom-right causal) on the warp-specialized
// Hopper tensor-core kernel of prefill_kernel.cuh, for every cache dtype: FP8 MMAs for FP8
// caches, 16-bit MMAs for BF16/FP16 caches.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>

#include "common/attention_host.h"
#include "common/torch_checks.h"
#include "generated/configs.h"
#include "prefill/prefill_kernel.cuh"

namespace fireattn {

#define FIREATTN_DECLARE_PREFILL(QT, FP8, D) \
  extern template void launch_prefill<QT, FP8, D>(const AttentionParams&, int, int, int, bool, cudaStream_t);
FIREATTN_ATTENTION_CONFIGS(FIREATTN_DECLARE_PREFILL)
#undef FIREATTN_DECLARE_PREFILL

// FP8 head_dim 64 has two loops with the same numerics: 128-key tiles, or 256-key tiles that
// round P per 128-key half (PrefillConfig::kWide; fewer instructions per key, up to a tile of
// wasted keys at the causal diagonal of each row tile). H200, same call, TFLOP/s 256 / 128
// (causal, batch 1, context x query): 16k x 4k 477 / 466, 24k x 8k 499 / 479, 32k x 2k / 8k /
// 16k 500 / 474, 508 / 482, 507 / 483, 64k x 4k 516 / 484, 128k x 512 517 / 473, 64k / 128k x
// 16k 525 / 492, 531 / 495; but 8k x 1k 411 / 416, 8k x 8k 389 / 408, 16k x 16k 452 / 450.
// FIREATTN_PREFILL_WIDE: "auto" (default) takes them when the longest sequence has >= 16384
// keys and at least twice the longest query's tokens; "1" always (where they apply: FP8, head_dim
// 64, promote_every 1), "0" never.
int prefill_wide_mode() {  // -1 auto, 0 never, 1 always
  const char* e = std::getenv("FIREATTN_PREFILL_WIDE");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return -1;
  if (std::strcmp(e, "0") == 0) return 0;
  if (std::strcmp(e, "1") == 0) return 1;
  TORCH_CHECK(false, "FIREATTN_PREFILL_WIDE must be auto, 0 or 1, got '", e, "'");
  return -1;
}
// Also an op (fireattn.prefill_wide_tiles), so tests can tell which loop a launch takes.
// max_seq_len 0 (unknown) counts as max_query_len.
bool prefill_wide_tiles(int64_t head_dim, bool fp8, int64_t max_query_len, int64_t max_seq_len, int64_t promote_every) {
  const int mode = prefill_wide_mode();
  if (!fp8 || head_dim != 64 || promote_every != 1 || mode == 0) return false;
  const int64_t keys = max_seq_len > max_query_len ? max_seq_len : max_query_len;
  return mode == 1 || (keys >= 16384 && keys >= 2 * max_query_len);
}

void prefill(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& q_scale,
             const at::Tensor& k_scale, const at::Tensor& v_scale, double softmax_scale, int64_t max_query_len,
             bool causal, int64_t window_left, double softcap, const std::optional<at::Tensor>& sinks,
             const std::optional<at::Tensor>& lse, int64_t promote_every, int64_t max_seq_len) {
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
  TORCH_CHECK(max_seq_len >= 0, "fireattn.prefill: max_seq_len must be >= 0 (0: unknown), got ", num(max_seq_len));
  // Work items of the kernel (row tiles x sequences x kv heads) are numbered in an int.
  const int64_t row_tiles = prefill_row_tiles(max_query_len * (p.num_q_heads / p.num_kv_heads));
  TORCH_CHECK(row_tiles * p.num_seqs * p.num_kv_heads < (int64_t{1} << 31), "fireattn.prefill: row tiles (max_query_len x ",
              "GQA group / ", kPrefillRowTile, ") x sequences x kv heads must stay below 2^31");
  const bool wide = prefill_wide_tiles(head_dim, fp8, max_query_len, max_seq_len, promote_every);
#define FIREATTN_TRY_PREFILL(QT, FP8, D)                                                                           \
  if (qt == scalar_type_of<QT>() && fp8 == FP8 && head_dim == D) {                                                 \
    launch_prefill<QT, FP8, D>(p, static_cast<int>(max_query_len), static_cast<int>(query.size(0)), static_cast<int>(promote_every), wide, stream); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                                \
    return;                                                                                                        \
  }
  FIREATTN_ATTENTION_CONFIGS(FIREATTN_TRY_PREFILL)
#undef FIREATTN_TRY_PREFILL
  fail_no_kernel("prefill", head_dim, qt, fp8);
}

// CTAs of a persistent prefill launch on the current device, 0 when it takes one CTA per work
// item (prefill_kernel.cuh, PrefillSchedule); an op, so tests can tell which path a shape takes.
// The 256-key loop (prefill_wide_tiles) takes one CTA per item whatever this says.
int64_t prefill_persistent_grid(int64_t max_query_len, int64_t num_tokens, int64_t num_seqs, int64_t num_q_heads,
                                int64_t num_kv_heads) {
  return prefill_persistent_ctas(max_query_len, num_tokens, num_seqs, num_q_heads, num_kv_heads);
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
