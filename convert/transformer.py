"""Lens DiT: PyTorch (diffusers key names) -> JAX pytree mapping, and the folder loader."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from .mapping import COPY, LINEAR, Rule, convert_state_dict, expected_shapes, unflatten
from .safetensors_io import CheckpointError, SafetensorsReader, open_checkpoint

# (JAX target, PyTorch source) for every Linear; weight -> kernel (transposed), bias -> bias.
_LINEARS = [
    ("img_in", "img_in"),
    ("txt_in", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_1"),
    ("time_text_embed.timestep_embedder.linear_2", "time_text_embed.timestep_embedder.linear_2"),
    ("norm_out.linear", "norm_out.linear"),
    ("proj_out", "proj_out"),
    ("transformer_blocks.attn.img_qkv", "transformer_blocks.{i}.attn.img_qkv"),
    ("transformer_blocks.attn.txt_qkv", "transformer_blocks.{i}.attn.txt_qkv"),
    ("transformer_blocks.attn.to_out", "transformer_blocks.{i}.attn.to_out.0"),
    ("transformer_blocks.attn.to_add_out", "transformer_blocks.{i}.attn.to_add_out"),
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

DIT_RULES: list[Rule] = [
    *[Rule(f"{t}.kernel", f"{s}.weight", LINEAR) for t, s in _LINEARS + _LINEARS_NO_BIAS],
    *[Rule(f"{t}.bias", f"{s}.bias", COPY) for t, s in _LINEARS],
    *[Rule(f"{t}.weight", f"{s}.weight", COPY) for t, s in _NORM_WEIGHTS],
]


def dit_expected_shapes(config, dtype) -> dict:
    from lens_jax.transformer import init_params

    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))
    return expected_shapes(abstract)


def _weights_and_config(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"transformer path {p} does not exist.")
    folder = p if p.is_dir() else p.parent
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
        reader, DIT_RULES, dit_expected_shapes(config, dtype),
        source_prefix=source_prefix, what="transformer checkpoint", progress=progress,
    )
    return unflatten(flat)


def convert_transformer(path: str | os.PathLike, dtype=np.float32, progress=None):
    """Read an upstream `transformer/` folder -> (TransformerConfig, params with numpy leaves)."""
    from lens_jax.transformer import TransformerConfig

    weights, config_path = _weights_and_config(path)
    config = TransformerConfig.from_json(config_path)
    reader = open_checkpoint(weights)
    return config, convert_dit_weights(reader, config, dtype, progress=progress)
