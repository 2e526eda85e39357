"""Prefill (TFLOP/s, causal-aware FLOPs) and decode (effective GB/s of KV read) benchmarks.

Each shape builds one random paged KV cache per layout (ours: [blocks, 2, Hkv, bs, D]; FA3:
separate K and V [blocks, bs, Hkv, D]), block size 16, and times FIREATTN (FP8 and BF16 caches)
and FA3 (`vllm.vllm_flash_attn.flash_attn_varlen_func`, BF16 and FP8) with triton's do_bench
(L2 flushed between reps, median). Decode calls are timed as CUDA-graph replays (each impl's call
captured alone), as vLLM runs them, and a second time after an L2 flush that reads instead of
writes (`*_read_flush` fields; see _bench_read_flush); prefill calls eagerly.
"""
from __future__ import annotations

import json

import torch

from vllm_fireattn import ops

BLOCK = 16
PREFILL_HEADS = {64: (64, 8), 128: (32, 8), 256: (16, 4)}
# (batch, seqlen, causal): square prefills (every key is new)
PREFILL_SHAPES = [(1, 16384, True), (4, 4096, True), (1, 16384, False), (1, 4096, True), (8, 4096, True),
                  (1, 32768, True)]
# (batch, q_len, seqlen): the last chunk of a long prompt under chunked prefill (vLLM's default
# 16k-token chunks), causal bottom-right over the cached context: what TTFT at 64k-128k spends
# most of its attention time on.
PREFILL_CHUNK_SHAPES = [(1, 16384, 65536), (1, 16384, 131072)]
# (batch, context): ANCHORS.md's shapes plus a batch-8 context sweep for the plot.
DECODE_SHAPES = [(8, 32768), (1, 131072), (8, 8192), (64, 4096), (1, 32768), (8, 4096), (8, 16384), (8, 65536),
                 (32, 32768)]


