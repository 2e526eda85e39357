#!/usr/bin/env python3
"""A tiny Llama with real (seeded random, BF16) weights whose KV heads differ in magnitude, for the
tensor-parallel scale test (tests/test_tensor_parallel.py).

  python tools/tp_model.py write --out DIR [--calibrate] [--check]

writes DIR/model (config.json, model.safetensors, a word-level tokenizer over "t0" .. "t49151"),
and with --calibrate DIR/calib.txt (token words for the calibration tool),
DIR/calibrated.safetensors (vllm_fireattn.calibrate, the calibration tool, on the CPU) and
DIR/reversed.safetensors (the same file with its KV heads in reverse order: what a rank-slicing
bug looks like). --check prints the CPU-emulated FP8 error of correct, reversed and 1.0 scales.

KV head h's keys are multiplied by K_FACTORS[h] and its values by V_FACTORS[h]; the queries of
its group and the o_proj columns it feeds are divided by the same factors. All are powers of two,
so in BF16 the model computes exactly what it would without them: only an FP8 cache sees the
difference. With scale 1.0 the largest V head saturates e4m3 and the smallest sits in its
subnormals; with another head's scale a head saturates or underflows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, vocab_size=49152, max_position_embeddings=4096)
K_FACTORS = (0.5, 1.0, 2.0, 4.0)
V_FACTORS = (1 / 64, 1.0, 16.0, 1024.0)  # with scale 1.0: head 3's |V| reaches ~5000, head 0's bulk < 2^-6
# Base weight std: sharp attention (score std ~2) and logits (std ~3), so that logprobs depend on
# what attention returns (the usual 0.02 gives near-uniform attention and logits).
STD = dict(embed=1.0, qk=0.0625, v=0.05, o=0.05, mlp=0.02, lm_head=0.13)
SEED = 0
FP8_MAX, FP8_MIN_NORMAL = 448.0, 2.0 ** -6  # e4m3


def word(i: int) -> str:
    return f"t{i}"


def state_dict(seed: int = SEED, k_factors=K_FACTORS, v_factors=V_FACTORS) -> dict[str, torch.Tensor]:
    """The BF16 weights, in transformers' Llama names."""
    s = SHAPE
    d, hd, f = s["hidden_size"], s["head_dim"], s["intermediate_size"]
    hq, hkv = s["num_attention_heads"], s["num_key_value_heads"]
    g = torch.Generator().manual_seed(seed)

    def normal(std, *shape):
        return torch.randn(*shape, generator=g) * std

    # Rows of k_proj / v_proj per KV head; rows of q_proj and columns of o_proj per query head,
    # and query heads h * group .. (h + 1) * group - 1 belong to KV head h (as in vLLM's TP split).
    per_kv = lambda fs: torch.tensor(fs).repeat_interleave(hd)  # noqa: E731
    per_q = lambda fs: torch.tensor(fs).repeat_interleave(hq // hkv * hd)  # noqa: E731
    sd = {"model.embed_tokens.weight": normal(STD["embed"], s["vocab_size"], d)}
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = normal(STD["qk"], hq * hd, d) / per_q(k_factors)[:, None]
        sd[p + "self_attn.k_proj.weight"] = normal(STD["qk"], hkv * hd, d) * per_kv(k_factors)[:, None]
        sd[p + "self_attn.v_proj.weight"] = normal(STD["v"], hkv * hd, d) * per_kv(v_factors)[:, None]
        sd[p + "self_attn.o_proj.weight"] = normal(STD["o"], d, hq * hd) / per_q(v_factors)[None, :]
        sd[p + "mlp.gate_proj.weight"] = normal(STD["mlp"], f, d)
        sd[p + "mlp.up_proj.weight"] = normal(STD["mlp"], f, d)
        sd[p + "mlp.down_proj.weight"] = normal(STD["mlp"], d, f)
        sd[p + "input_layernorm.weight"] = torch.ones(d)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(d)
    sd["model.norm.weight"] = torch.ones(d)
    sd["lm_head.weight"] = normal(STD["lm_head"], s["vocab_size"], d)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def write_model(out: str | Path, seed: int = SEED) -> Path:
    """DIR with config.json, model.safetensors and a word-level tokenizer (the calibration tool
    reads text; vLLM gets token ids and skips the tokenizer)."""
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                   architectures=["LlamaForCausalLM"])
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(out)
    save_file(state_dict(seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok = Tokenizer(models.WordLevel({word(i): i for i in range(SHAPE["vocab_size"])}, unk_token=word(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=word(0)).save_pretrained(out)
    return out


def token_ids(n: int, length: int, seed: int) -> list[list[int]]:
    """n seeded random prompts of `length` token ids (use different seeds for calibration and test)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SHAPE["vocab_size"], (n, length), generator=g).tolist()


def calibrate(model_dir: str | Path, out_dir: str | Path, tokens: int = 4096, seed: int = 1) -> dict[str, Path]:
    """calibrated.safetensors from the project's calibration tool (CPU, BF16) over `tokens` random
    token words, and reversed.safetensors: the same absmax with the KV heads in reverse order."""
    from vllm_fireattn import calibration
    from vllm_fireattn.calibrate import calibrate as run_tool

    out_dir = Path(out_dir)
    text = out_dir / "calib.txt"
    text.write_text(" ".join(word(i) for i in token_ids(1, tokens, seed)[0]))
    paths = {"calibrated": out_dir / "calibrated.safetensors", "reversed": out_dir / "reversed.safetensors"}
    run_tool(str(model_dir), [str(text)], str(paths["calibrated"]), seq_len=1024, max_tokens=tokens,
             device="cpu", progress=False)
    cal = calibration.load(paths["calibrated"])
    flip = [t.flip(-1) for t in (cal.k_absmax, cal.v_absmax, cal.q_absmax)]
    calibration.save(paths["reversed"], *flip, dict(cal.meta, reversed_heads=True), cal.attn_error)
    return paths


def fp8_errors(model_dir: str | Path, prompts: list[list[int]], scale_sets: dict[str, dict | None]) -> dict:
    """CPU emulation of the FP8 prefill's inputs: float32 transformers with post-RoPE Q, K, V through
    e4m3 with per-KV-head scales ({"q","k","v"}: [layers, KV heads], or None for 1.0). Returns
    "error": each set's mean |prompt logprob - FP32| over all prompt tokens, and the share of each
    V head's values ([layer][head]) that e4m3 with scale 1.0 saturates (> 448, "v_saturated_at_1")
    or holds as subnormals (< 2^-6, "v_subnormal_at_1")."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vllm_fireattn.calibrate import qkv_through_e4m3

    state = {"scales": None}
    layers, hkv = SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"]
    saturated, subnormal = torch.zeros(layers, hkv), torch.zeros(layers, hkv)

    def attention(module, q, k, v, mask, **kw):
        s = state["scales"]
        if s is None:  # the FP32 pass: where |V| lands on e4m3 with scale 1.0
            a = v.abs().transpose(0, 1).flatten(1)
            saturated[module.layer_idx] = (a > FP8_MAX).float().mean(-1)
            subnormal[module.layer_idx] = (a < FP8_MIN_NORMAL).float().mean(-1)
        else:
            i = module.layer_idx
            q, k, v = qkv_through_e4m3(q, k, v, s["q"][i], s["k"][i], s["v"][i])
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("fireattn_tp_model", attention)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="fireattn_tp_model").eval()
    ids = torch.tensor(prompts)
    one = torch.ones(layers, hkv)

    def logprobs():
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        return lp.gather(-1, ids[:, 1:, None])[..., 0]

    truth = logprobs()
    errs = {}
    for name, scales in scale_sets.items():
        state["scales"] = scales or {"q": one, "k": one, "v": one}
        errs[name] = (logprobs() - truth).abs().mean().item()
    return {"error": errs, "fp32_mean_logprob": truth.mean().item(), "v_saturated_at_1": saturated.tolist(),
            "v_subnormal_at_1": subnormal.tolist()}


def check(model_dir: str | Path, paths: dict[str, Path], prompts: list[list[int]]) -> dict:
    """fp8_errors for the calibrated and reversed files and for 1.0."""
    from vllm_fireattn import calibration

    sets = {name: calibration.load(p).scales() for name, p in paths.items()}
    sets["one"] = None
    return fp8_errors(model_dir, prompts, sets)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", required=True)
    w.add_argument("--seed", type=int, default=SEED)
    w.add_argument("--calibrate", action="store_true")
    w.add_argument("--check", action="store_true", help="also print CPU-emulated FP8 errors (implies --calibrate)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    model = write_model(out / "model", a.seed)
    print(f"wrote {model}")
    if a.calibrate or a.check:
        paths = calibrate(model, out)
        from vllm_fireattn import calibration

        cal = calibration.load(paths["calibrated"])
        for name in ("k", "v", "q"):
            print(f"{name} absmax [layer, KV head]:", getattr(cal, f"{name}_absmax").tolist())
        if a.check:
            res = check(model, paths, token_ids(4, 256, seed=2))
            print("mean |prompt logprob - FP32| over 4 x 256 held-out tokens, Q/K/V through e4m3:",
                  json.dumps({k: round(v, 4) for k, v in res["error"].items()}))
            print(f"FP32 mean prompt logprob {res['fp32_mean_logprob']:.3f}")
            for key in ("v_saturated_at_1", "v_subnormal_at_1"):
                print(f"{key} [layer][KV head]:", [[round(x, 3) for x in row] for row in res[key]])


if __name__ == "__main__":
    main()
