"""CPU: backend declarations, validation reasons, KV layout, metadata builder, and the whole
builder -> cache write -> forward path driven with the reference ops."""
from types import SimpleNamespace

import pytest
import torch

from helpers import attn_layer as _layer
from helpers import impl_with_settings as _impl_with_settings
from helpers import make_paged_batch
from vllm_fireattn import ops
from vllm_fireattn import reference as ref
from vllm_fireattn.backend import backend as B
from vllm_fireattn.backend._compat import CommonAttentionMetadata, DeviceCapability

HOPPER = DeviceCapability(9, 0)


def _validate(head_size=128, dtype=torch.bfloat16, kv="fp8", block=16, has_sink=False, cap=HOPPER, **kw):
    return B.FireAttnBackend.validate_configuration(
        head_size=head_size, dtype=dtype, kv_cache_dtype=kv, block_size=block, use_mla=False,
        has_sink=has_sink, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=True,
        device_capability=cap, attn_type="decoder", **kw,
    )


def _kernel_reason():
    r = ops.unavailable_reason(check_device=False)
    return [] if r is None else [f"FIREATTN kernels unavailable: {r}"]


@pytest.mark.parametrize("kv", ["auto", "bfloat16", "fp8", "fp8_e4m3"])
@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_valid_configurations(kv, head_size):
    got = _validate(head_size=head_size, kv=kv, has_sink=True, has_sliding_window=True)
    want = _kernel_reason()
    if not want and head_size not in ops.compiled_head_dims():
        assert len(got) == 1 and "was not compiled" in got[0]
    else:
        assert got == want


@pytest.mark.parametrize("kwargs,expected", [
    (dict(head_size=96), "head_size 96 not supported (FIREATTN supports [64, 128, 256])"),
    (dict(dtype=torch.float32), "model dtype torch.float32 not supported"),
    (dict(kv="fp8_e5m2"), "kv_cache_dtype 'fp8_e5m2' not supported"),
    (dict(block=8), "block_size 8 not supported (FIREATTN needs a multiple of 16)"),
    (dict(cap=DeviceCapability(8, 0)), "compute capability"),
    (dict(cap=DeviceCapability(10, 0)), "sm_90a"),
    (dict(kv="bfloat16", dtype=torch.float16), "kv_cache_dtype bfloat16 with model dtype torch.float16"),
    (dict(use_non_causal=True), "non-causal attention not supported"),
])
def test_invalid_configurations_have_clear_reasons(kwargs, expected):
    reasons = _validate(**kwargs)
    assert any(expected in r for r in reasons), reasons


def test_kv_cache_layout_is_num_blocks_first():
    be = B.FireAttnBackend
    assert be.get_kv_cache_shape(10, 32, 4, 128, "fp8") == (10, 2, 4, 32, 128)
    assert be.get_kv_cache_shape(10, 32, 4, 128) == ref.kv_cache_shape(10, 32, 4, 128)
    assert be.get_kv_cache_stride_order() == (0, 1, 2, 3, 4)
    assert be.get_kv_cache_stride_order(include_num_layers_dimension=True) == (1, 0, 2, 3, 4, 5)
    assert be.indexes_kv_by_block_stride()
    assert be.get_kv_cache_block_dim(32, 4, 128) == 0
    with pytest.raises(ValueError, match="multiple of 16"):
        be.get_kv_cache_shape(10, 8, 4, 128)
    assert be.get_name() == "CUSTOM"
    assert be.forward_includes_kv_cache_update is False


def _builder(num_spec=None):
    spec_cfg = None if num_spec is None else SimpleNamespace(num_speculative_tokens=num_spec,
                                                             parallel_drafting=False)
    vllm_config = SimpleNamespace(speculative_config=spec_cfg,
                                  parallel_config=SimpleNamespace(decode_context_parallel_size=1),
                                  model_config=SimpleNamespace(get_num_attention_heads=lambda parallel_config: 8))
    spec = SimpleNamespace(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.uint8)
    return B.FireAttnMetadataBuilder(spec, ["l0"], vllm_config, torch.device("cpu"))


def _common(q_lens, seq_lens, block_table, num_tokens=None):
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    total = int(qsl[-1])
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=len(q_lens),
        num_actual_tokens=num_tokens or total, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        block_table_tensor=block_table, slot_mapping=torch.zeros(num_tokens or total, dtype=torch.int64),
    )


