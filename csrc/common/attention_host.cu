// Host side shared by the attention ops: argument checks into AttentionParams, the compiled
// head dims and the 'no kernel compiled' error.
#include "common/attention_host.h"

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

#include <cstdlib>
#include <cstring>

#include "common/tma_host.h"
#include "common/torch_checks.h"
#include "generated/configs.h"

namespace fireattn {

namespace {

void check_int32_vector(const at::Tensor& t, const char* op, const char* name, int64_t numel) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kInt && t.dim() == 1 && t.stride(0) == 1, "fireattn.", op,
              ": ", name, " must be a contiguous 1-D int32 CUDA tensor");
  TORCH_CHECK(t.numel() == numel, "fireattn.", op, ": ", name, " must have ", num(numel), " elements, got ",
              num(t.numel()));
}

}  // namespace

std::vector<int64_t> compiled_head_dims() { return {FIREATTN_HEAD_DIMS}; }

AttentionParams make_attention_params(const char* op, at::Tensor& out, const at::Tensor& query,
                                      const at::Tensor& kv_cache, const at::Tensor& block_table,
                                      const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                                      const at::Tensor& q_scale, const at::Tensor& k_scale, const at::Tensor& v_scale,
                                      double softmax_scale, int64_t max_query_len, bool causal, int64_t window_left,
                                      double softcap, const std::optional<at::Tensor>& sinks,
                                      const std::optional<at::Tensor>& lse) {
  check_kv_cache(kv_cache);
  const int64_t num_kv_heads = kv_cache.size(2), head_dim = kv_cache.size(4);
  TORCH_CHECK(query.is_cuda() && query.dim() == 3 && query.size(2) == head_dim && query.stride(2) == 1, "fireattn.",
              op, ": query must be a CUDA tensor [num_tokens, num_q_heads, head_dim=", num(head_dim),
              "] contiguous in head_dim, got ", dims(query.sizes()));
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type() && out.stride(2) == 1,
              "fireattn.", op, ": out must match query's shape and dtype");
  const int64_t num_q_heads = query.size(1);
  TORCH_CHECK(num_q_heads % num_kv_heads == 0, "fireattn.", op, ": num_q_heads ", num(num_q_heads),
              " is not a multiple of num_kv_heads ", num(num_kv_heads));
  const bool fp8 = is_fp8_cache(kv_cache);
  TORCH_CHECK(fp8 || kv_cache.scalar_type() == query.scalar_type(), "fireattn.", op, ": cache dtype ",
              dtype_name(kv_cache.scalar_type()), " must be FP8 or match the query dtype ",
              dtype_name(query.scalar_type()));
  const int64_t num_seqs = seq_lens.numel();
  check_int32_vector(seq_lens, op, "seq_lens", num_seqs);
  check_int32_vector(cu_seqlens_q, op, "cu_seqlens_q", num_seqs + 1);
  TORCH_CHECK(block_table.is_cuda() && block_table.scalar_type() == at::kInt && block_table.dim() == 2 &&
                  block_table.size(0) >= num_seqs && block_table.stride(1) == 1,
              "fireattn.", op, ": block_table must be an int32 CUDA tensor [>= num_seqs, max_blocks] with unit column stride");
  TORCH_CHECK(max_query_len >= 0, "fireattn.", op, ": max_query_len must be >= 0");
  TORCH_CHECK(softcap >= 0, "fireattn.", op, ": softcap must be >= 0 (0 disables it)");
  TORCH_CHECK(window_left >= -1, "fireattn.", op, ": window_left must be -1 (off) or >= 0");

  AttentionParams p{};
  p.q = query.data_ptr();
  p.out = out.data_ptr();
  p.q_tok_stride = query.stride(0);
  p.q_head_stride = query.stride(1);
  p.o_tok_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  const int64_t elem = kv_cache.element_size();
  p.kv.base = reinterpret_cast<const uint8_t*>(kv_cache.data_ptr());
  p.kv.block_stride = kv_cache.stride(0) * elem;
  p.kv.kv_stride = kv_cache.stride(1) * elem;
  p.kv.head_stride = kv_cache.stride(2) * elem;
  p.kv.token_stride = kv_cache.stride(3) * elem;
  p.kv.block_table = block_table.data_ptr<int32_t>();
  p.kv.block_table_stride = block_table.stride(0);
  p.kv.block_size = static_cast<int>(kv_cache.size(3));
  p.kv.num_blocks = static_cast<int>(kv_cache.size(0));
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.q_scale_stride = scale_stride(q_scale, num_kv_heads, "q_scale");
  p.k_scale_stride = scale_stride(k_scale, num_kv_heads, "k_scale");
  p.v_scale_stride = scale_stride(v_scale, num_kv_heads, "v_scale");
  p.q_scale = q_scale.data_ptr<float>();
  p.k_scale = k_scale.data_ptr<float>();
  p.v_scale = v_scale.data_ptr<float>();
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->is_cuda() && sinks->scalar_type() == at::kFloat && sinks->dim() == 1 &&
                    sinks->numel() == num_q_heads && sinks->stride(0) == 1,
                "fireattn.", op, ": sinks must be a contiguous float32 CUDA tensor [num_q_heads]");
    p.sinks = sinks->data_ptr<float>();
  }
  if (lse.has_value()) {
    TORCH_CHECK(lse->is_cuda() && lse->scalar_type() == at::kFloat && lse->dim() == 2 &&
                    lse->size(0) == num_q_heads && lse->size(1) >= query.size(0) && lse->stride(1) == 1,
                "fireattn.", op, ": lse must be a float32 CUDA tensor [num_q_heads, >= num_tokens]");
    p.lse = lse->data_ptr<float>();
    p.lse_head_stride = lse->stride(0);
  }
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = static_cast<int>(window_left);
  p.causal = causal;
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_q_heads = static_cast<int>(num_q_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  return p;
}

