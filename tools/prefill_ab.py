"""A/B timing of FIREATTN's FP8 prefill: TFLOP/s (do_bench median, as bench prefill) on bench
prefill's shapes, for one build (run it from each variant tree with its own PYTHONPATH and a --tag);
--fa3 adds vLLM's FA3 FP8 on the same shapes. JSON lines with --json.

  PYTHONPATH=/tmp/v/base python3 tools/prefill_ab.py --dims 64 128 --tag base --json ab.jsonl
  ... --shapes chunk 4096      only the shapes whose label (e.g. "1x16384/65536 c") contains one of
                               these words ("chunk": the rows whose keys outnumber their queries)
"""
from __future__ import annotations

import argparse
import os

import torch

from vllm_fireattn import ops
from vllm_fireattn.bench.kernels import (PREFILL_HEADS, _bench, _fa3, _ours, _setup, append_json_lines, prefill_flops,
                                         prefill_shapes)


def _label(shape) -> str:
    batch, q_len, seqlen, causal = shape
    return f"{batch}x{q_len}/{seqlen} {'c' if causal else 'f'}"


def _wanted(shape, words) -> bool:
    if not words:
        return True
    chunk = shape[2] > shape[1]
    return any((w == "chunk" and chunk) or w in _label(shape) for w in words)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dims", type=int, nargs="+", default=[64])
    ap.add_argument("--tag", default="")
    ap.add_argument("--fa3", action="store_true", help="also time FA3 FP8")
    ap.add_argument("--json", help="append records here")
    ap.add_argument("--shapes", nargs="+", help="keep only shapes whose label contains one of these (or 'chunk')")
    a = ap.parse_args()
    shapes = [s for s in prefill_shapes() if _wanted(s, a.shapes)]
    for d in a.dims:
        hq, hkv = PREFILL_HEADS[d]
        for batch, q_len, seqlen, causal in shapes:
            s = _setup(batch, seqlen, q_len, hq, hkv, d)
            flops = prefill_flops(batch, q_len, seqlen, hq, d, causal)
            impls = [("fireattn", lambda: _ours(s, ops.prefill, q_len, causal, True, d, 1))]
            if a.fa3:
                impls.append(("fa3", lambda: _fa3(s, q_len, seqlen, causal, True, d)))
            for name, make in impls:
                ms = _bench(make())
                rec = dict(tag=a.tag, impl=name, head_dim=d, batch=batch, q_len=q_len, seqlen=seqlen,
                           causal=causal, ms=ms, tflops=flops / ms / 1e9,
                           wide=os.environ.get("FIREATTN_PREFILL_WIDE", "auto"))
                print(f"{a.tag:>10} {name:>8} D{d} {_label((batch, q_len, seqlen, causal))}: "
                      f"{rec['tflops']:7.1f} TFLOP/s")
                if a.json:
                    append_json_lines(a.json, [rec])
            del s
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
