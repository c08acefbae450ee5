"""The DiT's modulation, precomputed once per generation (a table over the schedule's sigmas).

Every block's (shift, scale, gate) x 2 per stream depends on the timestep alone
(SiLU(TimestepEmbedding(sigma)) -> `img_mod`/`txt_mod` Linear, d -> 6d). For a known schedule the
sampler computes them for every step once (`lens_jax.models.transformer.modulation_table`,
[steps, layers, 6d] per stream: ~35 MB in bf16 for 20 steps of the real DiT) and feeds step i's
rows to the DiT, whose block scan then never reads the modulation kernels. Those kernels are a
third of the real DiT's weights (2 x 48 x 1536 x 9216 = 1.36 B parameters, 2.53 GiB in bf16) and
stay in bf16 when the rest is quantised; so a quantised DiT, and any DiT under
`offload="text_encoder"` (the mode for cards that cannot hold the whole model), keeps them in pinned
host memory (`on_host`) and streams them layer by layer while the table is computed (`stream`): one
2.5 GiB transfer per generation instead of 2.5 GiB of device memory.
"""

from __future__ import annotations

from typing import Any

import jax

from .. import parallel
from ..models import transformer as dit
from ..parallel import offload

__all__ = ["table", "hosted", "on_host", "stream_for", "device_bytes"]


def table(dit_params, config: dit.TransformerConfig, timesteps: jax.Array, compute_dtype, stream=None) -> dict:
    """{"img_mod", "txt_mod"}: [N, L, 6d] for the schedule's `timesteps` (in [0, 1000], as the sampler
    feeds them: the DiT takes sigma = t / 1000). `stream` brings the modulation Linears from host memory."""
    return dit.modulation_table(dit_params, config, timesteps / 1000.0, compute_dtype, stream)


def hosted(quantize: str | None, offload_mode: str) -> bool:
    """True where the DiT's modulation kernels live in pinned host memory: a quantised DiT (they stay
    bf16 beside int8/fp8 blocks) or `offload="text_encoder"`. Under `offload="all"` they stream with
    the blocks, and with neither they stay on the device."""
    return offload_mode != "all" and (quantize is not None or offload_mode == "text_encoder")


def on_host(dit_shardings: Any, stacked_key: str = "transformer_blocks") -> Any:
    """`dit_shardings` with the stacked `img_mod`/`txt_mod` kernels moved to pinned host memory.

    The biases ([L, 6d], 0.9 MB in bf16 for the real DiT) stay on the device: too small to be worth
    a host stream (they were kept there when XLA:TPU could not slice 2-D host arrays, which
    `offload.HostStream` now works round)."""
    blocks = dit_shardings[stacked_key]
    kernels = {k: {"kernel": blocks[k]["kernel"]} for k in dit.MODULATION_KEYS}
    moved = offload.on_host({stacked_key: kernels}, stacked_key)[stacked_key]
    return {**dit_shardings, stacked_key: {**blocks, **{k: {**blocks[k], **moved[k]} for k in dit.MODULATION_KEYS}}}


def stream_for(mods_on_host: bool, blocks: Any = None):
    """The stream the table computation reads the modulation Linears with: a `HostStream` when they live
    in host memory, else None (the sampler falls back to the blocks' own stream when the stack streams).
    `blocks`: the placed stacked blocks, for the TPU layouts of an overlapped fetch (`HostStream.for_stack`)."""
    if not mods_on_host:
        return None
    return parallel.HostStream() if blocks is None else parallel.HostStream.for_stack(blocks)


def device_bytes(tree: Any) -> int:
    """Bytes of the leaves of `tree` (arrays or ShapeDtypeStructs with shardings) that sit in device memory."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None)
        if kind != offload.HOST:
            total += leaf.size * leaf.dtype.itemsize
    return total
