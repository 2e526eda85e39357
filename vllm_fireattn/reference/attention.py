"""Paged attention as specification, with the kernels' intermediate precisions.

precision:
  "exact"   float64 on the inputs as stored: K/V dequantized from the cache, Q unquantized.
            The "FP32 reference" of DESIGN.md's tolerance rule.
  "kernel"  the prefill kernel's input rounding: with an FP8 cache, Q is quantized to e4m3 with
            its per-KV-head scale (sat_rne(q / q_scale)); everything else exact (the kernel's
            tensor-core arithmetic is "fp8_mma" below).
  (ops.decode's kernel keeps the query in 16 bits and widens FP8 K/V exactly, so the reference
  decode's "kernel" precision is "exact" on the stored cache.)
  "fp8_mma" "kernel" plus the Hopper tensor-core prefill path: P quantized to e4m3 as
            sat_rne(p * p_scale) / p_scale (the prefill kernel's p_scale is 256), PV summed per
            32-key MMA step in an accumulator of `mma_mantissa_bits` bits (truncated), and that
            accumulator promoted into an FP32 accumulator every `promote_every` tiles of
            `block_n` keys (two-level accumulation; promote_every=0 means never). With a
            BF16/FP16 cache (16-bit MMAs) P is rounded to the model dtype instead (`p_dtype`).
            p_ref: what each tile's P is taken against before rounding: "running" (the running
            row max) or "tile" (the tile's own row max unless it lies more than
            P_REF_SPAN_LOG2 below the running max; the prefill kernel's choice, which
            makes every tile's largest P exact).
            l_from_p: the softmax denominator is the sum of the rounded P, accumulated like O
            (the FP8 prefill at head_dim 64 / 128, promoting every tile, sums P on the tensor
            cores as an extra row of ones in V^T); otherwise the sum of P in FP32 before rounding.

Masks: bottom-right causal (query i of a sequence with q_len queries and seq_len keys sits at
position seq_len - q_len + i and sees keys j <= position), sliding window (keys j >=
position - window_left), soft cap (s = cap * tanh(s / cap) on the scaled scores) and sinks
(one logit per query head that joins the softmax denominator only).
"""
from __future__ import annotations

import math

import torch

from vllm_fireattn.reference.cache import gather_kv, is_fp8_cache
from vllm_fireattn.reference.quant import FP8_DTYPE, dequantize_fp8, quantize_fp8

PRECISIONS = ("exact", "kernel", "fp8_mma")
P_REF_SPAN_LOG2 = 8.0  # the prefill kernel's kPRefSpan (csrc/prefill/prefill_kernel.cuh)


def _truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round toward zero to `bits` explicit mantissa bits (emulates a narrow MMA accumulator)."""
    mant, exp = torch.frexp(x)  # x = mant * 2**exp, |mant| in [0.5, 1)
    scale = float(2 ** (bits + 1))
    return torch.ldexp(torch.trunc(mant * scale) / scale, exp)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    window_left: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    *,
    p_fp8: bool = False,
    p_dtype: torch.dtype | None = None,
    p_scale: float = 256.0,
    block_n: int = 128,
    mma_mantissa_bits: int | None = None,
    promote_every: int = 1,
    p_ref: str = "running",
    l_from_p: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q [Lq, Hq, D], k/v [Lk, Hkv, D] (already dequantized, any float dtype).

    Returns (out [Lq, Hq, D], lse [Hq, Lq]) in q's dtype; lse is the natural-log sum of exp of
    the visible scores (sinks included), -inf for rows that see nothing.
    """
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = (lk - lq) + torch.arange(lq, device=q.device)
    j = torch.arange(lk, device=q.device)
    visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= j[None, :] <= pos[:, None]
    if window_left >= 0:
        visible &= j[None, :] >= pos[:, None] - window_left
    s = s.masked_fill(~visible, float("-inf"))
    sink_logit = None if sinks is None else sinks.to(s.dtype)[:, None].expand(hq, lq)
    p_round = FP8_DTYPE if p_fp8 else p_dtype
    if p_round is None and mma_mantissa_bits is None and not l_from_p:
        out, lse = _softmax_pv(s, v, sink_logit)
    else:
        out, lse = _softmax_pv_tiled(s, v, sink_logit, p_round, p_scale, block_n, mma_mantissa_bits, promote_every,
                                     p_ref, l_from_p)
    return out.to(q.dtype), lse.to(q.dtype)


def _softmax_pv(s, v, sink_logit):
    m = s.amax(-1) if s.shape[-1] > 0 else s.new_full(s.shape[:-1], float("-inf"))
    if sink_logit is not None:
        m = torch.maximum(m, sink_logit)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    e = torch.exp(s - m[..., None])
    denom = e.sum(-1)
    if sink_logit is not None:
        denom = denom + torch.exp(sink_logit - m)
    out = torch.einsum("hqk,khd->qhd", e, v) / torch.where(denom > 0, denom, torch.ones_like(denom)).T[..., None]
    lse = torch.where(denom > 0, m + torch.log(denom), torch.full_like(denom, float("-inf")))
    return out, lse


