"""The decode scheduler: how many splits of each sequence's keys the decode kernel may use.

Runs once per step (the FIREATTN metadata builder calls it; ops.decode calls it when no plan is
given). The result depends only on static shapes (batch size, heads, query rows), so a full CUDA
graph captured for a batch size replays with the same plan; the kernel then derives each
sequence's actual split count and ranges from its length on the GPU (at most `num_splits`: up to
32 splits of at least 64 keys, beyond that splits of at least 256 keys, and no empty split), so
nothing here reads sequence lengths or syncs with the GPU.

Heuristic: one wave of CTAs. A CTA is (split, 8-row tile, KV head, sequence) with 4 warps, and
ctas_per_sm() of them are resident on an SM (asked from the CUDA runtime for the compiled kernel),
so splits = floor(SMs * ctas_per_sm / base CTAs), at least 1: a second, partial wave would cost
as much as the first.
"""
from __future__ import annotations

import functools

import torch

MAX_SPLITS = 128  # the kernel accepts up to 256


@functools.lru_cache(maxsize=None)
def ctas_per_sm(head_dim: int, fp8: bool, fp16: bool = False) -> int:
    """Resident decode CTAs per SM of the compiled kernel (CUDA occupancy API). Without the
    kernels (CPU-only installs) it returns the kernel's design point, 4."""
    from vllm_fireattn.ops import _library

    if _library.unavailable_reason() is not None or head_dim not in _library.compiled_head_dims():
        return 4
    return max(1, int(torch.ops.fireattn.decode_ctas_per_sm(head_dim, fp8, fp16)))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_seqs: int, num_q_heads: int, num_kv_heads: int, max_query_len: int, head_dim: int,
                      fp8: bool, num_sms: int | None = None, fp16: bool = False,
                      ctas: int | None = None) -> int:
    """Splits per sequence for a decode batch of `num_seqs` rows of up to `max_query_len` queries."""
    if num_sms is None:
        num_sms = _num_sms(torch.cuda.current_device()) if torch.cuda.is_available() else 132
    rows = (num_q_heads // max(num_kv_heads, 1)) * max(max_query_len, 1)
    base = max(num_seqs, 1) * num_kv_heads * ((rows + 7) // 8)
    ctas = ctas_per_sm(head_dim, fp8, fp16) if ctas is None else ctas
    return max(1, min(MAX_SPLITS, (num_sms * ctas) // max(base, 1)))
