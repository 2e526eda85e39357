// Host side of the prefill kernel's TMA producer (FIREATTN_PREFILL_TMA, default on), implemented in
// attention_host.cu. Kept free of torch headers: the generated kernel files include it.
#pragma once
#include <cuda.h>

#include "common/attention_params.h"

namespace fireattn {

// Encodes the paged cache of `p` as a 3-D tiled tensor map for the prefill TMA producer:
// [num_blocks][2 * Hkv * block_size rows][row_bytes = head_dim x element size], boxes of box_cols bytes (the K
// tile's column chunk, 64 or 128, with the matching 64B / 128B swizzle) x min(block_size,
// tile_keys) rows. False (the caller uses cp.async instead) if the cache does not fit TMA's
// rules or this path's assumptions, the driver has no cuTensorMapEncodeTiled, or
// FIREATTN_DISABLE_TMA=1.
bool encode_kv_tensor_map(CUtensorMap* map, const AttentionParams& p, int row_bytes, int box_cols, int tile_keys);

}  // namespace fireattn
