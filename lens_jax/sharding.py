"""Device meshes and sharding rules: batch over a `data` axis, parameters over an `fsdp` axis.

A 2-D mesh ("data", "fsdp") covers one device, one host or many hosts (after
`jax.distributed.initialize()`; `jax.devices()` is then global). Parameters are placed with
`NamedSharding`s from `param_shardings`: each leaf is split along its largest axis that the
fsdp size divides (never the stacked layer axis, so `lax.scan` slices stay local), and XLA
inserts the all-gathers. Inputs go through `put`, which builds global arrays from host data
so that every process only transfers its own shards.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"

# Subtrees whose leaves carry a leading layer axis (stacked for lax.scan).
STACKED_KEYS = ("transformer_blocks", "layers")


def make_mesh(data: int | None = None, fsdp: int | None = None, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all, across hosts).

    With neither size given, all devices go on the fsdp axis (parameters sharded, batch
    replicated), which fits the largest models; give `data` to shard the batch too.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    if data is None and fsdp is None:
        data, fsdp = 1, n
    elif data is None:
        data = n // fsdp
    elif fsdp is None:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} must use all {n} devices.")
    return Mesh(devices.reshape(data, fsdp), (DATA, FSDP))


def _leaf_spec(shape: tuple[int, ...], fsdp_size: int, stacked: bool) -> P:
    if fsdp_size == 1 or not shape:
        return P()
    first = 1 if stacked else 0
    candidates = [a for a in range(first, len(shape)) if shape[a] % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: (shape[a], a))
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return P(*spec)


def param_shardings(params: Any, mesh: Mesh, fsdp: bool = True) -> Any:
    """NamedSharding per parameter leaf: fsdp-sharded (or replicated when `fsdp` is False)."""
    size = mesh.shape[FSDP] if fsdp else 1

    def spec(path, leaf):
        stacked = any(getattr(k, "key", None) in STACKED_KEYS for k in path)
        return NamedSharding(mesh, _leaf_spec(tuple(leaf.shape), size, stacked))

    return jax.tree_util.tree_map_with_path(spec, params)


def batch_sharding(mesh: Mesh, batch: int, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over `data` when it divides evenly; else replicate."""
    if batch % mesh.shape[DATA] == 0 and mesh.shape[DATA] > 1:
        return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))
    return NamedSharding(mesh, P())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place host data (identical on every process) as a global array with `sharding`."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if x.is_fully_addressable and sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_tree(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(put, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
    """Fetch a (possibly multi-host) global array to every process as numpy."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
