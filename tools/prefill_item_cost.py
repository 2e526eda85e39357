"""Per-item overhead of the prefill: non-causal shapes with the same token count and growing
length (64 x 512 ... 2 x 16k, so every shape has the same number of work items), timed for
FIREATTN FP8 and vLLM's FA3 FP8, then fitted as

    time = a * key_tiles + b * items        (both counted in FIREATTN's tiles: 128 rows x kBlockN keys)

and printed as b / a: what an item's prologue and epilogue cost in key tiles. Two causal shapes
give the causal / non-causal time ratio. GPU only.

  python tools/prefill_item_cost.py [--dims 64 128 256] [--json FILE]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from vllm_fireattn import ops
from vllm_fireattn.bench.kernels import PREFILL_HEADS, _bench, _fa3, _ours, _setup, append_json_lines

SHAPES = [(64, 512), (32, 1024), (16, 2048), (8, 4096), (2, 16384)]  # batch x length, 32k tokens each
KEY_TILE = {64: 128, 128: 128, 256: 64}  # FIREATTN's FP8 kBlockN (128-key tiles at head_dim 64 here)
ROW_TILE = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--json", help="append records here")
    a = ap.parse_args()
    recs = []
    for d in a.dims:
        hq, hkv = PREFILL_HEADS[d]
        for batch, length, causal in [(b, n, False) for b, n in SHAPES] + [(8, 4096, True), (2, 16384, True)]:
            s = _setup(batch, length, length, hq, hkv, d)
            for impl, make in [("fireattn", lambda: _ours(s, ops.prefill, length, causal, True, d, 1)),
                               ("fa3", lambda: _fa3(s, length, length, causal, True, d))]:
                recs.append(dict(impl=impl, head_dim=d, batch=batch, length=length, causal=causal, ms=_bench(make())))
            del s
            torch.cuda.empty_cache()
    for d in a.dims:
        hq, hkv = PREFILL_HEADS[d]
        group = hq // hkv
        for impl in ("fireattn", "fa3"):
            pts = [r for r in recs if r["head_dim"] == d and r["impl"] == impl and not r["causal"]]
            items = [r["batch"] * hkv * (r["length"] * group // ROW_TILE) for r in pts]
            tiles = [n * r["length"] / KEY_TILE[d] for n, r in zip(items, pts)]
            coef = np.linalg.lstsq(np.array([tiles, items]).T, np.array([r["ms"] for r in pts]), rcond=None)[0]
            tflops = " ".join(f"{r['length']}:{4 * r['batch'] * hq * r['length'] ** 2 * d / r['ms'] / 1e9:.0f}" for r in pts)
            print(f"D{d} {impl:>8}: item overhead {coef[1] / coef[0]:.2f} key tiles; TFLOP/s by length {tflops}")
            for r in recs:
                if r["head_dim"] == d and r["impl"] == impl and r["causal"]:
                    full = next(x for x in pts if x["length"] == r["length"] and x["batch"] == r["batch"])
                    print(f"    {r['batch']} x {r['length']} causal / non-causal time {r['ms'] / full['ms']:.3f}")
    if a.json:
        append_json_lines(a.json, recs)


if __name__ == "__main__":
    main()
