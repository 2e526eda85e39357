"""K/V smoothing study for an FP8 (e4m3) per-KV-head KV cache on SmolLM2-135M (CPU, fake quant).

Question: does storing K - mu_k (mu_k: per layer, KV head and channel mean of post-RoPE K over
calibration text; the softmax is unchanged because every score of a query row shifts by q.mu_k)
and V - mu_v (mu_v added back to the output) shrink the FP8 error? Q, K and V go through e4m3
with per-KV-head scales (vllm_fireattn.calibration.scales_from_absmax) inside a transformers
attention function; everything else is FP32. Results and the summary: README.md next to the
JSON files in kv_smoothing_study_2026-11-22/.

  MODEL=/tmp/smollm2-hf DATA=<dir with kjv.txt and haystack/> OUT=<dir> \
      PYTHONPATH=. python benchmarks/calibration/kv_smoothing_study.py [perplexity windows, default 8]
(tools/eval_data.py stages the texts; tools/smollm2.py converts the model.) ~30 min on 2 cores.
"""
import json, os, random, sys, time
from pathlib import Path
import torch
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM, AutoTokenizer, AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from vllm_fireattn.calibrate import through_e4m3
from vllm_fireattn.calibration import scales_from_absmax
from vllm_fireattn.eval import needle_prompt

OUT = Path(os.environ.get("OUT", "kv_smoothing_out")); OUT.mkdir(parents=True, exist_ok=True)
MODEL = os.environ.get("MODEL", "/tmp/smollm2-hf"); DATA = Path(os.environ["DATA"])
N_CAL_WIN, SEQ = 16, 2048
N_PPL = int(sys.argv[1]) if len(sys.argv) > 1 else 8
TRIALS = {1024: 8, 2048: 8}
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
VARIANTS = ["fp8", "fp8_ksmooth", "fp8_ksmooth_vsmooth"]
T0 = time.time()
def log(*a): print(f"[{time.time()-T0:7.1f}s]", *a, flush=True)

S = dict(mode="calib", store=None, scale=None, mu_k=None, mu_v=None, err=None)

def variant_attn(module, q, k, v, mask, mode, **kw):
    i = module.layer_idx
    if mode == "ref":
        return sdpa_attention_forward(module, q, k, v, mask, **kw)[0]
    sq, sk, sv, sk_s, sv_s = (S["scale"][n][i] for n in ("q", "k", "v", "ks", "vs"))
    g = q.shape[1] // k.shape[1]
    quant = not mode.startswith("noquant")
    fq = (lambda x, s: through_e4m3(x, s)) if quant else (lambda x, s: x)
    qq = fq(q, sq.repeat_interleave(g))
    if "ksmooth" in mode:
        kk = fq(k - S["mu_k"][i][None, :, None, :], sk_s)
    else:
        kk = fq(k, sk)
    if "vsmooth" in mode:
        vv = fq(v - S["mu_v"][i][None, :, None, :], sv_s)
    else:
        vv = fq(v, sv)
    out = sdpa_attention_forward(module, qq, kk, vv, mask, **kw)[0]  # [B, T, Hq, D]
    if "vsmooth" in mode:
        out = out + S["mu_v"][i].repeat_interleave(g, 0)[None, None]
    return out

def attn(module, query, key, value, attention_mask, **kw):
    i = module.layer_idx
    m = S["mode"]
    if m == "calib":
        S["store"]["k"][i].append(key[0].detach().clone()); S["store"]["v"][i].append(value[0].detach().clone())
        qa = query.abs().amax(dim=(0, 2, 3)).view(key.shape[1], -1).amax(-1)
        S["store"]["q"][i] = torch.maximum(S["store"]["q"][i], qa)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    out = variant_attn(module, query, key, value, attention_mask, m, **kw)
    if m == "ref" and S["err"] is not None:  # per-layer local error, identical inputs
        r = out.double()
        S["err"]["ref"][i] += r.pow(2).sum().item()
        for vname in VARIANTS:
            o = variant_attn(module, query, key, value, attention_mask, vname, **kw).double()
            S["err"][vname][i] += (o - r).pow(2).sum().item()
    return out, None

AttentionInterface.register("study", attn)
tok = AutoTokenizer.from_pretrained(MODEL)
tokenize = lambda s: tok(s, add_special_tokens=False)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="study").eval()
L = model.config.num_hidden_layers; HKV = model.config.num_key_value_heads
kjv = (DATA / "kjv.txt").read_text(errors="replace")
res = {}
def save(): (OUT / "results.json").write_text(json.dumps(res, indent=1))

