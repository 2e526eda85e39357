#!/bin/bash
# The SmolLM2-135M accuracy sweep of benchmarks/results/h200/eval: FIREATTN and FLASH_ATTN with BF16
# and FP8 KV caches, plus FIREATTN FP8 with the committed calibration file, then the report.
#   bash tools/eval_smollm2.sh MODEL_DIR DATA_DIR OUT_DIR      (DATA_DIR from tools/eval_data.py stage)
# Each run starts one vLLM engine (~1-2 minutes on an H200).
set -u
M=${1:?model dir}; D=${2:?data dir}; O=${3:?output dir}
CAL='{"fireattn": {"scales": "calibration", "calibration_file": "benchmarks/calibration/smollm2-135m_pg-essays-16k.safetensors"}}'
mkdir -p "$O"
run() {
  local log="$O/eval_$(echo "$@" | tr -c 'a-zA-Z0-9' _ | cut -c1-80).log"
  timeout 300 python3 -m vllm_fireattn.eval run --model "$M" --haystack "$D/haystack" --ppl-text "$D/kjv.txt" \
    --out-dir "$O" "$@" > "$log" 2>&1
  echo "$* -> rc=$? ($log)"
}
run --backend FIREATTN --kv fp8
run --backend FIREATTN --kv auto
run --backend FLASH_ATTN --kv auto
run --backend FLASH_ATTN --kv fp8
run --backend FIREATTN --kv fp8 --label calibrated --additional-config "$CAL"
python3 -m vllm_fireattn.eval report --dir "$O" --out "$O/eval_report.md" | tail -1
