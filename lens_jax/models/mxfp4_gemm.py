"""Grouped matmul over MXFP4-packed experts, decoding the weights inside the kernel (Pallas, GPU).

`gmm(x, blocks, scales, group_sizes)` computes, for rows `x` sorted by expert (megablox gmm /
`jax.lax.ragged_dot` semantics), `x[rows of e] @ W_e^T` where W_e [out, in] is the MXFP4 weight
stored as `mxfp4.py` describes (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32]).
The kernel reads the packed codes and scales, decodes each weight tile in registers with
`mxfp4.decode`'s integer formula (so the weights are bit-equal to `mxfp4.decode`'s) and accumulates
in float32; decoded experts are never written to memory, and experts without rows are never read.

Layout of the work: the rows of each expert are cut into tiles of `block_m` rows starting at the
expert's first row (at most rows/block_m + experts tiles in all; a static upper bound sizes the
grid, spare tiles do nothing). Program (tile, j) computes rows [start, end) of its expert for output
columns [j*block_n, (j+1)*block_n), looping over the input dimension `block_k` values at a time.
The packed bytes are read as 16-bit words of four codes (input columns 4w..4w+3, lowest nibble
first): the kernel decodes the four quarters of a [block_n, block_k/4] word tile and interleaves them
(`jnp.stack(..., axis=-1)`, Triton's `join`) into the [block_n, block_k] weight tile, so `x` is read
in its own layout.

Backends: on GPU the kernel lowers through Pallas' Triton backend; on CPU it runs in Pallas'
interpret mode (tests; slow); TPU is not supported (use the XLA dispatches there). The kernel has no
autodiff rule (the text encoder's "gmm" dispatch takes the ragged dispatch's gradient).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import mxfp4

__all__ = ["Tiling", "default_tiling", "tile_bounds", "gmm", "check_shapes"]


@dataclass(frozen=True)
class Tiling:
    """Kernel tile sizes: rows per tile (`block_m`), output columns per program (`block_n`) and input
    values per loop step (`block_k`); powers of two (Triton's block shapes), block_k a multiple of 32."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def _largest_pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def check_shapes(x_shape, blocks_shape, scales_shape, num_groups: int) -> tuple[int, int]:
    """(in, out) of a gmm call, or a ValueError naming the bad shape and the fix."""
    if len(x_shape) != 2:
        raise ValueError(f"mxfp4 gmm: x must be [rows, in], got shape {tuple(x_shape)}.")
    if len(blocks_shape) != 4 or blocks_shape[-1] != mxfp4.BLOCK // 2 or tuple(scales_shape) != tuple(blocks_shape[:3]):
        raise ValueError(f"mxfp4 gmm: blocks {tuple(blocks_shape)} / scales {tuple(scales_shape)} are not MXFP4 "
                         f"experts: expected blocks [groups, out, in/{mxfp4.BLOCK}, {mxfp4.BLOCK // 2}] uint8 and "
                         "scales [groups, out, in/32] uint8 (flatten leading layer/expert axes into groups).")
    k = x_shape[1]
    n_groups, n_out, n_blocks = blocks_shape[:3]
    if k != n_blocks * mxfp4.BLOCK:
        raise ValueError(f"mxfp4 gmm: x has {k} input features but the experts take {n_blocks * mxfp4.BLOCK} "
                         f"({n_blocks} blocks of {mxfp4.BLOCK}); the input dimension must match and be a multiple of "
                         f"{mxfp4.BLOCK}.")
    if n_out % 16:
        raise ValueError(f"mxfp4 gmm: the experts' output dimension {n_out} is not a multiple of 16 (the kernel's "
                         "smallest column tile); use moe_impl='grouped' for this shape.")
    if num_groups > n_groups:
        raise ValueError(f"mxfp4 gmm: {num_groups} group sizes for {n_groups} stored experts.")
    return k, n_out


def default_tiling(rows: int, num_groups: int, k: int, n_out: int) -> Tiling:
    """Tiles for `rows` rows over `num_groups` experts: block_m about the mean rows per expert (16..128:
    each tile decodes its weight columns once, so larger tiles decode less often), block_n and block_k
    the largest powers of two up to 128 / 128 dividing the output / input dimension."""
    mean = max(1, -(-rows // max(num_groups, 1)))
    block_m = int(min(128, max(16, 1 << (mean - 1).bit_length())))
    block_n = _largest_pow2_divisor(n_out, 128)
    block_k = 2 * _largest_pow2_divisor(k // 2, 64)
    return Tiling(block_m, block_n, block_k)


def tile_bounds(group_sizes: jax.Array, block_m: int, num_tiles: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(group, start row, end row) int32 [num_tiles] of every row tile: group e's rows
    [offset_e, offset_e + size_e) in tiles of block_m rows from offset_e; unused tiles have start == end."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    tiles = (sizes + block_m - 1) // block_m
    tile_ends = jnp.cumsum(tiles)
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    # the group of tile t: how many groups end at or before it (a compare and a sum: no search loop)
    group = jnp.minimum(jnp.sum(tile_ends[None, :] <= t[:, None], axis=1), sizes.shape[0] - 1).astype(jnp.int32)
    local = t - (tile_ends - tiles)[group]
    start = starts[group] + local * block_m
    used = t < tile_ends[-1]
    end = jnp.where(used, jnp.minimum(start + block_m, ends[group]), start)
    return group, jnp.where(used, start, 0), jnp.where(used, end, 0)


def _kernel(group_ref, start_ref, end_ref, offset_ref, x_ref, words_ref, scales_ref, out_ref, *, tiling: Tiling,
            num_rows: int, k: int, fast: bool, dot_dtype, precision):
    bm, bn = tiling.block_m, tiling.block_n
    bkw = tiling.block_k // 4  # packed 16-bit words per weight row and step (four input columns each)
    t, j = pl.program_id(0), pl.program_id(1)
    start, end = start_ref[t], end_ref[t]
    g = group_ref[t] + offset_ref[0]
    n0 = j * bn
    uint, mant, bias, max_exp = mxfp4._FORMATS[jnp.dtype(dot_dtype)]

    @pl.when(start < end)
    def _():
        # a tile near the end reads the last bm rows (in bounds, no padding) and stores only its own
        base = jnp.minimum(start, num_rows - bm)
        rows = pl.ds(base, bm)

        def step(i, acc):
            kw = i * bkw
            x = x_ref[rows, pl.ds(4 * kw, 4 * bkw)].astype(dot_dtype)  # [bm, bk]
            words = words_ref[g, pl.ds(n0, bn), pl.ds(kw, bkw)].astype(jnp.int32)  # [bn, bkw]
            sc = scales_ref[g, pl.ds(n0, bn), pl.ds(kw // 8, bkw // 8)].astype(jnp.int32)  # [bn, bkw/8]
            # one scale per 8 words (32 values): repeat each along the word axis
            sc = jnp.broadcast_to(sc[:, :, None], (bn, bkw // 8, 8)).reshape(bn, bkw)

            def weights(q):  # the decoded values of input columns 4w + q
                bits = mxfp4._float_bits((words >> (4 * q)) & 0xF, sc, mant, bias, max_exp, fast)
                return jax.lax.bitcast_convert_type(bits.astype(uint), dot_dtype)  # [bn, bkw]

            # interleave the four [bn, bkw] quarters into [bn, bk] (column 4w + 2a + b from quarter 2a + b),
            # two levels of Triton `join` (a two-way stack on a new last axis)
            pairs = [jnp.stack([weights(b), weights(2 + b)], axis=-1) for b in (0, 1)]  # [bn, bkw, a]
            w = jnp.stack(pairs, axis=-1).reshape(bn, 4 * bkw)  # [bn, bkw, a, b] -> [bn, bk]
            return acc + pl.dot(x, w, trans_b=True, precision=precision)

        acc = jax.lax.fori_loop(0, k // (4 * bkw), step, jnp.zeros((bm, bn), jnp.float32))
        row = base + jnp.arange(bm)
        mask = ((row >= start) & (row < end))[:, None]
        plgpu.store(out_ref.at[rows, pl.ds(n0, bn)], acc.astype(out_ref.dtype), mask=mask)


def gmm(x: jax.Array, blocks: jax.Array, scales: jax.Array, group_sizes: jax.Array, group_offset=0, *,
        fast: bool = False, out_dtype=None, tiling: Tiling | None = None, interpret: bool | None = None) -> jax.Array:
    """Grouped matmul with MXFP4 weights decoded in the kernel: y[r] = x[r] @ W_{g(r)}^T.

    x [rows, in] float, rows sorted by group (the first group_sizes[0] rows use group 0, ...; the sizes
    sum to `rows`). blocks uint8 [groups, out, in/32, 16] and scales uint8 [groups, out, in/32]: stored
    MXFP4 experts, group e of this call is stored group `group_offset + e` (so one call can address one
    layer of a flattened [layers * experts] stack without slicing it). Weights are decoded to x's dtype
    (`mxfp4.decode(..., fast=fast)`: `fast` only where `mxfp4.fast_decodable` holds) and multiplied in
    it with float32 accumulation (float32 x: full-precision dots, no TF32). Returns [rows, out] in
    `out_dtype` (default x's dtype).

    interpret: run the kernel in Pallas' interpret mode (None: where the program is lowered for CPU).
    Raises ValueError for shapes the kernel does not take (input not a multiple of 32, output not a
    multiple of 16, a tiling that does not divide them).
    """
    k, n_out = check_shapes(x.shape, blocks.shape, scales.shape, group_sizes.shape[0])
    rows = x.shape[0]
    dot_dtype = jnp.dtype(x.dtype)
    if dot_dtype not in mxfp4._FORMATS:
        raise ValueError(f"mxfp4 gmm: x dtype {dot_dtype} is not float32 / bfloat16 / float16.")
    out_dtype = jnp.dtype(out_dtype or dot_dtype)
    tiling = tiling or default_tiling(rows, group_sizes.shape[0], k, n_out)
    if n_out % tiling.block_n or k % tiling.block_k or tiling.block_k % mxfp4.BLOCK:
        raise ValueError(f"mxfp4 gmm: {tiling} does not tile in={k} / out={n_out} (block_n must divide out, block_k "
                         f"divide in and be a multiple of {mxfp4.BLOCK}).")
    bm = tiling.block_m
    num_tiles = -(-rows // bm) + group_sizes.shape[0]  # every group adds at most one partial tile
    group, start, end = tile_bounds(group_sizes, bm, num_tiles)
    xp = jnp.pad(x, ((0, bm - rows), (0, 0))) if rows < bm else x  # fewer rows than one tile: pad to one
    # [groups, out, in/4] uint16 (a free bitcast): word w holds columns 4w..4w+3, lowest nibble first
    # (little-endian). 16-bit elements keep Pallas' 32-bit element offsets exact for stacks up to 4 GiB
    # (above that it switches to 64-bit offsets); byte offsets of a 2-4 GiB uint8 stack (one layer
    # type's 24 layers of GPT-OSS-20B experts) would overflow them.
    words = jax.lax.bitcast_convert_type(blocks.reshape(*blocks.shape[:2], k // 4, 2), jnp.uint16)
    offset = jnp.reshape(jnp.asarray(group_offset, jnp.int32), (1,))
    precision = jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, tiling=tiling, num_rows=xp.shape[0], k=k, fast=fast,
                               dot_dtype=dot_dtype, precision=precision)
    whole = pl.no_block_spec  # refs are whole arrays; the kernel indexes them itself

    def call(interpret: bool, *operands):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((xp.shape[0], n_out), out_dtype),
            grid=(num_tiles, n_out // tiling.block_n),
            in_specs=[whole] * 7,
            out_specs=whole,
            compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
            interpret=interpret,
            name="mxfp4_gmm",
        )(*operands)

    operands = (group, start, end, offset, xp, words, scales)
    if interpret is None:  # by the platform lowered for: interpret mode on CPU, Triton elsewhere
        out = jax.lax.platform_dependent(*operands, cpu=functools.partial(call, True),
                                         default=functools.partial(call, False))
    else:
        out = call(interpret, *operands)
    return out[:rows] if rows < bm else out
