"""CPU: FIREATTN settings from --additional-config and FIREATTN_* variables, and their errors."""
import pytest

from vllm_fireattn.settings import FireAttnConfigError, FireAttnSettings, resolve


def test_defaults():
    assert resolve({}, {}) == FireAttnSettings("checkpoint", None, None, "none", 256, 0.1)
    assert resolve(None, {}).describe() == ("scales=checkpoint, calibration_file=None, decode_splits=auto, "
                                            "skip_policy=none, skip_window_max=256, skip_error_max=0.1, "
                                            "promote_every=1")


def test_additional_config_wins_over_environment(tmp_path):
    f = tmp_path / "cal.safetensors"
    f.write_bytes(b"x")
    env = {"FIREATTN_SCALES": "one", "FIREATTN_DECODE_SPLITS": "4"}
    assert resolve({}, env) == FireAttnSettings("one", None, 4)
    got = resolve({"fireattn": {"scales": "calibration", "calibration_file": str(f), "decode_splits": "auto"}}, env)
    assert got == FireAttnSettings("calibration", str(f), None)
    assert resolve({"fireattn": {"decode_splits": 16}}, {}).decode_splits == 16


@pytest.mark.parametrize("config,env,match", [
    ({"fireattn": {"scales": "fp8"}}, {}, r"fireattn.scales='fp8': accepted values are \['checkpoint', 'calibration', 'one'\]"),
    ({}, {"FIREATTN_SCALES": "calibrated"}, r"FIREATTN_SCALES='calibrated': accepted values"),
    ({"fireattn": {"scale": "one"}}, {}, r"unknown keys \['scale'\]; accepted keys"),
    ({"fireattn": {"scales": "calibration"}}, {}, r"needs a calibration file"),
    ({"fireattn": {"calibration_file": "/nonexistent.safetensors", "scales": "calibration"}}, {}, r"no such file"),
    ({}, {"FIREATTN_DECODE_SPLITS": "0"}, r"FIREATTN_DECODE_SPLITS='0': accepted values are 'auto' or an integer 1..128"),
    ({"fireattn": {"decode_splits": 1.5}}, {}, r"decode_splits=1.5"),
    ({"fireattn": {"decode_splits": True}}, {}, r"decode_splits=True"),
    ({"fireattn": "one"}, {}, r"must be a JSON object"),
    ({"fireattn": {"skip_policy": "sliding"}}, {}, r"skip_policy='sliding': accepted values are \['none', 'auto'\]"),
    ({}, {"FIREATTN_SKIP_WINDOW_MAX": "-1"}, r"FIREATTN_SKIP_WINDOW_MAX='-1': accepted values are an integer >= 0"),
    ({"fireattn": {"skip_error_max": "x"}}, {}, r"skip_error_max='x': accepted values are a number > 0"),
    ({}, {"FIREATTN_PROMOTE_EVERY": "-1"}, r"FIREATTN_PROMOTE_EVERY='-1': accepted values are an integer 0..1024"),
    ({"fireattn": {"promote_every": 2000}}, {}, r"promote_every=2000: accepted values are an integer 0..1024"),
])
def test_bad_values_name_the_value_and_the_accepted_ones(config, env, match):
    with pytest.raises(FireAttnConfigError, match=match):
        resolve(config, env)


def test_calibration_file_without_calibration_scales_is_refused(tmp_path):
    f = tmp_path / "cal.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(FireAttnConfigError, match="set scales to 'calibration'"):
        resolve({}, {"FIREATTN_CALIBRATION_FILE": str(f)})


def test_skip_policy_settings():
    got = resolve({"fireattn": {"skip_policy": "auto"}}, {"FIREATTN_SKIP_WINDOW_MAX": "512", "FIREATTN_SKIP_ERROR_MAX": "0.2"})
    assert (got.skip_policy, got.skip_window_max, got.skip_error_max) == ("auto", 512, 0.2)


def test_promote_every_from_either_source_and_head_dim_256_limit():
    assert resolve({}, {"FIREATTN_PROMOTE_EVERY": "0"}).promote_every == 0
    assert resolve({"fireattn": {"promote_every": 4}}, {"FIREATTN_PROMOTE_EVERY": "0"}).promote_every == 4
    resolve({"fireattn": {"promote_every": 4}}, {}).check_head_dim(128)
    resolve({"fireattn": {"promote_every": 1}}, {}).check_head_dim(256)
    with pytest.raises(FireAttnConfigError, match="head_dim 256 layers accept 0 \\(never\\) or 1"):
        resolve({"fireattn": {"promote_every": 4}}, {}).check_head_dim(256)
