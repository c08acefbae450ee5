"""LoRA adapters for the Lens DiT as pure functions over pytrees.

An adapter is a plain dict `{module_path: LoraWeights}`:

- `module_path` is the DiT pytree path of a Linear (the dict holding its `kernel`), dotted:
  `img_in`, `proj_out`, `transformer_blocks.attn.img_qkv`, `transformer_blocks.attn.to_out`,
  `transformer_blocks.img_mlp.w1`, ... (`lora_targets(params)` lists them all).
- `LoraWeights(lora_A, lora_B, alpha)`: `lora_A` [(L,) in, r] and `lora_B` [(L,) r, out] are the
  pytree leaves (what is trained and differentiated); `alpha` is static metadata (a float, or a
  tuple of L floats for a stacked module), so it is carried unchanged through `jax.grad`,
  optax updates and `jax.tree.map`, and is never trained. Entries also read like a dict:
  `w["lora_A"]`, `w["lora_B"]`, `w["alpha"]`.
- `in`/`out` are the Linear's flat feature sizes (PyTorch's `in_features`/`out_features`); for the
  attention Linears the flat axis is in PyTorch order, so `(A @ B).reshape(kernel.shape)` is the
  kernel-layout delta: qkv kernels are [d, 3, heads, head_dim], to_out/to_add_out [heads, head_dim, d].
- Modules under `transformer_blocks` carry the leading layer axis L (they run in the DiT's
  `lax.scan`). A layer without an adapter has zero A and B.

The adapter's effect: `kernel' = kernel + multiplier * (alpha / r) * A @ B` (PEFT / kohya
semantics: `y = W x + b + m * alpha/r * B_t (A_t x)` with A_t = A.T, B_t = B.T).

Two ways to apply it:
- `merge(params, adapter, m)` folds the adapter into the kernels (inference, fuse); `unmerge`
  subtracts it again (unfuse; exact only up to float rounding, keep the base to restore bit for bit).
- unmerged, for training: `lens_jax.models.transformer.apply(..., lora=adapter, lora_multiplier=m)`
  merges each block's kernels inside the `lax.scan` body, one layer at a time. The extra work is one
  [in, r] @ [r, out] product per kernel and step, i.e. about r / tokens of the layer's matmul
  (r=32 at 4096 tokens: < 1 %), and only one layer's merged kernels are live at a time. Gradients
  flow to `lora_A`/`lora_B` (and to the base params if wanted) through the merge.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
import numpy as np

from ..errors import InputError

__all__ = [
    "LoraWeights", "Adapter", "STACKED_PREFIX", "DEFAULT_TARGETS", "lora_targets", "module_shapes", "init_adapter",
    "merge", "merge_many", "unmerge", "scale_factors", "merge_factors", "split_stacked", "rank_of", "check_adapter",
    "check_adapter_shapes", "get_path", "set_path",
]

STACKED_PREFIX = "transformer_blocks."
# Attention and MLP Linears of every block (what musubi-tuner / diffusers trainers target by default).
DEFAULT_TARGETS = (r"transformer_blocks\.attn\.(img_qkv|txt_qkv|to_out|to_add_out)",
                   r"transformer_blocks\.(img|txt)_mlp\.w[123]")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LoraWeights:
    """One module's adapter: `lora_A` [(L,) in, r], `lora_B` [(L,) r, out] (leaves), `alpha` (static)."""

    lora_A: Any
    lora_B: Any
    alpha: float | tuple[float, ...] = field(metadata=dict(static=True))

    def __getitem__(self, key: str):
        if key not in ("lora_A", "lora_B", "alpha"):
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> tuple[str, str, str]:
        """The field names, so that `dict(w)` and `w["lora_A"]` read like the PEFT dicts."""
        return ("lora_A", "lora_B", "alpha")

    @property
    def rank(self) -> int:
        """The adapter's rank r (the last axis of `lora_A`)."""
        return int(self.lora_A.shape[-1])


Adapter = dict  # {module_path: LoraWeights}


def rank_of(w: LoraWeights) -> int:
    return int(w.lora_A.shape[-1])


def get_path(tree: Mapping, path: str):
    """The subtree at dotted `path`."""
    return _get(tree, path)


