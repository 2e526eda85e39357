"""Decode latency at small batch as a model sees it: one CUDA graph of `layers` decode calls,
each on its own KV cache (so nothing is served from L2), replayed; prints microseconds per call
for FIREATTN (FP8 and BF16 caches) and vLLM's FA3 (BF16 and FP8) on the same shapes.

  python tools/decode_latency.py [--batch 1] [--contexts 1024 4096 ...] [--head-dim 128] [--splits N ...]
--splits adds fixed split counts next to the scheduler's choice. --cache-write puts each layer's
KV write of the step's new token in the graph too (ours: fireattn.cache_write; FA3: vLLM's
reshape_and_cache_flash), as a decode step runs them: at short contexts that write is a large
part of the per-layer time. --random-blocks scatters each sequence's blocks (a random
permutation, as bench decode lays them out) instead of allocating them in order.
"""
from __future__ import annotations

import argparse

import torch

from vllm_fireattn import ops
from vllm_fireattn.bench.kernels import append_json_lines, graphed

HEADS = {64: (64, 8), 128: (32, 8), 256: (16, 4)}
BLOCK = 16


def graph_time_us(calls, reps=20) -> float:
    replay = graphed(lambda: [c() for c in calls])  # one graph of all the calls
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--splits", type=int, nargs="*", default=[], help="extra fixed split counts to try")
    ap.add_argument("--fa3", action="store_true", help="also time FA3 BF16/FP8")
    ap.add_argument("--cache-write", action="store_true", help="each layer also writes the new token's K/V")
    ap.add_argument("--random-blocks", action="store_true",
                    help="block tables as a random permutation (as bench decode has them) instead of in order")
    ap.add_argument("--json", help="append records here")
    a = ap.parse_args()
    if a.fa3:  # vLLM only for the baselines: the FIREATTN rows run without it
        from vllm._custom_ops import reshape_and_cache_flash
        from vllm.vllm_flash_attn import flash_attn_varlen_func

    d = a.head_dim
    hq, hkv = HEADS[d]
    recs = []
    for ctx in a.contexts:
        b = a.batch
        nbs = -(-ctx // BLOCK)
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        out = torch.empty_like(q)
        order = torch.randperm if a.random_blocks else torch.arange
        bt = order(b * nbs, device="cuda", dtype=torch.int32).view(b, nbs)
        seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        cu_q = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        one = torch.ones((), device="cuda")
        # the step's new token of each sequence (position ctx - 1) and its cache slot
        k_new = torch.randn(b, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v_new = torch.randn(b, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
        slots = (bt[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK).contiguous()
        def step(c, ns):  # one layer: the new token's KV write (with --cache-write), then decode
            if a.cache_write:
                ops.cache_write(k_new, v_new, c, slots, one, one)
            ops.decode(out, q, c, bt, cu_q, seq_lens, one, one, one, d**-0.5, 1, num_splits=ns)

        ours = {}
        for kv in ("fp8", "bf16"):
            caches = []
            for _ in range(a.layers):
                c = torch.randn(b * nbs, 2, hkv, BLOCK, d, device="cuda", dtype=torch.bfloat16, generator=g)
                caches.append(c.to(torch.float8_e4m3fn).view(torch.uint8) if kv == "fp8" else c)
            for ns in [None] + a.splits:
                calls = [lambda c=c, ns=ns: step(c, ns) for c in caches]
                us = graph_time_us(calls)
                ours[(kv, ns)] = us
                recs.append(dict(impl="fireattn", kv=kv, splits=ns or "auto", ctx=ctx, batch=b,
                                 head_dim=d, us=us, cache_write=a.cache_write, random_blocks=a.random_blocks))
            del caches
        if a.fa3:
            for kv in ("bf16", "fp8"):
                ks, vs = [], []
                for _ in range(a.layers):
                    k = torch.randn(b * nbs, BLOCK, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
                    v = torch.randn(b * nbs, BLOCK, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
                    if kv == "fp8":
                        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
                    ks.append(k)
                    vs.append(v)
                qq = q.to(torch.float8_e4m3fn) if kv == "fp8" else q
                kw = {}
                if kv == "fp8":
                    ds = one.expand(b, hkv)
                    kw = dict(q_descale=ds, k_descale=ds, v_descale=ds)
                # vLLM writes FP8 caches as uint8 ("fp8") and reads them as float8_e4m3fn
                write_kv, cache_dtype = (lambda t: t.view(torch.uint8), "fp8") if kv == "fp8" else (lambda t: t, "auto")

                def fa3_step(k, v, qq=qq, kw=kw, write_kv=write_kv, cache_dtype=cache_dtype):
                    if a.cache_write:
                        reshape_and_cache_flash(k_new, v_new, write_kv(k), write_kv(v), slots, cache_dtype, one, one)
                    flash_attn_varlen_func(qq, k, v, 1, cu_q, ctx, seqused_k=seq_lens, block_table=bt, causal=True,
                                           softmax_scale=d**-0.5, out=out, fa_version=3, **kw)
                calls = [lambda k=k, v=v: fa3_step(k, v) for k, v in zip(ks, vs)]
                recs.append(dict(impl="fa3", kv=kv, ctx=ctx, batch=b, head_dim=d, us=graph_time_us(calls),
                                 cache_write=a.cache_write))
                del ks, vs
        torch.cuda.empty_cache()
    for r in recs:
        kvb = 2 * r["batch"] * r["ctx"] * hkv * d * (1 if r["kv"] == "fp8" else 2)
        r["gbps"] = kvb / r["us"] / 1e3
        print(f"{r['impl']:>8} {r['kv']:>4} splits={str(r.get('splits', '-')):>4} "
              f"b={r['batch']} ctx={r['ctx']:>6} D={d}: {r['us']:8.2f} us  {r['gbps']:7.0f} GB/s")
    if a.json:
        append_json_lines(a.json, recs)


if __name__ == "__main__":
    main()
