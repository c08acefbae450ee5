"""Offloading: stacked layer parameters in pinned host memory, streamed to the device layer by layer.

Modes (`LensPipeline.from_pretrained(..., offload=)`, `lens-jax generate --offload`):

    none          everything on the device
    text_encoder  the text encoder's decoder layers stay in host memory and stream in while it runs
    all           the DiT's 48 blocks too, streamed at every step inside the sampler's program
    auto          the smallest offload that fits the device's free memory (said on stderr)

Non-stacked parameters (embeddings, norms, the VAE) stay on the device. The models take the
stream as a static argument and fetch layer i + 1 while layer i computes
(`lens_jax.models.streaming`); XLA schedules the host-to-device copies asynchronously.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on
from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import NamedSharding, PartitionSpec as P

from ..errors import InputError
from ..models import streaming

OFFLOAD_MODES = ("none", "text_encoder", "all", "auto")
HOST = "pinned_host"


@dataclass(frozen=True)
class HostStream:
    """Brings one layer of a stack in host memory into device memory (keeps its sharding).

    `layouts` (from `HostStream.for_stack`; empty: none known) lists, per stacked leaf shape and dtype,
    the TPU layout (major_to_minor) its host array has, when the layer axis is the major one: those
    leaves are fetched on TPU by the device-side asynchronous slice, which XLA overlaps with the
    previous layer's compute. CPU and GPU programs do not depend on it.
    """

    layouts: tuple[tuple[tuple[int, ...], str, tuple[int, ...], Any], ...] = ()  # (shape, dtype, m2m, spec)
    mesh: Any = None  # the leaves' mesh when it has more than one device (the slice runs per shard)

    @classmethod
    def for_stack(cls, stacked: Any) -> "HostStream":
        """The stream for `stacked` (arrays or ShapeDtypeStructs with their host shardings, [layers, ...])."""
        found: dict[tuple[tuple[int, ...], str], Any] = {}
        meshes = set()
        for a in jax.tree.leaves(stacked):
            key = (tuple(a.shape), jnp.dtype(a.dtype).name)
            layout = _layer_major(a)
            if layout is not None:
                meshes.add(a.sharding.mesh)
            found[key] = layout if found.get(key, layout) == layout else None  # ambiguous: fall back
        if len(meshes) != 1:
            return cls()
        mesh = meshes.pop()
        layouts = tuple((shape, dtype, *found[shape, dtype]) for shape, dtype in sorted(found) if found[shape, dtype])
        return cls(layouts, mesh if mesh.size > 1 else None)

    def prepare(self, stacked: Any) -> Any:
        """`stacked` before the layer loop: with layouts (a TPU target), its small 2-D leaves ([layers, width]:
        biases, norm scales, whose layer axis is a tiled one the device-side slice cannot cut) are brought
        to the device whole, once; the loop indexes them there. Without, `stacked` unchanged."""
        if not self.layouts:
            return stacked
        return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device) if a.ndim <= 2 else a, stacked)

    def fetch(self, stacked: Any, i: Any) -> Any:
        """Layer i of `stacked` (every leaf [layers, ...], in host memory), in device memory."""
        if self.layouts:
            layouts = {(shape, dtype): (m2m, spec) for shape, dtype, m2m, spec in self.layouts}
            tpu = partial(_fetch_overlapped, layouts, self.mesh)
        else:
            tpu = _fetch_sliced_on_host
        return jax.lax.platform_dependent(stacked, i, tpu=tpu, default=_fetch)


def _layer_major(a: Any) -> tuple[tuple[int, ...], Any] | None:
    """(major_to_minor, partition spec) of a stacked >= 3-D leaf's TPU default layout (per device shard), when
    the layer axis is its major axis (one layer is then whole (8, 128) tiles: the device-side slice takes it)."""
    sharding = getattr(a, "sharding", None)
    if a.ndim < 3 or not isinstance(sharding, NamedSharding):
        return None
    device = next(iter(sharding.device_set))
    if device.platform != "tpu" or (sharding.spec and sharding.spec[0] is not None):  # layer axis split: no
        return None
    shard = tuple(sharding.shard_shape(tuple(a.shape)))
    m2m = Layout.from_pjrt_layout(device.client.get_default_layout(jnp.dtype(a.dtype), shard, device)).major_to_minor
    return (tuple(m2m), sharding.spec) if m2m and m2m[0] == 0 else None


def _slice_to_device(a: Any, i: Any, m2m: tuple[int, ...]) -> Any:
    layer = jax.device_put(jax.lax.dynamic_slice_in_dim(a, i, 1, 0), jax.memory.Space.Device)
    return with_layout_constraint(layer, Layout(m2m))[0]


def _fetch_overlapped(layouts: dict, mesh: Any, stacked: Any, i: Any) -> Any:
    # Layer-major host leaves: the asynchronous device-side slice, its result constrained to the host
    # array's own layout (else layout assignment gives it the consumer's: "Inconsistent layout DS").
    # Small 2-D leaves are indexed on the device (`prepare` brought them there; device_put is then a
    # no-op). Anything else is sliced on the host as without layouts.
    def kind(a):
        if (tuple(a.shape), jnp.dtype(a.dtype).name) in layouts:
            return "slice"
        return "whole" if a.ndim <= 2 else "host"

    kinds = jax.tree.map(kind, stacked)

    def one(a, k):
        if k == "slice":
            m2m, spec = layouts[(tuple(a.shape), jnp.dtype(a.dtype).name)]
            if mesh is None:
                return _slice_to_device(a, i, m2m)
            # On a mesh, slice each device's shard (the layout is the shard's; constrained on the global
            # array, the partitioned slice loses it)
            spec = tuple(spec) + (None,) * (a.ndim - len(spec))
            return jax.shard_map(partial(_slice_to_device, m2m=m2m), mesh=mesh, in_specs=(P(*spec), P()),
                                 out_specs=P(*spec[1:]), check_vma=False)(a, i)
        if k == "whole":
            return jax.lax.dynamic_index_in_dim(jax.device_put(a, jax.memory.Space.Device), i, keepdims=False)
        return None

    direct = jax.tree.map(one, stacked, kinds)
    rest = jax.tree.map(lambda a, k: a if k == "host" else None, stacked, kinds)
    rest = _fetch_sliced_on_host(rest, i) if jax.tree.leaves(rest) else rest
    return jax.tree.map(lambda k, a, b: b if k == "host" else a, kinds, direct, rest, is_leaf=lambda x: x is None)


def _fetch(stacked: Any, i: Any) -> Any:
    return jax.device_put(streaming.layer(stacked, i), jax.memory.Space.Device)


def _fetch_sliced_on_host(stacked: Any, i: Any) -> Any:
    # XLA:TPU (libtpu 0.0.42) cannot slice one layer out of a pinned_host array on its way to the
    # device for most leaves: the asynchronous slice needs whole (8, 128) tiles (2-D leaves:
    # "Sublane slicing size must be multiple of element packing factor") and the same layout on
    # both sides, which layout assignment does not keep (>= 3-D: "Inconsistent layout DS" abort).
    # Those leaves are sliced on the host (an asynchronous host computation) and arrive as plain
    # one-layer arrays. One-byte leaves (MXFP4 blocks and scales) are the exception: the host
    # computation gets another tiling for them than the host arrays have ("async-start expects
    # the async shape ... to match"), and the device-side slice takes them.
    on_host = jax.tree.map(lambda a: a.dtype.itemsize > 1, stacked)
    host_part = jax.tree.map(lambda a, h: a if h else None, stacked, on_host)
    with compute_on("device_host"):
        sliced = jax.jit(streaming.layer)(host_part, i)
    sliced = jax.device_put(sliced, jax.memory.Space.Device)
    direct = _fetch(jax.tree.map(lambda a, h: None if h else a, stacked, on_host), i)
    return jax.tree.map(lambda h, a, b: a if h else b, on_host, sliced, direct, is_leaf=lambda x: x is None)


def check_mode(mode: str) -> str:
    if mode not in OFFLOAD_MODES:
        raise InputError(f"offload={mode!r} is not a mode; choose one of {', '.join(OFFLOAD_MODES)}.")
    return mode


def streams(mode: str, component: str) -> bool:
    """Whether `component` ("transformer" or "text_encoder") streams its layers under `mode`."""
    return mode == "all" or (mode == "text_encoder" and component == "text_encoder")


def on_host(shardings: Any, stacked_key: str) -> Any:
    """`shardings` with every leaf under `stacked_key` moved to pinned host memory."""
    def move(path, s):
        under = bool(path) and getattr(path[0], "key", None) == stacked_key
        return s.with_memory_kind(HOST) if under and isinstance(s, NamedSharding) else s

    return jax.tree_util.tree_map_with_path(move, shardings)


def free_device_bytes() -> int | None:
    """Free memory of the first local device, when the runtime reports it (GPUs do; CPUs do not)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


