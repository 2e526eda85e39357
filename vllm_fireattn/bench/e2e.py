"""End-to-end benchmark through vLLM: the method of vLLM's FP8 KV-cache study.

  python -m vllm_fireattn.bench e2e run --model llama31-8b --backend FIREATTN --kv fp8 [--skip-layers sliding_window]
  python -m vllm_fireattn.bench e2e merge SRC_FILE_OR_DIR... [--dir benchmarks/results/e2e] [--replace]
  python -m vllm_fireattn.bench e2e report [--dir benchmarks/results/e2e] [--out docs/e2e_report.md]

`run` measures one backend x KV dtype x model in one process (one engine; pieces fit a 10-minute
GPU slot) and appends to `<dir>/<model>__<backend>__<kv>[__skip-...].json` after every point, so
an interrupted run resumes where it stopped. A file is {"envs": [...], "records": [...]}: each
record's env_index points at the environment (GPU, driver, versions, commit, command) it was
measured in, since one file's points may come from several machines and sessions (files with the
older single "env" are read as one env and converted when next saved):
- sweep: concurrency 1, input lengths 256..125k, fixed output length. One output_len-token
  request per rep: TTFT and ITL come from vLLM's per-request stats (first-token latency; last minus
  first token time over output_len - 1), or, where a vLLM build gives no stats, from wall clock (a
  1-token request for TTFT). Each point is the median of --reps requests with fresh random token
  ids (prefix caching off), measured length by length, or with --interleave in rounds of one
  request per length (drifts of the machine then do not move one length's requests together).
  FIREATTN with a BF16 cache (--kv auto) prefills on the same warp-specialized tensor-core kernel
  as FP8 (16-bit wgmma; 0.68-0.93x of FA3 BF16's speed on an H200), so it runs the full
  input-length sweep like the other variants (the removed first CUDA-core kernel took minutes per
  125k-token request and needed --input-lens capped).
- load: --load-requests concurrent requests of --load-input tokens in, --load-output out;
  output tokens per second.
- serve: online serving at a latency budget (serve_budget.py): one `vllm serve` loaded by vLLM's
  `vllm bench serve` at each of --serve-rates; the report gives the requests/s sustained under
  each median end-to-end latency cutoff. Needs --serve-tokenizer (any tokenizer whose ids fit the
  model's vocabulary, e.g. SmolLM2's). It runs before the in-process engine of sweep/load.
`merge` folds result files measured elsewhere (e.g. copied back from a GPU host; same file names)
into the files of --dir, re-pointing their env_index; a point already there (same bench and input
length, or request rate for serve) is skipped unless --replace. Bad input writes nothing.
`report` merges every JSON of a directory and writes the markdown report (fits, ratios against
FLASH_ATTN BF16, targets) plus PNG plots next to it: ITL = slope x input_len + intercept (least
squares; the slope ratio carries its standard error), TTFT = quadratic fit, break-even input length
against BF16 of the same backend family.
The header lists every GPU, driver and commit; a model measured in more than one session says so,
and each model names the backend x KV pieces the suite asks for that it has no results for yet.

Models are dummy-weight configs shipped in vllm_fireattn/bench/configs (no weights, no
tokenizer: token-id prompts).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
MODELS = ("llama31-8b", "llama-hd64", "gemma3-12b-text")
BACKENDS = ("FIREATTN", "FLASH_ATTN", "FLASHINFER")
IMPL_NAMES = {"FIREATTN": "fireattn", "FLASH_ATTN": "fa3", "FLASHINFER": "flashinfer"}
SWEEP_INPUT_LENS = (256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 125000)
RESULT_DIR = Path("benchmarks/results/e2e")


def model_config(model: str) -> dict:
    """The shipped HF config.json of a benchmark model."""
    return json.loads((CONFIGS / model / "config.json").read_text())


# ---- measurement (needs a GPU and vLLM) ----------------------------------------------------

def _engine(model: str, backend: str, kv: str, skip_layers: list[str], max_model_len: int, max_num_seqs: int,
            gpu_memory_utilization: float):
    from vllm import LLM

    kwargs = dict(model=str(CONFIGS / model), load_format="dummy", skip_tokenizer_init=True, attention_backend=backend,
                  kv_cache_dtype=kv, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=0,
                  enable_prefix_caching=False, gpu_memory_utilization=gpu_memory_utilization,
                  disable_log_stats=False)  # per-request first/last token timestamps
    if skip_layers:
        kwargs["kv_cache_dtype_skip_layers"] = skip_layers
    return LLM(**kwargs)


def _timed(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return (time.perf_counter() - t0) * 1e3


def _measure(llm, prompt: list[int], output_len: int) -> tuple[float, float, str]:
    """(TTFT ms, ITL ms, method) of one concurrency-1 request."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    total = (time.perf_counter() - t0) * 1e3
    m = getattr(out, "metrics", None)
    n = len(out.outputs[0].token_ids)
    if m is not None and getattr(m, "first_token_latency", 0) > 0 and m.last_token_ts > m.first_token_ts and n > 1:
        return m.first_token_latency * 1e3, (m.last_token_ts - m.first_token_ts) * 1e3 / (n - 1), "engine_stats"
    ttft = _timed(llm, [prompt], 1)
    return ttft, (total - ttft) / (output_len - 1), "wall_clock"