def set_path(tree: Mapping, path: str, value) -> dict:
    """A copy of `tree` with dotted `path` replaced (only the dicts along the path are copied)."""
    return _set(tree, path, value)


def _get(tree: Mapping, path: str):
    for k in path.split("."):
        tree = tree[k]
    return tree


def _set(tree: Mapping, path: str, value) -> dict:
    """A copy of `tree` with `path` replaced (only the dicts along the path are copied)."""
    head, _, rest = path.partition(".")
    out = dict(tree)
    out[head] = _set(tree[head], rest, value) if rest else value
    return out


def lora_targets(params: Mapping, prefix: str = "") -> list[str]:
    """Dotted paths of every Linear (every dict with a `kernel`) in `params`, sorted."""
    found = []
    for k, v in params.items():
        if isinstance(v, Mapping):
            path = f"{prefix}{k}"
            if "kernel" in v:
                found.append(path)
            found.extend(lora_targets(v, path + "."))
    return sorted(found)


def module_shapes(params: Mapping) -> dict[str, tuple[int | None, int, int]]:
    """{module path: (layers or None, in, out)} of every Linear; `in`/`out` are flat (PyTorch) sizes.

    The flat split of a kernel: qkv [d, 3, heads, head_dim] -> in = d; to_out [heads, head_dim, d] ->
    out = d; plain [in, out].
    """
    out = {}
    for path in lora_targets(params):
        shape = tuple(_get(params, path)["kernel"].shape)
        layers = None
        if path.startswith(STACKED_PREFIX):
            layers, shape = shape[0], shape[1:]
        if _is_qkv(path):
            n_in, n_out = shape[0], math.prod(shape[1:])
        else:
            n_in, n_out = math.prod(shape[:-1]), shape[-1]
        out[path] = (layers, int(n_in), int(n_out))
    return out


def _is_qkv(path: str) -> bool:
    return path.endswith("_qkv")


