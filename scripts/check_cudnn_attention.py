#!/usr/bin/env python
"""GPU check: the DiT's cuDNN attention (per-row key counts) equals the XLA masked path.

Two full-width blocks, 64x64 image tokens, text rows with 192, 100 and 0 valid of 192 tokens,
bf16. Needs a CUDA GPU:

    python scripts/check_cudnn_attention.py
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax import transformer as T


def main() -> None:
    config = dataclasses.replace(T.TransformerConfig(), num_layers=2)
    params = jax.jit(lambda k: T.init_params(config, k, jnp.bfloat16))(jax.random.key(0))
    rng = np.random.default_rng(0)
    valid = [192, 100, 0]
    b, n, s = len(valid), 64 * 64, 192
    x = jnp.asarray(rng.standard_normal((b, n, config.in_channels)), jnp.bfloat16)
    feats = [jnp.asarray(rng.standard_normal((b, s, config.enc_hidden_dim)), jnp.bfloat16) for _ in range(4)]
    mask = jnp.asarray(np.arange(s)[None] < np.array(valid)[:, None])
    sigma = jnp.asarray([0.9, 0.5, 0.1], jnp.float32)
    outs = {
        impl: np.asarray(T.apply(params, config, x, feats, mask, sigma, (64, 64), jnp.bfloat16, impl), np.float32)
        for impl in ("cudnn", None)
    }
    for r in range(b):
        a, o = outs["cudnn"][r].ravel(), outs[None][r].ravel()
        cos = a @ o / np.linalg.norm(a) / np.linalg.norm(o)
        print(f"row {r} (valid text {valid[r]}): finite {bool(np.isfinite(a).all())}, "
              f"cosine cudnn vs xla {cos:.6f}, max abs {np.abs(a - o).max():.4f}")


if __name__ == "__main__":
    main()