def _random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1) for _ in range(length)] for _ in range(n)]


def result_path(out_dir: Path, model: str, backend: str, kv: str, skip_layers: list[str]) -> Path:
    name = f"{model}__{backend}__{kv}" + (f"__skip-{'-'.join(skip_layers)}" if skip_layers else "")
    return Path(out_dir) / f"{name}.json"


BENCHES = ("e2e_sweep", "e2e_load", "e2e_serve")


def record_key(r: dict) -> tuple:
    """What makes a record a duplicate within its file: `run` measures a key only once, `merge`
    replaces by it. Serve points are per request rate, sweep and load points per input length."""
    return (r["bench"], r.get("request_rate") if r["bench"] == "e2e_serve" else r.get("input_len"))


def load_results(path: Path) -> dict:
    """{"envs": [env, ...], "records": [record with env_index into envs, ...]}; an empty one if
    `path` does not exist. Files of the old format (one "env" for all records) are read as
    envs=[env], env_index 0, and are converted by the next save. ValueError if not a result file."""
    if not path.exists():
        return {"envs": [], "records": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError(f"{path}: not an e2e result file (no records list)")
    envs = data.get("envs", [data["env"]] if isinstance(data.get("env"), dict) else None)
    if not isinstance(envs, list) or not all(isinstance(e, dict) for e in envs):
        raise ValueError(f"{path}: not an e2e result file (no env dict or envs list)")
    records = []
    for r in data["records"]:
        if not isinstance(r, dict) or r.get("bench") not in BENCHES:
            raise ValueError(f"{path}: not an e2e result file (record without a known bench: {r!r:.200})")
        r = {**r, "env_index": r.get("env_index", 0)}
        if not isinstance(r["env_index"], int) or not 0 <= r["env_index"] < len(envs):
            raise ValueError(f"{path}: record {record_key(r)} has env_index {r['env_index']!r} but "
                             f"{len(envs)} envs")
        records.append(r)
    return {"envs": envs, "records": records}


def env_index(data: dict, env: dict) -> int:
    """Index of `env` in data["envs"], appended if no stored env equals it (every field counts)."""
    if env not in data["envs"]:
        data["envs"].append(env)
    return data["envs"].index(env)


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: an interrupted run never leaves half a file


def run(model: str, backend: str, kv: str, skip_layers: list[str], out_dir: Path, kinds: list[str],
        input_lens: list[int], output_len: int, reps: int, load_requests: int, load_input: int, load_output: int,
        gpu_memory_utilization: float, command: str, serve: dict | None = None, interleave: bool = False) -> Path:
    from tqdm import tqdm

    from vllm_fireattn.bench.env import environment

    config = model_config(model)
    max_pos = config.get("max_position_embeddings", 131072)
    too_long = [n for n in input_lens if n + output_len + 16 > max_pos]
    if too_long:
        print(f"{model}: skipping input lengths {too_long} (max_position_embeddings {max_pos})")
        input_lens = [n for n in input_lens if n not in too_long]
    load_input = min(load_input, max_pos - load_output - 16)
    path = result_path(out_dir, model, backend, kv, skip_layers)
    data = load_results(path)
    # every record points at the environment it was measured in: pieces of one file may come from
    # different machines and sessions
    base = dict(model=model, impl=IMPL_NAMES[backend], backend=backend, kv_dtype="bf16" if kv == "auto" else kv,
                skip_layers=skip_layers, env_index=env_index(data, environment(command)))
    done = {record_key(r) for r in data["records"]}
    if "serve" in kinds:
        _run_serve(model, backend, kv, skip_layers, out_dir, path, data, done, base, gpu_memory_utilization,
                   serve or {})
    todo = [n for n in input_lens if ("e2e_sweep", n) not in done] if "sweep" in kinds else []
    need_load = "load" in kinds and ("e2e_load", load_input) not in done
    if not todo and not need_load:
        print(f"{path}: complete")
        return path
    vocab = config.get("vocab_size", 32000)
    max_len = max([n + output_len for n in todo] + ([load_input + load_output] if need_load else []))
    llm = _engine(model, backend, kv, skip_layers, max_len + 16, max(8, load_requests), gpu_memory_utilization)
    _timed(llm, _random_prompts(1, 512, vocab, 0), 8)  # warm-up (graphs, allocator)

    def sweep_record(n, got, **extra):
        return dict(base, bench="e2e_sweep", input_len=n, output_len=output_len, reps=reps,
                    ttft_ms=statistics.median(g[0] for g in got), itl_ms=statistics.median(g[1] for g in got),
                    method=got[0][2], **extra)

    def measure(n, r):  # request r of input length n (the same prompt in either order)
        return _measure(llm, _random_prompts(1, n, vocab, r + 1)[0], output_len)

    if interleave:
        # Round r measures every input length once: slow drifts of the machine then spread over all
        # lengths instead of shifting one length's requests together (saved when all rounds end).
        got = {n: [] for n in todo}
        for r in tqdm(range(reps), desc=f"{model} {backend} {kv} sweep rounds", unit="round"):
            for n in todo:
                got[n].append(measure(n, r))
        data["records"] += [sweep_record(n, got[n], order="interleaved") for n in todo]
        _save(path, data)
    else:
        for n in tqdm(todo, desc=f"{model} {backend} {kv} sweep", unit="len"):
            data["records"].append(sweep_record(n, [measure(n, r) for r in range(reps)]))
            _save(path, data)
    if need_load:
        ms = _timed(llm, _random_prompts(load_requests, load_input, vocab, 99), load_output)
        data["records"].append(dict(base, bench="e2e_load", input_len=load_input, output_len=load_output,
                                    concurrency=load_requests, ms=ms,
                                    output_tok_per_s=load_requests * load_output / (ms / 1e3)))
        _save(path, data)
    return path


def _run_serve(model, backend, kv, skip_layers, out_dir, path, data, done, base, gpu_memory_utilization,
               serve: dict):
    from vllm_fireattn.bench import serve_budget

    if not serve.get("tokenizer"):
        raise SystemExit("--kinds serve needs --serve-tokenizer (a tokenizer folder whose ids fit the model)")
    from transformers import AutoTokenizer

    vocab = model_config(model).get("vocab_size", 32000)
    serve_budget.check_tokenizer_fits(len(AutoTokenizer.from_pretrained(serve["tokenizer"])), vocab, model)
    rates = [r for r in serve.get("rates", serve_budget.DEFAULT_RATES) if ("e2e_serve", r) not in done]
    if not rates:
        return

    def keep(record):
        data["records"].append(dict(base, **record))
        _save(path, data)

    serve_budget.measure(CONFIGS / model, serve["tokenizer"], backend, kv, skip_layers, rates,
                         serve.get("input_len", 2048), serve.get("output_len", 256), serve.get("seconds", 30.0),
                         serve.get("port", 8765), gpu_memory_utilization, Path(out_dir) / "logs", keep)


# ---- merging results measured elsewhere (CPU) ----------------------------------------------

def _check_name(path: Path, data: dict) -> None:
    """Each record's model, backend, KV dtype and skip layers must be those of the file name, or
    `merge` would file it under the wrong variant."""
    for r in data["records"]:
        try:
            kv = "auto" if r["kv_dtype"] == "bf16" else r["kv_dtype"]
            want = result_path(path.parent, r["model"], r["backend"], kv, r.get("skip_layers") or []).name
        except KeyError as e:
            raise ValueError(f"{path}: record {record_key(r)} has no {e}") from None
        if want != path.name:
            raise ValueError(f"{path}: record {record_key(r)} belongs in {want}, not {path.name}")


def _drop_unused_envs(data: dict) -> None:
    """After replacements: forget environments no record points at any more, so the report does not
    list a machine or commit whose numbers are gone."""
    used = sorted({r["env_index"] for r in data["records"]})
    new_index = {old: new for new, old in enumerate(used)}
    data["envs"] = [data["envs"][i] for i in used]
    for r in data["records"]:
        r["env_index"] = new_index[r["env_index"]]


def merge(sources: list[Path], dest_dir: Path, replace: bool = False) -> list[dict]:
    """Merge result files measured elsewhere (files, or directories of them) into the same-named
    files of `dest_dir`, one summary line per source file. Records whose key (record_key) is
    already there are skipped, or replace the old record with `replace`. Every source is read and
    checked before anything is written; bad input raises SystemExit."""
    files = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(src.glob("*.json"))
            if not found:
                raise SystemExit(f"merge: no result JSONs in {src}")
            files += found
        elif src.is_file():
            files.append(src)
        else:
            raise SystemExit(f"merge: {src}: no such file or directory")
    dests: dict[Path, dict] = {}
    incoming = []
    try:
        for f in files:
            dest = Path(dest_dir) / f.name
            if dest.exists() and dest.resolve() == f.resolve():
                raise ValueError(f"{f} is the destination file itself")
            data = load_results(f)
            _check_name(f, data)
            if dest not in dests:
                dests[dest] = load_results(dest)
            incoming.append((f, data, dest))
    except ValueError as e:
        raise SystemExit(f"merge: {e}; nothing written") from None
    summary, changed = [], set()
    for f, src, dest in incoming:
        dst = dests[dest]
        where = {record_key(r): i for i, r in enumerate(dst["records"])}
        counts, skipped = {"added": 0, "skipped": 0, "replaced": 0}, []
        for r in src["records"]:
            key = record_key(r)
            if key in where and not replace:
                counts["skipped"] += 1
                skipped.append(f"{key[0].removeprefix('e2e_')} {key[1]}")
                continue
            r = dict(r, env_index=env_index(dst, src["envs"][r["env_index"]]))
            if key in where:
                dst["records"][where[key]] = r
                counts["replaced"] += 1
            else:
                where[key] = len(dst["records"])
                dst["records"].append(r)
                counts["added"] += 1
        if counts["added"] or counts["replaced"]:
            changed.add(dest)
        summary.append(dict(source=str(f), dest=str(dest), **counts))
        print(f"{f} -> {dest}: {counts['added']} added, {counts['skipped']} skipped, {counts['replaced']} replaced"
              + (f" (already there, --replace overwrites: {', '.join(skipped)})" if skipped else ""))
    for dest in sorted(changed):
        _drop_unused_envs(dests[dest])
        _save(dest, dests[dest])
    return summary


# ---- analysis (pure Python, CPU) -----------------------------------------------------------

def _polyfit(xs: list[float], ys: list[float], degree: int) -> list[float]:
    """Least-squares polynomial coefficients, highest power first (numpy-free normal equations)."""
    n = degree + 1
    a = [[sum(x ** (2 * degree - i - j) for x in xs) for j in range(n)] for i in range(n)]
    b = [sum(y * x ** (degree - i) for x, y in zip(xs, ys)) for i in range(n)]
    for c in range(n):  # Gauss-Jordan with partial pivoting
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p], b[c], b[p] = a[p], a[c], b[p], b[c]
        if a[c][c] == 0:
            raise ValueError("degenerate fit: not enough distinct input lengths")
        for r in range(n):
            if r != c:
                f = a[r][c] / a[c][c]
                a[r] = [u - f * v for u, v in zip(a[r], a[c])]
                b[r] -= f * b[c]
    return [b[i] / a[i][i] for i in range(n)]


