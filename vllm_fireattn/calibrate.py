"""python -m vllm_fireattn.calibrate --model DIR --data FILE [FILE ...] --out FILE.safetensors

Runs a Hugging Face checkpoint (transformers) over a text set and records, per layer and per KV
head, the absmax of the post-RoPE keys and values, and of the queries of each KV head's group:
the inputs the attention kernels see. Writes the FIREATTN calibration file
(vllm_fireattn/calibration.py), which `--additional-config '{"fireattn": {"scales":
"calibration", "calibration_file": ...}}'` loads.

How: a transformers attention function is registered that records the statistics and then
computes attention with SDPA, so any model that uses transformers' attention interface works.
Texts are tokenized, concatenated and cut into windows of --seq-len tokens, up to --max-tokens.
A second pass over the first --sensitivity-windows windows measures, per layer, the relative L2
change of the attention output when K and V go through e4m3 with the calibrated scales (the
auto skip policy's sensitivity measure; 0 skips it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vllm_fireattn import __version__
from vllm_fireattn.calibration import save, scales_from_absmax
from vllm_fireattn.reference.quant import dequantize_fp8, quantize_fp8

ATTENTION_NAME = "fireattn_calibration"


class _Stats:
    def __init__(self, num_layers: int, num_kv_heads: int):
        self.k = torch.zeros(num_layers, num_kv_heads)
        self.v = torch.zeros(num_layers, num_kv_heads)
        self.q = torch.zeros(num_layers, num_kv_heads)
        self.seen = torch.zeros(num_layers, dtype=torch.bool)
        self.scales: tuple[torch.Tensor, torch.Tensor] | None = None  # set for the sensitivity pass
        self.err_sq = torch.zeros(num_layers, dtype=torch.float64)
        self.ref_sq = torch.zeros(num_layers, dtype=torch.float64)

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        # query [B, Hq, T, D]; key/value [B, Hkv, T, D] (post-RoPE, before GQA expansion)
        hkv = key.shape[1]
        amax = lambda x: x.detach().abs().float().amax(dim=(0, 2, 3)).cpu()  # noqa: E731
        self.k[layer] = torch.maximum(self.k[layer], amax(key))
        self.v[layer] = torch.maximum(self.v[layer], amax(value))
        q = amax(query).view(hkv, -1).amax(-1)
        self.q[layer] = torch.maximum(self.q[layer], q)
        self.seen[layer] = True


def _register_attention(stats: _Stats) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        if stats.scales is None:
            stats.record(module.layer_idx, query, key, value)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        i = module.layer_idx
        kq = through_e4m3(key, stats.scales[0][i].to(key.device))
        vq = through_e4m3(value, stats.scales[1][i].to(value.device))
        out8, _ = sdpa_attention_forward(module, query, kq, vq, attention_mask, **kwargs)
        stats.err_sq[i] += (out8.double() - out.double()).pow(2).sum().item()
        stats.ref_sq[i] += out.double().pow(2).sum().item()
        return out, weights

    AttentionInterface.register(ATTENTION_NAME, recording_attention)


def through_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] -> what an FP8 cache with per-head `scale` [H] returns for it (the reference
    quantizer, which works on [..., H, D])."""
    xt = x.transpose(1, 2)
    return dequantize_fp8(quantize_fp8(xt, scale), scale, torch.float32).to(x.dtype).transpose(1, 2)


def qkv_through_e4m3(q, k, v, q_scale, k_scale, v_scale):
    """Q, K, V [B, H, T, D] through an FP8 cache with per-KV-head scales [Hkv]; each query head
    takes its KV head's scale (GQA groups are contiguous)."""
    group = q.shape[1] // k.shape[1]
    return (through_e4m3(q, q_scale.repeat_interleave(group)), through_e4m3(k, k_scale),
            through_e4m3(v, v_scale))


def _windows(tokenizer, files: list[str], seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    ids: list[int] = []
    for f in files:
        ids += tokenizer(Path(f).read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise SystemExit(f"the data files hold {len(ids)} tokens; calibration needs text")
    return [torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


def calibrate(model_dir: str, files: list[str], out: str, seq_len: int = 2048, max_tokens: int = 65536,
              device: str | None = None, dtype: str = "bfloat16", progress: bool = True,
              sensitivity_windows: int = 4) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = AutoConfig.from_pretrained(model_dir)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    num_layers = text_cfg.num_hidden_layers
    num_q_heads = text_cfg.num_attention_heads
    num_kv_heads = getattr(text_cfg, "num_key_value_heads", None) or num_q_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // num_q_heads
    stats = _Stats(num_layers, num_kv_heads)
    _register_attention(stats)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                 attn_implementation=ATTENTION_NAME).to(device).eval()
    windows = _windows(tokenizer, files, seq_len, max_tokens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(w) for w in windows), unit="tok", desc="calibrating", file=sys.stderr)
    t0 = time.time()
    with torch.inference_mode():
        for w in windows:
            model(input_ids=w[None].to(device), use_cache=False)
            if bar:
                bar.update(len(w))
    if bar:
        bar.close()
    if not stats.seen.all():
        missing = (~stats.seen).nonzero().flatten().tolist()
        raise SystemExit(f"layers {missing} never called the attention interface; this model is not supported")
    attn_error = None
    if sensitivity_windows > 0:
        stats.scales = (scales_from_absmax(stats.k), scales_from_absmax(stats.v))
        with torch.inference_mode():
            for w in windows[:sensitivity_windows]:
                model(input_ids=w[None].to(device), use_cache=False)
        attn_error = (stats.err_sq / stats.ref_sq.clamp_min(1e-30)).sqrt().float()
    meta = {
        "tool_version": __version__, "model": Path(model_dir).name, "model_type": getattr(cfg, "model_type", ""),
        "num_layers": num_layers, "num_kv_heads": num_kv_heads, "num_q_heads": num_q_heads, "head_dim": head_dim,
        "samples": len(windows), "tokens": sum(len(w) for w in windows), "seq_len": seq_len,
        "data": [Path(f).name for f in files], "dtype": dtype, "seconds": round(time.time() - t0, 1),
        "sensitivity_windows": min(sensitivity_windows, len(windows)),
    }
    save(out, stats.k, stats.v, stats.q, meta, attn_error)
    return meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vllm_fireattn.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face model folder (config.json, weights, tokenizer)")
    ap.add_argument("--data", required=True, nargs="+", help="text files")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per forward pass (default 2048)")
    ap.add_argument("--max-tokens", type=int, default=65536, help="stop after this many tokens (default 65536)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--sensitivity-windows", type=int, default=4,
                    help="windows for the per-layer FP8 attention-error pass (0: skip; default 4)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.seq_len < 1 or a.max_tokens < 1:
        ap.error("--seq-len and --max-tokens must be positive")
    for f in a.data:
        if not Path(f).is_file():
            ap.error(f"--data {f!r}: no such file")
    meta = calibrate(a.model, a.data, a.out, a.seq_len, a.max_tokens, a.device, a.dtype, not a.no_progress,
                     a.sensitivity_windows)
    print(f"wrote {a.out}: {meta['num_layers']} layers x {meta['num_kv_heads']} KV heads, "
          f"{meta['tokens']} tokens in {meta['samples']} windows")


if __name__ == "__main__":
    main()
