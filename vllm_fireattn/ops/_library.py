"""Loads the compiled op library (vllm_fireattn/_C*.so) on first use, never at import.

Importing vllm_fireattn never needs the extension: a pure-Python install (FIREATTN_NO_CUDA=1)
imports fine and every op reports why it is unavailable instead of failing obscurely.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_lock = threading.Lock()
_load_error: str | None = None
_loaded = False


class FireAttnUnavailableError(RuntimeError):
    """Raised by an op whose kernels cannot run here; the message says why."""


def _find_library() -> Path | None:
    candidates = sorted(_PACKAGE_DIR.glob("_C*.so"))
    return candidates[0] if candidates else None


def load() -> str | None:
    """Loads the op library once. Returns None on success, else the reason it is unavailable."""
    global _loaded, _load_error
    if _loaded or _load_error is not None:
        return _load_error
    with _lock:
        if _loaded or _load_error is not None:
            return _load_error
        if os.environ.get("FIREATTN_DISABLE_KERNELS") == "1":
            _load_error = "kernels disabled by FIREATTN_DISABLE_KERNELS=1"
            return _load_error
        path = _find_library()
        if path is None:
            _load_error = (
                f"the CUDA extension is not built (no _C*.so in {_PACKAGE_DIR}); this is a pure-Python "
                "install (FIREATTN_NO_CUDA=1) or the build failed: reinstall with nvcc (CUDA 13) available"
            )
            return _load_error
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as e:
            _load_error = f"loading {path.name} failed: {e}"
            return _load_error
        from vllm_fireattn.ops import _fake  # noqa: F401  (fake kernels for torch.compile)

        _loaded = True
        return None


def unavailable_reason(check_device: bool = True) -> str | None:
    """Why FIREATTN kernels cannot run in this process (None if they can).

    check_device also requires a CUDA device of compute capability 9.0 (Hopper); it queries the
    device, which initialises CUDA, so the plugin's import path never calls it.
    """
    reason = load()
    if reason is not None or not check_device:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"FIREATTN kernels need compute capability 9.0 (Hopper, sm_90a); this GPU is sm_{major}{minor}"
    return None


def is_available(check_device: bool = True) -> bool:
    return unavailable_reason(check_device) is None


def require() -> None:
    if not _loaded:
        reason = load()
        if reason is not None:
            raise FireAttnUnavailableError(f"vllm-fireattn kernels unavailable: {reason}")


def compiled_head_dims() -> list[int]:
    """Head dims the installed extension was compiled for ([] if it is not available)."""
    if load() is not None:
        return []
    return list(torch.ops.fireattn.compiled_head_dims())
