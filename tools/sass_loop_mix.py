"""Instruction mix of one loop iteration of the prefill or decode kernel, read from its SASS.

The FP8 prefill's consumer warpgroups are issue-bound (ncu, benchmarks/results/h200/README.md),
so the number of instructions a consumer warp issues per key tile is a GPU-free proxy for a
change's effect. This walks the SASS of the promote-every-tile kernel with the default key tile
(`...Lb1ELb0EEE...`: kEveryTile, not kWide) and counts
the instructions of one iteration on the common path (no mask, no soft cap):

  loop head (the `ready` wait) .. the QK^T wgmma wait .. the fall-through softmax variant (the
  kernel tests soft cap, then masking, and falls through to the plain variant) .. its jump to the
  PV code .. the backward branch to the loop head.

Conditional code after the join (other promotion modes at head_dim 256) is counted as well, so
compare like with like (same head_dim, before/after a change). Static count; the loop has no
inner loops on that path.

    nvcc -c csrc/generated/prefill_bf16_fp8_d128.cu ... -gencode=arch=compute_90a,code=sm_90a -o k.o
    cuobjdump -sass k.o > k.sass      # (cuobjdump ships with triton: triton/backends/nvidia/bin)
    python tools/sass_loop_mix.py k.sass

Decode (`--decode`, a decode_bf16_*.cu TU): the split kernel's stage loop, the innermost loop
around all its tensor-core MMAs (HMMA), counted whole: boundary masks, soft cap, the rescale of
the accumulator and the tail's zero fill are conditional code inside it, so this is a static
count, again for like-with-like comparisons.

    python tools/sass_loop_mix.py k.sass --decode
"""
from __future__ import annotations

import collections
import re
import sys

_INSTR = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA (?:!?U?P\w+, )?0x([0-9a-f]+)")


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+ ", "", text).split()[0].split(".")[0]


def kernel_instructions(sass: str, kernel_marker: str = "prefill_kernel") -> list[tuple[int, str]]:
    """(address, text) of the first promote-every-tile prefill kernel (or, with kernel_marker
    "decode_kernel", the first decode split kernel) in a cuobjdump listing."""
    out, inside = [], False
    for line in sass.splitlines():
        if "Function : " in line:
            name = line.split("Function : ")[1].strip()
            inside = kernel_marker in name and (kernel_marker != "prefill_kernel" or "Lb1ELb0EEE" in name)
            if out and not inside:
                break
            continue
        m = _INSTR.match(line)
        if inside and m:
            out.append((int(m.group(1), 16), m.group(2)))
    if not out:
        raise SystemExit(f"no {kernel_marker} (promote every tile) function in the listing")
    return out


def loop_path(ins: list[tuple[int, str]]) -> list[tuple[int, str]]:
    index = {a: i for i, (a, _) in enumerate(ins)}
    first_mma = next(i for i, (_, t) in enumerate(ins) if "GMMA" in t)
    back = [(i, index[int(m.group(1), 16)]) for i, (a, t) in enumerate(ins)
            if i > first_mma and (m := _BRANCH.search(t)) and int(m.group(1), 16) <= ins[first_mma][0]]
    # The consumer tile loop: the innermost loop over the first wgmma (latest head; an outer loop
    # over work items, if any, starts earlier), and its last backward branch.
    head_i = max(h for _, h in back)
    back_i = max(i for i, h in back if h == head_i)
    wait = next(i for i in range(first_mma, back_i) if "DEPBAR" in ins[i][1])
    jump = next(i for i in range(wait + 1, back_i) if ins[i][1].startswith("BRA "))
    join = index[int(_BRANCH.search(ins[jump][1]).group(1), 16)]
    return ins[head_i:jump + 1] + ins[join:back_i + 1]


def decode_loop(ins: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The innermost loop (head .. backward branch) that contains every HMMA of the kernel."""
    index = {a: i for i, (a, _) in enumerate(ins)}
    mmas = [i for i, (_, t) in enumerate(ins) if opcode(t) == "HMMA"]
    loops = [(index[int(m.group(1), 16)], i) for i, (_, t) in enumerate(ins)
             if (m := _BRANCH.search(t)) and int(m.group(1), 16) in index]
    head, back = min(((h, b) for h, b in loops if h <= mmas[0] and b >= mmas[-1]), key=lambda hb: hb[1] - hb[0])
    return ins[head:back + 1]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--decode"):
        print(__doc__)
        return 2
    sass = open(argv[1]).read()
    if len(argv) == 3:
        path = decode_loop(kernel_instructions(sass, "decode_kernel"))
        what = "per decode stage (whole loop body, static)"
    else:
        path = loop_path(kernel_instructions(sass))
        what = "per consumer iteration (common path)"
    mix = collections.Counter(opcode(t) for _, t in path)
    print(f"{len(path)} instructions {what}")
    print(" ".join(f"{k}:{v}" for k, v in mix.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
