"""LoRA files for the Lens DiT: diffusers/PEFT, kohya/musubi-tuner and ComfyUI, read and written.

| format | tensor names | alpha |
|---|---|---|
| `peft`  | `transformer.{module}.lora_A.weight` [r, in], `.lora_B.weight` [out, r] | metadata `lora_adapter_metadata` (JSON: `transformer.r`, `transformer.lora_alpha`, `..._pattern`) |
| `kohya` | `lora_unet_{module with '.' -> '_'}.lora_down.weight` [r, in], `.lora_up.weight` [out, r] | `.alpha` (0-dim) per module |
| `comfy` | `diffusion_model.{module}.lora_A.weight`, `.lora_B.weight` | none: alpha = r (scale 1), lora_B stored times alpha/r |

`{module}` is the upstream PyTorch module path (`transformer_blocks.0.attn.to_out.0`); the DiT's
mapping table (`dit_rules`) turns it into our pytree path plus a layer index
(`transformer_blocks.attn.to_out`, layer 0). A PyTorch delta `lora_B @ lora_A` is [out, in]; ours is
`lora_A @ lora_B` [in, out] with lora_A = A_t.T, lora_B = B_t.T, and the flat axes are in PyTorch order,
so `(A @ B).reshape(kernel.shape)` equals the Rule transform of the PyTorch delta (`lens_jax.models.lora`).
Reading also accepts PEFT's own prefix `base_model.model.`, unprefixed PEFT names, ComfyUI's
`model.diffusion_model.` and `.alpha` tensors in any format; writing produces exactly the table above.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

import jax
from jax.typing import DTypeLike
import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError, InputError, LayoutError
from ..models import lora as lora_lib
from ..models.lora import LoraWeights
from ..models.transformer import TransformerConfig, init_params
from .dit import dit_rules
from .safetensors_io import SafetensorsReader

__all__ = ["FORMATS", "detect_format", "read_state_dict", "from_state_dict", "load", "state_dict", "metadata", "save",
           "torch_module_table"]

FORMATS = ("peft", "kohya", "comfy")
PEFT_PREFIX = "transformer."
COMFY_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
_READ_PREFIXES = {  # prefix -> format, longest first
    "base_model.model.": "peft", "model.diffusion_model.": "comfy", COMFY_PREFIX: "comfy", PEFT_PREFIX: "peft",
}
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B",
             ".alpha": "alpha"}


def torch_module_table() -> list[tuple[str, str, bool]]:
    """(our module path, PyTorch module template with `{i}` for the block index, stacked) per Linear."""
    rules = dit_rules(TransformerConfig())  # names do not depend on the sizes
    return [(r.target[: -len(".kernel")], r.sources[0][: -len(".weight")], r.stacked)
            for r in rules if r.target.endswith(".kernel")]


def _module_matchers(underscored: bool) -> list[tuple[re.Pattern, str, bool]]:
    out = []
    for path, template, stacked in torch_module_table():
        name = template.replace(".", "_") if underscored else template
        pattern = re.escape(name).replace(re.escape("{i}"), r"(\d+)")
        out.append((re.compile(pattern), path, stacked))
    return out


def _resolve(module: str, matchers) -> tuple[str, int | None] | None:
    for pattern, path, stacked in matchers:
        m = pattern.fullmatch(module)
        if m:
            return path, (int(m.group(1)) if stacked else None)
    return None


def _read_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return header.get("__metadata__") or {}


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointNotFoundError(f"LoRA file {p} does not exist; pass a .safetensors LoRA file.")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p} is not a .safetensors file; lens-jax reads LoRAs from safetensors only.")
    reader = SafetensorsReader([p])
    return {k: reader.get(k) for k in reader.keys()}, _read_metadata(p)


def detect_format(keys: Iterable[str]) -> str:
    """'peft', 'kohya' or 'comfy' from the tensor names; `LayoutError` when none fits."""
    keys = list(keys)
    if keys and all(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    found = set()
    for k in keys:
        if not any(k.endswith(s) for s in _SUFFIXES):
            break
        found.add(next((f for p, f in _READ_PREFIXES.items() if k.startswith(p)), "peft"))
    else:
        if len(found) == 1:
            return found.pop()
    examples = ", ".join(keys[:3]) or "no tensors"
    raise LayoutError(
        f"unknown LoRA format (keys like {examples}); lens-jax reads diffusers/PEFT "
        "(transformer.{module}.lora_A/B.weight), kohya/musubi (lora_unet_{module}.lora_down/lora_up.weight + .alpha) "
        "and ComfyUI (diffusion_model.{module}.lora_A/B.weight) LoRAs of the Lens DiT."
    )


def _split_key(key: str, fmt: str) -> tuple[str, str]:
    """(module name as written, 'A'|'B'|'alpha')."""
    kind = next((v for s, v in _SUFFIXES.items() if key.endswith(s)), None)
    if kind is None:
        raise LayoutError(f"LoRA tensor {key!r} is neither lora_A/lora_B/lora_down/lora_up.weight nor .alpha.")
    module = key[: -len(next(s for s in _SUFFIXES if key.endswith(s)))]
    if fmt == "kohya":
        return module[len(KOHYA_PREFIX):], kind
    prefix = next((p for p in _READ_PREFIXES if module.startswith(p)), "")
    return module[len(prefix):], kind


def _peft_config(meta: Mapping[str, str]) -> dict:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    cfg = json.loads(raw)
    # diffusers prefixes every key with the component name ("transformer.r"); PEFT itself does not.
    return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in cfg.items()}


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT semantics: a key applies to a module equal to it or ending with '.' + key (else a regex)."""
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return value
    for key, value in (patterns or {}).items():
        if re.fullmatch(key, module):
            return value
    return default


