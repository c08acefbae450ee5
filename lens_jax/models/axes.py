"""Logical axis names, and how the models declare them.

Every parameter leaf of every model has a tuple of logical axis names, one per dimension
(None: never sharded), declared next to the model as data: a table of (dotted-path pattern,
axes) resolved against the model's own parameter tree by `axes_from_table`. `lens_jax.parallel`
maps the logical names onto mesh axes (`data`, `fsdp`, `tensor`) with a rules table that a user
can override; the models themselves never see a mesh.

Activations are constrained through a `Constrain` object passed in as a static argument (None:
no constraints). It is duck-typed (anything with `.constrain(x, axes)`), so this layer imports
nothing above it.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, Sequence

from flax import traverse_util

# Parameter axes.
LAYERS = "layers"  # the stacked layer axis scanned by lax.scan: never split
EMBED = "embed"  # the model width (DiT 1536, GPT-OSS 2880)
HEADS = "heads"  # query heads (x head_dim, flattened or not)
KV_HEADS = "kv_heads"  # key/value heads
MLP = "mlp"  # MLP / expert hidden width
EXPERTS = "experts"  # MoE experts
EXPERT_MLP = "expert_mlp"  # expert hidden width of the expert tensors with no EMBED axis (MXFP4 gate_up blocks)
VOCAB = "vocab"  # token embedding rows

# Activation axes (distinct names: an activation's width is not sharded like a weight's).
BATCH = "act_batch"
SEQ = "act_seq"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"
ACT_EMBED = "act_embed"

Axes = tuple[str | None, ...]


class Constrain(Protocol):
    """What the models need to place a sharding constraint on an activation (hashable, static)."""

    def constrain(self, x: Any, axes: Axes) -> Any: ...


def constrain(x, axes: Axes, sharding: Constrain | None):
    """`sharding.constrain(x, axes)`, or `x` unchanged when no sharding is given."""
    return x if sharding is None else sharding.constrain(x, axes)


def axes_from_table(params: Any, table: Sequence[tuple[str, Axes]], stacked: Sequence[str] = ()) -> Any:
    """The pytree of logical axes for `params` (concrete or abstract) from a pattern table.

    Each leaf's dotted path is matched against the table's regular expressions in order (full
    match); the first match gives the axes of its trailing dimensions, and leaves under a
    `stacked` subtree get LAYERS prepended. Every leaf must match, and the axes must fit its rank.
    """
    flat = traverse_util.flatten_dict(params, sep=".")
    compiled = [(re.compile(p), axes) for p, axes in table]
    out = {}
    for path, leaf in flat.items():
        lead = (LAYERS,) if any(path.startswith(s + ".") for s in stacked) else ()
        rel = path.split(".", 1)[1] if lead else path
        for pattern, axes in compiled:
            if pattern.fullmatch(rel) or pattern.fullmatch(path):
                break
        else:
            raise KeyError(f"no logical axes declared for parameter {path!r}")
        full = lead + tuple(axes)
        if len(full) != len(leaf.shape):
            raise ValueError(f"logical axes {full} of {path!r} do not fit its shape {tuple(leaf.shape)}")
        out[path] = full
    return traverse_util.unflatten_dict(out, sep=".")