def _pick(patterns: Mapping[str, Any] | None, path: str, default):
    """The value of the first regex in `patterns` that fully matches `path` (else `default`)."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(pattern, path):
            return value
    return default


def init_adapter(
    params: Mapping,
    config: Any = None,
    key: jax.Array | None = None,
    *,
    targets: Sequence[str] | str = DEFAULT_TARGETS,
    rank: int = 16,
    alpha: float | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    dtype: DTypeLike = jnp.float32,
) -> Adapter:
    """A fresh adapter on every Linear whose path fully matches one of the `targets` regexes.

    PEFT's default init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0, so the
    adapter starts as the identity. `alpha` defaults to `rank`; `rank_pattern` / `alpha_pattern` map
    a regex (full match on the module path) to a per-module rank / alpha. `config` is accepted for
    symmetry with the other model functions (the shapes come from `params`).
    """
    if key is None:
        key = jax.random.key(0)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    shapes = module_shapes(params)
    chosen = [p for p in shapes if any(re.fullmatch(t, p) for t in targets)]
    if not chosen:
        raise InputError(
            f"no Linear of the DiT matches the LoRA targets {list(targets)}; module paths look like "
            f"{', '.join(sorted(shapes)[:4])}, ... (lens_jax.lora.lora_targets(params) lists them)."
        )
    adapter = {}
    for path, k in zip(chosen, jax.random.split(key, len(chosen))):
        layers, n_in, n_out = shapes[path]
        r = int(_pick(rank_pattern, path, rank))
        a = float(_pick(alpha_pattern, path, alpha if alpha is not None else r))
        if r < 1:
            raise InputError(f"LoRA rank for {path} must be >= 1; got {r}.")
        lead = () if layers is None else (layers,)
        bound = 1.0 / math.sqrt(n_in)
        lora_A = jax.random.uniform(k, lead + (n_in, r), jnp.float32, -bound, bound).astype(dtype)
        lora_B = jnp.zeros(lead + (r, n_out), dtype)
        adapter[path] = LoraWeights(lora_A, lora_B, a if layers is None else (a,) * layers)
    return adapter


def check_multiplier(multiplier: Any) -> None:
    """A LoRA multiplier must be a finite real number (or a JAX array, e.g. a traced one to differentiate)."""
    if isinstance(multiplier, jax.Array):
        return
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real) or not math.isfinite(multiplier):
        raise InputError(f"the LoRA multiplier must be a finite number (1.0: the adapter as trained); got {multiplier!r}.")


def check_adapter(params: Mapping, adapter: Mapping[str, LoraWeights]) -> None:
    """Raise `InputError` naming the first module the model lacks or whose shapes do not fit."""
    check_adapter_shapes(module_shapes(params), adapter)


def check_adapter_shapes(shapes: Mapping[str, tuple], adapter: Mapping[str, LoraWeights]) -> None:
    """`check_adapter` against `module_shapes(params)`."""
    for path, w in adapter.items():
        if path not in shapes:
            raise InputError(
                f"the LoRA adapts {path!r}, which this DiT does not have; its Linears are "
                f"{', '.join(sorted(shapes))}."
            )
        layers, n_in, n_out = shapes[path]
        lead = () if layers is None else (layers,)
        r = w.lora_A.shape[-1]
        if tuple(w.lora_A.shape) != lead + (n_in, r) or tuple(w.lora_B.shape) != lead + (r, n_out):
            raise InputError(
                f"LoRA for {path!r} has lora_A {tuple(w.lora_A.shape)} and lora_B {tuple(w.lora_B.shape)}; "
                f"this DiT needs [{'L, ' if lead else ''}{n_in}, r] and [{'L, ' if lead else ''}r, {n_out}]"
                f"{f' with L = {layers}' if lead else ''}."
            )


def scale_factors(adapter: Mapping[str, LoraWeights], multiplier=1.0) -> dict[str, tuple]:
    """{path: (A, B, s)} with s = multiplier * alpha / r, shape () or (L,) for stacked modules."""
    out = {}
    for path, w in adapter.items():
        r = w.lora_A.shape[-1]
        s = np.asarray(w.alpha, np.float32) / np.float32(r)
        if w.lora_A.ndim == 3 and s.ndim == 0:  # stacked: one scale per layer, so the scan can slice it
            s = np.full((w.lora_A.shape[0],), s, np.float32)
        s = jnp.asarray(s)
        out[path] = (w.lora_A, w.lora_B, s * jnp.asarray(multiplier, jnp.float32))
    return out


def _delta(a, b, s, shape, dtype):
    d = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    d = d * jnp.reshape(s, jnp.shape(s) + (1, 1))
    return d.reshape(shape)


def merge_factors(params: Mapping, factors: Mapping[str, tuple], sign: float = 1.0) -> dict:
    """`params` with kernel += sign * s * A @ B for every {path: (A, B, s)} (paths relative to `params`)."""
    for path, (a, b, s) in factors.items():
        kernel = _get(params, path)["kernel"]
        merged = kernel.astype(jnp.float32) + sign * _delta(a, b, s, kernel.shape, kernel.dtype)
        params = _set(params, path + ".kernel", merged.astype(kernel.dtype))
    return params


def merge(params: Mapping, adapter: Mapping[str, LoraWeights], multiplier: float | jax.Array = 1.0) -> dict:
    """Params with the adapter folded into the kernels: kernel + multiplier * (alpha/r) * A @ B.

    Pure, jit-able and differentiable in `params`, `adapter` and `multiplier`; the delta is formed in
    float32 and the result cast back to each kernel's dtype.
    """
    return merge_factors(params, scale_factors(adapter, multiplier))


def merge_many(params: Mapping, adapters: Iterable[tuple[Mapping[str, LoraWeights], float]]) -> dict:
    """Several adapters stacked, each with its own multiplier: [(adapter, multiplier), ...]."""
    for adapter, multiplier in adapters:
        params = merge(params, adapter, multiplier)
    return params


def unmerge(params: Mapping, adapter: Mapping[str, LoraWeights], multiplier: float | jax.Array = 1.0) -> dict:
    """The inverse of `merge` (subtracts the delta); exact up to float rounding of the kernels' dtype."""
    return merge_factors(params, scale_factors(adapter, multiplier), sign=-1.0)


def split_stacked(factors: Mapping[str, tuple], prefix: str = STACKED_PREFIX) -> tuple[dict, dict]:
    """Split `scale_factors` output into (top-level, per-block with `prefix` removed) for the scan."""
    top = {p: f for p, f in factors.items() if not p.startswith(prefix)}
    stacked = {p[len(prefix):]: f for p, f in factors.items() if p.startswith(prefix)}
    return top, stacked
