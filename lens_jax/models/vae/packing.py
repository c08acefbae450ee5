"""Lens latent packing: VAE latents <-> DiT tokens, with the VAE's BatchNorm normalisation.

Layouts (NHWC throughout):
  latent      [B, 2h, 2w, C]          the VAE's latent (C = 32 for FLUX.2)
  patchified  [B, h, w, 4C]           2x2 patches moved to channels in (c, p1, p2) order,
                                      i.e. channel c*4 + p1*2 + p2 holds latent[2y+p1, 2x+p2, c]
  tokens      [B, h*w, 4C]            patchified, positions flattened row-major (y, x)

Lens' normalisation is a BatchNorm without affine over the patchified channels:
  normalised = (x - running_mean) / sqrt(running_var + eps), and its inverse
  x = normalised * sqrt(running_var + eps) + running_mean, both in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["patchify", "unpatchify", "pack", "unpack", "normalize", "denormalize"]


def patchify(z: jax.Array) -> jax.Array:
    """[B, 2h, 2w, C] -> [B, h, w, 4C], channel order (c, p1, p2)."""
    b, hh, ww, c = z.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"patchify needs an even latent height and width, got {hh}x{ww}.")
    z = z.reshape(b, hh // 2, 2, ww // 2, 2, c)
    return z.transpose(0, 1, 3, 5, 2, 4).reshape(b, hh // 2, ww // 2, 4 * c)


def unpatchify(p: jax.Array) -> jax.Array:
    """[B, h, w, 4C] (c, p1, p2) -> [B, 2h, 2w, C]; the inverse of `patchify`."""
    b, h, w, c4 = p.shape
    c = c4 // 4
    p = p.reshape(b, h, w, c, 2, 2)
    return p.transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c)


def pack(p: jax.Array) -> jax.Array:
    """[B, h, w, D] -> tokens [B, h*w, D] (row-major positions)."""
    b, h, w, d = p.shape
    return p.reshape(b, h * w, d)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """tokens [B, h*w, D] -> [B, h, w, D]."""
    b, n, d = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens cannot form a {h}x{w} grid (needs {h * w}).")
    return tokens.reshape(b, h, w, d)


def _bn_std(bn: dict, eps: float) -> jax.Array:
    return jnp.sqrt(bn["running_var"].astype(jnp.float32) + eps)


def normalize(x: jax.Array, bn: dict, eps: float) -> jax.Array:
    """(x - running_mean) / sqrt(running_var + eps) over the last axis, in float32."""
    return (x.astype(jnp.float32) - bn["running_mean"].astype(jnp.float32)) / _bn_std(bn, eps)


def denormalize(x: jax.Array, bn: dict, eps: float) -> jax.Array:
    """x * sqrt(running_var + eps) + running_mean over the last axis, in float32."""
    return x.astype(jnp.float32) * _bn_std(bn, eps) + bn["running_mean"].astype(jnp.float32)
