"""GPU: ops.decode (the split-KV tensor-core kernel) vs the reference: shapes, split counts,
masks, padded rows, garbage past the end of a sequence, and CUDA-graph capture/replay."""
import pytest
import torch

from helpers import assert_attention_close, make_paged_batch, reference_outputs
from vllm_fireattn import ops
from vllm_fireattn import reference as ref

pytestmark = pytest.mark.gpu


def _decode(batch, max_query_len, out=None, **kw):
    out = torch.full_like(batch.query, float("nan")) if out is None else out
    ops.decode(out, *batch.args(), kw.get("softmax_scale", 0.125), max_query_len, True,
               kw.get("window_left", -1), kw.get("softcap", 0.0), kw.get("sinks"), kw.get("lse"),
               num_splits=kw.get("num_splits"))
    return out


def _skip_unless(d):
    if d not in ops.compiled_head_dims():
        pytest.skip(f"head_dim {d} not compiled in this build")


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("batch_size,context", [(1, 1), (7, 300), (64, 129), (256, 33)])
@pytest.mark.parametrize("q_len", [1, 4])
def test_decode_grid(q_len, batch_size, context, head_dim, fp8):
    _skip_unless(head_dim)
    gen = torch.Generator().manual_seed(batch_size * 7 + context)
    seq_lens = [max(q_len, int(x)) for x in torch.randint(1, context + 1, (batch_size,), generator=gen)]
    batch = make_paged_batch([q_len] * batch_size, seq_lens, 32, 8, head_dim, fp8=fp8, seed=context)
    out = _decode(batch, q_len, softmax_scale=head_dim**-0.5)
    r32, rlp, _ = reference_outputs(batch, ref.decode, softmax_scale=head_dim**-0.5)
    assert_attention_close(out, r32, rlp, q_len * batch_size)


@pytest.mark.parametrize("block_size", [16, 32, 48, 64])
@pytest.mark.parametrize("heads", [(4, 4), (16, 4), (32, 4), (8, 1)], ids=["mha", "gqa4", "gqa8", "mqa"])
def test_decode_gqa_and_blocks(heads, block_size):
    _skip_unless(128)
    seq_lens = [block_size - 1, block_size, block_size + 1, 5 * block_size + 3]
    batch = make_paged_batch([1] * 4, seq_lens, heads[0], heads[1], 128, block_size=block_size)
    out = _decode(batch, 1)
    r32, rlp, _ = reference_outputs(batch, ref.decode)
    assert_attention_close(out, r32, rlp, 4)


@pytest.mark.parametrize("block_size", [16, 48])
def test_decode_fp8_d64_block_entries_ahead(block_size):
    """FP8 head_dim 64 reads each stage's block-table entries one warp iteration early (two 16-key
    sub-tiles per stage): sequences long enough for many stages per warp and several splits,
    scattered blocks, a block size that is not a power of two, a window that starts mid-block."""
    _skip_unless(64)
    seq_lens = [2000, 4093, 37, 9000]
    batch = make_paged_batch([1] * 4, seq_lens, 16, 2, 64, block_size=block_size, fp8=True, seed=block_size)
    for window_left in (-1, 1234):
        out = _decode(batch, 1, softmax_scale=64**-0.5, window_left=window_left)
        r32, rlp, _ = reference_outputs(batch, ref.decode, softmax_scale=64**-0.5, window_left=window_left)
        assert_attention_close(out, r32, rlp, 4)


@pytest.mark.parametrize("q_len", [1, 2, 3, 5, 8])
def test_decode_spec_verification_rows(q_len):
    """Spec-decode verification: q_len > 1, causal aligned bottom-right; a mixed short row too."""
    _skip_unless(128)
    q_lens = [q_len, q_len, max(1, q_len - 1)]
    batch = make_paged_batch(q_lens, [q_len, 70, 200], 16, 4, 128, seed=q_len)
    sinks = torch.randn(16, device="cuda")
    out = _decode(batch, q_len, window_left=50, softcap=20.0, sinks=sinks)
    r32, rlp, _ = reference_outputs(batch, ref.decode, window_left=50, softcap=20.0, sinks=sinks)
    assert_attention_close(out, r32, rlp, sum(q_lens))


def test_decode_padded_rows_are_harmless():
    """CUDA graphs pad the batch: rows with seq_len 0 (and query len 0 or 1) must give zeros
    and leave the real rows intact."""
    _skip_unless(128)
    batch = make_paged_batch([1, 1, 1, 0], [50, 0, 17, 0], 8, 2, 128)
    out = _decode(batch, 1)
    assert torch.all(out[1] == 0)
    r32, rlp, _ = reference_outputs(batch, ref.decode)
    assert_attention_close(out, r32, rlp, 3)


