"""Device meshes over ("data", "fsdp", "tensor"), and moving arrays onto them.

One mesh covers one device, one host or many hosts (after `jax.distributed.initialize()`,
`jax.devices()` is global). `put` builds a global array from host data that every process
holds, so each process transfers only its own shards; `to_host` is the inverse.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .rules import DATA, FSDP, MESH_AXES, TENSOR


def make_mesh(data: int | None = None, fsdp: int | None = None, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all, across hosts).

    Unspecified sizes take what is left: with none given every device goes on `fsdp`
    (parameters sharded, batch split over data x fsdp); `tensor` splits attention heads and
    MLP widths. The sizes must multiply to the device count.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    for name, v in (("data", data), ("fsdp", fsdp), ("tensor", tensor)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"mesh size {name}={v!r} must be a positive integer.")
    if n % tensor:
        raise ValueError(f"mesh tensor={tensor} does not divide the {n} devices.")
    rest = n // tensor
    if data is None and fsdp is None:
        data, fsdp = 1, rest
    elif data is None or fsdp is None:
        given, size = ("fsdp", fsdp) if data is None else ("data", data)
        if rest % size:
            raise ValueError(f"mesh {given}={size} does not divide the {rest} devices left for data x fsdp "
                             f"({n} devices, tensor={tensor}); pick a divisor of {rest}.")
        data, fsdp = (rest // fsdp, fsdp) if data is None else (data, rest // data)
    if data * fsdp * tensor != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} must use all {n} devices.")
    return Mesh(devices.reshape(data, fsdp, tensor), MESH_AXES)


def batch_axes(mesh: Mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes a batch of `batch` rows is split over: data and fsdp, as far as they divide it."""
    names, size = [], 1
    for name in (DATA, FSDP):
        n = mesh.shape.get(name, 1)
        if n > 1 and batch % (size * n) == 0:
            names.append(name)
            size *= n
    return tuple(names)


def batch_sharding(mesh: Mesh, batch: int, ndim: int) -> NamedSharding:
    """Split the leading (batch) axis over data (and fsdp) where that divides it; replicate otherwise."""
    names = batch_axes(mesh, batch)
    if not names:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(names if len(names) > 1 else names[0], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a whole copy on every device of `mesh`."""
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
    """`put` every leaf of `tree` with the sharding at the same place in `shardings`."""
    return jax.tree.map(put, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
    """Fetch a (possibly multi-host) global array to every process as numpy."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


__all__ = ["DATA", "FSDP", "TENSOR", "make_mesh", "batch_axes", "batch_sharding", "replicated", "put", "put_tree",
           "to_host"]
