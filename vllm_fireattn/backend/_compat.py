"""Every vLLM-version-specific detail of vllm-fireattn, in one place.

Targets vLLM 0.26.x. Holds:
  * the vLLM symbols the backend uses (imported here, so a rename breaks one file);
  * registration into the CUSTOM attention-backend slot;
  * the FIREATTN name shim: vLLM 0.26 accepts only its own AttentionBackendEnum member names
    (`--attention-backend`, `LLM(attention_backend=...)`, `attention_config.backend`,
    `backend_per_kind`, `speculative_config.attention_backend` all call
    `AttentionBackendEnum[name.upper()]`). The shim wraps that lookup on the enum's metaclass
    so "FIREATTN" resolves to CUSTOM, and only while CUSTOM holds our backend.
"""
from __future__ import annotations

import logging

from vllm_fireattn import BACKEND_CLASS_PATH, BACKEND_NAME

logger = logging.getLogger("vllm.fireattn")  # under vLLM's logger: same handlers

SUPPORTED_VLLM_SERIES = ("0.26",)

from vllm.config import VllmConfig, get_current_vllm_config_or_none  # noqa: E402
from vllm.model_executor.models.utils import extract_layer_index  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.utils.torch_utils import is_quantized_kv_cache  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import (  # noqa: E402
    _ATTN_OVERRIDES,
    AttentionBackendEnum,
    register_backend,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills  # noqa: E402
from vllm.v1.kv_cache_interface import AttentionSpec  # noqa: E402

__all__ = [
    "AttentionBackend",
    "AttentionCGSupport",
    "AttentionImpl",
    "AttentionMetadataBuilder",
    "AttentionSpec",
    "AttentionType",
    "CommonAttentionMetadata",
    "DeviceCapability",
    "MultipleOf",
    "VllmConfig",
    "extract_layer_index",
    "get_current_vllm_config_or_none",
    "is_quantized_kv_cache",
    "tensor_parallel_rank_and_size",
    "split_decodes_and_prefills",
]


def tensor_parallel_rank_and_size() -> tuple[int, int]:
    """This worker's tensor-parallel rank and group size ((0, 1) before distributed init)."""
    from vllm.distributed import parallel_state as ps

    if getattr(ps, "_TP", None) is None:
        return 0, 1
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def vllm_series() -> str:
    import vllm

    return ".".join(vllm.__version__.split(".")[:2])


def custom_slot_owner() -> str | None:
    """The class path registered in vLLM's CUSTOM slot, if any."""
    return _ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM)


def register() -> None:
    """Puts FireAttnBackend into the CUSTOM slot and installs the FIREATTN name. Idempotent."""
    owner = custom_slot_owner()
    if owner is not None and owner != BACKEND_CLASS_PATH:
        raise RuntimeError(
            f"vllm-fireattn: vLLM's CUSTOM attention-backend slot is already registered to {owner!r} "
            f"by another plugin, and {BACKEND_NAME} needs that slot. Uninstall or disable the other "
            f"plugin, or load only this one with VLLM_PLUGINS=fireattn."
        )
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
    install_name_alias()
    install_skip_policy_hook()


def fireattn_selected(vllm_config) -> bool:
    """Whether the config asks for FIREATTN (vLLM's CUSTOM slot, held by vllm-fireattn)."""
    attn = getattr(vllm_config, "attention_config", None)
    wanted = [getattr(attn, "backend", None), *(getattr(attn, "backend_per_kind", None) or {}).values()]
    return AttentionBackendEnum.CUSTOM in wanted and custom_slot_owner() == BACKEND_CLASS_PATH


def install_skip_policy_hook() -> bool:
    """Wraps EngineArgs.create_engine_config so the `auto` skip policy (vllm_fireattn/policy.py)
    edits kv_cache_dtype_skip_layers once, in the engine process, before executors size KV pages
    (as vLLM's TurboQuant does with its boundary layers). Idempotent; returns whether installed."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_fireattn_hook", False):
        return True
    if vllm_series() not in SUPPORTED_VLLM_SERIES:
        return False

    def create_engine_config(self, *args, **kwargs):
        from vllm_fireattn.policy import apply_auto_skip
        from vllm_fireattn.settings import resolve

        config = original(self, *args, **kwargs)
        if fireattn_selected(config):
            apply_auto_skip(config, resolve(getattr(config, "additional_config", None)))
        return config

    create_engine_config._fireattn_hook = True
    EngineArgs.create_engine_config = create_engine_config
    return True


def install_name_alias() -> bool:
    """Makes AttentionBackendEnum['FIREATTN'] return CUSTOM. Returns whether the shim is active."""
    meta = type(AttentionBackendEnum)
    if getattr(meta, "_fireattn_alias", False):
        return True
    series = vllm_series()
    original = meta.__dict__.get("__getitem__")
    if series not in SUPPORTED_VLLM_SERIES or original is None:
        logger.warning(
            "vllm-fireattn: vLLM %s is not a tested series %s; the %s name is not installed. "
            "Select the backend as CUSTOM (--attention-backend CUSTOM).",
            series, SUPPORTED_VLLM_SERIES, BACKEND_NAME,
        )
        return False

    def __getitem__(cls, name):
        if cls is AttentionBackendEnum and isinstance(name, str) and name.upper() == BACKEND_NAME:
            owner = custom_slot_owner()
            if owner != BACKEND_CLASS_PATH:
                raise ValueError(
                    f"Attention backend {BACKEND_NAME} is unavailable: vLLM's CUSTOM slot holds "
                    f"{owner!r}, not vllm-fireattn's {BACKEND_CLASS_PATH!r} (another plugin took it)."
                )
            name = "CUSTOM"
        return original(cls, name)

    meta.__getitem__ = __getitem__
    meta._fireattn_alias = True
    return True
