"""Typed wrappers around torch.ops.fireattn.* (the compiled kernels).

Each op has the same signature as its specification in vllm_fireattn.reference. Calling an op
where the extension is missing raises FireAttnUnavailableError with the reason.
"""
from __future__ import annotations

import torch

from vllm_fireattn.ops._library import (
    FireAttnUnavailableError,
    compiled_head_dims,
    is_available,
    require,
    unavailable_reason,
)
from vllm_fireattn.ops.plan import decode_num_splits
from vllm_fireattn.reference.quant import FP8_CACHE_DTYPES

__all__ = [
    "FireAttnUnavailableError",
    "cache_write",
    "compiled_head_dims",
    "decode",
    "decode_num_splits",
    "is_available",
    "prefill",
    "unavailable_reason",
]


def cache_write(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """Writes key/value [>= N, Hkv, D] into kv_cache [blocks, 2, Hkv, block_size, D] at
    slot_mapping [N] (int64; -1 skips). FP8 caches store sat_rne(x / scale[head])."""
    require()
    torch.ops.fireattn.cache_write(key, value, kv_cache, slot_mapping, k_scale, v_scale)


def prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    softmax_scale: float,
    max_query_len: int,
    causal: bool = True,
    window_left: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    promote_every: int = 1,
    max_seq_len: int = 0,
) -> None:
    """Varlen paged attention; query/out [T, Hq, D] indexed by absolute cu_seqlens_q offsets.

    promote_every (FP8 caches): KV tiles between promotions of the FP8 tensor-core PV
    accumulator into the FP32 one (0: only at the end; head_dim 256 takes 0 or 1).
    lse [Hq, T] (natural log, optional): with an FP8 cache at head_dim 64 / 128 and promote_every
    1, of the row sums of the e4m3-rounded P that weigh V (README, Numerics); else of FP32 sums.
    max_seq_len: the longest sequence's keys, when known (0: unknown); it only picks between
    loops with the same numerics (FP8 head_dim 64: 256-key tiles for long cached contexts)."""
    require()
    torch.ops.fireattn.prefill(
        out, query, kv_cache, block_table, cu_seqlens_q, seq_lens, q_scale, k_scale, v_scale,
        softmax_scale, max_query_len, causal, window_left, softcap, sinks, lse, promote_every, max_seq_len,
    )


def decode(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    softmax_scale: float,
    max_query_len: int,
    causal: bool = True,
    window_left: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> None:
    """Decode / spec-verification rows; max_query_len is a static bound (CUDA-graph safe).

    num_splits: the most splits of one sequence's keys (split-KV); None asks the scheduler
    (ops.decode_num_splits), which depends only on static shapes.
    """
    require()
    if num_splits is None:
        num_splits = decode_num_splits(seq_lens.numel(), query.shape[1], kv_cache.shape[2], max_query_len,
                                       kv_cache.shape[4], kv_cache.dtype in FP8_CACHE_DTYPES,
                                       fp16=query.dtype == torch.float16)
    torch.ops.fireattn.decode(
        out, query, kv_cache, block_table, cu_seqlens_q, seq_lens, q_scale, k_scale, v_scale,
        softmax_scale, max_query_len, causal, window_left, softcap, sinks, lse, num_splits,
    )
