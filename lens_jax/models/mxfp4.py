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

__all__ = ["FP4_VALUES", "BLOCK", "SCALE_BIAS", "dequantize_np", "dequantize", "decode", "fast_decodable", "fast_scale_range", "quantize_np", "packed_shapes"]

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


# Target float formats of the gather-free decode: (same-width unsigned int, mantissa bits, exponent
# bias, largest biased exponent of a finite value).
_FORMATS = {
    jnp.dtype(jnp.float32): (jnp.uint32, 23, 127, 254),
    jnp.dtype(jnp.bfloat16): (jnp.uint16, 7, 127, 254),
    jnp.dtype(jnp.float16): (jnp.uint16, 10, 15, 30),
}


def fast_scale_range(dtype) -> tuple[int, int]:
    """(lo, hi): the scale bytes for which `decode(..., fast=True)` is exact in `dtype` (float32 /
    bfloat16: 2..252, float16: 114..140): every value of such a block is a normal number."""
    _, _, bias, max_exp = _FORMATS[jnp.dtype(dtype)]
    return 129 - bias, max_exp + 125 - bias


def fast_decodable(scales: jax.Array, dtype) -> jax.Array:
    """Scalar bool: every scale byte lies in `fast_scale_range(dtype)` (true of real checkpoints)."""
    lo, hi = fast_scale_range(_decode_dtype(dtype))
    return jnp.all((scales >= lo) & (scales <= hi))


def _decode_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    return dtype if dtype in _FORMATS else jnp.dtype(jnp.float32)


def _codes_shift(blocks: jax.Array) -> jax.Array:
    """uint8 [..., G, 16] packed pairs -> int32 E2M1 codes [..., G, 32] (low nibble first), as one
    broadcast and shift: no stack or gather, so it fuses into whatever consumes it (GPU, TPU)."""
    pair = blocks.astype(jnp.int32)[..., None] >> jnp.asarray([0, 4], jnp.int32)
    return (pair & 0xF).reshape(*blocks.shape[:-1], BLOCK)


def _codes_words(blocks: jax.Array) -> jax.Array:
    """`_codes_shift` for XLA:CPU, reading the packed bytes as uint32 words of eight codes.

    XLA:CPU vectorises the decode loop over the output (8 lanes); `_codes_shift`'s element k reads byte
    k // 2, a different byte per lane, which it emits as eight scalar loads per vector. Here element k
    reads word k // 8, one load broadcast to all lanes of an aligned vector, and shifts it by 4 (k % 8).
    (The shift table is an iota: where XLA hoists it out of a loop as an array, the loop goes scalar
    again; `text_encoder`'s tiled MoE decodes inside a `lax.cond` branch, where it stays put.)"""
    words = jax.lax.bitcast_convert_type(blocks.reshape(*blocks.shape[:-1], 4, 4), jnp.uint32)  # [..., G, 4]
    shape = (*words.shape, 8)
    shift = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1) * 4
    codes = (jnp.broadcast_to(words[..., None], shape) >> shift) & 0xF
    return codes.reshape(*blocks.shape[:-1], BLOCK).astype(jnp.int32)


def _codes(blocks: jax.Array) -> jax.Array:
    """The E2M1 codes of packed `blocks`, by the formula that compiles best on the platform lowered for
    (only that branch is in a single-platform program)."""
    return jax.lax.platform_dependent(blocks, cpu=_codes_words, default=_codes_shift)