def test_builder_splits_decodes_and_prefills():
    bt = torch.arange(5 * 4, dtype=torch.int32).view(5, 4)
    m = _builder().build(0, _common([1, 1, 7, 1, 30], [10, 20, 30, 5, 60], bt))
    assert (m.num_decodes, m.num_decode_tokens, m.num_prefills, m.num_prefill_tokens) == (2, 2, 3, 38)
    assert m.decode_max_query_len == 1
    assert m.decode_query_start_loc.tolist() == [0, 1, 2]
    assert m.prefill_query_start_loc.tolist() == [2, 9, 10, 40]  # absolute offsets
    assert m.prefill_seq_lens.tolist() == [30, 5, 60]
    assert torch.equal(m.prefill_block_table, bt[2:])


def test_builder_spec_decode_rows_are_decodes():
    b = _builder(num_spec=3)
    assert b.reorder_batch_threshold == 4 and b.decode_max_query_len == 4
    bt = torch.zeros(4, 8, dtype=torch.int32)
    m = b.build(0, _common([4, 4, 4, 4], [9, 50, 4, 100], bt))
    assert (m.num_decodes, m.num_prefills) == (4, 0)
    m = b.build(0, _common([4, 2, 9], [9, 50, 100], bt[:3]))
    assert (m.num_decodes, m.num_decode_tokens, m.num_prefills) == (2, 6, 1)


def test_builder_padded_uniform_batch():
    """A CUDA-graph padded decode batch: trailing rows with seq_len 0 stay decodes."""
    bt = torch.zeros(8, 4, dtype=torch.int32)
    m = _builder().build(0, _common([1] * 8, [5, 9, 3, 0, 0, 0, 0, 0], bt))
    assert m.num_decodes == 8 and m.num_prefills == 0
    assert m.decode_seq_lens.tolist() == [5, 9, 3, 0, 0, 0, 0, 0]


def test_impl_refuses_unsupported_options():
    with pytest.raises(NotImplementedError, match="ALiBi"):
        B.FireAttnImpl(8, 128, 0.1, 2, [0.1] * 8, None, "fp8")
    with pytest.raises(NotImplementedError, match="decoder attention only"):
        B.FireAttnImpl(8, 128, 0.1, 2, None, None, "fp8", attn_type="encoder_only")
    with pytest.raises(NotImplementedError, match="use_alibi_sqrt"):
        B.FireAttnImpl(8, 128, 0.1, 2, None, None, "fp8", use_alibi_sqrt=True)
    with pytest.raises(ValueError, match="sinks must have shape"):
        B.FireAttnImpl(8, 128, 0.1, 2, None, None, "fp8", sinks=torch.zeros(3))
    impl = B.FireAttnImpl(8, 128, 0.1, 2, None, 512, "fp8", logits_soft_cap=30.0)
    assert impl.window_left == 511 and impl.logits_soft_cap == 30.0
    assert impl.supports_quant_query_input is False  # Q is quantized inside our kernel


class _ReferenceOps:
    """The reference functions standing in for the kernels, to test the backend's plumbing."""

    def __init__(self):
        self.calls = []

    def cache_write(self, *a):
        self.calls.append("cache_write")
        ref.cache_write(*a)

    def prefill(self, out, *a, promote_every=1, max_seq_len=0):
        self.calls.append("prefill")
        self.promote_every = promote_every  # the setting reaches the op (it changes no math here)
        self.max_seq_len = max_seq_len  # the step's longest sequence (picks a loop, no math)
        tmp = torch.zeros(out.shape, dtype=torch.float64)
        tmp.copy_(out)
        ref.prefill(tmp, *a)
        out.copy_(tmp)

    def decode(self, out, *a, num_splits=None):
        self.calls.append("decode")
        self.decode_num_splits = num_splits
        tmp = out.double()
        ref.decode(tmp, *a)
        out.copy_(tmp)


