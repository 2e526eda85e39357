"""Kernel benchmarks: FIREATTN vs vLLM's bundled FlashAttention-3, same run, same GPU.

python -m vllm_fireattn.bench prefill|decode [--quick] [--out results.json]
A benchmark reports (TFLOP/s, GB/s, ratios); it never passes or fails on a time.
"""
