"""Offline generation with the FIREATTN backend and an FP8 KV cache.

Default: the small dummy-weight Llama config shipped in examples/configs/tiny-llama (no
download, random weights, so the tokens are meaningless; it shows the backend running).
With real weights: python examples/offline_inference.py --model /path/to/hf-model-folder
"""
import argparse
from pathlib import Path

from vllm import LLM, SamplingParams

TINY = Path(__file__).parent / "configs" / "tiny-llama"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: dummy tiny-llama config)")
    ap.add_argument("--kv-cache-dtype", default="fp8", choices=["fp8", "fp8_e4m3", "auto"])
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    dummy = args.model is None
    llm = LLM(
        model=str(TINY) if dummy else args.model,
        attention_backend="FIREATTN",
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=4096,
        gpu_memory_utilization=0.5,
        **({"load_format": "dummy", "skip_tokenizer_init": True} if dummy else {}),
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=dummy)
    if dummy:
        prompts = [{"prompt_token_ids": list(range(100, 100 + n))} for n in (8, 300)]
    else:
        prompts = ["The capital of France is", "Write a haiku about attention kernels:"]
    for out in llm.generate(prompts, params):
        c = out.outputs[0]
        print(f"{len(out.prompt_token_ids)} prompt tokens -> {c.token_ids if dummy else repr(c.text)}")


if __name__ == "__main__":
    main()
