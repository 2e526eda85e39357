"""What each attention layer of a loaded model really runs: impl class, KV cache dtype, window,
tensor-parallel rank, and FIREATTN's per-head q/k/v scales.

Meant for `LLM.apply_model(layer_report)`. It lives in the package, not in a script, because with
tensor_parallel_size > 1 vLLM pickles the function to worker processes by reference: a function
defined in a script's __main__ does not resolve there ("not the same object as
__main__._inspect_layers", seen on 2 H200s).
"""
from __future__ import annotations


def layer_report(model) -> list[dict]:
    from vllm_fireattn.backend._compat import tensor_parallel_rank_and_size

    rank = tensor_parallel_rank_and_size()[0]
    layers = []
    for name, module in model.named_modules():
        impl = getattr(module, "impl", None)
        if impl is not None and hasattr(module, "kv_cache_dtype"):
            scales = impl._scales(module) if hasattr(impl, "_scales") else None  # FIREATTN's q/k/v scales
            layers.append({
                "name": name,
                "impl": f"{type(impl).__module__}.{type(impl).__qualname__}",
                "kv_cache_dtype": module.kv_cache_dtype,
                "sliding_window": getattr(impl, "sliding_window", None),
                "tp_rank": rank,
                "num_kv_heads": getattr(impl, "num_kv_heads", None),
                "scales": None if scales is None else [s.float().flatten().tolist() for s in scales],
            })
    return layers
