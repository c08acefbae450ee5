"""Running stacked layers whose parameters live in host memory, one layer ahead on the device.

`scan_layers(step, carry, stacked, stream)` is `lax.scan(step, carry, stacked)` when `stream` is
None. With a stream (duck-typed: `stream.fetch(stacked, i)` returns layer i of the stack in
device memory, e.g. from `pinned_host`), the loop fetches layer i + 1 while layer i computes
(double buffering: the transfer of the next layer overlaps the current layer's work), so the
device holds about two layers instead of the stack. The models stay mesh-agnostic:
`lens_jax.parallel.offload` builds the stream.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp


class LayerStream(Protocol):
    def fetch(self, stacked: Any, i: Any) -> Any: ...  # optional too: prepare(stacked) -> stacked


def layer(stacked: Any, i) -> Any:
    """Layer i of a stacked parameter tree (dynamic index, no copy of the stack)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)


def scan_layers(step: Callable[[Any, Any], tuple[Any, Any]], carry: Any, stacked: Any,
                stream: LayerStream | None = None) -> tuple[Any, Any]:
    """`step(carry, layer_params) -> (carry, out)` over every layer of `stacked`; returns (carry, outs)."""
    if stream is None:
        return jax.lax.scan(step, carry, stacked)
    n = jax.tree.leaves(stacked)[0].shape[0]
    prepare = getattr(stream, "prepare", None)  # optional: placement done once, before the loop
    stacked = prepare(stacked) if prepare is not None else stacked

    def fetch(i):
        return stream.fetch(stacked, i)

    def body(state, i):
        inner, current = state
        following = fetch(jnp.minimum(i + 1, n - 1))  # issued before the compute that hides it
        inner, out = step(inner, current)
        return (inner, following), out

    (carry, _), outs = jax.lax.scan(body, (carry, fetch(0)), jnp.arange(n))
    return carry, outs
