"""vllm-fireattn: the FIREATTN attention backend for vLLM on NVIDIA Hopper.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process (API
server, engine core, workers), so it is idempotent, cheap, and touches neither CUDA nor the
compiled kernels.
"""
__version__ = "0.1.0"

BACKEND_NAME = "FIREATTN"
BACKEND_CLASS_PATH = "vllm_fireattn.backend.backend.FireAttnBackend"


def register() -> None:
    """Registers FIREATTN into vLLM's CUSTOM attention-backend slot (and the FIREATTN name)."""
    from vllm_fireattn.backend import _compat

    _compat.register()