def append_json_lines(path: str, records) -> None:
    """Append each record to `path` as one JSON line (the tools' --json files)."""
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def prefill_shapes() -> list[tuple[int, int, int, bool]]:
    """bench prefill's (batch, q_len, seqlen, causal): the squares, then the chunk rows."""
    return [(b, n, n, c) for b, n, c in PREFILL_SHAPES] + [(b, q, n, True) for b, q, n in PREFILL_CHUNK_SHAPES]


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graphed(fn):
    """fn captured in a CUDA graph; returns its replay (decode runs under CUDA graphs in vLLM, and
    a replay's short launch cannot leave the GPU idle inside _bench_read_flush's timed region).
    Under do_bench it times as eager calls do (H200, head_dim 64, 8 x 32k FP8: 89.0 vs 88.6 us)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up (allocations, lazy initialization) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


_FLUSH = {}


def _bench_read_flush(fn, reps: int = 100) -> float:
    """Median ms of fn after an L2 flush that *reads* 256 MB. do_bench flushes by zeroing 256 MB,
    which leaves L2 full of dirty lines (~50 MB on H100/H200) that are written back while the
    timed call runs, a fixed DRAM cost in every call; in a model, attention follows GEMMs that
    read weights, leaving clean lines. Reported beside do_bench's figure (which the anchors and
    targets use), not instead of it."""
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.ones(64 * 2**20, device="cuda", dtype=torch.float32)
    buf = _FLUSH["buf"]
    for _ in range(5):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in ev:
        buf.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in ev)
    return times[len(times) // 2]


def _setup(batch, seqlen, q_len, hq, hkv, d, dtype=torch.bfloat16):
    blocks_per_seq = -(-seqlen // BLOCK)
    nb = batch * blocks_per_seq
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(nb, BLOCK, hkv, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(nb, BLOCK, hkv, d, device="cuda", dtype=dtype, generator=g)
    q = torch.randn(batch * q_len, hq, d, device="cuda", dtype=dtype, generator=g)
    block_table = torch.randperm(nb, device="cuda", generator=g).int().view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
    cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device="cuda")
    ours_bf16 = torch.stack([k, v], dim=1).permute(0, 1, 3, 2, 4).contiguous()  # [nb, 2, Hkv, bs, D]
    one = torch.ones((), device="cuda")
    ours_fp8 = (ours_bf16.float().clamp(-448, 448)).to(torch.float8_e4m3fn).view(torch.uint8)
    return dict(q=q, k=k, v=v, block_table=block_table, seq_lens=seq_lens, cu_q=cu_q, ours_bf16=ours_bf16,
                ours_fp8=ours_fp8, one=one, seqlen=seqlen)


def _fa3(s, q_len, seqlen, causal, fp8, d):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    batch, hkv = s["seq_lens"].numel(), s["k"].shape[2]
    q, k, v = s["q"], s["k"], s["v"]
    kw = {}
    if fp8:
        q, k, v = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
        ds = s["one"].expand(batch, hkv)
        kw = dict(q_descale=ds, k_descale=ds, v_descale=ds)
    out = torch.empty(s["q"].shape, dtype=torch.bfloat16, device="cuda")
    return lambda: flash_attn_varlen_func(q, k, v, q_len, s["cu_q"], seqlen, seqused_k=s["seq_lens"],
                                          block_table=s["block_table"], causal=causal, softmax_scale=d**-0.5,
                                          out=out, fa_version=3, **kw)


def _ours(s, op, q_len, causal, fp8, d, promote_every=None):
    cache = s["ours_fp8"] if fp8 else s["ours_bf16"]
    out = torch.empty_like(s["q"])
    one = s["one"]
    extra = () if promote_every is None else (promote_every,)
    # The prefill gets the longest sequence's length, as the FIREATTN backend passes it from vLLM's
    # metadata (it picks FP8 head_dim 64's 256-key loop for long cached contexts).
    kw = dict(max_seq_len=s["seqlen"]) if op is ops.prefill else {}
    return lambda: op(out, s["q"], cache, s["block_table"], s["cu_q"], s["seq_lens"], one, one, one, d**-0.5,
                      q_len, causal, -1, 0.0, None, None, *extra, **kw)


def run(bench: str, quick: bool = False) -> list[dict]:
    reason = ops.unavailable_reason()
    if reason:
        raise SystemExit(f"FIREATTN kernels unavailable: {reason}")
    records = []
    for d, (hq, hkv) in PREFILL_HEADS.items():
        if d not in ops.compiled_head_dims():
            continue
        if bench == "prefill":
            shapes = prefill_shapes()
        else:
            shapes = [(b, 1, n, True) for b, n in DECODE_SHAPES]
        for batch, q_len, seqlen, causal in shapes[:2] if quick else shapes:
            s = _setup(batch, seqlen, q_len, hq, hkv, d)
            base = dict(bench=bench, head_dim=d, num_q_heads=hq, num_kv_heads=hkv, batch=batch, seqlen=seqlen,
                        causal=causal, paged=True, block_size=BLOCK)
            if bench == "prefill":
                base["q_len"] = q_len
            op = ops.prefill if bench == "prefill" else ops.decode
            impls = [("fa3", "bf16"), ("fa3", "fp8"), ("fireattn", "bf16"), ("fireattn", "fp8")]
            if bench == "prefill":  # the two-level accumulation's cost: promote every tile vs never
                impls.append(("fireattn-never", "fp8"))
            for impl, kv in impls:
                if impl == "fa3":
                    fn = _fa3(s, q_len, seqlen, causal, kv == "fp8", d)
                else:  # prefill rows name their promotion interval; decode has none
                    promote = (0 if impl == "fireattn-never" else 1) if bench == "prefill" else None
                    fn = _ours(s, op, q_len, causal, kv == "fp8", d, promote)
                if bench == "decode":
                    fn = graphed(fn)
                rec = dict(base, impl=impl, kv_dtype=kv, ms=_bench(fn))
                if bench == "prefill":
                    rec["tflops"] = prefill_flops(batch, q_len, seqlen, hq, d, causal) / rec["ms"] / 1e9
                else:
                    kv_bytes = 2 * batch * seqlen * hkv * d * (1 if kv == "fp8" else 2)
                    rec["gbps"] = kv_bytes / rec["ms"] / 1e6
                    rec["ms_read_flush"] = _bench_read_flush(fn)
                    rec["gbps_read_flush"] = kv_bytes / rec["ms_read_flush"] / 1e6
                records.append(rec)
            del s
            torch.cuda.empty_cache()
    _add_ratios(records)
    return records


def prefill_flops(batch, q_len, seqlen, num_q_heads, head_dim, causal) -> float:
    """QK^T + PV FLOPs over the visible (query, key) pairs. Causal is bottom-right aligned: query i
    of q_len sees seqlen - q_len + i + 1 keys (a square causal prefill counts seqlen^2 / 2, as FA3's
    benchmarks do, not the exact seqlen (seqlen + 1) / 2)."""
    if not causal:
        pairs = q_len * seqlen
    elif q_len == seqlen:
        pairs = seqlen * seqlen / 2
    else:
        pairs = q_len * (seqlen - q_len) + q_len * (q_len + 1) / 2
    return 4.0 * batch * pairs * num_q_heads * head_dim


def _add_ratios(records):
    key = lambda r: (r["head_dim"], r["batch"], r.get("q_len"), r["seqlen"], r["causal"])  # noqa: E731
    fa_bf16 = {key(r): r["ms"] for r in records if r["impl"] == "fa3" and r["kv_dtype"] == "bf16"}
    fa_fp8 = {key(r): r["ms"] for r in records if r["impl"] == "fa3" and r["kv_dtype"] == "fp8"}
    fa_bf16_rf = {key(r): r["ms_read_flush"] for r in records
                  if r["impl"] == "fa3" and r["kv_dtype"] == "bf16" and "ms_read_flush" in r}
    for r in records:
        r["time_vs_fa3_bf16"] = r["ms"] / fa_bf16[key(r)]
        r["speedup_vs_fa3_fp8"] = fa_fp8[key(r)] / r["ms"]
        if key(r) in fa_bf16_rf and "ms_read_flush" in r:
            r["time_vs_fa3_bf16_read_flush"] = r["ms_read_flush"] / fa_bf16_rf[key(r)]


def print_table(records) -> None:
    metric = "tflops" if records and "tflops" in records[0] else "gbps"
    rf = bool(records) and "gbps_read_flush" in records[0]  # decode: the read-flush columns too
    print(f"{'D':>4} {'batch':>5} {'q_len':>6} {'seqlen':>7} {'causal':>6} {'impl':>14} {'kv':>5} {'ms':>9} "
          f"{metric:>8} {'t/fa3bf16':>9} {'x fa3fp8':>8}" + (f" {'gbps rf':>8} {'t/fa3bf16 rf':>12}" if rf else ""))
    for r in records:
        print(f"{r['head_dim']:>4} {r['batch']:>5} {r.get('q_len', 1):>6} {r['seqlen']:>7} {str(r['causal']):>6} "
              f"{r['impl']:>14} {r['kv_dtype']:>5} {r['ms']:>9.3f} {r[metric]:>8.1f} {r['time_vs_fa3_bf16']:>9.2f} "
              f"{r['speedup_vs_fa3_fp8']:>8.2f}"
              + (f" {r['gbps_read_flush']:>8.1f} {r.get('time_vs_fa3_bf16_read_flush', float('nan')):>12.2f}" if rf else ""))
