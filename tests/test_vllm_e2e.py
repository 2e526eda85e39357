"""GPU: FIREATTN inside vLLM 0.26 (each engine in its own process via e2e_runner.py).

Dummy-weight configs check that every layer runs our impl, CUDA graphs on (full graphs for
decode), for head_dim 128 (Llama-3.1-8B), 64, and 256 with sliding-window layers (Gemma-3-12B,
with and without the sliding-window skip policy), FP8 and BF16 caches, and both model runners.
The real SmolLM2-135M weights (tools/smollm2.py; FIREATTN_SMOLLM2_DIR, default
/tmp/smollm2-hf) check accuracy: BF16 greedy tokens equal FLASH_ATTN's; the FP8 prompt-logprob
deviation from BF16 stays within the bound below; spec decode leaves greedy output unchanged;
and `vllm serve` answers a completion request.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from helpers import run_engine
from vllm_fireattn.bench.serve_budget import stop_server, wait_ready

pytestmark = [pytest.mark.gpu, pytest.mark.vllm_gpu]

HERE = Path(__file__).parent
CONFIGS = HERE.parent / "vllm_fireattn" / "bench" / "configs"  # the e2e benchmark's model configs
SMOLLM2 = Path(os.environ.get("FIREATTN_SMOLLM2_DIR", "/tmp/smollm2-hf"))
IMPL = "vllm_fireattn.backend.backend.FireAttnImpl"

# Accuracy is measured against ground truth: float32 transformers logprobs of every prompt
# token of a ~2.5k-token text. Error = mean |logprob(backend) - logprob(fp32)|.
# Bounds: FIREATTN's error is no worse than FLASH_ATTN's (FA3) with the same cache dtype, up to
# 10% + a small noise term; and the FP8 error, with vLLM's uncalibrated scales of 1.0 (the
# documented worst case), stays under FP8_MEAN_ABS_BOUND nats.
FP8_MEAN_ABS_BOUND = 0.3
NEAR_TIE_NATS = 0.25


def _dummy_prompts(vocab: int = 30000) -> str:
    lens = [5, 300, 1500]
    return json.dumps([[(i * 7919 + n) % vocab + 10 for i in range(n)] for n in lens])


@pytest.mark.parametrize("kv,skip", [("fp8", None), ("auto", None), ("fp8", "sliding_window")],
                         ids=["fp8", "bf16", "fp8-skip-sliding"])
@pytest.mark.parametrize("config", ["llama31-8b", "llama-hd64", "gemma3-12b-text"])
def test_dummy_configs_generate_with_cuda_graphs(config, kv, skip):
    if skip and config != "gemma3-12b-text":
        pytest.skip("the skip policy matters for the sliding-window model")
    args = ["--model", str(CONFIGS / config), "--dummy", "--kv-cache-dtype", kv,
            "--prompt-token-ids", _dummy_prompts(), "--max-tokens", "24"]
    if skip:
        args += ["--skip-layers", skip]
    res = run_engine(*args)
    layers = res["layers"]
    assert layers and all(layer["impl"] == IMPL for layer in layers), layers[:3]
    windows = [layer["sliding_window"] for layer in layers]
    dtypes = [layer["kv_cache_dtype"] for layer in layers]
    if config == "gemma3-12b-text":
        assert windows.count(None) == 8 and set(windows) == {None, 1024}
        if skip:  # sliding layers keep BF16, full layers FP8: two cache dtypes in one model
            assert all(d == ("auto" if w else "fp8") for d, w in zip(dtypes, windows))
    if not skip:
        assert set(dtypes) == {kv}
    for out in res["outputs"]:
        assert len(out["token_ids"]) == 24
        assert all(lp == lp and lp > -1e9 for lp in out["logprobs"])  # finite, not NaN


def test_skip_policy_auto_and_scale_settings_in_an_engine():
    """FIREATTN settings through --additional-config: the auto policy keeps Gemma-3's 1024-token
    sliding layers in BF16 (threshold 1024) while global layers use FP8, and scales='one' runs."""
    cfg = json.dumps({"fireattn": {"skip_policy": "auto", "skip_window_max": 1024, "scales": "one"}})
    res = run_engine("--model", str(CONFIGS / "gemma3-12b-text"), "--dummy", "--kv-cache-dtype", "fp8",
                     "--prompt-token-ids", _dummy_prompts(), "--max-tokens", "8", "--additional-config", cfg)
    layers = res["layers"]
    assert layers and all(layer["impl"] == IMPL for layer in layers)
    assert all(layer["kv_cache_dtype"] == ("auto" if layer["sliding_window"] else "fp8") for layer in layers)
    assert all(lp == lp and lp > -1e9 for out in res["outputs"] for lp in out["logprobs"])


def test_model_runner_v1_also_works():
    res = run_engine("--model", str(CONFIGS / "llama31-8b"), "--dummy", "--kv-cache-dtype", "fp8",
                     "--prompt-token-ids", _dummy_prompts(), env={"VLLM_USE_V2_MODEL_RUNNER": "0"})
    assert all(layer["impl"] == IMPL for layer in res["layers"])
    assert all(len(o["token_ids"]) == 16 for o in res["outputs"])


def _smollm2():
    if not (SMOLLM2 / "config.json").exists():
        pytest.skip(f"SmolLM2 weights not staged at {SMOLLM2} (python tools/smollm2.py convert ...)")
    return str(SMOLLM2)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Here is a short story about a lighthouse keeper:",
    "The three primary colors are",
]


def _real(backend: str, kv: str, **extra) -> dict:
    text = (HERE / "data" / "apache-2.0.txt").read_text()
    args = ["--model", _smollm2(), "--backend", backend, "--kv-cache-dtype", kv, "--prompt-logprobs",
            "--prompts", json.dumps(PROMPTS + [text]), "--max-tokens", "48", "--top-logprobs", "5"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return run_engine(*args)


def _mean_abs_prompt_delta(a: dict, b: dict) -> float:
    pa, pb = a["outputs"][-1]["prompt_logprobs"][1:], b["outputs"][-1]["prompt_logprobs"][1:]
    assert len(pa) == len(pb) > 2000
    return sum(abs(x - y) for x, y in zip(pa, pb)) / len(pa)


@pytest.fixture(scope="module")
def smollm2_runs():
    runs = {(be, kv): _real(be, kv) for be in ("FIREATTN", "FLASH_ATTN") for kv in ("auto", "fp8")}
    ids = [o["prompt_token_ids"] for o in runs[("FLASH_ATTN", "auto")]["outputs"]]
    runs["fp32"] = run_engine("--model", _smollm2(), "--hf-reference", "--prompt-token-ids", json.dumps(ids))
    return runs


def test_smollm2_bf16_greedy_matches_flash_attn(smollm2_runs):
    """Same greedy tokens as FLASH_ATTN BF16; where they part, it must be at a near-tie of
    FLASH_ATTN's own distribution, not a real disagreement. Two correct BF16 kernels differ in
    rounding (FA3 rounds P to BF16, ours keeps it in FP32): measured on an H200, their prompt
    logprobs differ by 0.043 nats on average while both are 0.036 from the FP32 truth, so a
    top-2 margin under NEAR_TIE_NATS is within that noise."""
    ours, fa = smollm2_runs[("FIREATTN", "auto")], smollm2_runs[("FLASH_ATTN", "auto")]
    assert all(layer["impl"] == IMPL for layer in ours["layers"])
    assert "Paris" in ours["outputs"][0]["text"]
    for o, f, prompt in zip(ours["outputs"], fa["outputs"], PROMPTS):
        diff = next((i for i, (a, b) in enumerate(zip(o["token_ids"], f["token_ids"])) if a != b), None)
        if diff is None:
            continue
        top = f["top_logprobs"][diff]
        mine = str(o["token_ids"][diff])
        print(f"{prompt!r} diverges at token {diff}: {o['text']!r} vs {f['text']!r}")
        assert mine in top and max(top.values()) - top[mine] <= NEAR_TIE_NATS, (
            f"{prompt!r}: divergence at token {diff} is not a near-tie: {top}, ours {mine}")


def test_smollm2_accuracy_vs_fp32_no_worse_than_flash_attn(smollm2_runs):
    truth = smollm2_runs["fp32"]
    err = {k: _mean_abs_prompt_delta(v, truth) for k, v in smollm2_runs.items() if k != "fp32"}
    print("mean |logprob - fp32 logprob| over prompt tokens: "
          + ", ".join(f"{be} {kv}: {e:.4f}" for (be, kv), e in err.items()))
    assert err[("FIREATTN", "auto")] <= 1.1 * err[("FLASH_ATTN", "auto")] + 0.002
    assert err[("FIREATTN", "fp8")] <= 1.1 * err[("FLASH_ATTN", "fp8")] + 0.005
    assert err[("FIREATTN", "fp8")] <= FP8_MEAN_ABS_BOUND


WINDOWS = HERE / "data" / "smollm2_fp8_windows.json"  # 16 x 1024 held-out token ids (see its "about")
OCTAVE_OFFSETS = [2 ** (j / 4) for j in range(4)]


def _window_errors(run: dict, truth: dict) -> list[float]:
    """Mean |prompt logprob - FP32| of each window (the first token has no logprob)."""
    errs = []
    for a, b in zip(run["outputs"], truth["outputs"]):
        pa, pb = a["prompt_logprobs"][1:], b["prompt_logprobs"][1:]
        assert len(pa) == len(pb) > 1000
        errs.append(sum(abs(x - y) for x, y in zip(pa, pb)) / len(pa))
    return errs


def test_smollm2_calibrated_scales_no_worse_than_uncalibrated(tmp_path):
    """Issue 5's target: calibrated per-KV-head scales (the committed SmolLM2 file) no worse than
    1.0, as mean |prompt logprob - FP32| over 16 held-out windows, paired per window.

    One text and one scale per choice cannot decide it: e4m3's grid repeats every factor of 2, so
    where values fall on it (log2(scale) mod 1) moves the error by more than the difference under
    test, in the same direction for every text (benchmarks/calibration/README.md). So each choice
    runs at 4 offsets spanning an octave (calibrated x c against uniform c, c = 2^(j/4)) and the
    per-window differences are averaged over them. CPU emulation: -0.0009 +- 0.0008 nats;
    H200 through vLLM (2026-11-22): -0.0017 +- 0.0009 nats.
    Runs 8 engines plus the FP32 reference: run it alone on a 10-minute device slot."""
    from vllm_fireattn import calibration

    model = _smollm2()
    cal = calibration.load(HERE.parent / "benchmarks" / "calibration" / "smollm2-135m_pg-essays-16k.safetensors")
    truth = run_engine("--model", model, "--hf-reference", "--prompt-token-ids", f"@{WINDOWS}")
    half_range = calibration.FP8_MAX / calibration.HEADROOM  # absmax that maps to scale 1.0
    diffs = None
    for c in OCTAVE_OFFSETS:
        errs = {}
        for name, absmax in (("calibrated", [t * c for t in (cal.k_absmax, cal.v_absmax, cal.q_absmax)]),
                             ("uniform", [cal.k_absmax * 0 + half_range * c] * 3)):
            path = tmp_path / f"{name}_{c:.4f}.safetensors"
            calibration.save(path, *absmax, cal.meta)
            run = run_engine("--model", model, "--backend", "FIREATTN", "--kv-cache-dtype", "fp8", "--prompt-logprobs",
                             "--prompt-token-ids", f"@{WINDOWS}", "--max-tokens", "1", "--max-model-len", "2048",
                             "--additional-config", json.dumps(
                                 {"fireattn": {"scales": "calibration", "calibration_file": str(path)}}))
            errs[name] = _window_errors(run, truth)
        d = [(a - b) / len(OCTAVE_OFFSETS) for a, b in zip(errs["calibrated"], errs["uniform"])]
        diffs = d if diffs is None else [x + y for x, y in zip(diffs, d)]
        print(f"offset {c:.3f}: calibrated {sum(errs['calibrated']) / len(d):.4f}, "
              f"uniform {sum(errs['uniform']) / len(d):.4f}")
    n = len(diffs)
    mean = sum(diffs) / n
    se = (sum((x - mean) ** 2 for x in diffs) / (n - 1) / n) ** 0.5
    print(f"calibrated minus 1.0, paired over {n} windows: {mean:+.4f} +- {se:.4f} nats")
    assert mean <= 2 * se + 0.002


def test_smollm2_spec_decode_keeps_greedy_output(smollm2_runs):
    spec = _real("FIREATTN", "fp8", spec_ngram=3)
    base = smollm2_runs[("FIREATTN", "fp8")]
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(spec["outputs"], base["outputs"]))
    # Verification batches differ in shape from plain decode, so FP8 rounding can flip a near-tie;
    # most prompts must still match exactly and every one must share a long prefix.
    assert same >= len(PROMPTS) - 1
    for a, b in zip(spec["outputs"], base["outputs"]):
        prefix = next((i for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y),
                      len(a["token_ids"]))
        assert prefix >= 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_fp8_answers_completion():
    model = _smollm2()
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--attention-backend", "FIREATTN",
           "--kv-cache-dtype", "fp8", "--port", str(port), "--max-model-len", "4096",
           "--gpu-memory-utilization", "0.4"]
    log = open(os.environ.get("FIREATTN_SERVE_LOG", "/tmp/fireattn-serve.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc, timeout_s=480)  # raises if the server exits or stays unhealthy
        body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 12,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        text = reply["choices"][0]["text"]
        print("vllm serve completion:", repr(text))
        assert re.search(r"\bParis\b", text), text
    finally:
        stop_server(proc, timeout_s=30)
        log.close()
