"""Online serving at a latency budget (the FireAttention Mixtral study's metric): the requests/s
that `vllm serve` sustains while the median end-to-end latency of a request stays under a cutoff.

The load comes from vLLM's own generator, `vllm bench serve` (random dataset, Poisson arrivals),
at each of a list of request rates against one `vllm serve` of a dummy-weight config; its result
JSON gives the achieved request throughput and the median and p99 end-to-end latency per rate.
`throughput_at_budget` then reads the curve: the highest throughput whose median latency is at
most the cutoff, interpolated linearly between the last rate under it and the first over it.

The random dataset needs a tokenizer; the dummy configs ship none, so pass any tokenizer whose
ids fit the model's vocabulary (SmolLM2's 49k, staged by tools/smollm2.py, fits the Llama-3.1
and Gemma-3 configs but not the 32k-vocabulary head_dim-64 one).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_RATES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
DEFAULT_CUTOFFS_MS = (3000.0, 5000.0, 10000.0)


def _vllm_cli() -> list[str]:
    exe = shutil.which("vllm")
    return [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def server_command(model_dir: Path, tokenizer: str, backend: str, kv: str, skip_layers: list[str], port: int,
                   max_model_len: int, gpu_memory_utilization: float) -> list[str]:
    cmd = _vllm_cli() + ["serve", str(model_dir), "--load-format", "dummy", "--tokenizer", tokenizer,
                         "--attention-backend", backend, "--kv-cache-dtype", kv, "--port", str(port),
                         "--max-model-len", str(max_model_len), "--no-enable-prefix-caching",
                         "--gpu-memory-utilization", str(gpu_memory_utilization), "--seed", "0"]
    if skip_layers:
        cmd += ["--kv-cache-dtype-skip-layers", *skip_layers]
    return cmd


def client_command(model_dir: Path, tokenizer: str, port: int, rate: float, input_len: int, output_len: int,
                   num_prompts: int, result_dir: Path, result_name: str) -> list[str]:
    return _vllm_cli() + ["bench", "serve", "--backend", "vllm", "--model", str(model_dir), "--tokenizer", tokenizer,
                          "--port", str(port), "--dataset-name", "random", "--random-input-len", str(input_len),
                          "--random-output-len", str(output_len), "--num-prompts", str(num_prompts),
                          "--request-rate", str(rate), "--ignore-eos", "--seed", "0",
                          "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                          "--save-result", "--result-dir", str(result_dir), "--result-filename", result_name]


def check_tokenizer_fits(tokenizer_size: int, vocab_size: int, model: str) -> None:
    """Random prompts use every id of the tokenizer; ids past the model's vocabulary would fail."""
    if tokenizer_size > vocab_size:
        raise SystemExit(f"--serve-tokenizer has {tokenizer_size} tokens, more than {model}'s vocabulary of "
                         f"{vocab_size}; use a tokenizer with at most {vocab_size} tokens")


def num_prompts_for(rate: float, seconds: float, minimum: int = 20) -> int:
    """Enough requests for `seconds` of Poisson arrivals at `rate`, and at least `minimum`."""
    return max(minimum, int(round(rate * seconds)))


def record_from_result(result: dict, rate: float) -> dict:
    """The fields of one `vllm bench serve` result JSON this report uses."""
    missing = [k for k in ("request_throughput", "median_e2el_ms", "completed") if k not in result]
    if missing:
        raise ValueError(f"vllm bench serve result lacks {missing} (was --percentile-metrics e2el passed?)")
    return dict(bench="e2e_serve", request_rate=rate, request_throughput=result["request_throughput"],
                median_e2el_ms=result["median_e2el_ms"], p99_e2el_ms=result.get("p99_e2el_ms"),
                median_ttft_ms=result.get("median_ttft_ms"), completed=result["completed"],
                failed=result.get("failed", 0))


def throughput_at_budget(points: list[dict], cutoff_ms: float) -> float | None:
    """Highest request throughput with median end-to-end latency <= cutoff_ms, interpolating
    between neighbouring rates; None when even the lowest rate is over the budget."""
    pts = sorted(points, key=lambda r: r["request_rate"])
    best = None
    for i, a in enumerate(pts):
        if a["median_e2el_ms"] > cutoff_ms:
            continue
        best = max(best or 0.0, a["request_throughput"])
        if i + 1 < len(pts) and pts[i + 1]["median_e2el_ms"] > cutoff_ms:
            b = pts[i + 1]
            frac = (cutoff_ms - a["median_e2el_ms"]) / (b["median_e2el_ms"] - a["median_e2el_ms"])
            best = max(best, a["request_throughput"] + frac * (b["request_throughput"] - a["request_throughput"]))
    return best


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 900.0) -> None:
    """Polls the server's /health until it answers; fails fast if the server process exits."""
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve did not become ready on port {port} within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(model_dir: Path, tokenizer: str, backend: str, kv: str, skip_layers: list[str], rates: list[float],
            input_len: int, output_len: int, seconds: float, port: int, gpu_memory_utilization: float,
            log_dir: Path, on_record) -> None:
    """Starts one `vllm serve`, runs `vllm bench serve` at each rate, calls on_record(record)
    after each, and stops the server."""
    from tqdm import tqdm

    log_dir.mkdir(parents=True, exist_ok=True)
    server_log = open(log_dir / f"serve_{backend}_{kv}.log", "w")
    server = subprocess.Popen(
        server_command(model_dir, tokenizer, backend, kv, skip_layers, port, input_len + output_len + 64,
                       gpu_memory_utilization), stdout=server_log, stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")})
    try:
        wait_ready(port, server)
        with tempfile.TemporaryDirectory() as tmp:
            for rate in tqdm(rates, desc=f"serve {backend} {kv}", unit="rate"):
                name = f"rate{rate:g}.json"
                n = num_prompts_for(rate, seconds)
                res = subprocess.run(client_command(model_dir, tokenizer, port, rate, input_len, output_len, n,
                                                    Path(tmp), name), capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"vllm bench serve failed at rate {rate}:\n{res.stderr[-4000:]}")
                result = json.loads((Path(tmp) / name).read_text())
                on_record(dict(record_from_result(result, rate), input_len=input_len, output_len=output_len,
                               num_prompts=n))
    finally:
        stop_server(server)
        server_log.close()