with torch.inference_mode():
    # ---------------- calibration ----------------
    cal_ids = tokenize(kjv[:200000])[: N_CAL_WIN * SEQ]
    S["store"] = dict(k=[[] for _ in range(L)], v=[[] for _ in range(L)], q=[torch.zeros(HKV) for _ in range(L)])
    for w in range(N_CAL_WIN):
        model(input_ids=torch.tensor(cal_ids[w * SEQ:(w + 1) * SEQ])[None], use_cache=False, logits_to_keep=1)
    log("calibration forwards done", len(cal_ids), "tokens")
    mu_k, mu_v, sc = [], [], dict(q=[], k=[], v=[], ks=[], vs=[])
    ratios = []
    for i in range(L):
        K = torch.cat(S["store"]["k"][i], 1); V = torch.cat(S["store"]["v"][i], 1)  # [H, N, D]
        mk, mv = K.mean(1), V.mean(1)
        Kc, Vc = K - mk[:, None], V - mv[:, None]
        am = lambda x: x.abs().amax(dim=(1, 2)); rms = lambda x: x.pow(2).mean(dim=(1, 2)).sqrt()
        rk_abs, rk_rms = am(Kc) / am(K), rms(Kc) / rms(K)
        rv_abs, rv_rms = am(Vc) / am(V), rms(Vc) / rms(V)
        # which channels carry the mean: fraction of K energy in mu (per head) and top channel
        mu_energy = (mk.pow(2).sum(-1) / K.pow(2).mean(1).sum(-1))
        ratios.append(dict(layer=i, k_abs=rk_abs.tolist(), k_rms=rk_rms.tolist(), v_abs=rv_abs.tolist(),
                           v_rms=rv_rms.tolist(), k_mu_energy=mu_energy.tolist(), k_absmax=am(K).tolist(),
                           kc_absmax=am(Kc).tolist()))
        mu_k.append(mk); mu_v.append(mv)
        sc["q"].append(scales_from_absmax(S["store"]["q"][i])); sc["k"].append(scales_from_absmax(am(K)))
        sc["v"].append(scales_from_absmax(am(V))); sc["ks"].append(scales_from_absmax(am(Kc)))
        sc["vs"].append(scales_from_absmax(am(Vc)))
    S.update(store=None, mu_k=mu_k, mu_v=mu_v, scale=sc)
    res["calib_ratios"] = ratios; save()
    log("calibration stats done")

    # ---------------- sanity: invariance unquantized ----------------
    ppl_ids = tokenize(kjv[2_000_000:2_000_000 + 6 * SEQ * (N_PPL + 1)])
    windows = [ppl_ids[j * SEQ:(j + 1) * SEQ] for j in range(N_PPL)]
    x = torch.tensor(windows[0][:1024])[None]
    S["mode"] = "ref"; lr = model(input_ids=x, use_cache=False).logits
    san = {}
    for m in ("noquant_ksmooth", "noquant_ksmooth_vsmooth"):
        S["mode"] = m; lm = model(input_ids=x, use_cache=False).logits
        san[m] = dict(max_abs_logit_diff=(lm - lr).abs().max().item(), ref_logit_absmax=lr.abs().max().item())
    res["sanity"] = san; save(); log("sanity", san)

    # ---------------- perplexity + KL + per-layer error ----------------
    ppl = {v: dict(nll=[], kl=[]) for v in ["ref"] + VARIANTS}
    S["err"] = None
    for j, w in enumerate(windows):
        x = torch.tensor(w)[None]; tgt = x[0, 1:]
        if j < 2:
            S["err"] = {n: [0.0] * L for n in ["ref"] + VARIANTS}
            if "layer_err" not in res: res["layer_err"] = {n: [0.0] * L for n in ["ref"] + VARIANTS}
        S["mode"] = "ref"; lpr = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0, :-1], -1)
        if S["err"] is not None:
            for n in S["err"]:
                res["layer_err"][n] = [a + b for a, b in zip(res["layer_err"][n], S["err"][n])]
            S["err"] = None
        ppl["ref"]["nll"].append(-lpr.gather(1, tgt[:, None]).mean().item()); ppl["ref"]["kl"].append(0.0)
        pr = lpr.exp()
        for v in VARIANTS:
            S["mode"] = v; lpv = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0, :-1], -1)
            ppl[v]["nll"].append(-lpv.gather(1, tgt[:, None]).mean().item())
            ppl[v]["kl"].append((pr * (lpr - lpv)).sum(-1).mean().item())
        res["ppl"] = ppl; save(); log("ppl window", j, {v: round(ppl[v]["nll"][-1], 4) for v in ppl})

    # ---------------- passkey (teacher-forced) ----------------
    hay = tokenize("\n\n".join(f.read_text(errors="replace") for f in sorted((DATA / "haystack").glob("*.txt"))))
    rng = random.Random(0)
    jobs = [(c, d, t, rng.randrange(10000, 99999), rng.randrange(len(hay) - c + 1))
            for c in TRIALS for d in DEPTHS for t in range(TRIALS[c])]
    jobs.sort(key=lambda j: (j[0], j[2], j[1]))  # t-major so a cut keeps depths balanced
    res["passkey"] = []
    for (c, d, t, key, start) in jobs:
        p = needle_prompt(tokenize, hay, c, d, key, start); ans = tokenize(f" {key}")
        x = torch.tensor(p + ans)[None]; A = len(ans); tgt = torch.tensor(ans)
        rec = dict(context=c, depth=d, trial=t, key=key, start=start)
        S["mode"] = "ref"; lpr = torch.log_softmax(model(input_ids=x, use_cache=False, logits_to_keep=A + 1).logits[0, :-1], -1)
        rec["ref_lp"] = lpr.gather(1, tgt[:, None]).sum().item(); rec["ref_ok"] = bool((lpr.argmax(-1) == tgt).all())
        for v in VARIANTS:
            S["mode"] = v; lpv = torch.log_softmax(model(input_ids=x, use_cache=False, logits_to_keep=A + 1).logits[0, :-1], -1)
            rec[v + "_lp"] = lpv.gather(1, tgt[:, None]).sum().item()
            rec[v + "_ok"] = bool((lpv.argmax(-1) == tgt).all())
            rec[v + "_kl"] = (lpr.exp() * (lpr - lpv)).sum(-1).mean().item()
        res["passkey"].append(rec); save()
        log("passkey", c, d, t, {k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items() if k.endswith(("_lp", "_ok"))})
log("done")