def fit_sweep(records: list[dict]) -> dict:
    """ITL linear fit (ms per input token, ms) and TTFT quadratic fit of one variant's sweep."""
    pts = sorted((r["input_len"], r["itl_ms"], r["ttft_ms"]) for r in records)
    if len(pts) < 3:
        raise ValueError(f"need >= 3 input lengths to fit, got {len(pts)}")
    xs = [float(p[0]) for p in pts]
    ys = [p[1] for p in pts]
    slope, intercept = _polyfit(xs, ys, 1)
    qa, qb, qc = _polyfit(xs, [p[2] for p in pts], 2)
    # Standard error of the slope (ordinary least squares): how far two sweeps of one build can
    # disagree, so a ratio within it of a target bound reads as "at the bound", not as met / missed.
    x_mean = sum(xs) / len(xs)
    sxx = sum((x - x_mean) ** 2 for x in xs)
    rss = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    slope_se = math.sqrt(rss / (len(xs) - 2) / sxx)
    return {"itl_slope_ms_per_token": slope, "itl_slope_se_ms_per_token": slope_se, "itl_intercept_ms": intercept,
            "ttft_quad_ms": [qa, qb, qc], "max_input_len": int(max(xs))}


def ttft_at(fit: dict, n: float) -> float:
    a, b, c = fit["ttft_quad_ms"]
    return a * n * n + b * n + c