def _float_bits(code: jax.Array, scale: jax.Array, mant: int, bias: int, max_exp: int, fast: bool) -> jax.Array:
    """int32 bit patterns of E2M1 `code` x 2**(scale - 127) in a float format with `mant` mantissa
    bits, exponent `bias` and largest finite biased exponent `max_exp`, rounded like a float cast
    (round to nearest even into subnormals, overflow to infinity). code int32 [..., 32], scale
    int32 [..., 1] (broadcast over the block).

    A code is sign (bit 3), exponent e (bits 2-1), mantissa m (bit 0): e > 0 is 2**(e-1) x 1.m and
    e == 0 is m x 0.5 (zero or one half). With x0 = scale - 128 + bias the biased exponent of the
    result is e + x0 (e > 0) or x0 (the half), so for blocks in `fast_scale_range` (1 <= x0 <=
    max_exp - 3) the bits are simply `mag << (mant - 1)` + `x0 << mant`. `fast=True` computes only
    that; otherwise blocks outside the range take the general formula.
    """
    width = 32 if mant == 23 else 16
    sign = (code & 8) << (width - 4)
    mag = code & 7
    x0 = scale - 128 + bias
    bits = jnp.where(mag >= 2, (mag << (mant - 1)) + (x0 << mant), jnp.where(mag == 1, x0 << mant, 0))
    if not fast:
        e, m = mag >> 1, mag & 1
        x = jnp.where(e > 0, e + x0, x0)  # biased exponent of the leading bit
        q = jnp.where(e > 0, 2 + m, 2)  # significand with one fraction bit: 1.0 -> 2, 1.5 -> 3
        normal = (x << mant) | (jnp.where(e > 0, m, 0) << (mant - 1))
        # x <= 0: a subnormal, q x 2**(x + mant - 2) units of the smallest subnormal; right shifts
        # round to nearest even (only float16 gets there with bits to drop)
        s = x + mant - 2
        up = q << jnp.clip(s, 0, mant)
        n = jnp.clip(-s, 1, 4)
        down = (q + ((1 << n) >> 1) - 1 + ((q >> n) & 1)) >> n
        general = jnp.where(x <= 0, jnp.where(s >= 0, up, down),
                            jnp.where(x > max_exp, (max_exp + 1) << mant, normal))
        in_range = (x0 >= 1) & (x0 <= max_exp - 3)
        bits = jnp.where(in_range, bits, jnp.where(mag == 0, 0, general))
    return sign | bits


def decode(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16, *, fast: bool = False) -> jax.Array:
    """jnp MXFP4 -> [..., rows, G*32] in `dtype`, for use inside jit.

    Gather-free and exact: each value's bits are assembled from its E2M1 code and the block's E8M0
    scale with integer ops and one `bitcast_convert_type` (float32 / bfloat16 / float16; other float
    dtypes are decoded in float32 and cast), equal to `dequantize_np(...).astype(dtype)` for every
    code and scale byte (float16 included: its subnormals round to nearest even, larger values
    overflow to inf). Elementwise, so it fuses into its consumer: a matmul that contracts the stored
    [out, in] layout directly (`lax.dot_general`) lets XLA:GPU fuse the decode into the dot operand.

    fast=True: only the direct formula (constant shifts), exact where `fast_decodable(scales, dtype)`
    holds, garbage elsewhere; pick it with a `lax.cond` on that predicate (`dequantize` does). On CPU
    decode + matmul ran 1.6x faster with it than with the general formula's variable shifts.

    Caveat: backends that flush subnormals (XLA on CPU) treat the subnormal results of scale bytes 0
    and 1 (float32 / bfloat16) as zero in any later arithmetic; real checkpoints use scales far
    above that.
    """
    _check(blocks.shape, scales.shape)
    target = jnp.dtype(dtype)
    dt = _decode_dtype(target)
    uint, mant, bias, max_exp = _FORMATS[dt]
    bits = _float_bits(_codes(blocks), scales.astype(jnp.int32)[..., None], mant, bias, max_exp, fast)
    out = jax.lax.bitcast_convert_type(bits.astype(uint), dt).reshape(*blocks.shape[:-2], -1)
    return out if dt == target else out.astype(target)


def dequantize(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """jnp MXFP4 -> [..., rows, G*32] in `dtype`, exact for every scale byte: `decode`'s direct formula
    when every scale allows it, else the general one (a `lax.cond`, so the result is materialised;
    inside a matmul call `decode` next to the dot instead)."""
    return jax.lax.cond(fast_decodable(scales, dtype), lambda: decode(blocks, scales, dtype, fast=True),
                        lambda: decode(blocks, scales, dtype))


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
