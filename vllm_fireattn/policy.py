"""The `auto` skip-layer policy: which layers keep a BF16 KV cache when the rest use FP8.

Two reasons to keep a layer in BF16:
- window: a sliding-window layer whose window is at most `skip_window_max` tokens. Its cache is
  small, so FP8 saves little memory and bandwidth, while the per-step FP8 overhead stays. vLLM's
  FP8 KV-cache study found window 128 worth skipping and 512 worth quantizing; the default
  threshold, 256, sits between and is provisional until FIREATTN's own e2e sweep measures it.
- error: with a calibration file that recorded it, a layer whose attention output changes by more
  than `skip_error_max` (relative L2) when its K/V go through FP8 with the calibrated scales. The
  default, 0.1, is about 1.25x the median layer of SmolLM2-135M. Measured: median 0.079, range
  0.017-0.113 over its 30 layers (benchmarks/calibration/README.md). At 0.1 the policy keeps that
  model's two worst layers in BF16.

`apply_auto_skip(vllm_config)` runs once in the engine process, right after vLLM builds its
config (hooked in backend/_compat.py), and adds the chosen layer indices to vLLM's
`kv_cache_dtype_skip_layers`, next to any the user gave; vLLM then gives those layers BF16 pages.
Imports nothing from vLLM itself.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm.fireattn")


def layer_windows(hf_text_config) -> list[int | None]:
    """Per layer: the sliding window in tokens, or None for full attention."""
    n = hf_text_config.num_hidden_layers
    window = getattr(hf_text_config, "sliding_window", None)
    types = getattr(hf_text_config, "layer_types", None)
    if not window:
        return [None] * n
    if types:  # e.g. Gemma-3, Qwen: "sliding_attention" / "full_attention" per layer
        return [window if t == "sliding_attention" else None for t in types][:n]
    pattern = getattr(hf_text_config, "sliding_window_pattern", None)
    if pattern:  # every pattern-th layer is global
        return [None if (i + 1) % pattern == 0 else window for i in range(n)]
    return [window] * n  # e.g. Mistral: every layer slides


def auto_skip_layers(windows: list[int | None], window_max: int, errors=None,
                     error_max: float | None = None) -> dict[int, str]:
    """{layer index: reason} of the layers that keep BF16."""
    chosen = {}
    for i, w in enumerate(windows):
        if w is not None and w <= window_max:
            chosen[i] = f"sliding window {w} <= {window_max}"
    if errors is not None and error_max is not None:
        for i, e in enumerate(errors):
            if e > error_max and i not in chosen:
                chosen[i] = f"FP8 attention error {e:.3f} > {error_max}"
    return chosen


def apply_auto_skip(vllm_config, settings) -> dict[int, str]:
    """Adds the auto policy's layers to vllm_config.cache_config.kv_cache_dtype_skip_layers (called
    only for configs that select FIREATTN)."""
    cache = vllm_config.cache_config
    if settings.skip_policy != "auto" or not str(cache.cache_dtype).startswith("fp8"):
        return {}
    text = vllm_config.model_config.hf_text_config
    errors = None
    if settings.calibration_file:
        from vllm_fireattn import calibration

        cal = calibration.load(settings.calibration_file)
        errors = None if cal.attn_error is None else cal.attn_error.tolist()
    chosen = auto_skip_layers(layer_windows(text), settings.skip_window_max, errors, settings.skip_error_max)
    existing = list(cache.kv_cache_dtype_skip_layers or [])
    added = [str(i) for i in sorted(chosen) if str(i) not in existing]
    cache.kv_cache_dtype_skip_layers = existing + added
    if chosen:
        logger.info("FIREATTN skip policy 'auto': layers keeping a BF16 KV cache: %s",
                    "; ".join(f"{i} ({r})" for i, r in sorted(chosen.items())))
    else:
        logger.info("FIREATTN skip policy 'auto': every layer uses the FP8 KV cache")
    return chosen
