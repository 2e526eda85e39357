"""python -m vllm_fireattn.bench {prefill,decode} [--quick] [--out FILE.json]
   python -m vllm_fireattn.bench plot FILE.json [--png FILE.png]
   python -m vllm_fireattn.bench e2e {run,merge,report} ...   (see vllm_fireattn/bench/e2e.py)"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_fireattn.bench import kernels
from vllm_fireattn.bench.env import environment


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["e2e"]:
        from vllm_fireattn.bench import e2e

        e2e.main(argv[1:])
        return
    ap = argparse.ArgumentParser(prog="python -m vllm_fireattn.bench", description=__doc__)
    ap.add_argument("bench", choices=["prefill", "decode", "plot", "e2e"])
    ap.add_argument("json", nargs="?", help="plot: the benchmark JSON to plot")
    ap.add_argument("--quick", action="store_true", help="the anchor shapes only")
    ap.add_argument("--out", help="write {env, records} JSON here")
    ap.add_argument("--png", help="plot: output PNG (default: the JSON's name with .png)")
    args = ap.parse_args(argv)
    if args.bench == "plot":
        if not args.json:
            ap.error("plot needs the benchmark JSON file")
        from vllm_fireattn.bench.plot import plot

        print(f"wrote {plot(args.json, args.png)}")
        return
    records = kernels.run(args.bench, quick=args.quick)
    kernels.print_table(records)
    if args.out:
        cmd = f"python -m vllm_fireattn.bench {args.bench}" + (" --quick" if args.quick else "")
        Path(args.out).write_text(json.dumps({"env": environment(cmd), "records": records}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
