"""python -m vllm_fireattn.bench {prefill,decode} [--quick] [--out FILE.json]
   python -m vllm_fireattn.bench plot FILE.json [--png FILE.png]"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from vllm_fireattn.bench import kernels


def environment(command: str) -> dict:
    import vllm

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    commit = commit or os.environ.get("FIREATTN_GIT_COMMIT", "")  # device copies carry no .git
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    return {"gpu": torch.cuda.get_device_name(), "driver": driver, "cuda": torch.version.cuda,
            "torch": torch.__version__, "vllm": vllm.__version__, "commit": commit, "command": command,
            "python": platform.python_version()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vllm_fireattn.bench", description=__doc__)
    ap.add_argument("bench", choices=["prefill", "decode", "plot"])
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