bool encode_kv_tensor_map(CUtensorMap* map, const AttentionParams& p, int row_bytes, int box_cols, int tile_keys) {
  const PagedKV& kv = p.kv;
  const int64_t bs = kv.block_size;
  // Boxes must tile pages and tiles exactly and start 1024-byte aligned in the swizzled tile.
  if (bs < 16 || (bs & (bs - 1)) != 0 || kv.num_blocks <= 0) return false;
  // TMA: 16-byte aligned base and strides (a padded block stride may not be).
  if (reinterpret_cast<uintptr_t>(kv.base) % 16 != 0 || kv.block_stride % 16 != 0 || row_bytes % 16 != 0) return false;
  // The row view needs compact (K/V, head, key) dims (check_kv_cache already requires them).
  if (kv.token_stride != row_bytes || kv.head_stride != bs * row_bytes || kv.kv_stride != p.num_kv_heads * kv.head_stride)
    return false;
  static const bool disabled = [] {
    const char* e = std::getenv("FIREATTN_DISABLE_TMA");
    return e != nullptr && std::strcmp(e, "1") == 0;
  }();
  if (disabled) return false;
  // The driver entry point without linking libcuda (the runtime hands out the driver's symbol).
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return false;
  // [num_blocks][2 * Hkv * block_size rows][row_bytes]; row = (kv * Hkv + head) * bs + key.
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(2 * p.num_kv_heads * bs),
                              static_cast<cuuint64_t>(kv.num_blocks)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(kv.token_stride), static_cast<cuuint64_t>(kv.block_stride)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_cols),
                             static_cast<cuuint32_t>(bs < tile_keys ? bs : tile_keys), 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<uint8_t*>(kv.base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            box_cols == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

void fail_no_kernel(const char* op, int64_t head_dim, at::ScalarType qt, bool fp8) {
  TORCH_CHECK(false, "fireattn.", op, ": no kernel compiled for head_dim=", num(head_dim), " dtype=", dtype_name(qt),
              " cache=", fp8 ? "fp8" : "same-as-query", " (this build has head dims {", FIREATTN_HEAD_DIMS_STR,
              "}; rebuild with FIREATTN_HEAD_DIMS / FIREATTN_DTYPES including it)");
}

}  // namespace fireattn
