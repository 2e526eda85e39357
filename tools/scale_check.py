"""CPU check of FP8 scale choices: mean |prompt logprob - FP32| of a Hugging Face model when its
post-RoPE Q, K and V go through e4m3 (what the FP8 prefill kernel sees), for scales of 1.0 and
for a calibration file's absmax / 448 times several headrooms.

  python tools/scale_check.py --model /tmp/smollm2-hf \
      --calibration benchmarks/calibration/smollm2-135m_pg-essays-16k.safetensors \
      --text tests/data/apache-2.0.txt [--headrooms 1 2 4 8] [--max-tokens 2600] [--test-prompts]

--test-prompts evaluates what tests/test_vllm_e2e.py sends: its PROMPTS and then the text, each its
own sequence, tokenized as vLLM does (tokenizer defaults, no truncation). The test's metric
(_mean_abs_prompt_delta) is the last sequence's, the text's; the short prompts are shown apart.

It also prints how far the text's absmax goes beyond the calibration file's (ratio > 1 means
absmax / 448 would saturate). Softmax and PV stay exact here, so only the scale choice differs.
"""
import argparse
import ast
from pathlib import Path

import torch

from vllm_fireattn.calibrate import through_e4m3
from vllm_fireattn.calibration import load


def test_prompts() -> list[str]:
    """PROMPTS of tests/test_vllm_e2e.py, read without importing the GPU test module."""
    tree = ast.parse((Path(__file__).parents[1] / "tests" / "test_vllm_e2e.py").read_text())
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "PROMPTS")


def main() -> None:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--headrooms", type=float, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=2600)
    ap.add_argument("--test-prompts", action="store_true", help="the GPU test's prompts, then the text")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cal = load(a.calibration)
    text = open(a.text).read()
    if a.test_prompts:
        seqs = [tok(p, return_tensors="pt").input_ids for p in test_prompts() + [text]]
    else:
        seqs = [tok(text, return_tensors="pt").input_ids[:, : a.max_tokens]]
    seen = torch.zeros(3, *cal.k_absmax.shape)
    state = {"scales": None}

    def attention(module, q, k, v, mask, **kw):
        i, hkv = module.layer_idx, k.shape[1]
        seen[0, i] = torch.maximum(seen[0, i], k.abs().amax(dim=(0, 2, 3)))
        seen[1, i] = torch.maximum(seen[1, i], v.abs().amax(dim=(0, 2, 3)))
        seen[2, i] = torch.maximum(seen[2, i], q.abs().amax(dim=(0, 2, 3)).view(hkv, -1).amax(-1))
        if state["scales"] is not None:
            ks, vs, qs = (s[i] for s in state["scales"])
            k, v = through_e4m3(k, ks), through_e4m3(v, vs)
            q = through_e4m3(q, qs.repeat_interleave(q.shape[1] // hkv))
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("fireattn_scale_check", attention)
    model.set_attn_implementation("fireattn_scale_check")

    def logprobs():
        lps = [torch.log_softmax(model(ids).logits[0, :-1].float(), -1) for ids in seqs]
        return [lp.gather(-1, ids[0, 1:, None])[:, 0] for lp, ids in zip(lps, seqs)]

    truth = logprobs()
    absmax = torch.stack([cal.k_absmax, cal.v_absmax, cal.q_absmax])
    ratio = (seen / absmax.clamp_min(1e-30)).amax(dim=(1, 2))
    print(f"text absmax / calibration absmax, max over layers and heads: K {ratio[0]:.2f}, V {ratio[1]:.2f}, "
          f"Q {ratio[2]:.2f}")
    ones = torch.ones_like(absmax)
    for name, scales in [("scale 1.0", ones)] + [(f"absmax/448 x{h:g}", absmax * h / 448) for h in a.headrooms]:
        state["scales"] = scales
        err = [(x - t).abs().mean().item() for x, t in zip(logprobs(), truth)]
        short = f"  (short prompts: {' '.join(f'{e:.4f}' for e in err[:-1])})" if len(err) > 1 else ""
        print(f"{name:18s} mean |logprob - fp32| {err[-1]:.4f}{short}")


if __name__ == "__main__":
    main()