def break_even(fit: dict, ref: dict) -> float | None:
    """Input length above which `fit`'s ITL is below `ref`'s (0 if always, None if never)."""
    ds = ref["itl_slope_ms_per_token"] - fit["itl_slope_ms_per_token"]
    di = fit["itl_intercept_ms"] - ref["itl_intercept_ms"]
    if ds <= 0:
        return 0.0 if di <= 0 else None
    return max(0.0, di / ds)


def _variant(r: dict) -> tuple:
    return (r["model"], r["backend"], r["kv_dtype"], tuple(r.get("skip_layers") or ()))


def _variant_label(r: dict) -> str:
    """'FIREATTN fp8 skip sliding_window' for a record or fit record."""
    return f"{r['backend']} {r['kv_dtype']}" + (f" skip {','.join(r['skip_layers'])}" if r.get("skip_layers") else "")


def analyze(records: list[dict], cutoffs_ms=None) -> list[dict]:
    """e2e_fit records: per variant, fits and ratios against FLASH_ATTN BF16 of the same model,
    and requests/s at each median end-to-end latency cutoff where serve points exist."""
    from vllm_fireattn.bench.serve_budget import DEFAULT_CUTOFFS_MS, throughput_at_budget

    cutoffs_ms = list(cutoffs_ms or DEFAULT_CUTOFFS_MS)
    sweeps: dict[tuple, list[dict]] = {}
    loads: dict[tuple, dict] = {}
    serves: dict[tuple, list[dict]] = {}
    for r in records:
        if r["bench"] == "e2e_sweep":
            sweeps.setdefault(_variant(r), []).append(r)
        elif r["bench"] == "e2e_load":
            loads[_variant(r)] = r
        elif r["bench"] == "e2e_serve":
            serves.setdefault(_variant(r), []).append(r)
    fits = {}
    for v, rs in sweeps.items():
        try:
            fits[v] = fit_sweep(rs)
        except ValueError:
            continue
    out = []
    for v in sorted(set(fits) | set(loads) | set(serves)):
        model, backend, kv, skip = v
        ref_key = (model, "FLASH_ATTN", "bf16", ())
        rec = dict(bench="e2e_fit", model=model, backend=backend, impl=IMPL_NAMES.get(backend, backend),
                   kv_dtype=kv, skip_layers=list(skip))
        f, ref = fits.get(v), fits.get(ref_key)
        if f:
            rec.update(f)
            rec["ttft_at_max_ms"] = ttft_at(f, f["max_input_len"])
        if f and ref:
            ratio = f["itl_slope_ms_per_token"] / ref["itl_slope_ms_per_token"]
            rec["itl_slope_vs_fa3_bf16"] = ratio
            if f["itl_slope_ms_per_token"] and ref["itl_slope_ms_per_token"]:  # delta method
                rec["itl_slope_vs_fa3_bf16_se"] = abs(ratio) * math.hypot(
                    f["itl_slope_se_ms_per_token"] / f["itl_slope_ms_per_token"],
                    ref["itl_slope_se_ms_per_token"] / ref["itl_slope_ms_per_token"])
            rec["itl_intercept_minus_fa3_bf16_ms"] = f["itl_intercept_ms"] - ref["itl_intercept_ms"]
            n = min(f["max_input_len"], ref["max_input_len"])
            rec["ttft_vs_fa3_bf16_at_max"] = ttft_at(f, n) / ttft_at(ref, n)
            rec["break_even_vs_fa3_bf16_tokens"] = break_even(f, ref)
        bf16 = fits.get((model, backend, "bf16", ()))
        if f and bf16 and kv != "bf16":
            rec["break_even_vs_own_bf16_tokens"] = break_even(f, bf16)
        if v in loads:
            rec["load_output_tok_per_s"] = loads[v]["output_tok_per_s"]
            if ref_key in loads:
                rec["load_vs_fa3_bf16"] = loads[v]["output_tok_per_s"] / loads[ref_key]["output_tok_per_s"]
        if v in serves:
            rec["serve_rps_at_budget"] = {str(c): throughput_at_budget(serves[v], c) for c in cutoffs_ms}
            if ref_key in serves:
                ratios = {}
                for c in cutoffs_ms:
                    mine, ref_rps = rec["serve_rps_at_budget"][str(c)], throughput_at_budget(serves[ref_key], c)
                    ratios[str(c)] = mine / ref_rps if mine is not None and ref_rps else None
                rec["serve_rps_vs_fa3_bf16"] = ratios
        out.append(rec)
    return out


