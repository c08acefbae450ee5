"""Quantised DiT weights: int8 weight-only and FP8 (e4m3 weights and activations), as pure functions.

A quantised Linear keeps its dict with `kernel` in int8 or float8_e4m3fn and a `kernel_scale`
(float32, the kernel's shape with the contracted axes kept as size 1: one scale per output
channel). `einsum_kernel` multiplies by it after the matmul, which is exact for per-output-
channel scales, so the dequantised kernel is never materialised:

- int8 weight-only: y = (x @ q) * scale, q cast to the activation dtype inside the dot (|q| <= 127
  is exact in bf16);
- fp8: x is scaled per tensor into e4m3 range and cast (dynamic scaling), the dot runs on e4m3
  operands with float32 accumulation (`preferred_element_type`), and y = acc * x_scale * w_scale.

The modulation Linears (`img_mod`, `txt_mod`) and the small embedding/output Linears stay in the
parameter dtype: grid artifacts are reported when the modulation is quantised, and the others are
a fraction of a percent of the weights.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ..errors import InputError
from . import nn

Params = dict[str, Any]

MODES = ("int8", "fp8")
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
INT8_MAX = 127.0
# Linears quantised in the DiT (dotted paths of their dicts, inside the stacked blocks), with the
# kernel axes each contracts. Everything else, including img_mod / txt_mod, is left alone.
DIT_QUANTISED: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"transformer_blocks\.attn\.(img|txt)_qkv", (1,)),  # [L, d, 3, heads, head_dim]
    (r"transformer_blocks\.attn\.(to_out|to_add_out)", (1, 2)),  # [L, heads, head_dim, d]
    (r"transformer_blocks\.(img|txt)_mlp\.(w1|w2|w3)", (1,)),  # [L, in, out]
)
SCALE = "kernel_scale"


def check_mode(mode: str | None) -> str | None:
    """None or one of MODES; anything else is an error naming the choices."""
    if mode is not None and mode not in MODES:
        raise InputError(f"unknown quantize={mode!r}; choose one of {MODES} (or None for no quantisation).")
    return mode


def quantize_kernel(kernel: jax.Array, contracted: tuple[int, ...], mode: str) -> tuple[jax.Array, jax.Array]:
    """(quantised kernel, float32 scale) with one scale per output channel (absmax over `contracted`).

    A numpy kernel is quantised with numpy on the host (a conversion: no device buffers, no
    allocator growth), a jax one with jax; the same IEEE float32 operations (round half to even,
    the same float8 rounding through ml_dtypes), so both give the same bits (tested)."""
    xp = np if isinstance(kernel, np.ndarray) else jnp
    w = xp.asarray(kernel).astype(np.float32)
    top = {"int8": INT8_MAX, "fp8": FP8_MAX}[check_mode(mode)]
    # Products with float32 reciprocals, not divisions: XLA rewrites x / constant and x / broadcast(s)
    # into x * (1 / ...) itself, so numpy must spell out the same operations to give the same bits.
    scale = xp.max(xp.abs(w), axis=contracted, keepdims=True) * xp.float32(1.0 / top)
    scale = xp.where(scale > 0, scale, xp.float32(1.0))
    scaled = w * (xp.float32(1.0) / scale)
    if mode == "int8":
        q = xp.clip(xp.round(scaled), -INT8_MAX, INT8_MAX).astype(np.int8)
    else:
        q = scaled.astype(FP8)
    return q, scale


def dequantize_kernel(p: Params, dtype=jnp.float32) -> jax.Array:
    """The kernel of a (possibly quantised) Linear in `dtype`."""
    k = p["kernel"]
    return (k.astype(jnp.float32) * p[SCALE]).astype(dtype) if SCALE in p else k.astype(dtype)


def is_quantized(p: Params) -> bool:
    return SCALE in p


def _output_scale(equation: str, x_ndim: int, scale: jax.Array) -> jax.Array:
    # The per-output-channel scale laid out like the einsum's output (size-1 where it broadcasts).
    return jnp.einsum(equation, jnp.ones((1,) * x_ndim, jnp.float32), scale)


def einsum_kernel(equation: str, x: jax.Array, p: Params) -> jax.Array:
    """`jnp.einsum(equation, x, kernel)` in x's dtype for a plain or quantised Linear dict `p` (no bias)."""
    k = p["kernel"]
    if SCALE not in p:
        return jnp.einsum(equation, x, k.astype(x.dtype))
    out_scale = _output_scale(equation, x.ndim, p[SCALE])
    if k.dtype == jnp.int8:
        y = jnp.einsum(equation, x, k.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * out_scale).astype(x.dtype)
    if k.dtype == FP8:
        x32 = x.astype(jnp.float32)
        x_scale = jnp.maximum(jnp.max(jnp.abs(x32)), 1e-12) / FP8_MAX
        xq = (x32 / x_scale).astype(FP8)
        y = jnp.einsum(equation, xq, k, preferred_element_type=jnp.float32)
        return (y * (out_scale * x_scale)).astype(x.dtype)
    raise TypeError(f"quantised kernel of dtype {k.dtype}; expected int8 or float8_e4m3fn.")


