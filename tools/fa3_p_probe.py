"""Reads the attention weights an FP8 prefill kernel actually applied, to find out how vLLM's FA3
FP8 rounds P (GPU + vLLM; a few seconds).

Why: on random normal data FA3 FP8's relative L2 error was 5-9% below FIREATTN's (0.0225 vs
0.0242 at 4k, head_dim 128), and no emulated variant (P scale, tile length, row sums of rounded P)
explained it.

How: V is one-hot over the last 128 keys of each context (key ctx - 128 + d has V = e_d, every
other key V = 0), so output[q, h, d] is the weight the kernel gave that key: its P / l, in the
output's BF16 (8 bits, enough to tell e4m3's 3-bit roundings apart). The same inputs go to FA3
FP8, to FIREATTN's ops.prefill, and to the reference's emulation (vllm_fireattn.reference) under
several hypotheses; the table says how far each kernel's weights are from each hypothesis.

    python tools/fa3_p_probe.py [--contexts 128 1024 4096] [--fa3-num-splits N] [--json OUT]

H200, 2026-11-22 (benchmarks/results/h200/ab_2026-11-22c/fa3_p_probe.json, FIREATTN then still
rounding against the running max): at 128 keys both kernels match "e4m3 P*256" with an FP32 l
(96% of weights equal in BF16). At 1k and 4k FIREATTN still did (95%); FA3 FP8 matched no
hypothesis (<= 19%), and at 4k 35% of its weights equalled the exact P (mean relative deviation
0.015 against 0.022): FA3 keeps many large weights exact. The CPU emulation then showed that P
rounded against each tile's (or split's) own max does that and reaches FA3's error; FIREATTN now
does it and its weights match "vs tile max, 128-key tiles" (95% at 4k; error below FA3's).
--fa3-num-splits 1 would tell whether FA3's split-KV is its mechanism.
"""
from __future__ import annotations

import argparse
import json

import torch

from vllm_fireattn.reference.attention import attend

D, HQ, Q = 128, 8, 64  # head_dim, query heads (one KV head), queries at the end of the context


def _inputs(ctx: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    fp8 = torch.float8_e4m3fn
    q = torch.randn(Q, HQ, D, generator=g).clamp(-448, 448).to(fp8)
    k = torch.randn(ctx, 1, D, generator=g).to(fp8)
    v = torch.zeros(ctx, 1, D)
    v[ctx - 128 + torch.arange(128), 0, torch.arange(128)] = 1.0  # one-hot over the last 128 keys
    return q, k, v.to(fp8)


def _hypotheses(q, k, v, scale):
    """Weights of the last 128 keys [Q, HQ, 128] under each emulated rounding of P."""
    args = (q.double(), k.double(), v.double(), scale, True)
    out = {"exact P": attend(*args)[0]}
    for bn in (64, 128, 176):  # l = sum of the FP32 P in every hypothesis, as in both kernels
        out[f"e4m3 P*256, {bn}-key tiles"] = attend(*args, p_fp8=True, block_n=bn)[0]
        # P against each tile's own max (FIREATTN since 2026-11-22; see the reference's p_ref)
        out[f"e4m3 P*256 vs tile max, {bn}-key tiles"] = attend(*args, p_fp8=True, block_n=bn, p_ref="tile")[0]
    return out


def _fa3(q, k, v, scale, ctx, dev, num_splits=0):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    bs = 16
    nblk = ctx // bs
    kc = k.to(dev).view(nblk, bs, 1, D)
    vc = v.to(dev).view(nblk, bs, 1, D)
    ones = torch.ones(1, 1, device=dev)
    out = torch.empty(Q, HQ, D, dtype=torch.bfloat16, device=dev)
    flash_attn_varlen_func(q.to(dev), kc, vc, Q, torch.tensor([0, Q], dtype=torch.int32, device=dev), ctx,
                           seqused_k=torch.tensor([ctx], dtype=torch.int32, device=dev),
                           block_table=torch.arange(nblk, dtype=torch.int32, device=dev)[None], causal=True,
                           softmax_scale=scale, q_descale=ones, k_descale=ones, v_descale=ones, fa_version=3, out=out,
                           num_splits=num_splits)
    return out.double().cpu()


def _fireattn(q, k, v, scale, ctx, dev):
    from vllm_fireattn import ops

    bs = 16
    nblk = ctx // bs
    cache = torch.empty(nblk, 2, 1, bs, D, dtype=torch.uint8, device=dev)
    cache[:, 0] = k.view(torch.uint8).to(dev).view(nblk, bs, 1, D).permute(0, 2, 1, 3)
    cache[:, 1] = v.view(torch.uint8).to(dev).view(nblk, bs, 1, D).permute(0, 2, 1, 3)
    one = torch.ones((), device=dev)
    out = torch.empty(Q, HQ, D, dtype=torch.bfloat16, device=dev)
    query = q.float().to(torch.bfloat16).to(dev)  # e4m3 values are exact in BF16: q8 = q at scale 1
    ops.prefill(out, query, cache, torch.arange(nblk, dtype=torch.int32, device=dev)[None],
                torch.tensor([0, Q], dtype=torch.int32, device=dev), torch.tensor([ctx], dtype=torch.int32, device=dev),
                one, one, one, scale, Q)
    return out.double().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--fa3-num-splits", type=int, default=0, help="FA3 split-KV count (0: its heuristic)")
    ap.add_argument("--json", help="write the table as JSON here too")
    a = ap.parse_args()
    dev = "cuda"
    scale = D**-0.5
    rows = []
    for ctx in a.contexts:
        assert ctx % 16 == 0 and ctx >= 128
        q, k, v = _inputs(ctx, seed=ctx)
        hyp = _hypotheses(q, k, v, scale)
        kernels = {}
        for name, fn in (("FA3 FP8", lambda *x: _fa3(*x, num_splits=a.fa3_num_splits)), ("FIREATTN FP8", _fireattn)):
            try:
                kernels[name] = fn(q, k, v, scale, ctx, dev)
            except Exception as e:  # noqa: BLE001 - report and go on with the other kernel
                print(f"{name}: {type(e).__name__}: {e}")
        for kname, w in kernels.items():
            for hname, h in hyp.items():
                hb = h.to(torch.bfloat16).double()  # the kernels' weights went through BF16 too
                big = hb.abs() > 1e-3
                rel = ((w - hb).abs() / hb.abs().clamp_min(1e-30))[big]
                rows.append(dict(context=ctx, kernel=kname, hypothesis=hname,
                                 equal_in_bf16=float((w[big] == hb[big]).double().mean()),
                                 max_rel=float(rel.max()), mean_rel=float(rel.mean()),
                                 weight_sum_last_row=float(w[-1].sum(-1).mean())))
    print(f"{'ctx':>5} {'kernel':<13} {'equal':>6} {'mean rel':>9} {'max rel':>8}  hypothesis")
    for r in rows:
        print(f"{r['context']:>5} {r['kernel']:<13} {r['equal_in_bf16']:>6.3f} {r['mean_rel']:>9.2e} {r['max_rel']:>8.2e}  "
              f"{r['hypothesis']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
