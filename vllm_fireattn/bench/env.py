"""The environment every benchmark JSON records (GPU, driver, versions, commit, command)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def environment(command: str) -> dict:
    import vllm

    # FIREATTN_GIT_COMMIT wins: copies of a checkout on a GPU host may carry no (or stale) .git.
    commit = os.environ.get("FIREATTN_GIT_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip()
        except OSError:
            commit = ""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        driver = ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "driver": driver, "cuda": torch.version.cuda,
            "torch": torch.__version__, "vllm": vllm.__version__, "commit": commit, "command": command,
            "python": platform.python_version()}


def command_line(prog: str, args) -> str:
    """The command that reproduces a run, from its argparse namespace (for the JSON's env)."""
    parts = []
    for k, v in vars(args).items():
        if k == "cmd" or v in (None, [], "", False):
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {' '.join(map(str, v)) if isinstance(v, list) else v}")
    return " ".join([prog] + parts)
