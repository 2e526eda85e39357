"""The paged KV-cache layout and the cache write, as specification.

Layout (every FIREATTN op): kv_cache[num_blocks, 2, num_kv_heads, block_size, head_dim];
K at [:, 0], V at [:, 1]. FP8 caches are uint8 (as vLLM allocates them) or float8_e4m3fn.
The block dim may carry padding (vLLM pads pages when skip layers mix FP8 and BF16 pages);
the inner four dims are compact.
"""
from __future__ import annotations

import torch

from vllm_fireattn.reference.quant import FP8_CACHE_DTYPES, FP8_DTYPE, dequantize_fp8, quantize_fp8


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
    return (num_blocks, 2, num_kv_heads, block_size, head_size)


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype in FP8_CACHE_DTYPES


def cache_write(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """Writes key/value [>= N, Hkv, D] rows to the slots in slot_mapping [N] (int64, -1 = skip)."""
    n = slot_mapping.numel()
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = kv_cache.shape[3]
    blocks, offsets = slots // block_size, slots % block_size
    k, v = key[:n][keep], value[:n][keep]
    if is_fp8_cache(kv_cache):
        dest = kv_cache.view(FP8_DTYPE) if kv_cache.dtype == torch.uint8 else kv_cache
        k, v = quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
    else:
        if kv_cache.dtype != key.dtype:
            raise ValueError(f"cache dtype {kv_cache.dtype} is neither FP8 nor the key dtype {key.dtype}")
        dest = kv_cache
    # Advanced indices around a slice put the token dim first: [N, Hkv, D].
    dest[blocks, 0, :, offsets] = k
    dest[blocks, 1, :, offsets] = v


def gather_kv(
    kv_cache: torch.Tensor,
    block_table_row: torch.Tensor,
    seq_len: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    dtype=torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [seq_len, Hkv, D] of one sequence in `dtype`; FP8 entries are dequantized with the
    given scales (pass scales of 1.0 to get the raw stored values)."""
    block_size = kv_cache.shape[3]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table_row[:num_blocks].long()
    pages = kv_cache[blocks]  # [nb, 2, H, bs, D]
    kv = pages.permute(1, 0, 3, 2, 4).reshape(2, num_blocks * block_size, *pages.shape[2:3], pages.shape[-1])
    k, v = kv[0, :seq_len], kv[1, :seq_len]
    if is_fp8_cache(kv_cache):
        one = torch.ones((), dtype=torch.float32)
        return (
            dequantize_fp8(k, one if k_scale is None else k_scale, dtype),
            dequantize_fp8(v, one if v_scale is None else v_scale, dtype),
        )
    return k.to(dtype), v.to(dtype)
