"""Pure-PyTorch executable specification of every FIREATTN op (runs on CPU or GPU).

Same signatures, same rounding and the same cache layout as the kernels in csrc/, so tests
compare kernels against it and CPU tests can drive the backend with it.
"""
from vllm_fireattn.reference.attention import attend, decode, prefill
from vllm_fireattn.reference.cache import cache_write, gather_kv, kv_cache_shape
from vllm_fireattn.reference.quant import FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "attend",
    "cache_write",
    "decode",
    "dequantize_fp8",
    "gather_kv",
    "kv_cache_shape",
    "prefill",
    "quantize_fp8",
]
