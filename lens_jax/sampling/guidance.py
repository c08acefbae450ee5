"""Lens' classifier-free guidance: the usual combination, rescaled per token to the conditional norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def guided_velocity(cond: jax.Array, uncond: jax.Array, guidance: jax.Array) -> jax.Array:
    """uncond + g (cond - uncond), rescaled per token to the norm of cond (norms over channels).

    Where the combination's norm is 0 it is kept as is (upstream's `torch.where`).
    """
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    comb = uncond + guidance * (cond - uncond)
    cond_norm = jnp.linalg.norm(cond, axis=-1, keepdims=True)
    comb_norm = jnp.linalg.norm(comb, axis=-1, keepdims=True)
    return jnp.where(comb_norm > 0, comb * (cond_norm / jnp.maximum(comb_norm, 1e-12)), comb)
