"""Small functional building blocks shared by the networks.

Parameters are plain dicts of arrays. Matrix products run in the activation dtype (bf16 on
accelerators, with the hardware's f32 accumulation); normalisation statistics and softmax
run in float32 whatever the activation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Params = dict


def dense(x: jax.Array, p: Params) -> jax.Array:
    """y = x @ kernel (+ bias); `kernel` is [in, out] (PyTorch's weight transposed)."""
    y = jnp.matmul(x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis with statistics in float32 (diffusers/transformers semantics)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def layer_norm(x: jax.Array, eps: float, weight: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32 (biased variance, like torch)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
