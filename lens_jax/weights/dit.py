"""Lens DiT: PyTorch (diffusers key names) -> JAX pytree mapping, and the folder loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
import numpy as np

from .mapping import COPY, LINEAR, Rule, Transform, convert_state_dict, expected_shapes, to_state_dict, unflatten
from ..errors import CheckpointError
from ..models import quant
from ..models.dtypes import resolve_dtype
from ..models.transformer import LensTransformer, TransformerConfig, init_params
from .safetensors_io import SafetensorsReader, open_checkpoint

# (JAX target, PyTorch source) for every Linear; weight -> kernel (transposed), bias -> bias.
# Attention weights keep the head axis, so tensor parallelism splits whole heads:
# fused qkv PyTorch [3 * inner, d] (rows q, k, v; each heads x head_dim) <-> kernel [d, 3, heads, head_dim],
# bias [3 * inner] <-> [3, heads, head_dim]; output Linear [d, inner] <-> kernel [heads, head_dim, d].
def qkv_transforms(heads: int) -> tuple[Transform, Transform, Transform]:
    """(qkv kernel, qkv bias, attention-output kernel) transforms for a DiT with `heads` heads."""
    kernel = Transform(
        "qkv_kernel", lambda t: ((t[1] * t[2] * t[3], t[0]),), lambda x: x.T.reshape(x.shape[1], 3, heads, -1),
        lambda x: x.reshape(x.shape[0], -1).T,
    )
    bias = Transform("qkv_bias", lambda t: ((t[0] * t[1] * t[2],),), lambda x: x.reshape(3, heads, -1),
                     lambda x: x.reshape(-1))
    out = Transform("attn_out_kernel", lambda t: ((t[2], t[0] * t[1]),), lambda x: x.T.reshape(heads, -1, x.shape[0]),
                    lambda x: x.reshape(-1, x.shape[-1]).T)
    return kernel, bias, out


_QKV = [(f"transformer_blocks.attn.{s}_qkv", f"transformer_blocks.{{i}}.attn.{s}_qkv") for s in ("img", "txt")]
_ATTN_OUT = [("transformer_blocks.attn.to_out", "transformer_blocks.{i}.attn.to_out.0"),
             ("transformer_blocks.attn.to_add_out", "transformer_blocks.{i}.attn.to_add_out")]

_LINEARS = [
    ("img_in", "img_in"),
    ("txt_in", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_1"),
    ("time_text_embed.timestep_embedder.linear_2", "time_text_embed.timestep_embedder.linear_2"),
    ("norm_out.linear", "norm_out.linear"),
    ("proj_out", "proj_out"),
    ("transformer_blocks.img_mod", "transformer_blocks.{i}.img_mod.1"),
    ("transformer_blocks.txt_mod", "transformer_blocks.{i}.txt_mod.1"),
]
_LINEARS_NO_BIAS = [
    (f"transformer_blocks.{stream}_mlp.{w}", f"transformer_blocks.{{i}}.{stream}_mlp.{w}")
    for stream in ("img", "txt")
    for w in ("w1", "w2", "w3")
]
_NORM_WEIGHTS = [
    ("txt_norm", "txt_norm.{i}"),
    *[(f"transformer_blocks.attn.{n}", f"transformer_blocks.{{i}}.attn.{n}")
      for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")],
    *[(f"transformer_blocks.{n}", f"transformer_blocks.{{i}}.{n}")
      for n in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2")],
]

def dit_rules(config: TransformerConfig) -> list[Rule]:
    """The DiT's key-mapping table (PyTorch diffusers names -> JAX pytree paths) for `config`."""
    qkv_kernel, qkv_bias, out_kernel = qkv_transforms(config.num_attention_heads)
    return [
        *[Rule(f"{t}.kernel", f"{s}.weight", qkv_kernel) for t, s in _QKV],
        *[Rule(f"{t}.bias", f"{s}.bias", qkv_bias) for t, s in _QKV],
        *[Rule(f"{t}.kernel", f"{s}.weight", out_kernel) for t, s in _ATTN_OUT],
        *[Rule(f"{t}.bias", f"{s}.bias", COPY) for t, s in _ATTN_OUT],
        *[Rule(f"{t}.kernel", f"{s}.weight", LINEAR) for t, s in _LINEARS + _LINEARS_NO_BIAS],
        *[Rule(f"{t}.bias", f"{s}.bias", COPY) for t, s in _LINEARS],
        *[Rule(f"{t}.weight", f"{s}.weight", COPY) for t, s in _NORM_WEIGHTS],
    ]