def test_decode_long_context_128k():
    _skip_unless(128)
    batch = make_paged_batch([1], [131072], 32, 8, 128, block_size=64, seed=3)
    out = _decode(batch, 1, softmax_scale=128**-0.5)
    r32, rlp, _ = reference_outputs(batch, ref.decode, softmax_scale=128**-0.5)
    assert_attention_close(out, r32, rlp, 1)


def test_decode_cuda_graph_replay_matches_eager():
    """Capture once, then replay with new sequence lengths and block tables (written into the
    captured buffers) and compare with eager calls on the same inputs."""
    _skip_unless(128)
    bsz, hq, hkv, d, bs, max_blocks = 8, 16, 4, 128, 16, 40
    a = make_paged_batch([1] * bsz, [bs * max_blocks - 3] * bsz, hq, hkv, d, block_size=bs, seed=11)
    query, kv_cache = a.query.clone(), a.kv_cache
    block_table = torch.zeros(bsz, max_blocks, dtype=torch.int32, device="cuda")
    block_table[:, : a.block_table.shape[1]] = a.block_table
    cu, seq_lens = a.cu_seqlens_q.clone(), a.seq_lens.clone()
    out = torch.empty_like(query)

    def step():  # the plan for 8 sequences x 4 KV heads splits long sequences (combine kernel too)
        ops.decode(out, query, kv_cache, block_table, cu, seq_lens, a.q_scale, a.k_scale, a.v_scale,
                   0.1, 1, True, -1, 0.0, None, None)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(5)
    num_blocks = kv_cache.shape[0]
    for trial in range(3):
        new_lens = torch.randint(0, bs * max_blocks - 3, (bsz,), generator=gen).int()
        new_lens[0] = 0  # a padded row
        seq_lens.copy_(new_lens)
        block_table.copy_(torch.randint(0, num_blocks, (bsz, max_blocks), generator=gen).int())
        query.copy_(torch.randn(query.shape, generator=gen).to(query.dtype))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        step()
        torch.cuda.synchronize()
        assert torch.equal(replayed, out), f"trial {trial}: graph replay differs from eager"
        assert torch.all(replayed[0] == 0)


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_decode_sees_the_cache_write_before_it_in_a_graph(fp8):
    """A decode step as vLLM runs it: the new token's K/V write, then decode, captured in one CUDA
    graph. The decode kernel is launched as the write's programmatic dependent (it may start
    before the write ends): every replay must attend to the token just written. The new key is
    aligned with the queries, so a stale read of its slot changes the output a lot."""
    _skip_unless(128)
    bsz, hq, hkv, d, bs = 4, 16, 4, 128, 16
    ctx = [300, 1000, 4000, 70]  # 4000 keys: several splits, so the combine kernel runs too
    a = make_paged_batch([1] * bsz, ctx, hq, hkv, d, block_size=bs, fp8=fp8, seed=21)
    out = torch.empty_like(a.query)
    k_new = torch.empty(bsz, hkv, d, dtype=a.query.dtype, device="cuda")
    v_new = torch.empty_like(k_new)
    slots = torch.empty(bsz, dtype=torch.int64, device="cuda")
    seq_lens = a.seq_lens.clone()

    def step():
        ops.cache_write(k_new, v_new, a.kv_cache, slots, a.k_scale, a.v_scale)
        ops.decode(out, a.query, a.kv_cache, a.block_table, a.cu_seqlens_q, seq_lens, a.q_scale, a.k_scale,
                   a.v_scale, d**-0.5, 1, True, -1, 0.0, None, None)

    def new_token(trial):  # the step's token at position seq_len - 1: a key along the queries' mean
        gen = torch.Generator().manual_seed(100 + trial)
        q = a.query.float().view(bsz, hkv, hq // hkv, d).mean(2)
        k_new.copy_((3.0 * q / q.norm(dim=-1, keepdim=True) * d**0.5).to(k_new.dtype))
        v_new.copy_((4.0 * torch.randn(bsz, hkv, d, generator=gen)).to(v_new.dtype))
        lens = torch.tensor(ctx, dtype=torch.int32) - 40 * trial  # a different slot each trial
        seq_lens.copy_(lens)
        pos = lens.long().cuda() - 1
        slots.copy_(a.block_table.long()[torch.arange(bsz, device="cuda"), pos // bs] * bs + pos % bs)

    new_token(0)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(1, 4):
        new_token(trial)
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        ops.decode(out, a.query, a.kv_cache, a.block_table, a.cu_seqlens_q, seq_lens, a.q_scale, a.k_scale,
                   a.v_scale, d**-0.5, 1, True, -1, 0.0, None, None)  # after the write, in order
        torch.cuda.synchronize()
        assert torch.equal(replayed, out), f"trial {trial}: the graph's decode did not see the new token"


@pytest.mark.parametrize("num_splits", [1, 2, 5, 40, 64, 77])
@pytest.mark.parametrize("window_left", [-1, 700])
def test_decode_split_counts(num_splits, window_left):
    """Split-KV: every split count gives the reference result and LSE, at lengths around the
    split sizes (64-key splits up to 32 of them, 256-key splits beyond: 2048 and 8192 keys are
    the switches; 12000 / 20000 / 33000 keys reach 40+ and 64 splits, so the combine kernel merges
    more than one batch of 8 and more than 32 LSEs; 2049, 4097, 16385, 20000 and 33000 keys get
    rounded-up chunks that fill fewer splits than planned, e.g. 16385 over 64 -> 61) and with a
    window that moves the range start off a tile boundary."""
    _skip_unless(128)
    seq_lens = [1, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1500, 2047, 2049, 9000, 4097, 4095, 8192, 8209, 12000,
                16384, 16385, 20000, 33000]
    q_lens = [1, 1, 2, 1, 1, 2, 1, 1, 1, 2, 1, 1, 2, 3, 1, 1, 2, 1, 1, 1, 2, 1, 1]
    batch = make_paged_batch(q_lens, seq_lens, 16, 4, 128, seed=num_splits)
    rows = sum(q_lens)
    lse = torch.full((16, rows), float("nan"), device="cuda")
    out = _decode(batch, 3, window_left=window_left, num_splits=num_splits, lse=lse)
    r32, rlp, rlse = reference_outputs(batch, ref.decode, window_left=window_left)
    assert_attention_close(out, r32, rlp, rows)
    torch.testing.assert_close(lse.double(), rlse[:, :rows], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_splits_with_sinks_softcap_window(head_dim):
    _skip_unless(head_dim)
    seq_lens, q_lens = [3000, 700, 5], [2, 1, 1]
    batch = make_paged_batch(q_lens, seq_lens, 8, 2, head_dim, block_size=32, seed=head_dim)
    sinks = torch.randn(8, device="cuda") * 3
    kw = dict(window_left=1000, softcap=15.0, sinks=sinks, softmax_scale=head_dim**-0.5)
    lse = torch.zeros(8, 4, device="cuda")
    out = _decode(batch, 2, num_splits=9, lse=lse, **kw)
    r32, rlp, rlse = reference_outputs(batch, ref.decode, **kw)
    assert_attention_close(out, r32, rlp, 4)
    torch.testing.assert_close(lse.double(), rlse[:, :4], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_fp16(head_dim):
    _skip_unless(head_dim)
    for fp8 in (True, False):
        batch = make_paged_batch([1, 2], [600, 90], 8, 1, head_dim, dtype=torch.float16, fp8=fp8)
        try:
            out = _decode(batch, 2, num_splits=3)
        except RuntimeError as e:
            if "no kernel compiled" in str(e):
                pytest.skip("fp16 kernels not compiled in this build (FIREATTN_DTYPES)")
            raise
        r32, rlp, _ = reference_outputs(batch, ref.decode)
        assert_attention_close(out, r32, rlp, 3)


def test_decode_ignores_garbage_past_the_end():
    """Cache slots past seq_len hold whatever the allocator left (here NaN bytes): P is 0 there
    and must not turn into 0 * NaN."""
    _skip_unless(128)
    batch = make_paged_batch([1, 1], [37, 300], 16, 4, 128, seed=2)
    raw = batch.kv_cache.view(torch.uint8)
    for b, s in enumerate(batch.seq_lens.tolist()):
        last = int(batch.block_table[b, (s - 1) // 16])
        raw[last, :, :, s % 16 or 16:, :] = 0x7F  # e4m3 NaN
    for num_splits in (1, 2):
        out = _decode(batch, 1, num_splits=num_splits)
        r32, rlp, _ = reference_outputs(batch, ref.decode)
        assert_attention_close(out, r32, rlp, 2)


def test_decode_rejects_bad_arguments():
    _skip_unless(128)
    batch = make_paged_batch([1], [20], 8, 2, 128)
    with pytest.raises(RuntimeError, match="num_splits must be in"):
        _decode(batch, 1, num_splits=0)

