"""MXFP4 dequantisation (numpy and in-jit) against transformers' own, and the test quantiser."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.weights.text_encoder import MXFP4_DEQUANT
from lens_jax.models import mxfp4


E, OUT, IN = 3, 16, 96  # 3 blocks of 32 per row


def _random_packed(seed=0, lo=110, hi=140):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(E, OUT, IN // 32, 16), dtype=np.uint8)
    scales = rng.integers(lo, hi, size=(E, OUT, IN // 32), dtype=np.uint8)
    return blocks, scales


def test_dequantize_matches_transformers():
    torch = pytest.importorskip("torch")  # only this test needs the reference; the others run without torch
    hf_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    blocks, scales = _random_packed()
    # transformers returns the in-memory parameter layout [E, in, out]
    ref = hf_mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    ours = mxfp4.dequantize_np(blocks, scales)
    assert ours.shape == (E, OUT, IN)
    np.testing.assert_array_equal(ours.transpose(0, 2, 1), ref.numpy())
    # the conversion transform yields the same [E, in, out] tensor
    np.testing.assert_array_equal(MXFP4_DEQUANT.apply(blocks, scales), ref.numpy())
    assert MXFP4_DEQUANT.source_shapes((E, IN, OUT)) == (blocks.shape, scales.shape)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jnp_dequantize_matches_numpy(dtype):
    blocks, scales = _random_packed(1)
    ours = jax.jit(mxfp4.dequantize, static_argnums=2)(jnp.asarray(blocks), jnp.asarray(scales), dtype)
    assert ours.dtype == dtype
    # exact: a 2-bit mantissa times a power of two is representable in both dtypes
    np.testing.assert_array_equal(np.asarray(ours, np.float32), mxfp4.dequantize_np(blocks, scales))


def test_nibble_order_table_and_scale():
    blocks = np.zeros((1, 1, 16), np.uint8)
    blocks[0, 0, 0] = 0x21  # low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1
    blocks[0, 0, 1] = 0xF8  # low 8 (-0), high 15 (-6)
    blocks[0, 0, 2] = 0x7B  # low 11 (-1.5), high 7 (6)
    out = mxfp4.dequantize_np(blocks, np.array([[128]], np.uint8))[0]  # scale 2**1
    np.testing.assert_array_equal(out[:6], [1.0, 2.0, -0.0, -12.0, -3.0, 12.0])
    assert np.signbit(out[2])
    assert not out[6:].any()


def test_quantiser_round_trip():
    rng = np.random.default_rng(2)
    # values already on the grid come back exactly
    grid = np.asarray(mxfp4.FP4_VALUES, np.float32)
    scale = 2.0 ** rng.integers(-6, 3, size=(4, 2))
    exact = (rng.choice(grid, size=(4, 64)) * scale.repeat(32, axis=1)).astype(np.float32)
    exact[:, ::32] = -6.0 * scale  # pin each block's largest magnitude, so its exponent is known
    b, s = mxfp4.quantize_np(exact)
    assert b.dtype == np.uint8 and b.shape == (4, 2, 16) and s.shape == (4, 2)
    assert b.flags["C_CONTIGUOUS"] and s.flags["C_CONTIGUOUS"]  # safetensors writes raw memory order
    np.testing.assert_array_equal(mxfp4.dequantize_np(b, s), exact)
    # random values: round to nearest (at most half the largest step, 1 * 2**e) except that block maxima
    # in [6, 8) * 2**e saturate to 6 * 2**e (at most 2 * 2**e)
    x = rng.normal(0, 0.05, size=(8, 128)).astype(np.float32)
    b, s = mxfp4.quantize_np(x)
    y = mxfp4.dequantize_np(b, s)
    unit = np.repeat(2.0 ** (s.astype(np.float64) - 127), 32, axis=-1)
    err = np.abs(y - x)
    assert np.all(err <= np.where(np.abs(x) > 6 * unit, 2, 1) * unit + 1e-12)
    assert np.linalg.norm(y - x) < 0.15 * np.linalg.norm(x)  # about 0.12 for Gaussian blocks


def test_shape_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.packed_shapes((4, 33))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize_np(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8))