# Peak device memory of a one-pass bf16 VAE decode per megapixel (H100: 1.75 GB at 1024^2, 3.22 GB
# at 1440^2; docs/benchmarks.md).
DECODE_BYTES_PER_PIXEL = 1.6 * 2**30 / 2**20


def decode_fits(pixels: int, batch: int) -> bool:
    """Whether a one-pass VAE decode of `batch` images of `pixels` fits the device's free memory."""
    free = free_device_bytes()
    return free is None or pixels * batch * DECODE_BYTES_PER_PIXEL <= free


def choose(mode: str, dit_bytes: int, text_encoder_bytes: int, activation_bytes: int,
           modulation_bytes: int = 0) -> str:
    """Resolve "auto" from the device's free memory; other modes pass through. `modulation_bytes`: the
    part of `dit_bytes` that "text_encoder" mode keeps in host memory (the DiT's modulation kernels)."""
    if check_mode(mode) != "auto":
        return mode
    free = free_device_bytes()
    if free is None:
        chosen, why = "none", "the device reports no memory limit"
    elif dit_bytes + text_encoder_bytes + activation_bytes <= free:
        chosen, why = "none", "everything fits"
    elif dit_bytes - modulation_bytes + activation_bytes <= free:
        chosen, why = "text_encoder", "the DiT fits but not the text encoder beside it"
    else:
        chosen, why = "all", "the DiT does not fit whole"
    gib = 2**30
    print(f"lens-jax: offload=auto chose {chosen!r} ({why}; free {0 if free is None else free / gib:.1f} GiB, "
          f"DiT {dit_bytes / gib:.1f} GiB, text encoder {text_encoder_bytes / gib:.1f} GiB)", file=sys.stderr)
    return chosen
