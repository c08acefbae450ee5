"""Building blocks of the FLUX.2 VAE, NHWC, matching diffusers' modules numerically.

Convolution kernels are HWIO. Activations run in the parameters' dtype; GroupNorm statistics
and the attention softmax run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import attention as attn_lib
from ..nn import dense

Params = dict

# Queries per chunk in the mid-block attention: the [chunk, tokens] float32 score block stays
# ~280 MB at the 33,800 tokens of a 2080x1040 image instead of a 4.6 GB full matrix.
ATTENTION_QUERY_CHUNK = 2048


def group_norm(x: jax.Array, p: Params, groups: int, eps: float) -> jax.Array:
    """torch.nn.GroupNorm over the last (channel) axis of [B, ..., C], statistics in float32."""
    shape = x.shape
    c = shape[-1]
    xg = x.astype(jnp.float32).reshape(shape[0], -1, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(shape)
    y = y * p["weight"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def conv2d(x: jax.Array, p: Params, stride: int = 1, padding=None) -> jax.Array:
    """Conv2d on NHWC with an HWIO kernel; `padding` defaults to torch's `k // 2` on every side."""
    kernel = p["kernel"].astype(x.dtype)
    if padding is None:
        kh, kw = kernel.shape[:2]
        padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    y = jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["bias"].astype(x.dtype)


def resnet_block(x: jax.Array, p: Params, groups: int, eps: float, output_scale_factor: float = 1.0) -> jax.Array:
    """diffusers ResnetBlock2D without time embedding: norm-SiLU-conv twice, 1x1 shortcut if widths differ."""
    h = conv2d(jax.nn.silu(group_norm(x, p["norm1"], groups, eps)), p["conv1"])
    h = conv2d(jax.nn.silu(group_norm(h, p["norm2"], groups, eps)), p["conv2"])
    if "conv_shortcut" in p:
        x = conv2d(x, p["conv_shortcut"])
    out = x + h
    return out if output_scale_factor == 1.0 else out / output_scale_factor


def downsample(x: jax.Array, p: Params) -> jax.Array:
    """diffusers Downsample2D(padding=0): zero-pad right and bottom by one, then 3x3 conv, stride 2."""
    return conv2d(x, p["conv"], stride=2, padding=((0, 1), (0, 1)))


def upsample(x: jax.Array, p: Params) -> jax.Array:
    """diffusers Upsample2D: nearest-neighbour 2x, then 3x3 conv."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return conv2d(x, p["conv"])


def single_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = ATTENTION_QUERY_CHUNK,
                          impl: str = "blocked") -> jax.Array:
    """Exact softmax attention, one head, [B, N, D] -> [B, N, D], scale 1/sqrt(D).

    Runs lens_jax.models.attention's `impl`, blocked by default on every backend: the VAE gets no
    activation sharding to run splash under shard_map on a TPU mesh, and XLA partitions the
    blocked path's plain ops by itself (one mid-block attention per decode). The blocked path takes
    queries `chunk` at a time against one block of all keys (each row's softmax is independent,
    so this is the same result as one pass) so that memory grows as chunk x N, never N x N;
    cuDNN is not used: it accepts head dims up to 256 only, while this head has 512.
    """
    out = attn_lib.attention(q[:, :, None], k[:, :, None], v[:, :, None], impl=impl, block_q=chunk, block_k=None)
    return out[:, :, 0]


def attention_block(x: jax.Array, p: Params, groups: int, eps: float, output_scale_factor: float = 1.0,
                    chunk: int = ATTENTION_QUERY_CHUNK) -> jax.Array:
    """diffusers Attention as built by UNetMidBlock2D: GroupNorm, one head over all positions, residual."""
    b, h, w, c = x.shape
    t = group_norm(x, p["group_norm"], groups, eps).reshape(b, h * w, c)
    o = single_head_attention(dense(t, p["to_q"]), dense(t, p["to_k"]), dense(t, p["to_v"]), chunk)
    out = x + dense(o, p["to_out"]["0"]).reshape(b, h, w, c)
    return out if output_scale_factor == 1.0 else out / output_scale_factor
