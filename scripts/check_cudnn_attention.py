#!/usr/bin/env python
"""GPU check: the DiT's cuDNN attention (key lengths) equals the XLA masked path on full, partial and empty text.

    python scripts/check_cudnn_attention.py   # needs a CUDA GPU
"""
import dataclasses, jax, jax.numpy as jnp, numpy as np
from lens_jax import transformer as T
c = dataclasses.replace(T.TransformerConfig(), num_layers=2)
p = jax.jit(lambda k: T.init_params(c, k, jnp.bfloat16))(jax.random.key(0))
rng = np.random.default_rng(0)
b, n, s = 3, 64 * 64, 192
x = jnp.asarray(rng.standard_normal((b, n, 128)), jnp.bfloat16)
f = [jnp.asarray(rng.standard_normal((b, s, 2880)), jnp.bfloat16) for _ in range(4)]
mask = jnp.asarray(np.arange(s)[None] < np.array([192, 100, 0])[:, None])
t = jnp.asarray([0.9, 0.5, 0.1], jnp.float32)
outs = {impl: np.asarray(T.apply(p, c, x, f, mask, t, (64, 64), jnp.bfloat16, impl), np.float32) for impl in ("cudnn", None)}
for r in range(b):
    a, o = outs["cudnn"][r].ravel(), outs[None][r].ravel()
    print(f"row {r} (valid text {[192, 100, 0][r]}): finite {np.isfinite(a).all()}, cosine cudnn vs xla {a @ o / np.linalg.norm(a) / np.linalg.norm(o):.6f}, max abs {np.abs(a - o).max():.4f}")
