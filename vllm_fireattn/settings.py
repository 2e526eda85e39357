"""FIREATTN's own settings: vLLM's `--additional-config '{"fireattn": {...}}'` and FIREATTN_*
environment variables (vLLM's `--kv-cache-dtype` values are closed, so FP8 itself is still
`--kv-cache-dtype fp8`).

| key (additional-config) | environment variable        | values                                  | default      |
|-------------------------|-----------------------------|-----------------------------------------|--------------|
| scales                  | FIREATTN_SCALES             | checkpoint, calibration, one            | checkpoint   |
| calibration_file        | FIREATTN_CALIBRATION_FILE   | path made by python -m vllm_fireattn.calibrate | none  |
| decode_splits           | FIREATTN_DECODE_SPLITS      | auto, or an integer 1..128              | auto         |
| skip_policy             | FIREATTN_SKIP_POLICY        | none, auto (vllm_fireattn/policy.py)    | none         |
| skip_window_max         | FIREATTN_SKIP_WINDOW_MAX    | integer >= 0 (tokens)                   | 256          |
| skip_error_max          | FIREATTN_SKIP_ERROR_MAX     | number > 0 (relative L2)                | 0.1          |
| promote_every           | FIREATTN_PROMOTE_EVERY      | integer 0..1024 (0: never)              | 1            |

scales: "checkpoint" uses what vLLM loaded (per-tensor or compressed-tensors attn_head scales,
1.0 when the checkpoint has none); "calibration" uses the per-layer, per-KV-head scales of
`calibration_file` (2 x absmax / 448 of post-RoPE K, V and Q; vllm_fireattn/calibration.py);
"one" forces 1.0, the documented uncalibrated worst case. promote_every: KV tiles between
promotions of the FP8 prefill's tensor-core PV accumulator into its FP32 accumulator (two-level
accumulation); 1 is the most accurate and, on an H200, also the fastest
(benchmarks/results/h200/README.md); head_dim 256 layers of any cache dtype take 0 or 1. The additional-config
value wins over the environment; every value is validated when the backend starts, and a bad one
is an error that names it and the accepted ones.
Imports nothing from vLLM.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

SCALE_SOURCES = ("checkpoint", "calibration", "one")
SKIP_POLICIES = ("none", "auto")
MAX_DECODE_SPLITS = 128
MAX_PROMOTE_EVERY = 1024
ENV = {"scales": "FIREATTN_SCALES", "calibration_file": "FIREATTN_CALIBRATION_FILE",
       "decode_splits": "FIREATTN_DECODE_SPLITS", "skip_policy": "FIREATTN_SKIP_POLICY",
       "skip_window_max": "FIREATTN_SKIP_WINDOW_MAX", "skip_error_max": "FIREATTN_SKIP_ERROR_MAX",
       "promote_every": "FIREATTN_PROMOTE_EVERY"}


class FireAttnConfigError(ValueError):
    """A FIREATTN setting has a bad value; the message names it and the accepted values."""


@dataclass(frozen=True)
class FireAttnSettings:
    scales: str = "checkpoint"
    calibration_file: str | None = None
    decode_splits: int | None = None  # None: the scheduler's plan ("auto")
    skip_policy: str = "none"
    skip_window_max: int = 256
    skip_error_max: float = 0.1
    promote_every: int = 1

    def check_head_dim(self, head_dim: int) -> None:
        """head_dim 256 promotes per 64-column slice: every tile or never."""
        if head_dim == 256 and self.promote_every > 1:
            raise FireAttnConfigError(f"promote_every={self.promote_every}: head_dim 256 layers accept 0 (never) "
                                      "or 1")

    def describe(self) -> str:
        d = asdict(self)
        d["decode_splits"] = "auto" if self.decode_splits is None else self.decode_splits
        return ", ".join(f"{k}={v}" for k, v in d.items())


def _where(key: str, from_config: bool) -> str:
    return f'--additional-config fireattn.{key}' if from_config else ENV[key]


def _parse_splits(raw: Any, where: str) -> int | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "auto"):
        return None
    return _parse_number(raw, int, 1, f"'auto' or an integer 1..{MAX_DECODE_SPLITS}", where, MAX_DECODE_SPLITS)


def resolve(additional_config: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> FireAttnSettings:
    """Settings from vLLM's additional_config (its "fireattn" entry) over FIREATTN_* variables."""
    environ = os.environ if environ is None else environ
    section = (additional_config or {}).get("fireattn", {})
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise FireAttnConfigError(f"--additional-config fireattn must be a JSON object, got {section!r}")
    known = {f.name for f in fields(FireAttnSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise FireAttnConfigError(f"--additional-config fireattn: unknown keys {unknown}; accepted keys: "
                                  f"{sorted(known)}")
    raw, origin = {}, {}
    for key in known:
        if key in section:
            raw[key], origin[key] = section[key], True
        elif environ.get(ENV[key], "").strip():
            raw[key], origin[key] = environ[ENV[key]].strip(), False

    scales = raw.get("scales", "checkpoint")
    if scales not in SCALE_SOURCES:
        raise FireAttnConfigError(f"{_where('scales', origin['scales'])}={scales!r}: accepted values are "
                                  f"{list(SCALE_SOURCES)}")
    calibration_file = raw.get("calibration_file")
    if calibration_file is not None:
        calibration_file = str(calibration_file)
        if not os.path.isfile(calibration_file):
            raise FireAttnConfigError(f"{_where('calibration_file', origin['calibration_file'])}="
                                      f"{calibration_file!r}: no such file")
    if scales == "calibration" and calibration_file is None:
        raise FireAttnConfigError(f"{_where('scales', origin['scales'])}='calibration' needs a calibration file "
                                  f"(--additional-config fireattn.calibration_file or "
                                  f"{ENV['calibration_file']}; make one with python -m vllm_fireattn.calibrate)")
    if scales != "calibration" and calibration_file is not None:
        raise FireAttnConfigError(f"a calibration file was given but scales={scales!r}; set scales to "
                                  f"'calibration' to use it")
    splits = _parse_splits(raw.get("decode_splits"), _where("decode_splits", origin.get("decode_splits", True)))
    policy = raw.get("skip_policy", "none")
    if policy not in SKIP_POLICIES:
        raise FireAttnConfigError(f"{_where('skip_policy', origin['skip_policy'])}={policy!r}: accepted values are "
                                  f"{list(SKIP_POLICIES)}")
    window_max = _parse_number(raw.get("skip_window_max", 256), int, 0, "an integer >= 0",
                               _where("skip_window_max", origin.get("skip_window_max", True)))
    error_max = _parse_number(raw.get("skip_error_max", 0.1), float, 1e-9, "a number > 0",
                              _where("skip_error_max", origin.get("skip_error_max", True)))
    promote_every = _parse_number(raw.get("promote_every", 1), int, 0, f"an integer 0..{MAX_PROMOTE_EVERY}",
                                  _where("promote_every", origin.get("promote_every", True)), MAX_PROMOTE_EVERY)
    return FireAttnSettings(scales=scales, calibration_file=calibration_file, decode_splits=splits,
                            skip_policy=policy, skip_window_max=window_max, skip_error_max=error_max,
                            promote_every=promote_every)


def _parse_number(raw: Any, kind, minimum, accepted: str, where: str, maximum=None):
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = kind(raw)
        if kind is int and isinstance(raw, float) and raw != value:
            raise ValueError
    except (TypeError, ValueError):
        raise FireAttnConfigError(f"{where}={raw!r}: accepted values are {accepted}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise FireAttnConfigError(f"{where}={raw!r}: accepted values are {accepted}")
    return value
