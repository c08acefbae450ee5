"""Lens' use of the VAE: tokens <-> images, input checks, and the `VAE` object returned by `load`.

Pure functions here (NHWC, jit-able with `config` and `tiling` static) are what the pipeline
calls inside its own jit; the `VAE` class wraps them for eager use with diffusers' NCHW layout.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from . import model
from .config import VAEConfig
from .layers import ATTENTION_QUERY_CHUNK
from .packing import denormalize, normalize, pack, patchify, unpack, unpatchify
from .tiling import Tiling

__all__ = ["tokens_to_latent", "latent_to_tokens", "decode_tokens", "encode_to_tokens", "VAE"]

Params = dict


# ----------------------------------------------------------------------------------------------
# input checks (shapes are static, so these also run while tracing under jit)


def _check_latent(z, config: VAEConfig, layout: str = "NHWC") -> None:
    axis = 1 if layout == "NCHW" else -1
    if z.ndim != 4 or z.shape[axis] != config.latent_channels:
        want = "[B, C, h, w]" if layout == "NCHW" else "[B, h, w, C]"
        raise ValueError(
            f"latent must be {layout} {want} with C = latent_channels = {config.latent_channels}, got shape "
            f"{tuple(z.shape)}. Pass the VAE latent (not packed tokens; use decode_tokens for those)."
        )


def _check_image(x, config: VAEConfig, layout: str = "NHWC", multiple: int = 1) -> None:
    axis = 1 if layout == "NCHW" else -1
    if x.ndim != 4 or x.shape[axis] != config.in_channels:
        want = "[B, C, H, W]" if layout == "NCHW" else "[B, H, W, C]"
        raise ValueError(
            f"image must be {layout} {want} with C = {config.in_channels} channels, got shape {tuple(x.shape)}."
            + (" Drop the alpha channel (RGBA -> RGB)." if x.ndim == 4 and x.shape[axis] == 4 else "")
        )
    hh, ww = (x.shape[2], x.shape[3]) if layout == "NCHW" else (x.shape[1], x.shape[2])
    if hh % multiple or ww % multiple:
        fix_h, fix_w = max(multiple, hh // multiple * multiple), max(multiple, ww // multiple * multiple)
        raise ValueError(
            f"image height and width must be multiples of {multiple} for Lens tokens "
            f"(VAE factor {config.spatial_factor} x 2x2 patch), got {hh}x{ww}. "
            f"Resize or crop it, e.g. to {fix_h}x{fix_w}."
        )


def _check_tokens(tokens, config: VAEConfig, h: int, w: int) -> None:
    if tokens.ndim != 3 or tokens.shape[-1] != config.token_channels:
        raise ValueError(
            f"tokens must be [B, h*w, {config.token_channels}] (4 x latent_channels, packed 2x2 patches), "
            f"got shape {tuple(tokens.shape)}."
        )
    if tokens.shape[1] != h * w:
        raise ValueError(
            f"got {tokens.shape[1]} tokens but latent_h x latent_w = {h} x {w} = {h * w}; pass the token grid "
            f"the tokens were made for (image size / {config.token_factor})."
        )


# ----------------------------------------------------------------------------------------------
# pure functions (NHWC)


def tokens_to_latent(params: Params, config: VAEConfig, tokens: jax.Array, h: int, w: int) -> jax.Array:
    """Normalised tokens [B, h*w, 4C] -> VAE latent [B, 2h, 2w, C] (float32): de-normalise, unpatchify."""
    _check_tokens(tokens, config, h, w)
    p = denormalize(unpack(tokens, h, w), params["bn"], config.batch_norm_eps)
    return unpatchify(p)


def latent_to_tokens(params: Params, config: VAEConfig, z: jax.Array) -> jax.Array:
    """VAE latent [B, 2h, 2w, C] -> normalised tokens [B, h*w, 4C] (float32): patchify, normalise."""
    _check_latent(z, config)
    return pack(normalize(patchify(z), params["bn"], config.batch_norm_eps))


def decode_tokens(params: Params, config: VAEConfig, tokens: jax.Array, h: int, w: int, *,
                  tiling: Tiling | None = None, attention_chunk: int = ATTENTION_QUERY_CHUNK) -> jax.Array:
    """Lens `_decode`: tokens [B, h*w, 4C] -> image [B, 16h, 16w, 3] in about [-1, 1] (unclamped)."""
    z = tokens_to_latent(params, config, tokens, h, w)
    return model.decode(params, config, z, tiling=tiling, attention_chunk=attention_chunk)


def encode_to_tokens(params: Params, config: VAEConfig, image: jax.Array, *,
                     attention_chunk: int = ATTENTION_QUERY_CHUNK) -> jax.Array:
    """Image [B, H, W, 3] in [-1, 1] (H, W multiples of 16) -> normalised tokens [B, H/16*W/16, 4C]."""
    _check_image(image, config, multiple=config.token_factor)
    z = model.encode(params, config, image, attention_chunk=attention_chunk)
    return latent_to_tokens(params, config, z.astype(jnp.float32))


_STATIC = ("config", "tiling", "attention_chunk")
_decode_jit = jax.jit(model.decode, static_argnames=_STATIC)
_encode_jit = jax.jit(model.encode, static_argnames=("config", "attention_chunk"))
_encode_moments_jit = jax.jit(model.encode_moments, static_argnames=("config", "attention_chunk"))
_decode_tokens_jit = jax.jit(decode_tokens, static_argnames=_STATIC + ("h", "w"))
_encode_to_tokens_jit = jax.jit(encode_to_tokens, static_argnames=("config", "attention_chunk"))


def _nchw_to_nhwc(x) -> jax.Array:
    return jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))


def _nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def _as_array(x):
    """numpy, jax or anything array-like (e.g. a CPU torch tensor via __array__) -> array with .ndim/.shape."""
    return x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x)


def _tiling_arg(tiled: bool | Tiling) -> Tiling | None:
    if isinstance(tiled, Tiling):
        return tiled
    return Tiling() if tiled else None


class VAE:
    """A loaded FLUX.2 VAE with diffusers-style NCHW methods; `params` and `config` feed the pure functions."""

    def __init__(self, params: Params, config: VAEConfig):
        self.params = params
        self.config = config

    @property
    def dtype(self) -> jnp.dtype:
        """The parameters' dtype."""
        return self.params["decoder"]["conv_in"]["kernel"].dtype

    def decode(self, z: ArrayLike, *, tiled: bool | Tiling = False) -> jax.Array:
        """`vae.decode(z).sample`: latent [B, C, h, w] -> image [B, 3, 8h, 8w] (unclamped)."""
        z = _as_array(z)
        _check_latent(z, self.config, "NCHW")
        out = _decode_jit(self.params, self.config, _nchw_to_nhwc(z), tiling=_tiling_arg(tiled))
        return _nhwc_to_nchw(out)

    def encode(self, x: ArrayLike) -> jax.Array:
        """`vae.encode(x).latent_dist.mode()`: image [B, 3, H, W] in [-1, 1] -> latent [B, C, h, w]."""
        x = _as_array(x)
        _check_image(x, self.config, "NCHW")
        return _nhwc_to_nchw(_encode_jit(self.params, self.config, _nchw_to_nhwc(x)))

    def encode_moments(self, x: ArrayLike) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of the latent posterior, each [B, C, h, w]."""
        x = _as_array(x)
        _check_image(x, self.config, "NCHW")
        mean, logvar = _encode_moments_jit(self.params, self.config, _nchw_to_nhwc(x))
        return _nhwc_to_nchw(mean), _nhwc_to_nchw(logvar)

    def decode_tokens(self, tokens: ArrayLike, latent_h: int, latent_w: int, *, tiled: bool | Tiling = False) -> jax.Array:
        """Lens tokens [B, h*w, 4C] on an h x w grid -> image [B, 3, 16h, 16w] in about [-1, 1] (unclamped)."""
        tokens = _as_array(tokens)
        _check_tokens(tokens, self.config, int(latent_h), int(latent_w))
        out = _decode_tokens_jit(self.params, self.config, jnp.asarray(tokens), int(latent_h), int(latent_w),
                                 tiling=_tiling_arg(tiled))
        return _nhwc_to_nchw(out)

    def encode_to_tokens(self, image: ArrayLike) -> jax.Array:
        """Image [B, 3, H, W] in [-1, 1], H and W multiples of 16 -> normalised tokens [B, H*W/256, 4C]."""
        image = _as_array(image)
        _check_image(image, self.config, "NCHW", multiple=self.config.token_factor)
        return _encode_to_tokens_jit(self.params, self.config, _nchw_to_nhwc(image))
