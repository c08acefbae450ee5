"""MXFP4 (OCP microscaling FP4) as stored by the `openai/gpt-oss-*` checkpoints.

Layout of one quantised weight [..., rows, cols] (rows = output features, cols = input
features, i.e. PyTorch's Linear orientation):
  * `blocks` uint8 [..., rows, cols/32, 16]: two FP4 E2M1 codes per byte, the LOW nibble is the
    even element and the HIGH nibble the odd element of each pair;
  * `scales` uint8 [..., rows, cols/32]: an E8M0 exponent per block of 32 values, value
    2**(s - 127).
Code -> value: [+0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6] (bit 3 = sign).

Dequantisation is exact in float32 and in bfloat16 (every product is a 2-bit mantissa times
a power of two), so the packed and the dequantised models compute the same function. The
numpy functions serve conversion and tests; `dequantize` runs inside jitted forwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FP4_VALUES", "BLOCK", "SCALE_BIAS", "dequantize_np", "dequantize", "quantize_np", "packed_shapes"]

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SCALE_BIAS = 127


def packed_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(blocks shape, scales shape) for a dequantised [..., rows, cols] tensor."""
    *lead, cols = shape
    if cols % BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {BLOCK}, got {cols}.")
    return (*lead, cols // BLOCK, BLOCK // 2), (*lead, cols // BLOCK)


def _check(blocks_shape, scales_shape) -> None:
    if tuple(blocks_shape[:-1]) != tuple(scales_shape) or blocks_shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks_shape)} and scales {tuple(scales_shape)} do not match: expected "
            f"blocks [..., G, {BLOCK // 2}] and scales [..., G]."
        )


def dequantize_np(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Numpy MXFP4 -> [..., rows, G*32] in `dtype` (exact; subnormal scales kept)."""
    _check(blocks.shape, scales.shape)
    blocks = np.asarray(blocks, np.uint8)
    lut = np.asarray(FP4_VALUES, np.float32)
    vals = np.empty((*blocks.shape[:-1], BLOCK), np.float32)
    vals[..., 0::2] = lut[blocks & 0x0F]
    vals[..., 1::2] = lut[blocks >> 4]
    np.ldexp(vals, np.asarray(scales, np.int32)[..., None] - SCALE_BIAS, out=vals)  # in place: one f32 copy
    return vals.reshape(*blocks.shape[:-2], -1).astype(dtype, copy=False)


def dequantize(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """jnp MXFP4 -> [..., rows, G*32] in `dtype`; for use inside jit, one layer/expert at a time.

    Backends that flush subnormals (XLA on CPU) turn blocks with scale bytes below 2 into zeros;
    real checkpoints use scales far above that.
    """
    _check(blocks.shape, scales.shape)
    lut = jnp.asarray(FP4_VALUES, dtype)
    lo = jnp.take(lut, (blocks & 0x0F).astype(jnp.int32), mode="clip")
    hi = jnp.take(lut, (blocks >> 4).astype(jnp.int32), mode="clip")
    vals = jnp.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], BLOCK)
    scale = jnp.ldexp(jnp.ones((), jnp.float32), scales.astype(jnp.int32) - SCALE_BIAS).astype(dtype)
    return (vals * scale[..., None]).reshape(*blocks.shape[:-2], -1)


def quantize_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise [..., rows, cols] floats to MXFP4 (blocks, scales) along the last axis.

    OCP-style shared exponent floor(log2(amax)) - 2 per block of 32 and round-to-nearest onto
    the E2M1 grid (magnitudes above 6 * 2**e saturate to 6). Used by tests and benchmarks.
    """
    x = np.asarray(x, np.float32)
    blocks_shape, scales_shape = packed_shapes(x.shape)
    xb = x.reshape(*scales_shape, BLOCK)
    amax = np.max(np.abs(xb), axis=-1)
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -SCALE_BIAS)
    exp = np.clip(exp, -SCALE_BIAS, 255 - SCALE_BIAS).astype(np.int32)
    scaled = np.ldexp(xb, -exp[..., None])
    mags = np.asarray(FP4_VALUES[:8], np.float32)
    code = np.argmin(np.abs(np.abs(scaled)[..., None] - mags), axis=-1).astype(np.uint8)
    code |= np.where(scaled < 0, 8, 0).astype(np.uint8)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    scales = (exp + SCALE_BIAS).astype(np.uint8)
    return np.ascontiguousarray(packed.reshape(blocks_shape)), np.ascontiguousarray(scales.reshape(scales_shape))
