"""CPU: the accuracy harness's prompt building, scoring and report. Runs through vLLM need a GPU
(python -m vllm_fireattn.eval run)."""
import json
import math

import pytest

from vllm_fireattn import eval as ev


def _tokenize(s):
    return [ord(c) for c in s]


def test_needle_prompt_has_the_exact_length_and_the_needle_at_depth():
    hay = [ord("a")] * 5000
    for depth in (0.0, 0.5, 1.0):
        ids = ev.needle_prompt(_tokenize, hay, 3000, depth, 12345)
        assert len(ids) == 3000
        text = "".join(map(chr, ids))
        assert text.startswith(ev.INTRO) and text.endswith(ev.QUESTION)
        pos = text.index("The pass key is 12345")
        budget = 3000 - len(ev.INTRO) - len(ev.NEEDLE.format(key=12345)) - len(ev.QUESTION)
        assert pos == len(ev.INTRO) + round(depth * budget) + 1  # +1: the needle starts with a newline
    with pytest.raises(ValueError, match="too short"):
        ev.needle_prompt(_tokenize, hay, 50, 0.5, 1)
    with pytest.raises(ValueError, match="haystack has 5000 tokens"):
        ev.needle_prompt(_tokenize, hay, 9000, 0.5, 1)


def test_needle_prompt_takes_its_window_from_start():
    hay = [0x4E00 + i for i in range(5000)]  # distinct tokens: the window's position is visible
    ids = ev.needle_prompt(_tokenize, hay, 3000, 0.0, 12345, start=700)
    after = ids[len(ev.INTRO) + len(ev.NEEDLE.format(key=12345)):]
    assert after[:3] == hay[700:703]
    budget = 3000 - len(ev.INTRO) - len(ev.NEEDLE.format(key=12345)) - len(ev.QUESTION)
    assert ids[-len(ev.QUESTION) - 1] == hay[700 + budget - 1]
    assert ev.needle_prompt(_tokenize, hay, 3000, 0.0, 12345, start=5000 - budget)  # the last window fits
    with pytest.raises(ValueError, match="from token 4000 needs"):
        ev.needle_prompt(_tokenize, hay, 3000, 0.5, 1, start=4000)


def test_answers_and_perplexity():
    assert ev.found(" 12345. Remember", 12345) and ev.found(" 12,345", 12345) and not ev.found(" 1234", 12345)
    ppl, n = ev.perplexity([[None, math.log(0.5), math.log(0.25)], [None, math.log(0.5)]])
    assert n == 3 and ppl == pytest.approx(math.exp((math.log(2) * 2 + math.log(4)) / 3))


def test_report_tables_accuracy_per_context(tmp_path):
    base = dict(model="smollm2", backend="FIREATTN", kv_dtype="fp8", label="")
    records = [dict(base, bench="eval_ppl", ppl=4.41)]
    records += [dict(base, bench="eval_needle", context=c, correct=ok) for c, ok in
                ((1024, True), (1024, True), (4096, True), (4096, False))]
    (tmp_path / "r.json").write_text(json.dumps({"env": {"gpu": "NVIDIA H200"}, "records": records}))
    out = ev.report(tmp_path, tmp_path / "out" / "eval.md")
    text = out.read_text()
    assert "| FIREATTN fp8 | 4.410 | 100 | 50 |" in text
    assert ev.summarize(records)["FIREATTN fp8"]["needle"] == {1024: 100.0, 4096: 50.0}


def test_report_pairs_each_variant_with_the_bf16_reference(tmp_path):
    def needle(backend, kv, oks, context=1024):
        return [dict(model="m", backend=backend, kv_dtype=kv, label="", bench="eval_needle", context=context,
                     depth=0.5, trial=t, key=10000 + t, start=7 * t, correct=ok) for t, ok in enumerate(oks)]
    ref = needle("FLASH_ATTN", "bf16", [True, True, True, False])
    fp8 = needle("FIREATTN", "fp8", [True, False, True, True])  # one gained, one lost: 0 points
    worse = needle("FLASH_ATTN", "fp8", [False, False, True, False])
    unpaired = needle("FIREATTN", "bf16", [True], context=2048)
    ppl = [dict(model="m", backend="FLASH_ATTN", kv_dtype="bf16", label="", bench="eval_ppl", ppl=9.5,
                window_nll=[2.0, 2.5, 2.25]),
           dict(model="m", backend="FIREATTN", kv_dtype="fp8", label="", bench="eval_ppl", ppl=9.75,
                window_nll=[2.02, 2.53, 2.28])]
    d = ev.paired_differences(ref + fp8 + worse + unpaired)
    assert d["FIREATTN fp8"][1024][0] == 0.0 and d["FIREATTN fp8"][1024][2] == 4
    assert d["FIREATTN fp8"][1024][1] == pytest.approx(1.96 * math.sqrt(2 / 3) / 2 * 100)
    assert d["FLASH_ATTN fp8"][1024][0] == -50.0
    assert "FIREATTN bf16" not in d  # no prompt in common with the reference
    (tmp_path / "r.json").write_text(json.dumps({"env": {}, "records": ref + fp8 + worse + ppl}))
    text = ev.report(tmp_path, tmp_path / "eval.md").read_text()
    assert ev.report(tmp_path, tmp_path / "eval.md").read_text() == text  # its own eval.json is not a result
    assert "| FIREATTN fp8 | +0.250 (NLL +0.0267 +- 0.0065, 3 windows) | +0.0 +- 80.0 (4) |" in text
    m, hw, n = ev.paired_nll(ppl)["FIREATTN fp8"]
    assert n == 3 and m == pytest.approx(0.08 / 3) and hw == pytest.approx(1.96 * math.sqrt(((0.02 - m) ** 2 + 2 * (0.03 - m) ** 2) / 2) / math.sqrt(3))
    assert "| FLASH_ATTN fp8 | - | -50.0 +- " in text


def test_cli_checks_inputs(tmp_path):
    with pytest.raises(SystemExit):
        ev.main(["run", "--model", str(tmp_path), "--kv", "fp8", "--haystack", "/nonexistent", "--ppl-text", "x"])
    with pytest.raises(SystemExit):
        ev.main(["run", "--model", str(tmp_path), "--kv", "fp8", "--haystack", str(tmp_path), "--ppl-text",
                 str(tmp_path), "--depths", "1.5"])