def to_torch_state_dict(params: Mapping[str, Any], config: TransformerConfig | None = None) -> dict[str, np.ndarray]:
    """The inverse of conversion: DiT params (or a gradient pytree of them) -> upstream PyTorch names and layouts.

    Linear kernels go back to [out, in], the fused qkv to [3 * inner, d], stacked blocks to
    `transformer_blocks.{i}.*`. Leaves keep their dtype. `config` is accepted for symmetry
    with `load` (the tree's shapes already say everything).
    """
    if not isinstance(params, Mapping) or "transformer_blocks" not in params:
        hint = (" it looks like a LoRA adapter: lens_jax.lora.state_dict(adapter, format) writes those"
                if isinstance(params, Mapping) and any(isinstance(k, str) and "." in k for k in params) else "")
        raise CheckpointError(f"to_torch_state_dict takes the DiT parameter tree (keys img_in, transformer_blocks, "
                              f"...);{hint or ' got ' + type(params).__name__ + ' without transformer_blocks'}.")
    mode = quant.params_mode(params)
    if mode is not None:  # int8 / fp8 kernels without their scales would load as garbage upstream
        raise CheckpointError(f"these DiT parameters are quantised ({mode}); PyTorch export needs float weights: export "
                              "from a pipeline loaded without quantize= from an unquantised checkpoint.")
    host = jax.tree.map(np.asarray, params)
    heads = host["transformer_blocks"]["attn"]["img_qkv"]["kernel"].shape[-2]
    if config is not None and config.num_attention_heads != heads:
        raise ValueError(f"params have {heads} heads but config says {config.num_attention_heads}.")
    return to_state_dict(host, dit_rules(config or _HeadsOnly(heads)))


class _HeadsOnly:
    def __init__(self, heads: int):
        self.num_attention_heads = heads


def dit_expected_shapes(config, dtype) -> dict:
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))
    return expected_shapes(abstract)


def _weights_and_config(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"transformer path {p} does not exist.")
    folder = p if p.is_dir() else p.parent
    from .orbax_io import find_converted  # here: orbax_io imports the registry, which imports the models

    converted = find_converted(folder)
    if converted is not None:
        root, what = converted
        raise CheckpointError(
            f"{p} is in {root}, {what}; this reader takes upstream safetensors only: load it with "
            f"LensPipeline.from_pretrained('{root}') or lens_jax.weights.orbax_io.load_component('{root}', 'transformer', "
            "dtype), or pass the PyTorch transformer/ folder it was converted from."
        )
    config = folder / "config.json"
    if not config.exists():
        raise CheckpointError(
            f"no config.json in {folder}: pass an upstream `transformer/` folder (config.json + "
            "diffusion_pytorch_model*.safetensors)."
        )
    return p, config


def convert_dit_weights(reader: SafetensorsReader, config, dtype, source_prefix: str = "", progress=None) -> dict:
    """Strictly map a DiT state dict (diffusers names) to the JAX pytree (numpy leaves)."""
    flat = convert_state_dict(
        reader, dit_rules(config), dit_expected_shapes(config, dtype),
        source_prefix=source_prefix, what="transformer checkpoint", progress=progress,
    )
    return unflatten(flat)


DIT_CLASS = "LensTransformer2DModel"
_DIT_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "enc_hidden_dim")


def read_config(config_path: str | os.PathLike) -> TransformerConfig:
    """A DiT `config.json` -> TransformerConfig; another component's config is a CheckpointError naming it."""
    import json

    path = Path(config_path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
    d = d if isinstance(d, dict) else {}
    # a diffusers config names its class; a transformers one (the text encoder's) its architecture
    cls = d.get("_class_name") or d.get("model_type") or (d.get("architectures") or [None])[0]
    if (cls is not None and cls != DIT_CLASS) or not any(k in d for k in _DIT_KEYS):
        raise CheckpointError(
            f"{path} is not a Lens DiT config ({f'it is {cls!r}' if cls else 'none of ' + ', '.join(_DIT_KEYS)}); "
            f"pass the pipeline's transformer/ folder (its config.json has _class_name {DIT_CLASS!r})."
        )
    return TransformerConfig.from_dict(d)


def convert_transformer(path: str | os.PathLike, dtype=np.float32, progress=None):
    """Read an upstream `transformer/` folder -> (TransformerConfig, params with numpy leaves)."""
    weights, config_path = _weights_and_config(path)
    config = read_config(config_path)
    reader = open_checkpoint(weights)
    return config, convert_dit_weights(reader, config, dtype, progress=progress)


def load(path: str | os.PathLike, dtype: DTypeLike = jnp.float32,
         compute_dtype: DTypeLike | None = None) -> LensTransformer:
    """Load an upstream `transformer/` folder (config.json + safetensors, single or sharded).

    `path` may also be a single safetensors file with a `config.json` beside it.
    """
    config, flat = convert_transformer(path, resolve_dtype(dtype))
    params = jax.tree.map(jnp.asarray, flat)
    return LensTransformer(config, params, compute_dtype)