def _softmax_pv_tiled(s, v, sink_logit, p_round, p_scale, block_n, mma_mantissa_bits, promote_every,
                      p_ref="running", l_from_p=False):
    """Online softmax over key tiles, as the tensor-core prefill kernel computes it. acc, part
    and l are relative to exp(m_ref); m is the running max. l_from_p: V gets a column of ones,
    and l is that column of the accumulator (the sum of the rounded P, accumulated as O is)."""
    if p_ref not in ("running", "tile"):
        raise ValueError(f"p_ref must be 'running' or 'tile', got {p_ref!r}")
    if l_from_p:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    hq, lq, lk = s.shape
    span = P_REF_SPAN_LOG2 * math.log(2.0)
    m = torch.full((hq, lq), float("-inf"), dtype=s.dtype, device=s.device)
    m_ref = m.clone()
    l = torch.zeros_like(m)
    acc = torch.zeros(hq, lq, v.shape[-1], dtype=s.dtype, device=s.device)
    part = torch.zeros_like(acc)
    vh = v.permute(1, 0, 2)  # [Hq, Lk, D]
    num_tiles = -(-lk // block_n)
    for t in range(num_tiles):
        st = s[..., t * block_n : (t + 1) * block_n]
        t_max = st.amax(-1)
        m_new = torch.maximum(m, t_max)
        r_new = torch.maximum(t_max, m_new - span) if p_ref == "tile" else m_new
        r_use = torch.where(torch.isinf(r_new) & (r_new < 0), torch.zeros_like(r_new), r_new)
        alpha = torch.exp(m_ref - r_use)
        p = torch.exp(st - r_use[..., None])
        l = l * alpha + p.sum(-1)
        if p_round is not None:  # the MMA's P: e4m3 for FP8 caches, the model dtype for 16-bit ones
            p = (p * p_scale).to(torch.float32).to(p_round).to(s.dtype) / p_scale
        acc = acc * alpha[..., None]
        part = part * alpha[..., None]
        vt = vh[:, t * block_n : (t + 1) * block_n]
        for k0 in range(0, st.shape[-1], 32):  # one MMA k-step
            part = part + p[..., k0 : k0 + 32] @ vt[:, k0 : k0 + 32]
            if mma_mantissa_bits is not None:
                part = _truncate_mantissa(part, mma_mantissa_bits)
        if (promote_every > 0 and (t + 1) % promote_every == 0) or t == num_tiles - 1:
            acc, part = acc + part, torch.zeros_like(part)
        m, m_ref = m_new, r_new
    m = m_ref
    if l_from_p:
        l, acc = acc[..., -1], acc[..., :-1]
    if sink_logit is not None:
        m_new = torch.maximum(m, sink_logit)
        alpha = torch.exp(m - m_new)
        l = l * alpha + torch.exp(sink_logit - m_new)
        acc = acc * alpha[..., None]
        m = m_new
    out = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    lse = torch.where(l > 0, m + torch.log(l), torch.full_like(l, float("-inf")))
    return out.permute(1, 0, 2), lse


def _quantized_query(q: torch.Tensor, q_scale: torch.Tensor, num_kv_heads: int, dtype) -> torch.Tensor:
    """Q [L, Hq, D] -> sat_rne(q / q_scale[kv head of each q head]) * q_scale, in `dtype`."""
    lq, hq, d = q.shape
    grouped = q.reshape(lq, num_kv_heads, hq // num_kv_heads * d)
    return dequantize_fp8(quantize_fp8(grouped, q_scale), q_scale, dtype).reshape(lq, hq, d)


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
    *,
    precision: str = "kernel",
    dtype=torch.float64,
    **emulation,
) -> None:
    """Same signature and semantics as vllm_fireattn.ops.prefill; writes out (and lse) in place."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fp8 = is_fp8_cache(kv_cache)
    num_kv_heads = kv_cache.shape[2]
    if precision == "fp8_mma":
        emulation.setdefault("p_fp8", fp8)
        emulation.setdefault("p_ref", "tile")  # the prefill kernel's (softmax_tile)
        # FP8 head_dim 64 / 128 promoting every tile: row sums of the rounded P on the tensor
        # cores (PrefillConfig::kSumRows); other intervals sum P in FP32
        emulation.setdefault("l_from_p", fp8 and query.shape[-1] != 256 and emulation.get("promote_every", 1) == 1)
        if not fp8:  # 16-bit caches: the tensor-core prefill rounds P to the model dtype
            emulation.setdefault("p_dtype", query.dtype)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q0, q1 = cu[b], cu[b + 1]
        if q1 <= q0:
            continue
        if q1 - q0 > max_query_len:
            raise ValueError(f"sequence {b} has {q1 - q0} queries > max_query_len {max_query_len}")
        k, v = gather_kv(kv_cache, block_table[b], seq_len, k_scale, v_scale, dtype)
        q = query[q0:q1]
        if fp8 and precision != "exact":
            q = _quantized_query(q, q_scale, num_kv_heads, dtype)
        o, row_lse = attend(
            q.to(dtype),
            k,
            v,
            softmax_scale,
            causal,
            window_left,
            softcap,
            sinks,
            **(emulation if precision == "fp8_mma" else {}),
        )
        out[q0:q1] = o.to(out.dtype)
        if lse is not None:
            lse[:, q0:q1] = row_lse.to(lse.dtype)


def decode(*args, num_splits: int | None = None, precision: str = "kernel", **kwargs) -> None:
    """Mirrors vllm_fireattn.ops.decode (num_splits changes only the work split, not the math).

    The decode kernel keeps the query in 16 bits (no FP8 quantization of Q) and widens FP8 K/V
    exactly, so its "kernel" precision is "exact" on the stored cache.
    """
    prefill(*args, precision="exact" if precision == "kernel" else precision, **kwargs)
