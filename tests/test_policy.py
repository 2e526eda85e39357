"""CPU: the `auto` skip-layer policy (which layers keep a BF16 KV cache) and its engine hook."""
import json
from types import SimpleNamespace

import torch

from vllm_fireattn import calibration
from vllm_fireattn.bench.e2e import CONFIGS
from vllm_fireattn.policy import apply_auto_skip, auto_skip_layers, layer_windows
from vllm_fireattn.settings import resolve


def _text_config(name):
    cfg = json.loads((CONFIGS / name / "config.json").read_text())
    return SimpleNamespace(**cfg.get("text_config", cfg))


def test_layer_windows_for_the_shipped_configs_and_patterns():
    gemma = layer_windows(_text_config("gemma3-12b-text"))
    assert len(gemma) == 48 and gemma.count(None) == 8 and set(gemma) == {None, 1024}
    assert layer_windows(_text_config("llama31-8b")) == [None] * 32
    pattern = SimpleNamespace(num_hidden_layers=6, sliding_window=512, sliding_window_pattern=3)
    assert layer_windows(pattern) == [512, 512, None, 512, 512, None]
    mistral = SimpleNamespace(num_hidden_layers=3, sliding_window=4096)
    assert layer_windows(mistral) == [4096] * 3


def test_auto_skip_layers_by_window_and_by_error():
    windows = [128, None, 512, None]
    assert auto_skip_layers(windows, 256) == {0: "sliding window 128 <= 256"}
    got = auto_skip_layers(windows, 256, errors=[0.01, 0.3, 0.02, 0.05], error_max=0.1)
    assert set(got) == {0, 1} and got[1] == "FP8 attention error 0.300 > 0.1"


def _vllm_config(skip, dtype="fp8", window=128):
    text = SimpleNamespace(num_hidden_layers=4, sliding_window=window,
                           layer_types=["sliding_attention", "full_attention"] * 2)
    return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=dtype, kv_cache_dtype_skip_layers=list(skip)),
                           model_config=SimpleNamespace(hf_text_config=text))


def test_apply_auto_skip_adds_to_the_users_layers(tmp_path):
    cfg = _vllm_config(["3"])
    chosen = apply_auto_skip(cfg, resolve({"fireattn": {"skip_policy": "auto"}}, {}))
    assert set(chosen) == {0, 2} and cfg.cache_config.kv_cache_dtype_skip_layers == ["3", "0", "2"]
    for settings, dtype in ((resolve({}, {}), "fp8"),  # policy none
                            (resolve({"fireattn": {"skip_policy": "auto"}}, {}), "auto")):  # BF16 cache
        cfg = _vllm_config(["3"], dtype)
        assert apply_auto_skip(cfg, settings) == {}
        assert cfg.cache_config.kv_cache_dtype_skip_layers == ["3"]


def test_apply_auto_skip_uses_the_calibrated_error(tmp_path):
    path = tmp_path / "cal.safetensors"
    ones = torch.ones(4, 2)
    calibration.save(path, ones, ones, ones, {"model": "m", "num_layers": 4, "num_kv_heads": 2, "head_dim": 64},
                     attn_error=torch.tensor([0.01, 0.5, 0.02, 0.03]))
    settings = resolve({"fireattn": {"skip_policy": "auto", "scales": "calibration", "calibration_file": str(path),
                                     "skip_window_max": 0}}, {})
    cfg = _vllm_config([], window=1024)
    assert set(apply_auto_skip(cfg, settings)) == {1}
    assert cfg.cache_config.kv_cache_dtype_skip_layers == ["1"]


def test_the_engine_config_hook_is_installed_once():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_fireattn.backend import _compat

    _compat.register()
    hooked = EngineArgs.create_engine_config
    assert getattr(hooked, "_fireattn_hook", False)
    _compat.register()
    assert EngineArgs.create_engine_config is hooked
    cfg = SimpleNamespace(attention_config=SimpleNamespace(backend=_compat.AttentionBackendEnum.CUSTOM,
                                                           backend_per_kind={}))
    assert _compat.fireattn_selected(cfg)
    cfg.attention_config.backend = None
    assert not _compat.fireattn_selected(cfg)