def dense(x: jax.Array, p: Params) -> jax.Array:
    """`nn.dense` for a plain or quantised Linear dict (kernel [in, out], optional bias)."""
    if SCALE not in p:
        return nn.dense(x, p)
    y = einsum_kernel("...i,io->...o", x, p)
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def _quantised_linears(params: Params, table) -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(params, sep=".")
    linears = {path.rsplit(".", 1)[0] for path in flat if path.endswith(".kernel")}
    compiled = [(re.compile(p), axes) for p, axes in table]
    return {lin: axes for lin in linears for pattern, axes in compiled if pattern.fullmatch(lin)}


def quantize_params(params: Params, mode: str, table=DIT_QUANTISED) -> Params:
    """A copy of `params` with the Linears matched by `table` quantised (kernel + kernel_scale).

    Linears already quantised in `mode` (e.g. restored from a quantised conversion) are kept as
    they are; params quantised in the other mode are refused (re-quantising would compound errors)."""
    check_mode(mode)
    have = params_mode(params)
    if have is not None and have != mode:
        raise InputError(f"the DiT parameters are already quantised as {have}; quantize={mode!r} cannot be applied on "
                         f"top: use quantize={have!r} (or None), or start from unquantised weights.")
    flat = dict(traverse_util.flatten_dict(params, sep="."))
    for lin, contracted in _quantised_linears(params, table).items():
        if f"{lin}.{SCALE}" in flat:
            continue  # already quantised (e.g. restored from a quantised conversion)
        flat[f"{lin}.kernel"], flat[f"{lin}.{SCALE}"] = quantize_kernel(flat[f"{lin}.kernel"], contracted, mode)
    return traverse_util.unflatten_dict(flat, sep=".")


def quantized_axes(axes: Params, params: Params) -> Params:
    """Logical axes for quantised `params` from the plain model's `axes`: a scale shards like its
    kernel on the axes it keeps (its contracted, size-1 axes are never split)."""
    flat_axes = dict(traverse_util.flatten_dict(axes, sep="."))
    for path, leaf in traverse_util.flatten_dict(params, sep=".").items():
        if path.endswith("." + SCALE):
            kernel_axes = flat_axes[path[: -len(SCALE)] + "kernel"]
            flat_axes[path] = tuple(None if n == 1 else a for a, n in zip(kernel_axes, leaf.shape))
    return traverse_util.unflatten_dict(flat_axes, sep=".")


def params_mode(params: Params) -> str | None:
    """The mode ("int8" / "fp8") a parameter tree is quantised in, None when it holds no quantised Linear.

    Works on arrays and on abstract (`jax.ShapeDtypeStruct`) leaves."""
    flat = traverse_util.flatten_dict(params, sep=".")
    modes = {_KERNEL_MODES.get(jnp.dtype(flat[p[: -len(SCALE)] + "kernel"].dtype)) for p in flat if p.endswith("." + SCALE)}
    if len(modes) > 1 or None in modes:
        raise InputError(f"the DiT parameters mix quantised kernel dtypes ({sorted(map(str, modes))}); "
                         "convert the checkpoint again.")
    return modes.pop() if modes else None


_KERNEL_MODES = {jnp.dtype(jnp.int8): "int8", jnp.dtype(FP8): "fp8"}


def layer_table(table=DIT_QUANTISED, stacked_key: str = "transformer_blocks"):
    """`table` for ONE layer of the stacked subtree `stacked_key` (a conversion writes layer by
    layer): the entries under it, without the `stacked_key.` prefix and with the contracted axes
    shifted down by one (no leading layer axis). Per-output-channel scales never span layers, so
    quantising each layer with this table gives exactly the slices of `quantize_params` on the stack."""
    head = re.escape(stacked_key) + r"\."
    return tuple((pattern[len(head):], tuple(a - 1 for a in axes)) for pattern, axes in table
                 if pattern.startswith(head))