def from_state_dict(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str] | None = None,
                    config: TransformerConfig | None = None, fmt: str | None = None) -> dict[str, LoraWeights]:
    """A LoRA state dict (any of the three formats) -> adapter pytree.

    With `config`, stacked modules get exactly `config.num_layers` layers and every shape is checked
    against the model; without it, the number of layers is the highest block index in the file + 1.
    """
    fmt = fmt or detect_format(tensors)
    peft = _peft_config(meta or {})
    if peft.get("use_dora"):
        raise CheckpointError("this LoRA is a DoRA (use_dora true); lens-jax supports plain LoRA only.")
    matchers = _module_matchers(underscored=fmt == "kohya")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        module, kind = _split_key(key, fmt)
        parts.setdefault(module, {})[kind] = value
    per_path: dict[str, dict[int | None, tuple]] = {}
    for module, got in sorted(parts.items()):
        where = _resolve(module, matchers)
        if where is None:
            raise CheckpointError(
                f"the LoRA adapts module {module!r}, which the Lens DiT does not have (or is not a Linear); "
                "is this a LoRA for another model?"
            )
        if "A" not in got or "B" not in got:
            raise CheckpointError(f"the LoRA for {module!r} lacks its {'lora_A' if 'A' not in got else 'lora_B'} tensor.")
        a_t, b_t = np.asarray(got["A"]), np.asarray(got["B"])
        if a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape[0] != b_t.shape[1]:
            raise CheckpointError(
                f"LoRA rank mismatch for {module!r}: lora_A/down is {list(a_t.shape)} ([r, in]) but lora_B/up is "
                f"{list(b_t.shape)} ([out, r]); the two must share r."
            )
        r = a_t.shape[0]
        if "alpha" in got:
            alpha = float(np.asarray(got["alpha"]).reshape(()))
        elif peft:
            rank_cfg = int(_pattern_value(peft.get("rank_pattern"), module, peft.get("r", r)))
            alpha = float(_pattern_value(peft.get("alpha_pattern"), module, peft.get("lora_alpha", rank_cfg)))
            if rank_cfg != r:
                raise CheckpointError(
                    f"LoRA rank mismatch for {module!r}: the tensors have rank {r} but the metadata says r = {rank_cfg}."
                )
            if peft.get("use_rslora"):
                alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r
        else:
            alpha = float(r)  # ComfyUI convention: no alpha -> scale 1
        path, layer = where
        per_path.setdefault(path, {})[layer] = (a_t.T, b_t.T, alpha, module)

    shapes = lora_lib.module_shapes(jax.eval_shape(lambda: init_params(config, jax.random.key(0)))) if config else None
    adapter = {}
    for path, layers in per_path.items():
        if None in layers:
            a, b, alpha, _ = layers[None]
            adapter[path] = LoraWeights(a, b, alpha)
            continue
        ranks = {v[0].shape[1] for v in layers.values()}
        if len(ranks) > 1:
            raise CheckpointError(
                f"the LoRA for {path} has different ranks across blocks ({sorted(ranks)}); lens-jax stacks the blocks "
                "and needs one rank per module."
            )
        n = config.num_layers if config else max(layers) + 1
        if max(layers) >= n:
            raise CheckpointError(
                f"the LoRA adapts block {max(layers)} ({layers[max(layers)][3]}) but the DiT has {n} blocks."
            )
        a0, b0, alpha0, _ = next(iter(layers.values()))
        a = np.zeros((n,) + a0.shape, a0.dtype)
        b = np.zeros((n,) + b0.shape, b0.dtype)
        alphas = [alpha0] * n
        for i, (ai, bi, al, module) in layers.items():
            if ai.shape != a0.shape or bi.shape != b0.shape:
                raise CheckpointError(f"LoRA tensors of {module!r} have shapes unlike the other blocks of {path}.")
            a[i], b[i], alphas[i] = ai, bi, al
        adapter[path] = LoraWeights(a, b, tuple(alphas))
    adapter = dict(sorted(adapter.items()))
    if shapes is not None:
        try:
            lora_lib.check_adapter_shapes(shapes, adapter)
        except InputError as e:
            raise CheckpointError(str(e)) from None
    return adapter


