// The paged KV-cache layout shared by every op (see vllm_fireattn/reference/cache.py):
//   kv_cache[num_blocks, 2, num_kv_heads, block_size, head_dim]
// K is index 0 and V index 1 of dim 1. The block dim may be padded (vLLM pads pages when
// skip layers mix FP8 and BF16 pages), so it is addressed by its runtime stride; the inner
// four dims are compact. FP8 caches arrive as uint8 (vLLM) or float8_e4m3fn.
#pragma once
#include <stdint.h>

namespace fireattn {

struct PagedKV {
  const uint8_t* base;       // byte pointer to kv_cache[0]
  int64_t block_stride;      // bytes between consecutive blocks
  int64_t kv_stride;         // bytes from K to V of one block
  int64_t head_stride;       // bytes between kv heads of one block
  int64_t token_stride;      // bytes between tokens of one head (= head_dim * elem_size)
  const int32_t* block_table;
  int64_t block_table_stride;  // elements between rows of the block table
  int block_size;
  int num_blocks;  // the TMA producer's tensor map bound (fills the struct's tail padding)

  __device__ __forceinline__ const uint8_t* key_ptr(int seq, int head, int token) const {
    const int64_t block = block_table[seq * block_table_stride + token / block_size];
    return base + block * block_stride + head * head_stride + (token % block_size) * token_stride;
  }
};
// num_blocks sits in what was tail padding, so the kernels' parameter layout is unchanged.
static_assert(sizeof(PagedKV) == 64, "PagedKV layout");

}  // namespace fireattn
