"""FP8 e4m3 quantization: stored = sat_rne(x / scale), per KV head (DESIGN.md numerics)."""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_CACHE_DTYPES = (torch.uint8, FP8_DTYPE)  # vLLM hands FP8 caches over as uint8
FP8_MAX = 448.0


def _per_head(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-tensor ([] / [1]) or per-head ([H]) scale over [..., H, D]."""
    s = scale.to(device=like.device, dtype=torch.float32)
    return s.reshape(()) if s.numel() == 1 else s.reshape(-1, 1)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., H, D] (any float dtype) -> float8_e4m3fn, saturating round-to-nearest-even.

    The division is done in float32, exactly as the kernels do it, so results match bit for bit.
    """
    y = x.to(torch.float32) / _per_head(scale, x)
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """float8_e4m3fn (or its uint8 bits) [..., H, D] -> x8 * scale in `dtype`."""
    if x8.dtype == torch.uint8:
        x8 = x8.view(FP8_DTYPE)
    return x8.to(dtype) * _per_head(scale, x8).to(dtype)


def round_through_fp8(x: torch.Tensor) -> torch.Tensor:
    """The value an FP8 tensor-core operand holds for x (no scale): float -> e4m3 -> float."""
    return x.to(torch.float32).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(x.dtype)
