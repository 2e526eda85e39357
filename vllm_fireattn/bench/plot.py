"""PNG plots from a kernel-benchmark JSON: one panel per head dim, one line per kernel.

decode: effective GB/s vs context for the batch with the most contexts (the batch-8 sweep);
prefill: TFLOP/s vs sequence length (square causal rows, batch 1; chunk rows are in the table only).
"""
from __future__ import annotations

import json
from pathlib import Path

LABELS = {("fa3", "bf16"): "FA3 BF16", ("fa3", "fp8"): "FA3 FP8", ("fireattn", "bf16"): "FIREATTN BF16",
          ("fireattn", "fp8"): "FIREATTN FP8", ("fireattn-never", "fp8"): "FIREATTN FP8, never promoted"}


def plot(json_path: str, png_path: str | None = None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # plotting is optional: pip install matplotlib
        raise SystemExit(f"plotting needs matplotlib ({e}); pip install matplotlib") from e
    data = json.loads(Path(json_path).read_text())
    records, env = data["records"], data["env"]
    bench = records[0]["bench"]
    metric, xkey = ("gbps", "seqlen") if bench == "decode" else ("tflops", "seqlen")
    if bench == "decode":
        counts = {}
        for r in records:
            counts[r["batch"]] = counts.get(r["batch"], 0) + 1
        batch = max(counts, key=counts.get)
        rows = [r for r in records if r["batch"] == batch]
        title = f"decode, batch {batch}, paged block 16: effective bandwidth"
        xlabel, ylabel = "context (tokens)", "GB/s (KV bytes read / time)"
    else:
        rows = [r for r in records if r["batch"] == 1 and r["causal"] and r.get("q_len", r["seqlen"]) == r["seqlen"]]
        title = "prefill, batch 1, causal, paged block 16"
        xlabel, ylabel = "sequence length", "TFLOP/s"
    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for (impl, kv), label in LABELS.items():
            pts = sorted((r[xkey], r[metric]) for r in rows if r["head_dim"] == d and r["impl"] == impl
                         and r["kv_dtype"] == kv)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="-" if impl.startswith("fireattn") else "--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"head_dim {d}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title} ({env.get('gpu', '?')}, commit {env.get('commit', '?')})", fontsize=10)
    fig.tight_layout()
    out = png_path or str(Path(json_path).with_suffix(".png"))
    fig.savefig(out, dpi=110)
    return out
