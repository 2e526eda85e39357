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

__all__ = [
    "FireAttnUnavailableError",
    "cache_write",
    "compiled_head_dims",
    "decode",
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
) -> None:
    """Varlen paged attention; query/out [T, Hq, D] indexed by absolute cu_seqlens_q offsets."""
    require()
    torch.ops.fireattn.prefill(
        out, query, kv_cache, block_table, cu_seqlens_q, seq_lens, q_scale, k_scale, v_scale,
        softmax_scale, max_query_len, causal, window_left, softcap, sinks, lse,
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
) -> None:
    """Decode / spec-verification rows; max_query_len is a static bound (CUDA-graph safe)."""
    require()
    torch.ops.fireattn.decode(
        out, query, kv_cache, block_table, cu_seqlens_q, seq_lens, q_scale, k_scale, v_scale,
        softmax_scale, max_query_len, causal, window_left, softcap, sinks, lse,
    )
