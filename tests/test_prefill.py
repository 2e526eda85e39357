"""GPU: ops.prefill vs the reference (DESIGN.md tolerance rule) over awkward shapes."""
import functools
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from helpers import assert_attention_close, make_paged_batch, reference_outputs
import vllm_fireattn
from vllm_fireattn import ops
from vllm_fireattn import reference as ref

pytestmark = pytest.mark.gpu

# (q_lens, seq_lens): seq_len 1, page boundaries +-1, chunked prefill over cached context,
# decode rows mixed in, and a long row.
BATCHES = {
    "single_token": ([1], [1]),
    "page_edges": ([15, 16, 17, 31, 33], [15, 16, 17, 31, 33]),
    "chunked_context": ([7, 16, 40], [100, 16 + 64, 40 + 33]),
    "mixed_decode_prefill": ([1, 1, 3, 50, 129], [77, 1, 40, 50, 300]),
    "long": ([300], [1500]),
}


def _run(batch, promote_every=1, causal=True, **kw):
    out = torch.full_like(batch.query, float("nan"))
    lse = torch.full((batch.query.shape[1], batch.query.shape[0]), float("nan"), device="cuda")
    ops.prefill(out, *batch.args(), kw.get("softmax_scale", 0.125), batch.max_query_len,
                causal, kw.get("window_left", -1), kw.get("softcap", 0.0), kw.get("sinks"), lse, promote_every)
    return out, lse


def _fp8(batch) -> bool:
    return batch.kv_cache.dtype in (torch.uint8, torch.float8_e4m3fn)


def _check(batch, rows, softmax_scale=0.125, window_left=-1, softcap=0.0, sinks=None, promote_every=1,
           causal=True):
    """Every cache dtype runs the warp-specialized tensor-core kernel; its own precision is the
    reference's "fp8_mma": P rounded in the kernel's key tiles, to e4m3 for FP8 caches and to the
    model dtype for BF16/FP16 caches (16-bit wgmma)."""
    out, lse = _run(batch, promote_every, causal, softmax_scale=softmax_scale, window_left=window_left,
                    softcap=softcap, sinks=sinks)
    fp8 = _fp8(batch)
    head_dim = batch.query.shape[-1]
    block_n = torch.ops.fireattn.prefill_key_tile(head_dim, fp8)  # the build's tile, not restated
    emulation = dict(block_n=block_n, promote_every=promote_every)
    r32, rlp, rlse, lse32 = reference_outputs(batch, lowp="fp8_mma", emulation=emulation, with_exact_lse=True,
                                              softmax_scale=softmax_scale, window_left=window_left,
                                              softcap=softcap, sinks=sinks, causal=causal)
    assert_attention_close(out, r32, rlp, rows, lowp_exact=False)
    # FP8 QK^T enters the LSE: the tensor cores accumulate each k-step with ~13 mantissa bits, so
    # scores (and the LSE) carry ~1e-4 relative error. At head_dim 64 / 128 the FP8 row sums are
    # of the rounded P (the reference's l_from_p) and so carry its e4m3 rounding, where the exp
    # approximation can flip single roundings: as for the outputs, the kernel's LSE may then be no
    # farther from the emulation than the emulation is from the exact LSE.
    tol = dict(atol=5e-3, rtol=1e-3) if fp8 else dict(atol=1e-4, rtol=1e-5)
    got, want = lse[:, :rows].double(), rlse[:, :rows]
    if fp8 and head_dim != 256 and promote_every == 1:
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), "LSE inf positions differ"
        gap = (want - lse32[:, :rows])[finite].abs().max().item() if finite.any() else 0.0
        dev = (got - want)[finite].abs().max().item() if finite.any() else 0.0
        assert dev <= gap + tol["atol"], f"max|lse - lse_lowp| {dev:.3e} > max|lse_lowp - lse_fp32| {gap:.3e} + 5e-3"
    else:
        torch.testing.assert_close(got, want, **tol)