def load(path: str | os.PathLike, config: TransformerConfig | None = None,
         dtype: DTypeLike | None = None) -> dict[str, LoraWeights]:
    """Read a LoRA file of any of the three formats (detected from the names) -> adapter pytree (numpy leaves).

    `config` (the DiT's) fixes the number of blocks and checks every shape; `dtype` casts A and B.
    """
    tensors, meta = read_state_dict(path)
    beside = Path(path).parent / "adapter_config.json"  # PEFT's save_pretrained keeps the config beside the weights
    if "lora_adapter_metadata" not in meta and beside.is_file():
        meta = {**meta, "lora_adapter_metadata": beside.read_text()}
    try:
        adapter = from_state_dict(tensors, meta, config)
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    if dtype is not None:
        adapter = jax.tree.map(lambda x: np.asarray(x).astype(dtype), adapter)
    return adapter


def _layers(w: LoraWeights):
    """(layer index or None, A [in, r], B [r, out], alpha) per layer of one module."""
    a, b = np.asarray(w.lora_A), np.asarray(w.lora_B)
    if a.ndim == 2:
        yield None, a, b, float(w.alpha)
        return
    alphas = w.alpha if isinstance(w.alpha, tuple) else (w.alpha,) * a.shape[0]
    for i in range(a.shape[0]):
        yield i, a[i], b[i], float(alphas[i])


def _entries(adapter: Mapping[str, LoraWeights], gradient: bool):
    templates = {path: template for path, template, _ in torch_module_table()}
    for path, w in sorted(adapter.items()):
        if path not in templates:
            raise InputError(f"the adapter has a module {path!r}, which the Lens DiT does not have.")
        for i, a, b, alpha in _layers(w):
            if not gradient and i is not None and not a.any() and not b.any():
                continue  # a block this adapter does not touch
            yield templates[path].format(i=i) if i is not None else templates[path], a, b, alpha


def state_dict(adapter: Mapping[str, LoraWeights], format: str = "peft", gradient: bool = False) -> dict[str, np.ndarray]:
    """An adapter (or a gradient of one) -> the file's tensors: names and PyTorch layouts of `format`.

    `gradient=True` says the tree is d loss / d adapter: every block is written (zeros included), and
    for `comfy` lora_B is divided by alpha/r instead of multiplied (the gradient with respect to the
    stored, pre-scaled tensor). For `peft`/`kohya` weights and gradients are written alike.
    """
    if format not in FORMATS:
        raise InputError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}.")
    out: dict[str, np.ndarray] = {}
    for module, a, b, alpha in _entries(adapter, gradient):
        a_t, b_t = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
        if format == "kohya":
            name = KOHYA_PREFIX + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = a_t
            out[f"{name}.lora_up.weight"] = b_t
            out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
        elif format == "peft":
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a_t
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_t
        else:
            factor = np.asarray(alpha / a.shape[1], b_t.dtype)
            out[f"{COMFY_PREFIX}{module}.lora_A.weight"] = a_t
            out[f"{COMFY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_t / factor if gradient else b_t * factor)
    return out


def metadata(adapter: Mapping[str, LoraWeights], format: str = "peft") -> dict[str, str]:
    """The safetensors metadata written with `format` (PEFT: `lora_adapter_metadata` as diffusers writes it)."""
    if format != "peft":
        return {}
    per_module = {module: (a.shape[1], alpha) for module, a, _, alpha in _entries(adapter, False)}
    r, alpha = Counter(per_module.values()).most_common(1)[0][0] if per_module else (0, 0.0)
    cfg = {
        "alpha_pattern": {m: al for m, (rk, al) in per_module.items() if al != alpha},
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_bias": False, "lora_dropout": 0.0, "peft_type": "LORA", "r": int(r),
        "rank_pattern": {m: rk for m, (rk, al) in per_module.items() if rk != r},
        "target_modules": sorted(per_module), "use_dora": False, "use_rslora": False,
    }
    return {"format": "pt",
            "lora_adapter_metadata": json.dumps({PEFT_PREFIX + k: v for k, v in sorted(cfg.items())}, indent=2)}


def save(adapter: Mapping[str, LoraWeights], path: str | os.PathLike, format: str = "peft") -> Path:
    """Write `adapter` as a `format` LoRA file (peft, kohya or comfy); returns the path."""
    from safetensors.numpy import save_file

    tensors = state_dict(adapter, format)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata=metadata(adapter, format) or None)
    return p
