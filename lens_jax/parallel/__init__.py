"""Meshes over ("data", "fsdp", "tensor") and the logical-axis rules that shard the models on them."""

from .mesh import DATA, FSDP, TENSOR, batch_axes, batch_sharding, make_mesh, put, put_tree, replicated, to_host
from .offload import OFFLOAD_MODES, HostStream
from .rules import (
    DEFAULT_RULES,
    BoundRules,
    FirstOf,
    ShardingRules,
    logical_shardings,
    replicated_shardings,
    rules_from_mapping,
)

__all__ = [
    "DATA", "FSDP", "TENSOR", "make_mesh", "batch_axes", "batch_sharding", "replicated", "put", "put_tree", "to_host",
    "OFFLOAD_MODES", "HostStream",
    "DEFAULT_RULES", "ShardingRules", "BoundRules", "FirstOf", "logical_shardings", "replicated_shardings", "rules_from_mapping",
]
