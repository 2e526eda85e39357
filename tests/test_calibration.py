"""CPU: the calibration file (format, model checks, tensor-parallel slicing) and the calibration
tool on a tiny random Llama, checked against post-RoPE keys computed by hand."""
import json

import pytest
import torch

from vllm_fireattn import calibration
from vllm_fireattn.calibration import CalibrationError

META = {"model": "m", "num_layers": 2, "num_kv_heads": 4, "head_dim": 16}


def _file(tmp_path, **meta):
    g = torch.Generator().manual_seed(0)
    k, v, q = (torch.rand(2, 4, generator=g) * 10 for _ in range(3))
    path = tmp_path / "cal.safetensors"
    calibration.save(path, k, v, q, dict(META, **meta))
    return path, k, v, q


def test_round_trip_and_scales(tmp_path):
    path, k, v, q = _file(tmp_path)
    cal = calibration.load(path)
    assert torch.equal(cal.k_absmax, k) and torch.equal(cal.q_absmax, q)
    assert cal.meta["format"] == calibration.FORMAT and cal.meta["fp8_format"] == "e4m3"
    s = cal.scales()
    torch.testing.assert_close(s["v"], v * calibration.HEADROOM / 448.0)
    cal.check_model(2, 4, 16)


def test_tensor_parallel_slices_follow_vllm_head_split(tmp_path):
    cal = calibration.load(_file(tmp_path)[0])
    full = cal.scales()["k"]
    assert torch.equal(cal.scales(1, 2)["k"], full[:, 2:4])  # 4 heads over 2 ranks: contiguous halves
    assert torch.equal(cal.scales(3, 4)["k"], full[:, 3:4])
    assert torch.equal(cal.scales(5, 8)["k"], full[:, 2:3])  # 8 ranks, 4 heads: each head on 2 ranks
    with pytest.raises(CalibrationError, match="do not split"):
        cal.scales(0, 3)


def test_zero_absmax_gives_scale_one(tmp_path):
    path = tmp_path / "z.safetensors"
    calibration.save(path, torch.zeros(2, 4), torch.ones(2, 4), torch.ones(2, 4), META)
    assert torch.all(calibration.load(path).scales()["k"] == 1.0)


def test_a_file_for_another_model_is_refused(tmp_path):
    cal = calibration.load(_file(tmp_path)[0])
    with pytest.raises(CalibrationError, match=r"made for model 'm' and does not match this model \(num_layers: file 2 vs model 32"):
        cal.check_model(32, 4, 16, "cal.safetensors")


def test_malformed_files_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(CalibrationError, match="not a readable safetensors file"):
        calibration.load(bad)
    from safetensors.torch import save_file

    save_file({"k_absmax": torch.ones(2, 4)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(CalibrationError, match="no 'fireattn' metadata"):
        calibration.load(tmp_path / "nometa.safetensors")
    meta = dict(META, format=calibration.FORMAT, version=calibration.VERSION)
    save_file({"k_absmax": torch.ones(2, 4), "v_absmax": -torch.ones(2, 4), "q_absmax": torch.ones(2, 4)},
              str(tmp_path / "neg.safetensors"), metadata={"fireattn": json.dumps(meta)})
    with pytest.raises(CalibrationError, match="v_absmax must be finite, non-negative"):
        calibration.load(tmp_path / "neg.safetensors")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny-llama")
    words = "the quick brown fox jumps over lazy dog and cat sat on mat".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    text = d / "data.txt"
    text.write_text(" ".join(words[i * 7 % len(words)] for i in range(100)))
    return d, text


def test_calibration_tool_records_post_rope_absmax(tiny_llama, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from vllm_fireattn.calibrate import main

    model_dir, text = tiny_llama
    out = tmp_path / "cal.safetensors"
    main(["--model", str(model_dir), "--data", str(text), "--out", str(out), "--device", "cpu",
          "--dtype", "float32", "--seq-len", "128", "--no-progress"])
    cal = calibration.load(out)
    assert cal.meta["num_layers"] == 2 and cal.meta["num_kv_heads"] == 2 and cal.meta["head_dim"] == 16
    assert cal.meta["tokens"] == 100 and cal.meta["samples"] == 1

    # Layer 0 by hand: its input is the embeddings.
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text.read_text(), add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[None]))
        attn = model.model.layers[0].self_attn
        t = ids.numel()
        q = attn.q_proj(x).view(1, t, 4, 16).transpose(1, 2)
        k = attn.k_proj(x).view(1, t, 2, 16).transpose(1, 2)
        v = attn.v_proj(x).view(1, t, 2, 16).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(cal.k_absmax[0], k.abs().amax(dim=(0, 2, 3)))
    torch.testing.assert_close(cal.v_absmax[0], v.abs().amax(dim=(0, 2, 3)))
    torch.testing.assert_close(cal.q_absmax[0], q.abs().amax(dim=(0, 2, 3)).view(2, 2).amax(-1))
    assert torch.all(cal.k_absmax[1] > 0)
    # The sensitivity pass: per-layer relative change of the attention output through e4m3 K/V.
    assert cal.attn_error is not None and cal.attn_error.shape == (2,)
    assert torch.all(cal.attn_error > 0) and torch.all(cal.attn_error < 0.2)
