"""The FIREATTN KV calibration file: per-layer, per-KV-head absmax of post-RoPE K, V and Q.

One safetensors file. Tensors `k_absmax`, `v_absmax`, `q_absmax`: float32 [num_layers,
num_kv_heads] over all KV heads of the model (before tensor parallelism; Q's absmax is the max over
the query heads of each KV head's group). Optional `attn_fp8_rel_err`: float32 [num_layers], the
relative L2 change of each layer's attention output when its K/V go through e4m3 with these scales
(the auto skip policy's sensitivity measure). Its metadata entry "fireattn" is a JSON object:
{format, version, tool_version, model, model_type, num_layers, num_kv_heads, num_q_heads,
head_dim, fp8_format, samples, tokens, seq_len, data}. Scales are HEADROOM * absmax / 448: the
largest value seen maps to half of e4m3's largest, because new text exceeds the calibration set's
absmax (by up to 1.45x on SmolLM2) and saturation costs far more than rounding, while e4m3's
relative precision is the same anywhere in its normal range.

Made by `python -m vllm_fireattn.calibrate`; read by the backend when scales="calibration".
Imports nothing from vLLM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "fireattn-kv-calibration"
VERSION = 1
FP8_MAX = 448.0
HEADROOM = 2.0
TENSORS = ("k_absmax", "v_absmax", "q_absmax")


class CalibrationError(ValueError):
    """The calibration file is malformed or does not match the model."""


@dataclass
class Calibration:
    k_absmax: torch.Tensor  # [num_layers, num_kv_heads] float32
    v_absmax: torch.Tensor
    q_absmax: torch.Tensor
    meta: dict
    attn_error: torch.Tensor | None = None  # [num_layers] or None

    @property
    def num_layers(self) -> int:
        return int(self.k_absmax.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.k_absmax.shape[1])

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int, source: str = "") -> None:
        """Refuses a file made for another model (layers, KV heads or head size differ)."""
        want = {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        bad = {k: (self.meta.get(k), v) for k, v in want.items() if self.meta.get(k) != v}
        if bad:
            detail = ", ".join(f"{k}: file {f} vs model {m}" for k, (f, m) in bad.items())
            raise CalibrationError(f"calibration file {source or ''} was made for model "
                                   f"{self.meta.get('model')!r} and does not match this model ({detail})")

    def scales(self, tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
        """{"k", "v", "q"}: float32 [num_layers, local KV heads] scales for one tensor-parallel rank.

        vLLM's head split: with at least tp_size KV heads, rank r holds heads
        [r * n, (r + 1) * n) (n = heads / tp_size); with fewer, heads are replicated and rank r holds
        head r // (tp_size / heads). A head that never saw a nonzero value gets scale 1.0.
        """
        h = self.num_kv_heads
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise CalibrationError(f"tensor-parallel rank {tp_rank} of size {tp_size} is invalid")
        if h >= tp_size:
            if h % tp_size:
                raise CalibrationError(f"{h} KV heads do not split over tensor_parallel_size {tp_size}")
            n = h // tp_size
            heads = list(range(tp_rank * n, (tp_rank + 1) * n))
        else:
            if tp_size % h:
                raise CalibrationError(f"{h} KV heads do not replicate over tensor_parallel_size {tp_size}")
            heads = [tp_rank // (tp_size // h)]
        return {name: scales_from_absmax(absmax[:, heads])
                for name, absmax in (("k", self.k_absmax), ("v", self.v_absmax), ("q", self.q_absmax))}


def scales_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """HEADROOM * absmax / 448 (the largest value seen maps to 448 / HEADROOM); 1.0 where nothing
    was seen."""
    a = absmax.float()
    return torch.where(a > 0, HEADROOM * a / FP8_MAX, torch.ones_like(a))


def save(path: str | Path, k_absmax: torch.Tensor, v_absmax: torch.Tensor, q_absmax: torch.Tensor,
         meta: dict, attn_error: torch.Tensor | None = None) -> None:
    from safetensors.torch import save_file

    shapes = {tuple(t.shape) for t in (k_absmax, v_absmax, q_absmax)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise CalibrationError(f"k/v/q absmax must share one [num_layers, num_kv_heads] shape, got {shapes}")
    meta = dict(meta, format=FORMAT, version=VERSION, fp8_format="e4m3")
    tensors = {"k_absmax": k_absmax, "v_absmax": v_absmax, "q_absmax": q_absmax}
    if attn_error is not None:
        if tuple(attn_error.shape) != (k_absmax.shape[0],):
            raise CalibrationError(f"attn_fp8_rel_err must be [num_layers], got {tuple(attn_error.shape)}")
        tensors["attn_fp8_rel_err"] = attn_error
    save_file({k: v.detach().float().cpu().clone() for k, v in tensors.items()}, str(path),
              metadata={"fireattn": json.dumps(meta, sort_keys=True)})


def load(path: str | Path) -> Calibration:
    from safetensors import safe_open

    path = str(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("fireattn")
            tensors = {name: f.get_tensor(name) for name in TENSORS + ("attn_fp8_rel_err",) if name in f.keys()}
    except Exception as e:  # safetensors raises several types for non-safetensors input
        raise CalibrationError(f"{path}: not a readable safetensors file ({e})") from e
    if raw_meta is None:
        raise CalibrationError(f"{path}: no 'fireattn' metadata; make the file with python -m vllm_fireattn.calibrate")
    meta = json.loads(raw_meta)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CalibrationError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                               f"expected {FORMAT!r} version {VERSION}")
    missing = [n for n in TENSORS if n not in tensors]
    if missing:
        raise CalibrationError(f"{path}: missing tensors {missing}")
    cal = Calibration(tensors["k_absmax"], tensors["v_absmax"], tensors["q_absmax"], meta,
                      tensors.get("attn_fp8_rel_err"))
    shape = (meta.get("num_layers"), meta.get("num_kv_heads"))
    for name in TENSORS:
        t = tensors[name]
        if tuple(t.shape) != shape or not torch.isfinite(t).all() or (t < 0).any():
            raise CalibrationError(f"{path}: {name} must be finite, non-negative, of shape {shape}; "
                                   f"got {tuple(t.shape)}")
    return cal
