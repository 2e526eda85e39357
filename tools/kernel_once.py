"""Runs one prefill or decode shape a few times, for profilers:
  ncu --clock-control none python3 tools/kernel_once.py decode --head-dim 128 --batch 8 --context 32768
  ncu --clock-control none python3 tools/kernel_once.py prefill --head-dim 128 --batch 1 --context 16384
Prefill rows are the whole context (causal); decode rows are one query per sequence.
"""
import argparse

import torch

from vllm_fireattn import ops
from vllm_fireattn.bench.kernels import PREFILL_HEADS, _ours, _setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("op", choices=["prefill", "decode"])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--bf16", action="store_true", help="BF16 cache instead of FP8")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    hq, hkv = PREFILL_HEADS[a.head_dim]
    q_len = a.context if a.op == "prefill" else 1
    s = _setup(a.batch, a.context, q_len, hq, hkv, a.head_dim)
    fn = _ours(s, getattr(ops, a.op), q_len, True, not a.bf16, a.head_dim)
    for _ in range(a.reps):
        fn()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
