"""CPU check of FP8 scale choices: mean |prompt logprob - FP32| of a Hugging Face model when its
post-RoPE Q, K and V go through e4m3 (what the FP8 prefill kernel sees), for scales of 1.0 and
for a calibration file's absmax / 448 times several headrooms.

  python tools/scale_check.py --model /tmp/smollm2-hf \
      --calibration benchmarks/calibration/smollm2-135m_pg-essays-16k.safetensors \
      --text tests/data/apache-2.0.txt [--headrooms 1 2 4 8] [--max-tokens 2600] [--test-prompts]

--test-prompts evaluates what tests/test_vllm_e2e.py sends: its PROMPTS and then the text, each its
own sequence, tokenized as vLLM does (tokenizer defaults, no truncation). The test's metric
(_mean_abs_prompt_delta) is the last sequence's, the text's; the short prompts are shown apart.

--windows N [--window-tokens T] scores N windows of T tokens cut from one or more --text files
(each file tokenized whole, cut into consecutive T-token windows; the N are dealt round-robin over
the files and spread evenly within each). Per scale choice it prints the mean error over windows
with its standard error, and per headroom the paired difference (that scale minus 1.0, window by
window) with its mean and standard error: the pairing removes the text-to-text spread.
--uniform C ... adds scale choices of C x 1.0 (no saturation either, so "C minus 1.0" is a null
comparison that shows how far rounding alone moves the paired mean). --json FILE writes the
per-window errors.

--dither K evaluates each scale choice S of a window at S x 2^((j + u) / K), j = 0 .. K-1, with a
phase u in [0, 1) of its own per window (golden-ratio sequence), and scores the window by the mean
over j. e4m3's grid is invariant under x2, so where a value lands on it depends on log2(scale) mod
1: without dither a scale choice carries a fixed "grid placement" effect that is the same in every
window and that averaging over windows cannot remove (x1, x2, x4 headroom share one placement,
uniform 1.1 has another). The octave average leaves what a scale changes beyond that: saturation
and subnormal range. Both sides of a paired difference use the same offsets.

  python tools/scale_check.py --model /tmp/smollm2-hf --calibration ... --headrooms 1 2 \
      --text /tmp/evaldata/kjv.txt OPTICKS tests/data/apache-2.0.txt --windows 16 --window-tokens 1024 \
      --dither 4
(OPTICKS: Isaac.Newton-Opticks.txt, Project Gutenberg, shipped in PyPI's apache-tvm-ffi under
tvm_ffi/3rdparty/libbacktrace/; neither text is in the calibration set, which is Paul Graham essays.)

It also prints how far the text's absmax goes beyond the calibration file's (ratio > 1 means
absmax / 448 would saturate). Softmax and PV stay exact here, so only the scale choice differs,
unless --p-e4m3: then attention is computed as the FP8 prefill kernel does it, in key tiles of
--block-n (128 for head_dim 64) with an online softmax, P rounded to e4m3 as sat_rne(p * 256) / 256
before PV, and the row sum and output accumulated from unrounded exps in FP32 (the reference is
still exact FP32 attention); --p-ref picks the max P is rounded against (tile: the kernel's).
"""
import argparse
import ast
import json
import math
from pathlib import Path

import torch

from vllm_fireattn.calibrate import qkv_through_e4m3
from vllm_fireattn.calibration import load
from vllm_fireattn.reference.attention import attend


def test_prompts() -> list[str]:
    """PROMPTS of tests/test_vllm_e2e.py, read without importing the GPU test module."""
    tree = ast.parse((Path(__file__).parents[1] / "tests" / "test_vllm_e2e.py").read_text())
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "PROMPTS")


def windows(tok, files: list[str], n: int, size: int) -> list[tuple[str, torch.Tensor]]:
    """n windows of `size` tokens: each file cut into consecutive windows, the n dealt round-robin
    over the files (a file gives no more than it has), spread evenly within each file."""
    cut = []
    for f in files:
        ids = tok(Path(f).read_text()).input_ids
        cut.append([torch.tensor([ids[i: i + size]]) for i in range(0, len(ids) - size + 1, size)])
    take = [0] * len(files)
    while sum(take) < n and any(t < len(c) for t, c in zip(take, cut)):
        for j, c in enumerate(cut):
            if sum(take) < n and take[j] < len(c):
                take[j] += 1
    out = []
    for f, c, k in zip(files, cut, take):
        out += [(f"{Path(f).stem}[{int((i + 0.5) * len(c) / k)}]", c[int((i + 0.5) * len(c) / k)]) for i in range(k)]
    return out


