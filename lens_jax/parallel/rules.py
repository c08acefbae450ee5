"""Logical axis -> mesh axis rules: the one table that says how everything is sharded.

The models declare a logical axis name per parameter dimension (`param_axes(config)`) and per
constrained activation dimension (`lens_jax.models.axes`). `ShardingRules` maps each logical
name to a mesh axis (or None: replicated). Rules are data: override any of them, e.g.

    rules = DEFAULT_RULES.override(vocab=None)               # no tensor split of the vocabulary
    rules = DEFAULT_RULES.override(heads=None, mlp=None)     # no tensor parallelism

A target may also be `FirstOf(choice, ...)`: the first choice that the mesh at hand can split the
dimension over (its axes present, of size > 1, dividing it). The default maps `expert_mlp` (the
hidden width of the expert tensors that have no `embed` axis: the MXFP4 `gate_up_proj_blocks` /
`_scales` and the gate_up bias) to `FirstOf("tensor", "fsdp")`: over tensor wherever the mesh has a
tensor axis that divides it (exactly as `mlp`), over fsdp where it has none (an fsdp-only mesh, where
these tensors were otherwise whole on every device). Splitting the expert width rather than the
experts keeps each expert's slice local to the grouped MoE's per-expert reads (the experts axis
split over fsdp made XLA gather the whole stacked tensor: 13 GiB of temporaries on a v5e-8).

Resolution is forgiving in two ways that keep every (mesh, config) pair valid: a mesh axis is
used at most once per array (later dimensions that map to an axis already used stay
unsplit), and a dimension that the mesh axis size does not divide stays unsplit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..models import axes as ax

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)



@dataclass(frozen=True, init=False)
class FirstOf:
    """A rule target naming alternatives: the first one the mesh can split the dimension over is used.

    Each choice is what a plain target may be (a mesh axis, a tuple of them, or None). A choice is
    taken when at least one of its axes is in the mesh with size > 1 and divides the dimension;
    otherwise the next choice is tried. The choice depends on the mesh and the dimension only: a
    taken choice whose axes an earlier dimension of the same array already uses leaves the
    dimension whole (as a plain target would), it does not move on to the next choice.
    """

    choices: tuple[str | tuple[str, ...] | None, ...]

    def __init__(self, *choices: str | tuple[str, ...] | None):
        object.__setattr__(self, "choices", tuple(choices))


MeshAxis = str | tuple[str, ...] | FirstOf | None


def _mesh_axes(target: MeshAxis) -> tuple[str, ...]:
    """Every mesh axis name a target mentions (for validation)."""
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    if isinstance(target, FirstOf):
        return tuple(n for choice in target.choices for n in _mesh_axes(choice))
    return tuple(target)


def _split(target: str | tuple[str, ...] | None, dim: int | None, mesh: Mesh, used: set[str]) -> tuple[str, ...]:
    """The mesh axes of `target` that split a dimension of size `dim`: greedily, as far as axes of size > 1,
    not in `used`, divide it."""
    names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    kept, size = [], 1
    for n in names:
        if n in mesh.shape and mesh.shape[n] > 1 and n not in used:
            if dim is None or dim % (size * mesh.shape[n]) == 0:
                kept.append(n)
                size *= mesh.shape[n]
    return tuple(kept)


@dataclass(frozen=True)
class ShardingRules:
    """An immutable, hashable table of (logical axis, mesh axis or axes, `FirstOf` them, or None)."""

    rules: tuple[tuple[str, MeshAxis], ...]

    def as_dict(self) -> dict[str, MeshAxis]:
        """The table as {logical axis: mesh target}."""
        return dict(self.rules)

    def override(self, **changes: MeshAxis) -> "ShardingRules":
        """A copy with some logical axes mapped elsewhere (None: replicated)."""
        table = self.as_dict()
        for name, target in changes.items():
            for t in _mesh_axes(target):
                if t not in MESH_AXES:
                    raise ValueError(f"rule {name}={target!r}: {t!r} is not a mesh axis; use one of {MESH_AXES}.")
            table[name] = target
        return ShardingRules(tuple(table.items()))

    def spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...] | None, mesh: Mesh) -> P:
        """PartitionSpec of an array with these logical `axes` (and `shape`, for divisibility) on `mesh`."""
        table, used, out = self.as_dict(), set(), []
        for i, name in enumerate(axes):
            target = table.get(name) if name is not None else None
            if isinstance(target, FirstOf):  # the first choice this mesh can split the dimension over
                target = next((c for c in target.choices if _split(c, None if shape is None else shape[i], mesh,
                                                                   set())), None)
            names = _split(target, None if shape is None else shape[i], mesh, used)
            if not names:
                out.append(None)
                continue
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        while out and out[-1] is None:
            out.pop()
        return P(*out)

    def bind(self, mesh: Mesh) -> "BoundRules":
        """These rules on `mesh`: what the models take as `sharding=` to constrain activations."""
        return BoundRules(self, mesh)


DEFAULT_RULES = ShardingRules((
    # parameters
    (ax.LAYERS, None),
    (ax.EMBED, FSDP),
    (ax.HEADS, TENSOR),
    (ax.KV_HEADS, TENSOR),
    (ax.MLP, TENSOR),
    (ax.EXPERTS, TENSOR),
    (ax.EXPERT_MLP, FirstOf(TENSOR, FSDP)),  # fsdp only where the mesh has no tensor axis for it (module doc)
    (ax.VOCAB, TENSOR),
    # activations
    (ax.BATCH, (DATA, FSDP)),
    (ax.SEQ, None),
    (ax.ACT_HEADS, TENSOR),
    (ax.ACT_MLP, TENSOR),
    (ax.ACT_EMBED, None),
))


@dataclass(frozen=True)
class BoundRules:
    """Rules bound to a mesh: what the models receive (static, hashable) to constrain activations."""

    rules: ShardingRules
    mesh: Mesh

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        """The NamedSharding of an array with logical `axes` (and `shape`, for divisibility)."""
        return NamedSharding(self.mesh, self.rules.spec(tuple(axes), None if shape is None else tuple(shape), self.mesh))

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """`x` constrained to its logical `axes` (inside jit)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def logical_shardings(params: Any, axes: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """NamedSharding per leaf of `params` (concrete or abstract) from its logical `axes` tree."""
    return jax.tree.map(
        lambda a, p: NamedSharding(mesh, rules.spec(a, tuple(p.shape), mesh)), axes, params, is_leaf=_is_axes,
    )


def replicated_shardings(params: Any, mesh: Mesh) -> Any:
    """A replicated NamedSharding per leaf of `params`."""
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), params)


def rules_from_mapping(mapping: Mapping[str, MeshAxis] | None) -> ShardingRules:
    """DEFAULT_RULES with a user's overrides (e.g. parsed from a config file)."""
    return DEFAULT_RULES if not mapping else DEFAULT_RULES.override(**mapping)
