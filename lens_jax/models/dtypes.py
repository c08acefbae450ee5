"""Dtype policy: which dtype parameters are stored in and which dtype activations use."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACCELERATOR_DTYPE = jnp.bfloat16


def default_dtype() -> jnp.dtype:
    """bfloat16 when the default backend is a GPU or TPU, float32 on CPU."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else ACCELERATOR_DTYPE)


def resolve_dtype(dtype) -> jnp.dtype:
    """Accept None (backend default), a jnp dtype, or the strings 'bf16'/'bfloat16'/'f32'/'float32'/'f16'."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        names = {"bf16": "bfloat16", "f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16"}
        dtype = names.get(dtype.lower(), dtype.lower())
        if dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"unknown dtype {dtype!r}; use 'bf16' or 'f32'.")
    return jnp.dtype(dtype)
