"""GPU: ops.cache_write is bitwise equal to the reference quantizer/copy."""
import pytest
import torch

from helpers import make_scales
from vllm_fireattn import ops
from vllm_fireattn import reference as ref

pytestmark = pytest.mark.gpu


def _cache(num_blocks, hkv, bs, d, dtype, pad=0):
    page = 2 * hkv * bs * d
    storage = torch.zeros(num_blocks * (page + pad), dtype=dtype, device="cuda")
    return storage.as_strided((num_blocks, 2, hkv, bs, d), (page + pad, hkv * bs * d, bs * d, d, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "native"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("scale_mode", ["head", "tensor", "one"])
def test_cache_write_bitwise(scale_mode, block_size, head_dim, fp8, dtype):
    gen = torch.Generator().manual_seed(head_dim + block_size)
    hkv, num_blocks, n = 4, 23, 150
    # Strided key/value as vLLM hands them over (slices of a fused qkv projection), scaled so
    # that some values saturate at +-448 * scale.
    qkv = (torch.randn(n + 4, 3 * hkv * head_dim, generator=gen) * 30).to(device="cuda", dtype=dtype)
    key = qkv[:, : hkv * head_dim].view(n + 4, hkv, head_dim)
    value = qkv[:, hkv * head_dim : 2 * hkv * head_dim].view(n + 4, hkv, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[::7] = -1  # padded tokens
    slots = slots.to("cuda")
    k_scale = make_scales(hkv, scale_mode, 40.0, "cuda", gen)
    v_scale = make_scales(hkv, scale_mode, 40.0, "cuda", gen)
    cache_dtype = torch.uint8 if fp8 else dtype
    got = _cache(num_blocks, hkv, block_size, head_dim, cache_dtype, pad=64)
    want = _cache(num_blocks, hkv, block_size, head_dim, cache_dtype, pad=64)
    got.as_strided((got.untyped_storage().nbytes() // got.element_size(),), (1,), 0).fill_(7)
    want.as_strided((want.untyped_storage().nbytes() // want.element_size(),), (1,), 0).fill_(7)
    ops.cache_write(key, value, got, slots, k_scale, v_scale)
    ref.cache_write(key, value, want, slots, k_scale, v_scale)
    full = lambda t: t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)  # noqa: E731
    assert torch.equal(full(got).view(torch.uint8), full(want).view(torch.uint8))
    if fp8 and scale_mode != "one":
        assert (got.view(torch.float8_e4m3fn).float().abs() == 448).any(), "test meant to exercise saturation"


def test_cache_write_float8_dtype_cache_and_errors():
    hkv, d, bs = 2, 128, 16
    key = torch.randn(5, hkv, d, device="cuda", dtype=torch.bfloat16)
    cache = torch.zeros(4, 2, hkv, bs, d, dtype=torch.float8_e4m3fn, device="cuda")
    want = torch.zeros_like(cache)
    slots = torch.tensor([0, 17, 33, -1, 63], device="cuda")
    s = torch.tensor(0.01, device="cuda")
    ops.cache_write(key, key, cache, slots, s, s)
    ref.cache_write(key, key, want, slots, s, s)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(RuntimeError, match="slot_mapping must be a 1-D int64"):
        ops.cache_write(key, key, cache, slots.int(), s, s)
    with pytest.raises(RuntimeError, match="does not match key dtype"):
        ops.cache_write(key, key, torch.zeros(4, 2, hkv, bs, d, dtype=torch.float16, device="cuda"), slots, s, s)