def attend_p_e4m3(q, k, v, scaling: float, block_n: int, p_ref: str = "tile"):
    """Causal attention of one sequence as the FP8 prefill kernel computes it (the reference's
    tiled softmax with P rounded to e4m3 as sat_rne(P * 256) / 256): q [1, Hq, T, D],
    k/v [1, Hkv, T, D] -> ([1, T, Hq, D], None) as transformers' attention interface returns it."""
    out, _ = attend(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), scaling, True,
                    p_fp8=True, block_n=block_n, p_ref=p_ref)
    return out[None], None


def mean_se(x: list[float]) -> tuple[float, float]:
    m = sum(x) / len(x)
    if len(x) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((a - m) ** 2 for a in x) / (len(x) - 1) / len(x))


def main() -> None:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--text", required=True, nargs="+", help="one text; several with --windows")
    ap.add_argument("--headrooms", type=float, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--uniform", type=float, nargs="*", default=[], help="extra scale choices C x 1.0")
    ap.add_argument("--max-tokens", type=int, default=2600)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--test-prompts", action="store_true", help="the GPU test's prompts, then the text")
    mode.add_argument("--windows", type=int, help="score this many windows of the --text files")
    ap.add_argument("--window-tokens", type=int, default=1024)
    ap.add_argument("--p-e4m3", action="store_true", help="also round P to e4m3 (x256) like the prefill kernel")
    ap.add_argument("--block-n", type=int, default=128, help="key tile of the --p-e4m3 emulation")
    ap.add_argument("--p-ref", choices=("tile", "running"), default="tile",
                    help="--p-e4m3 rounds P against each tile's max (the kernel) or the running max")
    ap.add_argument("--dither", type=int, default=1, help="average each choice over K scale offsets spanning an octave")
    ap.add_argument("--json", help="write the per-window errors here")
    a = ap.parse_args()
    if len(a.text) > 1 and not a.windows:
        ap.error("several --text files need --windows")
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cal = load(a.calibration)
    if a.windows:
        named = windows(tok, a.text, a.windows, a.window_tokens)
        names, seqs = [n for n, _ in named], [s for _, s in named]
    else:
        text = open(a.text[0]).read()
        if a.test_prompts:
            seqs = [tok(p, return_tensors="pt").input_ids for p in test_prompts() + [text]]
        else:
            seqs = [tok(text, return_tensors="pt").input_ids[:, : a.max_tokens]]
    seen = torch.zeros(3, *cal.k_absmax.shape)
    state = {"scales": None}

    def attention(module, q, k, v, mask, **kw):
        i, hkv = module.layer_idx, k.shape[1]
        seen[0, i] = torch.maximum(seen[0, i], k.abs().amax(dim=(0, 2, 3)))
        seen[1, i] = torch.maximum(seen[1, i], v.abs().amax(dim=(0, 2, 3)))
        seen[2, i] = torch.maximum(seen[2, i], q.abs().amax(dim=(0, 2, 3)).view(hkv, -1).amax(-1))
        if state["scales"] is not None:
            ks, vs, qs = (s[i] for s in state["scales"])
            q, k, v = qkv_through_e4m3(q, k, v, qs, ks, vs)
            if a.p_e4m3:
                assert q.shape[0] == 1 and q.shape[2] == k.shape[2], "one whole sequence per call"
                return attend_p_e4m3(q, k, v, module.scaling, a.block_n, a.p_ref)
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("fireattn_scale_check", attention)
    model.set_attn_implementation("fireattn_scale_check")

    def logprob(ids):
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        return lp.gather(-1, ids[0, 1:, None])[:, 0]

    absmax = torch.stack([cal.k_absmax, cal.v_absmax, cal.q_absmax])
    ones = torch.ones_like(absmax)
    choices = ([("scale 1.0", ones)] + [(f"uniform x{c:g}", ones * c) for c in a.uniform]
               + [(f"absmax/448 x{h:g}", absmax * h / 448) for h in a.headrooms])

    def ratio_line():
        ratio = (seen / absmax.clamp_min(1e-30)).amax(dim=(1, 2))
        return (f"text absmax / calibration absmax, max over layers and heads: K {ratio[0]:.2f}, "
                f"V {ratio[1]:.2f}, Q {ratio[2]:.2f}")

    if not a.windows:
        state["scales"] = None
        truth = [logprob(ids) for ids in seqs]
        print(ratio_line())
        for name, scales in choices:
            state["scales"] = scales
            err = [(logprob(ids) - t).abs().mean().item() for ids, t in zip(seqs, truth)]
            short = f"  (short prompts: {' '.join(f'{e:.4f}' for e in err[:-1])})" if len(err) > 1 else ""
            print(f"{name:18s} mean |logprob - fp32| {err[-1]:.4f}{short}")
        return

    dither = f", each the mean over {a.dither} scale offsets in an octave" if a.dither > 1 else ""
    print(f"{len(seqs)} windows of {a.window_tokens} tokens{', P through e4m3 (x256)' if a.p_e4m3 else ''}; "
          f"mean |logprob - fp32| per window{dither}:")
    print(f"{'window':26s} " + " ".join(f"{n:>17s}" for n, _ in choices), flush=True)
    raw = {n: [] for n, _ in choices}  # [window][offset]
    offsets = []
    for w, (name, ids) in enumerate(zip(names, seqs)):
        phase = (w * 0.6180339887498949) % 1 if a.dither > 1 else 0.0
        offsets.append([2 ** ((j + phase) / a.dither) for j in range(a.dither)])
        state["scales"] = None
        truth = logprob(ids)
        for n, scales in choices:
            raw[n].append([])
            for c in offsets[-1]:
                state["scales"] = scales * c
                raw[n][-1].append((logprob(ids) - truth).abs().mean().item())
        print(f"{name:26s} " + " ".join(f"{sum(raw[n][-1]) / a.dither:17.4f}" for n, _ in choices), flush=True)
    errs = {n: [sum(r) / len(r) for r in rs] for n, rs in raw.items()}
    print(ratio_line())
    if a.dither > 1:
        spread = {n: sum(mean_se(r)[1] * math.sqrt(len(r)) for r in rs) / len(rs) for n, rs in raw.items()}
        print("within a window, standard deviation over the offsets (grid placement alone), mean over windows: "
              + ", ".join(f"{n} {v:.4f}" for n, v in spread.items()))
    print(f"\nover {len(seqs)} windows: mean +- standard error")
    for n, _ in choices:
        m, se = mean_se(errs[n])
        print(f"{n:18s} {m:.4f} +- {se:.4f}")
    print("paired difference (choice minus scale 1.0, per window): mean +- s.e., t = mean / s.e., "
          "windows where the choice is better")
    base = errs["scale 1.0"]
    for n, _ in choices[1:]:
        d = [x - y for x, y in zip(errs[n], base)]
        m, se = mean_se(d)
        print(f"{n:18s} {m:+.4f} +- {se:.4f}  t {m / se if se > 0 else float('nan'):+.2f}  "
              f"better {sum(x < 0 for x in d)}/{len(d)}")
        if a.dither > 1:  # the grid-placement effect that the dither averages out, common to all windows
            bins = [[] for _ in range(8)]
            for w, offs in enumerate(offsets):
                for j, c in enumerate(offs):
                    bins[int(math.log2(c) % 1 * 8) % 8].append(raw[n][w][j] - raw["scale 1.0"][w][j])
            print(f"{'':18s} by octave phase log2(offset) mod 1 in eighths: "
                  + " ".join(f"{sum(b) / len(b):+.4f}" if b else "-" for b in bins))
    if a.json:
        Path(a.json).write_text(json.dumps({"windows": names, "window_tokens": a.window_tokens, "p_e4m3": a.p_e4m3, "p_ref": a.p_ref,
                                            "offsets": offsets, "errors": raw}, indent=1))


if __name__ == "__main__":
    main()
