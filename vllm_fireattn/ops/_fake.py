"""Fake (meta) kernels: every op mutates its outputs in place and returns nothing."""
import torch


@torch.library.register_fake("fireattn::cache_write")
def _cache_write_fake(key, value, kv_cache, slot_mapping, k_scale, v_scale) -> None:
    return None


@torch.library.register_fake("fireattn::prefill")
def _prefill_fake(out, query, kv_cache, block_table, cu_seqlens_q, seq_lens, q_scale, k_scale, v_scale,
                  softmax_scale, max_query_len, causal, window_left, softcap, sinks, lse, promote_every=1,
                  max_seq_len=0) -> None:
    return None


@torch.library.register_fake("fireattn::decode")
def _decode_fake(out, query, kv_cache, block_table, cu_seqlens_q, seq_lens, q_scale, k_scale, v_scale,
                 softmax_scale, max_query_len, causal, window_left, softcap, sinks, lse, num_splits=1) -> None:
    return None