# Issue-6 targets for FIREATTN FP8 against FLASH_ATTN BF16 of the same model (H200). The head_dim-64
# config takes the Llama-3.1-8B ratios ("similar ratios"). Keys: fit record field, comparison, bound.
# The intercept target ("within 0.05 ms of BF16", i.e. break-even <= 2k tokens) bounds FP8's
# per-token overhead: an intercept below BF16's (break-even at 0 tokens) meets it.
TARGETS = {
    "llama31-8b": [("itl_slope_vs_fa3_bf16", "<=", 0.52), ("itl_intercept_minus_fa3_bf16_ms", "<=", 0.05),
                   ("ttft_vs_fa3_bf16_at_max", "<=", 0.80), ("load_vs_fa3_bf16", ">=", 1.20)],
    "gemma3-12b-text": [("itl_slope_vs_fa3_bf16", "<=", 0.60), ("ttft_vs_fa3_bf16_at_max", "<=", 0.90),
                        ("load_vs_fa3_bf16", ">=", 1.15)],
}
TARGETS["llama-hd64"] = TARGETS["llama31-8b"]
TARGET_NAMES = {"itl_slope_vs_fa3_bf16": "ITL slope x FA3 BF16", "itl_intercept_minus_fa3_bf16_ms":
                "ITL intercept - FA3 BF16 (ms; lower is better)", "ttft_vs_fa3_bf16_at_max": "TTFT at max input x FA3 BF16",
                "load_vs_fa3_bf16": "throughput under load x FA3 BF16"}


