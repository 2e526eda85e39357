"""GPU: ops.prefill vs the reference (DESIGN.md tolerance rule) over awkward shapes."""
import pytest
import torch

from helpers import assert_attention_close, make_paged_batch, reference_outputs
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


def _run(batch, **kw):
    out = torch.full_like(batch.query, float("nan"))
    lse = torch.full((batch.query.shape[1], batch.query.shape[0]), float("nan"), device="cuda")
    ops.prefill(out, *batch.args(), kw.get("softmax_scale", 0.125), batch.max_query_len,
                True, kw.get("window_left", -1), kw.get("softcap", 0.0), kw.get("sinks"), lse)
    return out, lse


def _check(batch, rows, softmax_scale=0.125, window_left=-1, softcap=0.0, sinks=None):
    out, lse = _run(batch, softmax_scale=softmax_scale, window_left=window_left, softcap=softcap, sinks=sinks)
    r32, rlp, rlse = reference_outputs(batch, softmax_scale=softmax_scale, window_left=window_left,
                                       softcap=softcap, sinks=sinks)
    assert_attention_close(out, r32, rlp, rows)
    torch.testing.assert_close(lse[:, :rows].double(), rlse[:, :rows], atol=1e-4, rtol=1e-5)


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
                             seed=hash((batch_name, heads, head_dim)) % 1000)
    _check(batch, sum(q_lens), softmax_scale=head_dim**-0.5)


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("scale_mode", ["head", "tensor", "one"])
def test_prefill_block_sizes_and_scales(block_size, scale_mode):
    _head_dim_compiled(128)
    q_lens, seq_lens = [5, 63, 65], [block_size - 1 + 5, 63, block_size * 3 + 1 + 65]
    batch = make_paged_batch(q_lens, seq_lens, 8, 2, 128, block_size=block_size, scale_mode=scale_mode,
                             block_pad_bytes=256, query_row_pad=3)
    _check(batch, sum(q_lens), softmax_scale=128**-0.5)


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


def test_prefill_fp16():
    _head_dim_compiled(128)
    batch = make_paged_batch([9, 33], [40, 33], 8, 4, 128, dtype=torch.float16, fp8=True)
    try:
        _check(batch, 42, softmax_scale=128**-0.5)
    except RuntimeError as e:
        if "no kernel compiled" in str(e):
            pytest.skip("fp16 not compiled in this build")
        raise


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
    ref.prefill(rlp, q, kv_cache, blocks, cu, sl, one, one, one, 0.1, 40, precision="kernel")
    assert_attention_close(out, r32, rlp, 40)
    del kv_cache


def test_prefill_rejects_bad_input_clearly():
    _head_dim_compiled(128)
    batch = make_paged_batch([4], [4], 8, 2, 128)
    out = torch.empty_like(batch.query)
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
