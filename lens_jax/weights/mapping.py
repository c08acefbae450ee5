"""Strict key mapping from a PyTorch state dict to a JAX parameter pytree.

A component describes its layout as data: a list of `Rule`s, each naming a target leaf of the
JAX pytree (dotted path), the PyTorch key(s) it comes from and the `Transform` between them.
A source key containing `{i}` is a per-layer tensor; the layers are stacked on the target's
leading axis so that the blocks can run under `lax.scan`.

`convert_state_dict` first checks the whole checkpoint against the rules and the expected
target shapes (derived from the model's own `init_params` via `jax.eval_shape`), reporting
every missing, unexpected and mis-shaped key by name; only then does it read tensors, one at
a time, casting each into a preallocated output array, so peak host memory stays near one
copy of the converted parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util

from ..errors import CheckpointError
from .safetensors_io import SafetensorsReader

__all__ = [
    "Transform", "Rule", "COPY", "LINEAR", "CONV2D", "convert_state_dict", "check_state_dict", "read_target",
    "expected_shapes", "unflatten", "to_state_dict",
]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    """How source tensor(s) become one target tensor (per layer, for stacked targets)."""

    name: str
    source_shapes: Callable[[Shape], tuple[Shape, ...]]
    apply: Callable[..., np.ndarray]
    # target -> source (single-source transforms); what export to PyTorch uses
    inverse: Callable[[np.ndarray], np.ndarray] | None = None


COPY = Transform("copy", lambda t: (t,), lambda x: x, lambda x: x)
# torch.nn.Linear stores [out, in]; we keep Flax's [in, out] "kernel".
LINEAR = Transform("linear", lambda t: (t[::-1],), lambda x: x.T, lambda x: x.T)
# torch Conv2d OIHW -> Flax/lax HWIO.
CONV2D = Transform(
    "conv2d", lambda t: ((t[3], t[2], t[0], t[1]),), lambda x: np.transpose(x, (2, 3, 1, 0)),
    lambda x: np.transpose(x, (3, 2, 0, 1)),
)


@dataclass(frozen=True)
class Rule:
    target: str
    source: str | tuple[str, ...]
    transform: Transform = COPY

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else tuple(self.source)

    @property
    def stacked(self) -> bool:
        return any("{i}" in s for s in self.sources)


@dataclass
class _Plan:
    rule: Rule
    target_shape: Shape
    target_dtype: np.dtype
    # one entry per layer (or a single entry): the source keys to read
    layers: list[tuple[str, ...]] = field(default_factory=list)


def expected_shapes(abstract_params) -> dict[str, tuple[Shape, np.dtype]]:
    """Flatten an abstract pytree (from `jax.eval_shape`) to {dotted path: (shape, dtype)}."""
    flat = traverse_util.flatten_dict(abstract_params, sep=".")
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep=".")


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _plan(rules: Sequence[Rule], expected: Mapping[str, tuple[Shape, np.dtype]]) -> list[_Plan]:
    plans = []
    targets = set()
    for rule in rules:
        if rule.target not in expected:
            raise KeyError(f"mapping rule targets {rule.target!r}, which the model does not have")
        targets.add(rule.target)
        shape, dtype = expected[rule.target]
        plan = _Plan(rule, shape, dtype)
        if rule.stacked:
            plan.layers = [tuple(s.format(i=i) for s in rule.sources) for i in range(shape[0])]
        else:
            plan.layers = [rule.sources]
        plans.append(plan)
    unmapped = sorted(set(expected) - targets)
    if unmapped:
        raise KeyError(f"model parameters without a mapping rule: {unmapped}")
    return plans


def _report(what: str, problems: list[str], limit: int = 25) -> str:
    shown = problems[:limit]
    more = f"\n    ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"  {len(problems)} {what}:\n    " + "\n    ".join(shown) + more


def check_state_dict(
    reader: SafetensorsReader,
    rules: Sequence[Rule],
    expected: Mapping[str, tuple[Shape, np.dtype]],
    *,
    source_prefix: str = "",
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
) -> list[_Plan]:
    """Check `reader` against `rules` and `expected` without reading any tensor; returns the plans.

    Raises `CheckpointError` listing every missing, unexpected and mis-shaped key.
    """
    plans = _plan(rules, expected)
    ignore_res = [re.compile(p) for p in ignore]
    missing, mismatched, used = [], [], set()
    for plan in plans:
        per_layer = plan.target_shape[1:] if plan.rule.stacked else plan.target_shape
        want = plan.rule.transform.source_shapes(per_layer)
        for keys in plan.layers:
            for key, want_shape in zip(keys, want):
                full = source_prefix + key
                used.add(full)
                if full not in reader:
                    missing.append(f"{full} (expected {_fmt(want_shape)})")
                elif want_shape is not None and tuple(reader.shape(full)) != tuple(want_shape):
                    mismatched.append(f"{full}: expected {_fmt(want_shape)}, found {_fmt(reader.shape(full))}")
    unexpected = [
        f"{k} {_fmt(reader.shape(k))}"
        for k in reader.keys()
        if k not in used and k.startswith(source_prefix) and not any(r.search(k) for r in ignore_res)
    ]
    if missing or mismatched or unexpected:
        parts = [f"{what} does not match the model configuration:"]
        if missing:
            parts.append(_report("missing keys", missing))
        if unexpected:
            parts.append(_report("unexpected keys", unexpected))
        if mismatched:
            parts.append(_report("shape mismatches", mismatched))
        parts.append(
            "Check that the weights and config.json belong to the same model and layout "
            f"(files: {', '.join(str(f) for f in reader.files)})."
        )
        raise CheckpointError("\n".join(parts))
    return plans


def read_target(reader: SafetensorsReader, plan: _Plan, *, source_prefix: str = "", layer: int | None = None,
                what: str = "checkpoint") -> np.ndarray:
    """Read and convert one checked target: the whole (stacked) array, or only `layer` of a stacked one."""
    if layer is not None and not plan.rule.stacked:
        raise ValueError(f"{plan.rule.target} is not a stacked target; it has no layer {layer}.")
    indices = range(len(plan.layers)) if layer is None else [layer]
    shape = plan.target_shape if layer is None else plan.target_shape[1:]
    arr = np.empty(shape, dtype=plan.target_dtype)
    for i in indices:
        keys = plan.layers[i]
        value = plan.rule.transform.apply(*(reader.get(source_prefix + k) for k in keys))
        dst = arr[i] if plan.rule.stacked and layer is None else arr
        if value.shape != dst.shape:
            raise CheckpointError(
                f"{what}: {keys} converted to shape {_fmt(value.shape)}, expected {_fmt(dst.shape)}."
            )
        dst[...] = value  # casts to the target dtype in place
    return arr


def to_state_dict(params: Mapping, rules: Sequence[Rule], *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `convert_state_dict`: a JAX pytree (or a gradient of one) -> PyTorch names and layouts.

    Stacked targets are split back into one tensor per layer; every rule must have an inverse.
    """
    flat = traverse_util.flatten_dict(params, sep=".")
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        if rule.target not in flat:
            raise KeyError(f"the parameter tree has no {rule.target!r}")
        if rule.transform.inverse is None or len(rule.sources) != 1:
            raise ValueError(f"rule for {rule.target!r} ({rule.transform.name}) has no inverse")
        value = np.asarray(flat[rule.target])
        if rule.stacked:
            for i in range(value.shape[0]):
                out[prefix + rule.sources[0].format(i=i)] = np.ascontiguousarray(rule.transform.inverse(value[i]))
        else:
            out[prefix + rule.sources[0]] = np.ascontiguousarray(rule.transform.inverse(value))
    return out


def convert_state_dict(
    reader: SafetensorsReader,
    rules: Sequence[Rule],
    expected: Mapping[str, tuple[Shape, np.dtype]],
    *,
    source_prefix: str = "",
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
    progress: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Convert `reader`'s tensors into {target path: numpy array} following `rules`.

    `expected` gives each target's shape and dtype; every target must have a rule. Source keys
    are looked up as `source_prefix + key`; keys matching a regex in `ignore` may be present
    without a rule. Raises `CheckpointError` listing every problem before reading any tensor.
    """
    plans = check_state_dict(reader, rules, expected, source_prefix=source_prefix, ignore=ignore, what=what)
    out: dict[str, np.ndarray] = {}
    for plan in plans:
        out[plan.rule.target] = read_target(reader, plan, source_prefix=source_prefix, what=what)
        if progress is not None:
            progress(plan.rule.target)
    return out