def target_rows(fit: dict) -> list[tuple[str, str, float | None, bool | None, float | None]]:
    """(name, bound text, value, met, standard error or None) for each issue-6 target of a FIREATTN
    FP8 fit record."""
    rows = []
    for key, op, bound in TARGETS.get(fit["model"], []):
        value, se = fit.get(key), fit.get(key + "_se")
        if value is None:
            met = None
        elif op == "<=":
            met = value <= bound
        elif op == ">=":
            met = value >= bound
        else:
            raise ValueError(f"unknown comparison {op!r}")
        rows.append((TARGET_NAMES[key], f"{op} {bound:g}", value, met, se))
    return rows


def _fmt(x, spec=".2f", none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _distinct(envs: list[dict], field: str) -> str:
    return ", ".join(sorted({e.get(field) or "?" for e in envs})) or "?"


# env fields that tell sessions apart in the report; "command" is left out: it differs per piece
SESSION_FIELDS = ("commit", "gpu", "driver", "vllm", "torch", "cuda", "python")


def sessions_line(records: list[dict], envs: list[dict]) -> str | None:
    """One line naming the sessions (environments apart from the command) that one model's records
    come from, with what each measured; None if only one."""
    by_session: dict[tuple, dict[str, list[str]]] = {}
    for r in records:
        env = envs[r["env_index"]]
        kinds = by_session.setdefault(tuple(env.get(k) for k in SESSION_FIELDS), {})
        kind, variant = r["bench"].removeprefix("e2e_"), _variant_label(r)
        if kind not in kinds.setdefault(variant, []):
            kinds[variant].append(kind)
    if len(by_session) < 2:
        return None
    # name each session by the fields that differ between them (the commit when none does)
    differ = [i for i, _ in enumerate(SESSION_FIELDS) if len({s[i] for s in by_session}) > 1] or [0]
    parts = [" ".join(f"{SESSION_FIELDS[i]} {s[i] or '?'}" for i in differ) + " ("
             + ", ".join(f"{v} {'+'.join(k)}" for v, k in kinds.items()) + ")" for s, kinds in by_session.items()]
    return f"Measured in {len(by_session)} sessions, so ratios may mix machines or builds: {', '.join(parts)}."


def _has_sliding_window(model: str) -> bool:
    return bool(model_config(model).get("sliding_window"))


def not_runnable(model: str) -> dict[str, str]:
    """{backend: why} for the baselines that vLLM 0.26 refuses to start on Hopper with this config."""
    if _has_sliding_window(model):
        return {"FLASHINFER": "vLLM 0.26 refuses FlashInfer with sliding-window layers on SM90 "
                              "(NotImplementedError at engine start)"}
    return {}


def expected_variants(model: str) -> list[tuple[str, str, tuple]]:
    """The (backend, kv_dtype, skip_layers) pieces the suite asks for per model: every backend that
    runs with BF16 and FP8 KV, plus FIREATTN FP8 with the sliding-window layers kept BF16 where a
    model has them."""
    out = [(b, kv, ()) for b in BACKENDS if b not in not_runnable(model) for kv in ("bf16", "fp8")]
    if _has_sliding_window(model):
        out.append(("FIREATTN", "fp8", ("sliding_window",)))
    return out


def missing_line(model: str, records: list[dict]) -> str | None:
    """'Not measured yet: ...' for the expected pieces with no sweep/load record (serve is optional)."""
    if model not in MODELS:
        return None
    have = {_variant(r)[1:] for r in records if r["model"] == model and r["bench"] in ("e2e_sweep", "e2e_load")}
    missing = [v for v in expected_variants(model) if v not in have]
    refused = " ".join(f"{b} does not run: {why}." for b, why in not_runnable(model).items())
    if not missing:
        return refused or None
    return ("Not measured yet: " + ", ".join(f"{b} {kv}" + (f" skip {','.join(skip)}" if skip else "")
                                             for b, kv, skip in missing) + "." + (" " + refused if refused else ""))


def markdown(fits: list[dict], envs: list[dict], sources: dict[str, list[int]], records: list[dict]) -> str:
    """`envs`: the distinct environments of all files; `sources`: file -> indices into envs;
    `records`: the measured records, with env_index into envs."""
    lines = ["# End-to-end benchmark report (generated by `python -m vllm_fireattn.bench e2e report`)", ""]
    if not fits:
        return "\n".join(lines + ["No e2e results yet: run `python -m vllm_fireattn.bench e2e run ...` on a GPU.", ""])
    lines += [f"GPU: {_distinct(envs, 'gpu')}; driver {_distinct(envs, 'driver')}; vLLM {_distinct(envs, 'vllm')}; "
              f"commits {_distinct(envs, 'commit')}. Sources (commit): "
              + ", ".join(f"`{s}` ({_distinct([envs[i] for i in ix], 'commit')})" for s, ix in sources.items()), ""]
    for model in sorted({f["model"] for f in fits}):
        lines += [f"## {model}", ""]
        mixed = sessions_line([r for r in records if r["model"] == model], envs)
        if mixed:
            lines += [mixed, ""]
        missing = missing_line(model, records)
        if missing:
            lines += [missing, ""]
        lines += ["| backend | KV | skip | ITL slope (us/tok) | x FA3 BF16 | intercept (ms) | d intercept (ms) | "
                  "TTFT@max (ms) | x FA3 BF16 | break-even vs FA3 BF16 (tok) | load (tok/s) | x FA3 BF16 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in [f for f in fits if f["model"] == model]:
            slope = f.get("itl_slope_ms_per_token")
            lines.append(
                f"| {f['backend']} | {f['kv_dtype']} | {','.join(f['skip_layers']) or '-'} | "
                f"{_fmt(None if slope is None else slope * 1e3, '.4f')} | {_fmt(f.get('itl_slope_vs_fa3_bf16'))} | "
                f"{_fmt(f.get('itl_intercept_ms'), '.3f')} | {_fmt(f.get('itl_intercept_minus_fa3_bf16_ms'), '+.3f')} | "
                f"{_fmt(f.get('ttft_at_max_ms'), '.0f')} | {_fmt(f.get('ttft_vs_fa3_bf16_at_max'))} | "
                f"{_fmt(f.get('break_even_vs_fa3_bf16_tokens'), '.0f', 'never')} | "
                f"{_fmt(f.get('load_output_tok_per_s'), '.0f')} | {_fmt(f.get('load_vs_fa3_bf16'))} |")
        lines += ["", f"![ITL]({model}_itl.png) ![TTFT]({model}_ttft.png) ![load]({model}_load.png)", ""]
        for f in [f for f in fits if f["model"] == model and f["backend"] == "FIREATTN" and f["kv_dtype"] == "fp8"]:
            rows = target_rows(f)
            if not rows:
                continue
            skip = f" (skip layers: {','.join(f['skip_layers'])})" if f["skip_layers"] else ""
            lines += [f"Issue-6 targets, FIREATTN FP8{skip}:", "", "| target | bound | measured | met |",
                      "|---|---|---|---|"]
            lines += [f"| {name} | {bound} | {_fmt(value, '.3f')}{'' if se is None else f' +- {se:.3f}'} | "
                      f"{'-' if met is None else ('yes' if met else '**no**')} |" for name, bound, value, met, se in rows]
            if any(se is not None for *_, se in rows):
                lines += ["", "(+- one standard error of the ratio, from the two least-squares slope fits.)"]
            lines.append("")
        served = [f for f in fits if f["model"] == model and f.get("serve_rps_at_budget")]
        if served:
            cuts = list(served[0]["serve_rps_at_budget"])
            lines += ["Serving at a latency budget (`vllm bench serve`): requests/s with median end-to-end "
                      "latency under each cutoff (x FA3 BF16).", "",
                      "| backend | KV | skip | " + " | ".join(f"<= {float(c) / 1e3:g} s" for c in cuts) + " |",
                      "|---|---|---|" + "---|" * len(cuts)]
            for f in served:
                ratio = f.get("serve_rps_vs_fa3_bf16", {})
                cells = [f"{_fmt(f['serve_rps_at_budget'][c], '.2f', 'over budget')}"
                         + (f" ({_fmt(ratio.get(c))})" if ratio.get(c) is not None else "") for c in cuts]
                lines.append(f"| {f['backend']} | {f['kv_dtype']} | {','.join(f['skip_layers']) or '-'} | "
                             + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plots(records: list[dict], fits: list[dict], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    written = []
    for model in sorted({r["model"] for r in records if r["bench"] == "e2e_sweep"}):
        for metric, fname in (("itl_ms", "itl"), ("ttft_ms", "ttft")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for f in [f for f in fits if f["model"] == model and "itl_slope_ms_per_token" in f]:
                v = (model, f["backend"], f["kv_dtype"], tuple(f["skip_layers"]))
                pts = sorted((r["input_len"], r[metric]) for r in records
                             if r["bench"] == "e2e_sweep" and _variant(r) == v)
                line = ax.plot(*zip(*pts), "o", label=_variant_label(f))[0]
                xs = [i * f["max_input_len"] / 50 for i in range(51)]
                ys = ([f["itl_intercept_ms"] + f["itl_slope_ms_per_token"] * x for x in xs] if metric == "itl_ms"
                      else [ttft_at(f, x) for x in xs])
                ax.plot(xs, ys, "-", color=line.get_color(), alpha=0.6)
            ax.set_xlabel("input length (tokens)")
            ax.set_ylabel("ITL (ms)" if metric == "itl_ms" else "TTFT (ms)")
            ax.set_title(f"{model}: {'ITL, linear fit' if metric == 'itl_ms' else 'TTFT, quadratic fit'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            path = out_dir / f"{model}_{fname}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    for model in sorted({f["model"] for f in fits if f.get("load_output_tok_per_s")}):
        bars = [f for f in fits if f["model"] == model and f.get("load_output_tok_per_s")]
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{f['backend']}\n{f['kv_dtype']}" + (" skip" if f["skip_layers"] else "") for f in bars]
        ax.bar(labels, [f["load_output_tok_per_s"] for f in bars])
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{model}: throughput under load")
        ax.grid(alpha=0.3, axis="y")
        path = out_dir / f"{model}_load.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def report(result_dir: Path, out: Path, cutoffs_ms=None) -> Path:
    records, every = [], {"envs": []}  # the envs of all files, each once; env_index re-pointed into them
    sources = {}
    for f in sorted(Path(result_dir).glob("*.json")):
        d = load_results(f)
        ix = [env_index(every, e) for e in d["envs"]]
        records += [dict(r, env_index=ix[r["env_index"]]) for r in d["records"]]
        sources[str(f)] = ix
    envs = every["envs"]
    fits = analyze(records, cutoffs_ms)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = out.with_suffix(".json")
    merged.write_text(json.dumps({"envs": envs, "records": records + fits}, indent=1))
    plots(records, fits, out.parent)
    out.write_text(markdown(fits, envs, sources, records) + "\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vllm_fireattn.bench e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure one backend x KV dtype x model (resumable)")
    r.add_argument("--model", choices=MODELS, required=True)
    r.add_argument("--backend", choices=BACKENDS, required=True)
    r.add_argument("--kv", choices=["fp8", "auto"], required=True, help="auto = the model dtype (BF16)")
    r.add_argument("--skip-layers", nargs="*", default=[], help="vLLM's --kv-cache-dtype-skip-layers")
    r.add_argument("--kinds", nargs="+", choices=["sweep", "load", "serve"], default=["sweep", "load"])
    r.add_argument("--input-lens", type=int, nargs="+", default=list(SWEEP_INPUT_LENS))
    r.add_argument("--output-len", type=int, default=128)
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--interleave", action="store_true",
                   help="sweep in rounds (each round every input length once) instead of length by length")
    r.add_argument("--load-requests", type=int, default=8)
    r.add_argument("--load-input", type=int, default=32768)
    r.add_argument("--load-output", type=int, default=1024)
    r.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    r.add_argument("--out-dir", type=Path, default=RESULT_DIR)
    r.add_argument("--serve-tokenizer", help="serve: tokenizer folder for vllm serve / vllm bench serve")
    r.add_argument("--serve-rates", type=float, nargs="+", default=None, help="serve: request rates (req/s)")
    r.add_argument("--serve-input", type=int, default=2048, help="serve: input tokens per request")
    r.add_argument("--serve-output", type=int, default=256, help="serve: output tokens per request")
    r.add_argument("--serve-seconds", type=float, default=30.0, help="serve: seconds of arrivals per rate")
    r.add_argument("--serve-port", type=int, default=8765)
    p = sub.add_parser("report", help="merge a result directory into a markdown report with fits and plots")
    p.add_argument("--dir", type=Path, default=RESULT_DIR)
    p.add_argument("--out", type=Path, default=Path("docs/e2e_report.md"))
    p.add_argument("--serve-cutoffs-ms", type=float, nargs="+", default=None,
                   help="median end-to-end latency budgets for the serve table (default 3000 5000 10000)")
    m = sub.add_parser("merge", help="merge result JSONs measured elsewhere into the files of --dir")
    m.add_argument("sources", type=Path, nargs="+", metavar="SRC_FILE_OR_DIR",
                   help="result JSONs (<model>__<backend>__<kv>[__skip-...].json) or directories of them")
    m.add_argument("--dir", type=Path, default=RESULT_DIR, help=f"the result directory to merge into ({RESULT_DIR})")
    m.add_argument("--replace", action="store_true",
                   help="a record already in --dir (same bench and input length or request rate) is replaced; "
                        "default: skipped")
    a = ap.parse_args(argv)
    if a.cmd == "report":
        print(f"wrote {report(a.dir, a.out, a.serve_cutoffs_ms)}")
        return
    if a.cmd == "merge":
        merge(a.sources, a.dir, a.replace)
        return
    if a.output_len < 2:
        ap.error("--output-len must be >= 2 (ITL needs two tokens)")
    from vllm_fireattn.bench.env import command_line

    cmd = command_line("python -m vllm_fireattn.bench e2e run", a)
    if "serve" in a.kinds and not a.serve_tokenizer:
        ap.error("--kinds serve needs --serve-tokenizer")
    serve = dict(tokenizer=a.serve_tokenizer, input_len=a.serve_input, output_len=a.serve_output,
                 seconds=a.serve_seconds, port=a.serve_port)
    if a.serve_rates:
        serve["rates"] = a.serve_rates
    path = run(a.model, a.backend, a.kv, a.skip_layers, a.out_dir, a.kinds, a.input_lens, a.output_len, a.reps,
               a.load_requests, a.load_input, a.load_output, a.gpu_memory_utilization, cmd, serve, a.interleave)
    print(f"wrote {path}")