def _head_dim_compiled(d):
    if d not in ops.compiled_head_dims():
        pytest.skip(f"head_dim {d} not compiled in this build")


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads", [(8, 8), (16, 4), (16, 2)], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("batch_name", list(BATCHES))
def test_prefill_shapes(batch_name, heads, head_dim, fp8):
    _head_dim_compiled(head_dim)
    q_lens, seq_lens = BATCHES[batch_name]
    batch = make_paged_batch(q_lens, seq_lens, heads[0], heads[1], head_dim, block_size=16, fp8=fp8,
                             seed=zlib.crc32(repr((batch_name, heads, head_dim)).encode()) % 1000)
    _check(batch, sum(q_lens), softmax_scale=head_dim**-0.5)


# 48: not a power of two (the TMA producer falls back to cp.async); 256: a page spans
# two key tiles (TMA boxes start inside the page).
@pytest.mark.parametrize("block_size", [16, 32, 48, 64, 256])
@pytest.mark.parametrize("scale_mode", ["head", "tensor", "one"])
def test_prefill_block_sizes_and_scales(block_size, scale_mode):
    _head_dim_compiled(128)
    q_lens, seq_lens = [5, 63, 65], [block_size - 1 + 5, 63, block_size * 3 + 1 + 65]
    batch = make_paged_batch(q_lens, seq_lens, 8, 2, 128, block_size=block_size, scale_mode=scale_mode,
                             block_pad_bytes=256, query_row_pad=3)
    _check(batch, sum(q_lens), softmax_scale=128**-0.5)


# The producer per path: TMA boxes (FP8 at 128/256, 16-bit everywhere), cp.async (FP8 at 64), the
# run-time cp.async fallback (48: no power of two); 256: pages longer than every key tile.
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("block_size", [16, 48, 256])
def test_prefill_block_sizes_every_path(block_size, head_dim, fp8):
    _head_dim_compiled(head_dim)
    q_lens, seq_lens = [5, 63, 65], [block_size - 1 + 5, 63, block_size * 3 + 1 + 65]
    batch = make_paged_batch(q_lens, seq_lens, 8, 2, head_dim, block_size=block_size, fp8=fp8,
                             block_pad_bytes=256, seed=block_size + head_dim)
    _check(batch, sum(q_lens), softmax_scale=head_dim**-0.5)