@pytest.mark.parametrize("kv", ["fp8", "auto"])
def test_backend_pipeline_with_reference_ops(monkeypatch, kv):
    """Builder -> do_kv_cache_update -> forward on a mixed batch (decode rows, spec-style rows,
    chunked prefill with cached context) equals attention over the whole sequences."""
    fake = _ReferenceOps()
    monkeypatch.setattr(B, "ops", fake)
    hq, hkv, d, bs = 8, 2, 64, 16
    q_lens, seq_lens = [1, 1, 20, 9], [33, 16, 20, 80]
    ctx = make_paged_batch([0] * 4, [s - q for s, q in zip(seq_lens, q_lens)], hq, hkv, d, block_size=bs,
                           fp8=kv == "fp8", device="cpu", extra_blocks=12)
    kv_cache, bt = ctx.kv_cache, ctx.block_table
    blocks_needed = [-(-s // bs) for s in seq_lens]
    full_bt = torch.zeros(4, max(blocks_needed), dtype=torch.int32)
    used = set(bt.flatten().tolist())
    free = [b for b in range(kv_cache.shape[0]) if b not in used]
    for i, n in enumerate(blocks_needed):
        have = -(-(seq_lens[i] - q_lens[i]) // bs)
        full_bt[i, :have] = bt[i, :have]
        for j in range(have, n):
            full_bt[i, j] = free.pop()
    g = torch.Generator().manual_seed(0)
    T = sum(q_lens)
    new_k = torch.randn(T + 2, hkv, d, generator=g).bfloat16()  # +2 padded rows
    new_v = torch.randn(T + 2, hkv, d, generator=g).bfloat16()
    query = torch.randn(T + 2, hq, d, generator=g).bfloat16()
    slots = []
    for i, (q, s) in enumerate(zip(q_lens, seq_lens)):
        for p in range(s - q, s):
            slots.append(int(full_bt[i, p // bs]) * bs + p % bs)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    common = _common(q_lens, seq_lens, full_bt, num_tokens=T)
    common.slot_mapping = slot_mapping
    meta = _builder().build(0, common)
    impl = B.FireAttnImpl(hq, d, d**-0.5, hkv, None, None, kv)
    layer = SimpleNamespace(_q_scale=ctx.q_scale, _k_scale=ctx.k_scale, _v_scale=ctx.v_scale)
    impl.do_kv_cache_update(layer, new_k, new_v, kv_cache, slot_mapping)
    out = torch.full_like(query, float("nan"))
    impl.forward(layer, query, new_k, new_v, kv_cache, meta, out)
    assert fake.calls == ["cache_write", "decode", "prefill"]
    assert fake.decode_num_splits == meta.decode_num_splits == ops.decode_num_splits(2, hq, hkv, 1, 64, True)
    assert fake.max_seq_len == meta.max_seq_len == max(seq_lens)
    assert not torch.isnan(out[:T]).any()

    want = torch.zeros(T, hq, d, dtype=torch.float64)
    qsl = [0] + torch.cumsum(torch.tensor(q_lens), 0).tolist()
    for i in range(4):
        k, v = ref.gather_kv(kv_cache, full_bt[i], seq_lens[i], ctx.k_scale, ctx.v_scale)
        q = query[qsl[i] : qsl[i + 1]].double()
        if kv == "fp8" and i >= meta.num_decodes:  # prefill quantizes Q; decode keeps it 16-bit
            q = ref.attention._quantized_query(query[qsl[i] : qsl[i + 1]], ctx.q_scale, hkv, torch.float64)
        want[qsl[i] : qsl[i + 1]] = ref.attend(q, k, v, d**-0.5)[0]
    torch.testing.assert_close(out[:T].double(), want, atol=2e-2, rtol=1e-2)


def test_profiling_run_zeroes_output():
    impl = B.FireAttnImpl(8, 128, 0.1, 2, None, None, "auto")
    out = torch.ones(3, 8, 128)
    impl.forward(None, out, None, None, None, None, out)
    assert torch.all(out == 0)


def test_decode_plan_is_static():
    """The scheduler reads no sequence lengths: one wave of CTAs from static shapes."""
    def plan(*a, ctas=4):
        return ops.decode_num_splits(*a, num_sms=132, ctas=ctas)

    assert plan(1, 32, 8, 1, 128, True) == 66
    assert plan(8, 32, 8, 1, 128, True) == 8
    assert plan(64, 32, 8, 1, 128, True) == 1
    assert plan(256, 32, 8, 1, 128, True) == 1
    assert plan(1, 64, 8, 4, 128, True) == 16  # 32 rows = 4 row tiles per head
    assert plan(8, 16, 4, 1, 256, True, ctas=3) == 12
    assert plan(1, 8, 1, 1, 128, True, ctas=4) == 128  # capped at MAX_SPLITS


class _RecordingOps:
    def __init__(self):
        self.scales = {}

    def cache_write(self, key, value, kv_cache, slot_mapping, k_scale, v_scale):
        self.scales["cache_write"] = (k_scale, v_scale)


def test_calibrated_scales_reach_the_kernels(monkeypatch, tmp_path):
    from vllm_fireattn import calibration

    g = torch.Generator().manual_seed(1)
    k, v, q = (torch.rand(2, 4, generator=g) + 0.5 for _ in range(3))
    path = tmp_path / "cal.safetensors"
    calibration.save(path, k, v, q, {"model": "m", "num_layers": 2, "num_kv_heads": 4, "head_dim": 64})
    impl = _impl_with_settings(monkeypatch, {"fireattn": {"scales": "calibration", "calibration_file": str(path)}},
                               tp=(1, 2))
    impl.process_weights_after_loading(torch.bfloat16)
    fake = _RecordingOps()
    monkeypatch.setattr(B, "ops", fake)
    impl.do_kv_cache_update(_layer(1), None, None, None, None)
    k_scale, v_scale = fake.scales["cache_write"]
    torch.testing.assert_close(k_scale.cpu(), k[1, 2:4] * calibration.HEADROOM / 448.0)  # layer 1, TP rank 1 of 2: KV heads 2 and 3
    torch.testing.assert_close(v_scale.cpu(), v[1, 2:4] * calibration.HEADROOM / 448.0)
    q_scale, _, _ = impl._scales(_layer(0))
    torch.testing.assert_close(q_scale.cpu(), q[0, 2:4] * calibration.HEADROOM / 448.0)


def test_scales_one_overrides_the_checkpoint(monkeypatch):
    impl = _impl_with_settings(monkeypatch, {"fireattn": {"scales": "one"}})
    impl.process_weights_after_loading(torch.bfloat16)
    assert all(float(s) == 1.0 for s in impl._scales(_layer(0)))
    checkpoint = _impl_with_settings(monkeypatch, {})
    checkpoint.process_weights_after_loading(torch.bfloat16)
    assert all(float(s) == 3.0 for s in checkpoint._scales(_layer(0)))


def test_a_calibration_file_for_another_model_stops_startup(monkeypatch, tmp_path):
    from vllm_fireattn import calibration

    path = tmp_path / "other.safetensors"
    calibration.save(path, torch.ones(30, 3), torch.ones(30, 3), torch.ones(30, 3),
                     {"model": "SmolLM2", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64})
    impl = _impl_with_settings(monkeypatch, {"fireattn": {"scales": "calibration", "calibration_file": str(path)}})
    with pytest.raises(calibration.CalibrationError, match="made for model 'SmolLM2' and does not match"):
        impl.process_weights_after_loading(torch.bfloat16)


def test_bad_settings_stop_startup(monkeypatch):
    from vllm_fireattn.settings import FireAttnConfigError

    with pytest.raises(FireAttnConfigError, match="accepted values"):
        _impl_with_settings(monkeypatch, {"fireattn": {"scales": "per-head"}})


@pytest.mark.parametrize("kv_dtype", ["fp8", "auto"])
def test_promote_interval_the_kernel_cannot_run_stops_startup(monkeypatch, kv_dtype):
    """Every cache dtype prefills on the tensor-core kernel, whose head_dim-256 path promotes every
    tile or never: a BF16 layer must be refused at startup too, not at its first prefill."""
    from vllm_fireattn.settings import FireAttnConfigError

    _impl_with_settings(monkeypatch, {"fireattn": {"promote_every": 2}}, head_dim=128, kv_dtype=kv_dtype)
    with pytest.raises(FireAttnConfigError, match="head_dim 256 layers accept 0"):
        _impl_with_settings(monkeypatch, {"fireattn": {"promote_every": 2}}, head_dim=256, kv_dtype=kv_dtype)


def test_decode_splits_setting_overrides_the_plan(monkeypatch):
    b = _builder()
    b.settings = B.resolve({"fireattn": {"decode_splits": 7}})
    m = b.build(0, _common([1, 1], [5, 9], torch.zeros(2, 1, dtype=torch.int32)))
    assert m.decode_num_splits == 7


def test_layer_report_lists_what_each_attention_layer_runs(monkeypatch):
    """introspect.layer_report (what e2e_runner hands LLM.apply_model): one entry per module with
    an impl and a kv_cache_dtype, FIREATTN's q/k/v scales as lists, other impls without scales;
    and it pickles by reference, which tensor parallelism needs (a __main__ function did not)."""
    import pickle

    from vllm_fireattn.backend.introspect import layer_report

    impl = _impl_with_settings(monkeypatch, {"fireattn": {"scales": "one"}})
    impl.process_weights_after_loading(torch.bfloat16)
    ours = torch.nn.Module()
    ours.impl, ours.kv_cache_dtype = impl, "fp8"
    ours.layer_name = "model.layers.0.self_attn.attn"
    ours._q_scale = ours._k_scale = ours._v_scale = torch.tensor(3.0)
    other = torch.nn.Module()
    other.impl, other.kv_cache_dtype = SimpleNamespace(sliding_window=128, num_kv_heads=2), "auto"
    model = torch.nn.Sequential(ours, torch.nn.Linear(2, 2), other)
    rows = layer_report(model)
    assert [r["name"] for r in rows] == ["0", "2"]
    assert rows[0]["impl"] == "vllm_fireattn.backend.backend.FireAttnImpl" and rows[0]["kv_cache_dtype"] == "fp8"
    assert rows[0]["scales"] == [[1.0], [1.0], [1.0]] and rows[0]["num_kv_heads"] == 4 and rows[0]["tp_rank"] == 0
    assert rows[1]["scales"] is None and rows[1]["sliding_window"] == 128 and rows[1]["kv_cache_dtype"] == "auto"
    assert pickle.loads(pickle.dumps(layer_report)) is layer_report
