"""Random parameters straight into their shardings, shared by the benchmark scripts
(`from _random_init import init_sharded`; `python scripts/X.py` puts this folder on the import path).

Stacked layers that live in pinned host memory (offload) are built one layer at a time on the device
and gathered on the host, so the device never holds the whole stack: under
XLA_PYTHON_CLIENT_MEM_FRACTION for an 8 GiB card a one-shot init of the DiT's 7.6 GiB of blocks (and
its float32 temporaries) would not fit, though sampling with the blocks streamed does.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from lens_jax import parallel
from lens_jax.parallel import offload as offload_lib


def init_sharded(fn: Callable, cfg: Any, seed: int, dtype, mesh, axes: Any = None, stacked: str | None = None,
                 one_layer: Callable[[Any], Any] | None = None):
    """`fn(cfg, key, dtype)` placed by `axes` (logical axes; None: replicated) on `mesh`. With `stacked`,
    that subtree goes to pinned host memory, built layer by layer from `one_layer(cfg)` (the same
    config with a single layer; its other parameters are the model's own)."""
    key = jax.random.key(seed)
    abstract = jax.eval_shape(lambda k: fn(cfg, k, dtype), key)
    out = parallel.logical_shardings(abstract, axes, mesh) if axes is not None else \
        parallel.replicated_shardings(abstract, mesh)
    if stacked is None:
        return jax.jit(fn, static_argnums=(0, 2), out_shardings=out)(cfg, key, dtype)
    out = offload_lib.on_host(out, stacked)
    if one_layer is None:  # small models: one shot
        return jax.jit(fn, static_argnums=(0, 2), out_shardings=out)(cfg, key, dtype)
    cfg1 = one_layer(cfg)
    init1 = jax.jit(fn, static_argnums=(0, 2))
    first = init1(cfg1, key, dtype)
    host = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), abstract[stacked])
    for i in range(jax.tree.leaves(abstract[stacked])[0].shape[0]):
        layer = first if i == 0 else init1(cfg1, jax.random.fold_in(key, i), dtype)
        jax.tree.map(lambda buf, a: buf.__setitem__(i, np.asarray(a[0])), host, layer[stacked])
        del layer
    rest = {k: jax.device_put(v, out[k]) for k, v in first.items() if k != stacked}
    return {**rest, stacked: jax.device_put(host, out[stacked])}
