"""Tiled decoding with overlap blending, for images too large to decode in one pass.

Off by default: each tile normalises with its own GroupNorm statistics and attends only within
itself, so the result differs slightly from a one-pass decode (as diffusers' tiled decode does).
All tiles have the same shape, so the decoder compiles once and runs tile by tile under
`lax.map`, keeping peak memory at one tile's activations. Overlapping tiles are cross-faded with
linear ramps; the weights are normalised, so they form a partition of unity at every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Tiling", "tile_starts", "blend_tiles", "decode_tiled"]


@dataclass(frozen=True)
class Tiling:
    """Tile side and overlap in latent positions (x8 pixels for FLUX.2): 64/16 = 512 px tiles, 128 px blend."""

    tile: int = 64
    overlap: int = 16

    def __post_init__(self):
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tiling needs 0 <= overlap < tile, got tile={self.tile}, overlap={self.overlap}.")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length min(tile, size) covering [0, size); the last one ends at size."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp_weights(length: int, ramp: int, lead: bool, trail: bool) -> np.ndarray:
    w = np.ones(length, np.float64)
    if ramp > 0:
        r = (np.arange(ramp) + 0.5) / ramp
        if lead:
            w[:ramp] = np.minimum(w[:ramp], r)
        if trail:
            w[length - ramp:] = np.minimum(w[length - ramp:], r[::-1])
    return w


def blend_tiles(tiles: jax.Array, ys: list[int], xs: list[int], out_hw: tuple[int, int], ramp: int) -> jax.Array:
    """Cross-fade tiles [len(ys)*len(xs), B, th, tw, C] (row-major over (ys, xs)) placed at pixel
    offsets (y, x) into [B, H, W, C], with linear ramps of `ramp` pixels on edges shared with a
    neighbour. Computed in float32; weights are normalised per pixel."""
    n, b, th, tw, c = tiles.shape
    hh, ww = out_hw
    wys = [_ramp_weights(th, ramp, y > 0, y + th < hh) for y in ys]
    wxs = [_ramp_weights(tw, ramp, x > 0, x + tw < ww) for x in xs]
    total = np.zeros((hh, ww), np.float64)
    for y, wy in zip(ys, wys):
        for x, wx in zip(xs, wxs):
            total[y:y + th, x:x + tw] += np.outer(wy, wx)
    out = jnp.zeros((b, hh, ww, c), jnp.float32)
    k = 0
    for y, wy in zip(ys, wys):
        for x, wx in zip(xs, wxs):
            w = np.outer(wy, wx) / total[y:y + th, x:x + tw]
            out = out.at[:, y:y + th, x:x + tw].add(tiles[k].astype(jnp.float32) * jnp.asarray(w, jnp.float32)[..., None])
            k += 1
    return out


def decode_tiled(decode_fn: Callable[[jax.Array], jax.Array], z: jax.Array, tiling: Tiling, factor: int) -> jax.Array:
    """Decode latent [B, h, w, C] tile by tile with `decode_fn` ([B, th, tw, C] -> [B, th*f, tw*f, 3])."""
    b, h, w, _ = z.shape
    th, tw = min(tiling.tile, h), min(tiling.tile, w)
    ys, xs = tile_starts(h, tiling.tile, tiling.overlap), tile_starts(w, tiling.tile, tiling.overlap)
    if len(ys) == 1 and len(xs) == 1:
        return decode_fn(z)
    tiles = jnp.stack([z[:, y:y + th, x:x + tw] for y in ys for x in xs])
    decoded = jax.lax.map(decode_fn, tiles)
    out = blend_tiles(decoded, [y * factor for y in ys], [x * factor for x in xs], (h * factor, w * factor),
                      tiling.overlap * factor)
    return out.astype(decoded.dtype)
