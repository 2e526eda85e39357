"""CPU: plugin registration against the real vllm==0.26 (entry point, names, idempotence)."""
import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

import vllm_fireattn
from vllm_fireattn.backend import _compat

pytest.importorskip("vllm")
from vllm.config import AttentionConfig  # noqa: E402
from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum  # noqa: E402


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("fireattn") == "vllm_fireattn:register", f"installed entry points: {eps}"


def test_fresh_process_loads_plugin_through_vllm_without_cuda_or_kernels():
    code = r"""
import json, sys
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
import torch
print(json.dumps({
    "fireattn": E["FIREATTN"].name, "lower": E["fireattn"].name,
    "custom_class": E.CUSTOM.get_class().__qualname__,
    "cuda_initialized": torch.cuda.is_initialized(),
    "kernels_loaded": "vllm_fireattn.ops._fake" in sys.modules,
}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"fireattn": "CUSTOM", "lower": "CUSTOM", "custom_class": "FireAttnBackend",
                   "cuda_initialized": False, "kernels_loaded": False}


@pytest.fixture
def registered():
    saved = dict(_ATTN_OVERRIDES)
    vllm_fireattn.register()
    yield
    _ATTN_OVERRIDES.clear()
    _ATTN_OVERRIDES.update(saved)


def test_register_is_idempotent(registered):
    vllm_fireattn.register()
    vllm_fireattn.register()
    assert _ATTN_OVERRIDES[AttentionBackendEnum.CUSTOM] == vllm_fireattn.BACKEND_CLASS_PATH
    assert AttentionBackendEnum["FIREATTN"] is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum["CUSTOM"].get_class().get_name() == "CUSTOM"


def test_config_accepts_both_names(registered):
    for name in ("FIREATTN", "fireattn", "CUSTOM"):
        assert AttentionConfig(backend=name).backend is AttentionBackendEnum.CUSTOM
    cfg = AttentionConfig(backend_per_kind={"full_attention": "FIREATTN"})
    assert cfg.backend_per_kind["full_attention"] is AttentionBackendEnum.CUSTOM


def test_other_names_unaffected(registered):
    assert AttentionBackendEnum["FLASH_ATTN"] is AttentionBackendEnum.FLASH_ATTN
    with pytest.raises(ValueError, match="Unknown attention backend"):
        AttentionBackendEnum["NOPE"]


def test_conflicting_custom_owner_fails_loudly(registered):
    _ATTN_OVERRIDES[AttentionBackendEnum.CUSTOM] = "other_plugin.Backend"
    with pytest.raises(RuntimeError, match="already registered to 'other_plugin.Backend'"):
        vllm_fireattn.register()
    with pytest.raises(ValueError, match="other_plugin.Backend"):
        AttentionBackendEnum["FIREATTN"]
    assert AttentionBackendEnum["CUSTOM"] is AttentionBackendEnum.CUSTOM  # CUSTOM itself still works


def test_alias_shim_is_version_guarded(monkeypatch):
    assert _compat.vllm_series() in _compat.SUPPORTED_VLLM_SERIES
    assert _compat.install_name_alias() is True