def test_prefill_tma_disabled_fallback():
    """FIREATTN_DISABLE_TMA=1 (read once per process) sends every TMA-eligible launch to the
    cp.async fallback: rerun the shape tests of the long batch and the persistent-grid tests in a
    child process with it."""
    env = dict(os.environ, FIREATTN_DISABLE_TMA="1")
    # the child imports the package the parent imported (an in-place build is not installed)
    pkg_root = str(Path(vllm_fireattn.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                          "(test_prefill_shapes and long) or test_prefill_persistent"], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout, res.stdout[-500:]


# More work items (row tiles x sequences x kv heads) than SMs, mostly non-empty: the persistent
# grid, whose CTAs take items from an atomic counter (prefill_kernel.cuh, PrefillSchedule). A varlen
# batch (a decode row, cached context, a short and a long prompt) so items differ in length and
# some are empty.
PERSISTENT_BATCH = ([1200, 1, 700, 1500], [1300, 40, 700, 1600])


def _persistent_grid(q_lens, heads):
    return torch.ops.fireattn.prefill_persistent_grid(max(q_lens), sum(q_lens), len(q_lens), heads[0], heads[1])


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("variant", ["plain", "features", "non_causal", "promote2"])
def test_prefill_persistent_grid(variant, head_dim, fp8):
    _head_dim_compiled(head_dim)
    if variant == "promote2" and (not fp8 or head_dim == 256):
        pytest.skip("promote_every 2: FP8 caches below head_dim 256 only")
    q_lens, seq_lens = PERSISTENT_BATCH
    heads = (16, 4)
    ctas = _persistent_grid(q_lens, heads)
    items = -(-max(q_lens) * 4 // 128) * len(q_lens) * heads[1]
    assert 0 < ctas < items, f"expected the persistent grid ({items} items), got {ctas} CTAs"
    batch = make_paged_batch(q_lens, seq_lens, *heads, head_dim, fp8=fp8, seed=head_dim + fp8)
    kw = dict(window_left=500, softcap=20.0, sinks=torch.randn(16, device="cuda")) if variant == "features" else {}
    _check(batch, sum(q_lens), softmax_scale=head_dim**-0.5, causal=variant != "non_causal",
           promote_every=2 if variant == "promote2" else 1, **kw)


def test_prefill_persistent_grid_repeats_exactly():
    """Each launch leaves its item counters at 0 (the last CTA resets them): launches in a row give
    identical outputs, and one CTA computes each row tile whatever the order items are taken in."""
    _head_dim_compiled(128)
    q_lens, seq_lens = PERSISTENT_BATCH
    batch = make_paged_batch(q_lens, seq_lens, 16, 4, 128, fp8=True, seed=5)
    assert _persistent_grid(q_lens, (16, 4)) > 0
    first, first_lse = _run(batch, softmax_scale=128**-0.5)
    for _ in range(70):  # past the 64 counter slots the host rotates through
        out, lse = _run(batch, softmax_scale=128**-0.5)
        assert torch.equal(out, first) and torch.equal(lse.nan_to_num(), first_lse.nan_to_num())


def test_prefill_persistent_grid_choice():
    """Persistent only with more items than SMs, most of them non-empty."""
    _head_dim_compiled(128)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = torch.ops.fireattn.prefill_persistent_grid
    assert grid(4096, 4096, 1, 32, 8) == sms  # 1 x 4k, group 4: 128 row tiles x 8 kv heads
    assert grid(64, 64, 1, 32, 8) == 0  # 2 x 8 items
    assert grid(4096, 4096 + 40, 41, 32, 8) == 0  # one long prompt and 40 decode rows: 41 x 128 x 8 items, ~6% used


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("feature", ["window", "softcap", "sinks", "all"])
def test_prefill_features(feature, fp8):
    _head_dim_compiled(128)
    q_lens, seq_lens = [1, 37, 200], [90, 37, 260]
    batch = make_paged_batch(q_lens, seq_lens, 8, 2, 128, fp8=fp8, seed=7)
    kw = {}
    if feature in ("window", "all"):
        kw["window_left"] = 31
    if feature in ("softcap", "all"):
        kw["softcap"] = 5.0
    if feature in ("sinks", "all"):
        kw["sinks"] = torch.randn(8, device="cuda") * 2
    _check(batch, sum(q_lens), softmax_scale=0.3, **kw)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("promote_every", [0, 1, 2, 5])
def test_prefill_fp8_promotion_intervals(promote_every, head_dim):
    """Two-level accumulation: every interval gives the same math up to the accumulator's rounding."""
    _head_dim_compiled(head_dim)
    if head_dim == 256 and promote_every > 1:
        pytest.skip("head_dim 256 takes 0 or 1 (see test_prefill_rejects_bad_input_clearly)")
    batch = make_paged_batch([700, 3], [1300, 900], 8, 2, head_dim, fp8=True, seed=11)
    _check(batch, 703, softmax_scale=head_dim**-0.5, promote_every=promote_every)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_prefill_fp8_non_causal(head_dim):
    _head_dim_compiled(head_dim)
    batch = make_paged_batch([130, 64], [130, 300], 8, 8, head_dim, fp8=True, seed=3)
    _check(batch, 194, softmax_scale=head_dim**-0.5, causal=False)


@functools.lru_cache(maxsize=None)
def _long_context_errors(head_dim, wide="auto"):
    """Relative L2 vs an FP64 reference on the same rounded inputs (FP8 Q, K, V; ANCHORS.md's
    method), 64 queries at the end of 4k/16k/64k/128k-key contexts, random normal data: FIREATTN
    promoting every tile, never promoting, and vLLM's FA3 FP8 (empty when not importable).
    wide: FIREATTN_PREFILL_WIDE for these runs ("auto" takes the 128-key loop for 64 queries)."""
    saved = os.environ.get("FIREATTN_PREFILL_WIDE")
    os.environ["FIREATTN_PREFILL_WIDE"] = wide
    try:
        return _measure_long_context_errors(head_dim)
    finally:
        if saved is None:
            del os.environ["FIREATTN_PREFILL_WIDE"]
        else:
            os.environ["FIREATTN_PREFILL_WIDE"] = saved


def _measure_long_context_errors(head_dim):
    errs, never_errs, fa3_errs = [], [], []
    rel = lambda o, r: ((o.double() - r).norm() / r.norm()).item()  # noqa: E731
    for ctx in (4096, 16384, 65536, 131072):
        batch = make_paged_batch([64], [ctx], 8, 1, head_dim, fp8=True, seed=ctx, scale_mode="one")
        r32 = torch.zeros(batch.query.shape, dtype=torch.float64, device="cuda")
        ref.prefill(r32, *batch.args(), head_dim**-0.5, 64, precision="kernel")
        errs.append(rel(_run(batch, softmax_scale=head_dim**-0.5)[0], r32))
        never_errs.append(rel(_run(batch, promote_every=0, softmax_scale=head_dim**-0.5)[0], r32))
        fa3 = _fa3_fp8_prefill(batch, head_dim**-0.5)
        if fa3 is not None:
            fa3_errs.append(rel(fa3, r32))
    print(f"head_dim {head_dim} relative L2 at 4k/16k/64k/128k: FIREATTN {errs}, never promoted {never_errs}, "
          f"FA3 FP8 {fa3_errs or 'not importable'}")
    return errs, never_errs, fa3_errs


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_prefill_fp8_error_flat_with_context(head_dim):
    """DESIGN.md numerics: the error stays flat from 4k to 128k keys, promoting every tile is no
    worse than never promoting, and it stays at today's level (H200, P against each tile's max:
    0.0205-0.0220 at head_dim 64 (2026-11-23), 0.0212-0.0226 at 128, 0.0199-0.0211 at 256)."""
    _head_dim_compiled(head_dim)
    errs, never_errs, _ = _long_context_errors(head_dim)
    assert max(errs) <= 1.25 * min(errs), f"error grows with context: {errs}"
    for every, never in zip(errs, never_errs):
        assert every <= never * 1.001, f"promoting every tile {errs} worse than never {never_errs}"
    # never promoting drifts, but boundedly (H200, 2026-11-23, 128k keys: head_dim 64 / 128 0.037,
    # 256 0.056); row sums of P in the tensor-core accumulator without promotion reached 1.9
    assert max(never_errs) <= 3 * max(errs), f"never promoted {never_errs} vs every tile {errs}"
    assert max(errs) <= 0.024, f"relative L2 errors {errs} above today's level"


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_prefill_fp8_error_no_worse_than_fa3(head_dim):
    """Issue 3's accuracy target: no worse than vLLM FA3 FP8's error on the same inputs (2%
    slack), or, without FA3, inside ANCHORS.md's 0.022-0.025. H200, relative L2 at 4k / 16k / 64k
    / 128k: head_dim 64 (2026-11-23) FIREATTN 0.0207 / 0.0220 / 0.0205 / 0.0216 vs FA3 FP8 0.0212 /
    0.0233 / 0.0227 / 0.0246; (2026-11-22) head_dim 128 FIREATTN 0.0213 / 0.0212 / 0.0213 / 0.0226 vs FA3 FP8
    0.0225 / 0.0227 / 0.0239 / 0.0258; head_dim 256 0.0203 / 0.0211 / 0.0199 / 0.0201 vs 0.0224 /
    0.0240 / 0.0239 / 0.0247 (it was 5-10% above FA3 before each tile's P was taken against the
    tile's own max)."""
    _head_dim_compiled(head_dim)
    errs, _, fa3_errs = _long_context_errors(head_dim)
    if fa3_errs:
        for ours, theirs in zip(errs, fa3_errs):
            assert ours <= 1.02 * theirs, f"FIREATTN {errs} worse than FA3 FP8 {fa3_errs} on the same inputs"
    else:
        assert max(errs) <= 0.025, f"relative L2 errors {errs} above FA3 FP8's 0.022-0.025 (ANCHORS.md)"


def _fa3_fp8_prefill(batch, softmax_scale):
    """vLLM's FA3 with FP8 Q/K/V (descale 1) on the batch's own cache bytes, or None without vLLM."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - vLLM absent or built without FA3
        return None
    fp8 = torch.float8_e4m3fn
    k = batch.kv_cache[:, 0].permute(0, 2, 1, 3).contiguous().view(fp8)  # [blocks, bs, Hkv, D]
    v = batch.kv_cache[:, 1].permute(0, 2, 1, 3).contiguous().view(fp8)
    q = batch.query.float().clamp(-448, 448).to(fp8)
    ones = torch.ones(batch.seq_lens.numel(), k.shape[2], device="cuda")
    return flash_attn_varlen_func(q, k, v, batch.max_query_len, batch.cu_seqlens_q, int(batch.seq_lens.max()),
                                  seqused_k=batch.seq_lens, block_table=batch.block_table, causal=True,
                                  softmax_scale=softmax_scale, q_descale=ones, k_descale=ones, v_descale=ones,
                                  fa_version=3, out=torch.empty_like(batch.query))


def test_prefill_fp8_ignores_nan_blocks_before_the_window():
    """vLLM may replace the blocks before a sliding window; the FP8 kernel's first key tile starts
    up to 127 keys before the window, so those keys must never reach PV (0 * NaN is NaN)."""
    _head_dim_compiled(128)
    batch = make_paged_batch([64], [1000], 8, 2, 128, fp8=True, seed=5)
    kw = dict(softmax_scale=128**-0.5, window_left=100)  # visible keys start at 936 - 100 = 836
    r32, rlp, _ = reference_outputs(batch, lowp="fp8_mma", emulation=dict(block_n=128, promote_every=1), **kw)
    for blk in range(768 // 16, 832 // 16):  # whole blocks inside the first tile [768, 896), all before 836
        batch.kv_cache[batch.block_table[0, blk].long()] = 0x7F  # e4m3 NaN
    out, _ = _run(batch, **kw)
    assert torch.isfinite(out[:64]).all()
    assert_attention_close(out, r32, rlp, 64, lowp_exact=False)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_prefill_fp8_ignores_nan_keys_outside_the_range_in_loaded_pages(head_dim):
    """The TMA producer (head_dim 128/256) loads whole pages: keys of the window's first
    page before the window and keys past seq_len in the last page reach shared memory and must
    not reach PV."""
    _head_dim_compiled(head_dim)
    batch = make_paged_batch([64], [1000], 8, 2, head_dim, fp8=True, seed=6)
    kw = dict(softmax_scale=head_dim**-0.5, window_left=100)  # visible keys: [836, 1000)
    block_n = torch.ops.fireattn.prefill_key_tile(head_dim, True)
    r32, rlp, _ = reference_outputs(batch, lowp="fp8_mma", emulation=dict(block_n=block_n, promote_every=1), **kw)
    batch.kv_cache[batch.block_table[0, 836 // 16].long(), :, :, : 836 % 16] = 0x7F  # e4m3 NaN, keys 832..835
    batch.kv_cache[batch.block_table[0, 1000 // 16].long(), :, :, 1000 % 16 :] = 0x7F  # keys 1000..1007
    out, _ = _run(batch, **kw)
    assert torch.isfinite(out[:64]).all()
    assert_attention_close(out, r32, rlp, 64, lowp_exact=False)


def test_prefill_wide_tiles_switch(monkeypatch):
    """FP8 head_dim 64 takes the 256-key loop for long cached contexts (>= 16384 keys and at
    least twice the longest query) when promoting every tile; FIREATTN_PREFILL_WIDE=1 / 0 forces
    it on / off; nothing else takes it, P stays rounded per 128 keys, and a bad value is refused
    by name."""
    _head_dim_compiled(64)
    wide = torch.ops.fireattn.prefill_wide_tiles  # (head_dim, fp8, max_query_len, max_seq_len, promote_every)
    monkeypatch.delenv("FIREATTN_PREFILL_WIDE", raising=False)
    assert [wide(64, True, 8192, 16384), wide(64, True, 512, 131072), wide(64, True, 8192, 8192),
            wide(64, True, 16384, 16384), wide(64, True, 1024, 8192), wide(64, True, 16384, 0),
            wide(64, False, 512, 131072), wide(64, True, 512, 131072, 2), wide(128, True, 512, 131072)] == [
                True, True, False, False, False, False, False, False, False]
    assert torch.ops.fireattn.prefill_key_tile(64, True) == 128
    monkeypatch.setenv("FIREATTN_PREFILL_WIDE", "1")
    assert wide(64, True, 1, 1) and not wide(64, True, 1, 1, 0)
    monkeypatch.setenv("FIREATTN_PREFILL_WIDE", "0")
    assert not wide(64, True, 512, 131072)
    monkeypatch.setenv("FIREATTN_PREFILL_WIDE", "yes")
    with pytest.raises(RuntimeError, match="FIREATTN_PREFILL_WIDE must be auto, 0 or 1, got 'yes'"):
        wide(64, True, 1, 1)


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("block_size", [16, 48])
def test_prefill_fp8_wide_tiles(monkeypatch, name, block_size):
    """The 256-key loop forced onto every query length, against the 128-key emulation (the loop
    rounds P per 128-key half): the shapes, GQA, a window with soft cap and sinks, both producers
    (block 48 takes the cp.async fallback) and non-causal rows."""
    _head_dim_compiled(64)
    monkeypatch.setenv("FIREATTN_PREFILL_WIDE", "1")
    q_lens, seq_lens = BATCHES[name]
    batch = make_paged_batch(q_lens, seq_lens, 16, 2, 64, block_size=block_size, fp8=True, seed=block_size)
    assert torch.ops.fireattn.prefill_wide_tiles(64, True, batch.max_query_len, 0)
    _check(batch, sum(q_lens), softmax_scale=0.125)
    sinks = torch.randn(16, device="cuda")
    _check(batch, sum(q_lens), softmax_scale=0.125, window_left=37, softcap=30.0, sinks=sinks)
    if name == "long":
        _check(batch, sum(q_lens), softmax_scale=0.125, causal=False)


def test_prefill_fp8_wide_loop_error_equals_the_128_key_tiles():
    """The 256-key loop (forced) rounds P and promotes per 128-key half, so its long-context error
    is the 128-key tiles' up to FP32 rounding order; the error tests above cover the 128-key
    tiles at head_dim 64 (H200, 2026-11-23: equal to 1e-6)."""
    _head_dim_compiled(64)
    narrow, wide = _long_context_errors(64, "0")[0], _long_context_errors(64, "1")[0]
    assert wide == pytest.approx(narrow, rel=0.01), f"256-key loop {wide} vs 128-key tiles {narrow}"


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8-cache", "fp16-cache"])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_prefill_fp16(fp8, head_dim):
    _head_dim_compiled(head_dim)
    batch = make_paged_batch([9, 33], [40, 33], 8, 4, head_dim, dtype=torch.float16, fp8=fp8)
    try:
        _check(batch, 42, softmax_scale=head_dim**-0.5)
    except RuntimeError as e:
        if "no kernel compiled" in str(e):
            pytest.skip("fp16 not compiled in this build")
        raise


@pytest.mark.cpu
def test_prefill_producer_index_math_offline():
    """CPU: tools/tma_layout_check.py models the producer's TMA boxes, swizzles and both V
    transposes (ldmatrix/stmatrix and LDS/STS) and asserts they write the same V^T."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "tma_layout_check.py"
    res = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ldmatrix/stmatrix transpose writes the same V^T" in res.stdout


@pytest.mark.cpu
def test_prefill_fast_q_division_is_correctly_rounded_offline():
    """CPU: tools/q_div_check.py proves, in exact rational arithmetic, that the prefill's Q
    division (reciprocal + two FMA corrections, after the saturation clamp) equals RN(x / s) for
    BF16 queries and awkward scales (mantissas near 1 and 2, calibration-like values)."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "q_div_check.py"
    res = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 after two" in res.stdout


@pytest.mark.cpu
def test_sass_loop_mix_walks_the_common_path():
    """CPU: tools/sass_loop_mix.py counts loop head .. fall-through softmax .. PV .. back branch,
    skipping the other softmax variants (synthetic listing in cuobjdump's format)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import sass_loop_mix as tool

    body = [("0000", "MOV R1, c[0x0][0x28]"),
            ("0010", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R2], R3"),  # loop head
            ("0020", "QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], RZ, !UPT"),
            ("0030", "WARPGROUP.DEPBAR.LE gsb0, 0x0"),
            ("0040", "@P0 BRA 0x90"),  # soft cap variant
            ("0050", "FMNMX R4, R24, R25, !PT"),
            ("0060", "MUFU.EX2 R5, R4"),
            ("0070", "BRA 0xb0"),
            ("0080", "FADD R6, R6, R7"),  # other variants: not on the path
            ("0090", "MUFU.TANH R8, R9"),
            ("00a0", "BRA 0xb0"),
            ("00b0", "QGMMA.64x136x32.F32.E4M3.E4M3 R24, R100, gdesc[UR12], RZ, !UPT"),
            ("00c0", "@!P1 BRA 0x10"),
            ("00d0", "EXIT")]
    listing = "Function : _ZN8fireattn14prefill_kernelI13__nv_bfloat16Lb1ELi128ELb1ELb0EEEv\n" + "\n".join(
        f"        /*{a}*/                   {t} ;  /* 0x0 */" for a, t in body)
    path = tool.loop_path(tool.kernel_instructions(listing))
    assert [tool.opcode(t) for _, t in path] == ["SYNCS", "QGMMA", "WARPGROUP", "BRA", "FMNMX", "MUFU", "BRA",
                                                 "QGMMA", "BRA"]


@pytest.mark.cpu
def test_sass_loop_mix_decode_loop():
    """CPU: tools/sass_loop_mix.py --decode takes the innermost loop around every HMMA of the
    decode split kernel, conditional code included, and ignores the combine kernel."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import sass_loop_mix as tool

    body = [("0000", "MOV R1, c[0x0][0x28]"),
            ("0010", "LDG.E R2, desc[UR4][R4.64]"),  # outer loop head (not innermost)
            ("0020", "LDG.E.NA.128 R8, desc[UR4][R6.64]"),  # stage loop head
            ("0030", "HMMA.16816.F32 R12, R8, R20, RZ"),
            ("0040", "@P0 BRA 0x60"),  # a conditional part (rescale)
            ("0050", "FMUL R12, R12, R3"),
            ("0060", "HMMA.16816.F32 R16, R8, R22, R16"),
            ("0070", "@P1 BRA 0x20"),
            ("0080", "@P2 BRA 0x10"),
            ("0090", "EXIT")]
    listing = "\n".join(
        ["Function : _ZN8fireattn13decode_kernelI13__nv_bfloat16Lb1ELi128EEEvNS_12DecodeParamsE"]
        + [f"        /*{a}*/                   {t} ;  /* 0x0 */" for a, t in body]
        + ["Function : _ZN8fireattn21decode_combine_kernelI13__nv_bfloat16Li128EEEvNS_12DecodeParamsE",
           "        /*0000*/                   HMMA.16816.F32 R0, R0, R0, R0 ;  /* 0x0 */"])
    path = tool.decode_loop(tool.kernel_instructions(listing, "decode_kernel"))
    assert [tool.opcode(t) for _, t in path] == ["LDG", "HMMA", "BRA", "FMUL", "HMMA", "BRA"]


@pytest.mark.cpu
def test_fa3_p_probe_hypotheses_offline():
    """CPU: tools/fa3_p_probe.py's one-hot V turns outputs into weights: the last query row sees
    all 128 keys, so its weights sum to 1 for exact P and not exactly 1 for rounded P over an FP32
    l. With 128 keys a 128-key tile is the whole context, so the tile max is the running max and
    both roundings agree; 64-key tiles tell them apart."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import fa3_p_probe as probe

    q, k, v = probe._inputs(128, seed=1)
    hyp = probe._hypotheses(q, k, v, probe.D**-0.5)
    last = {name: w[-1].sum(-1) for name, w in hyp.items()}  # [heads]
    torch.testing.assert_close(last["exact P"], torch.ones_like(last["exact P"]))
    assert (last["e4m3 P*256, 128-key tiles"] - 1).abs().max() > 1e-5
    assert torch.equal(hyp["e4m3 P*256, 128-key tiles"], hyp["e4m3 P*256 vs tile max, 128-key tiles"])
    assert not torch.equal(hyp["e4m3 P*256, 64-key tiles"], hyp["e4m3 P*256 vs tile max, 64-key tiles"])


def test_prefill_leaves_rows_outside_batch_untouched():
    _head_dim_compiled(128)
    batch = make_paged_batch([4, 6], [4, 20], 8, 2, 128, query_row_pad=5)
    out, _ = _run(batch)
    assert torch.isnan(out[10:]).all()
    assert not torch.isnan(out[:10]).any()


def test_prefill_int32_overflow_offsets():
    """A page beyond 2**31 bytes of cache: offsets must be 64-bit."""
    _head_dim_compiled(128)
    hkv, bs, d = 8, 16, 128
    page = 2 * hkv * bs * d  # bytes per page in FP8
    num_blocks = (2**31) // page + 8
    kv_cache = torch.zeros(num_blocks, 2, hkv, bs, d, dtype=torch.uint8, device="cuda")
    blocks = torch.tensor([[num_blocks - 1, num_blocks - 3, 5]], dtype=torch.int32, device="cuda")
    k = torch.randn(40, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pos = torch.arange(40, device="cuda")
    slots = blocks[0].long()[pos // bs] * bs + pos % bs
    one = torch.ones((), device="cuda")
    ops.cache_write(k, v, kv_cache, slots, one, one)
    q = torch.randn(40, 16, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 40], dtype=torch.int32, device="cuda")
    sl = torch.tensor([40], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    ops.prefill(out, q, kv_cache, blocks, cu, sl, one, one, one, 0.1, 40, True, -1, 0.0, None, None)
    r32 = torch.zeros(q.shape, dtype=torch.float64, device="cuda")
    rlp = torch.zeros_like(r32)
    ref.prefill(r32, q, kv_cache, blocks, cu, sl, one, one, one, 0.1, 40, precision="exact")
    ref.prefill(rlp, q, kv_cache, blocks, cu, sl, one, one, one, 0.1, 40, precision="fp8_mma")
    assert_attention_close(out, r32, rlp, 40, lowp_exact=False)
    del kv_cache


def test_prefill_rejects_bad_input_clearly():
    _head_dim_compiled(128)
    batch = make_paged_batch([4], [4], 8, 2, 128)
    out = torch.empty_like(batch.query)
    with pytest.raises(RuntimeError, match="promote_every must be in"):
        ops.prefill(out, *batch.args(), 0.1, 4, True, -1, 0.0, None, None, -1)
    if 256 in ops.compiled_head_dims():
        b256 = make_paged_batch([4], [4], 8, 2, 256)
        with pytest.raises(RuntimeError, match="head_dim 256 promotes every tile or never"):
            ops.prefill(torch.empty_like(b256.query), *b256.args(), 0.1, 4, True, -1, 0.0, None, None, 2)
    with pytest.raises(RuntimeError, match="num_q_heads 7 is not a multiple"):
        q = torch.randn(4, 7, 128, device="cuda", dtype=torch.bfloat16)
        ops.prefill(torch.empty_like(q), q, *batch.args()[1:], 0.1, 4, True, -1, 0.0, None, None)
    with pytest.raises(RuntimeError, match="k_scale must have 1 element or shape"):
        args = list(batch.args())
        args[6] = torch.ones(3, device="cuda")
        ops.prefill(out, *args, 0.1, 4, True, -1, 0.0, None, None)
    with pytest.raises(RuntimeError, match="seq_lens must be a contiguous 1-D int32"):
        args = list(batch.args())
        args[4] = args[4].long()
        ops.prefill(out, *args, 0.1, 4, True, -1, 0.0, None, None)
