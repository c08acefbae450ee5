"""FLUX.2 VAE checkpoints -> `lens_jax.vae` parameters.

The key mapping is data: a `Layout` names where each structural piece of the model lives in a
checkpoint, and `vae_rules(config, layout)` expands it into strict `Rule`s (every model parameter
needs exactly its key; anything else in the file is an error, except `num_batches_tracked`).
Two layouts:

- `DIFFUSERS`: `AutoencoderKLFlux2.save_pretrained` names (also ComfyUI's `flux2-vae.safetensors`).
- `BFL`: the original FLUX.2 `ae.safetensors` names (LDM style: `encoder.down.{i}.block.{j}`,
  `mid.block_1`, `mid.attn_1` with 1x1-conv q/k/v/proj_out, `norm_out`, `nin_shortcut`,
  `encoder.quant_conv`, `decoder.post_quant_conv`; the decoder's `up.{L-1-i}` is diffusers'
  `up_blocks.{i}`), as documented by diffusers' `scripts/convert_flux2_to_diffusers.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ..errors import CheckpointError
from ..models.vae.config import VAEConfig
from ..models.dtypes import resolve_dtype
from ..models.vae.api import VAE
from ..models.vae.model import init_params

from .mapping import CONV2D, COPY, LINEAR, Rule, Transform, convert_state_dict, expected_shapes, unflatten
from .safetensors_io import open_checkpoint

__all__ = ["Layout", "DIFFUSERS", "BFL", "LAYOUTS", "vae_rules", "detect_layout", "convert_vae", "IGNORE"]

# A 1x1 Conv2d [out, in, 1, 1] used as a linear layer -> [in, out] kernel.
CONV1X1_AS_LINEAR = Transform("conv1x1->linear", lambda t: ((t[1], t[0], 1, 1),), lambda x: x[:, :, 0, 0].T)

IGNORE = (r"(^|\.)num_batches_tracked$",)


@dataclass(frozen=True)
class Layout:
    """Where each piece of the VAE lives in a checkpoint's key space (L = number of levels)."""

    name: str
    enc_resnet: Callable[[int, int], str]          # (level, j) -> prefix
    enc_downsample: Callable[[int], str]           # level -> prefix of the conv
    dec_resnet: Callable[[int, int, int], str]     # (diffusers level i, j, L) -> prefix
    dec_upsample: Callable[[int, int], str]        # (diffusers level i, L) -> prefix of the conv
    mid_resnet: Callable[[str, int], str]          # ("encoder"|"decoder", j) -> prefix
    mid_attention: Callable[[str], str]            # "encoder"|"decoder" -> prefix
    attention_names: dict                          # our name -> checkpoint name inside the attention
    attention_transform: Transform                 # how q/k/v/out projections are stored
    shortcut: str                                  # the resnet's 1x1 shortcut conv
    norm_out: Callable[[str], str]
    quant_conv: str
    post_quant_conv: str
    marker: str                                    # a key only this layout has (for detection)


DIFFUSERS = Layout(
    name="diffusers",
    enc_resnet=lambda i, j: f"encoder.down_blocks.{i}.resnets.{j}",
    enc_downsample=lambda i: f"encoder.down_blocks.{i}.downsamplers.0.conv",
    dec_resnet=lambda i, j, n: f"decoder.up_blocks.{i}.resnets.{j}",
    dec_upsample=lambda i, n: f"decoder.up_blocks.{i}.upsamplers.0.conv",
    mid_resnet=lambda part, j: f"{part}.mid_block.resnets.{j}",
    mid_attention=lambda part: f"{part}.mid_block.attentions.0",
    attention_names={"group_norm": "group_norm", "to_q": "to_q", "to_k": "to_k", "to_v": "to_v",
                     "to_out.0": "to_out.0"},
    attention_transform=LINEAR,
    shortcut="conv_shortcut",
    norm_out=lambda part: f"{part}.conv_norm_out",
    quant_conv="quant_conv",
    post_quant_conv="post_quant_conv",
    marker="encoder.down_blocks.0.resnets.0.conv1.weight",
)

BFL = Layout(
    name="bfl",
    enc_resnet=lambda i, j: f"encoder.down.{i}.block.{j}",
    enc_downsample=lambda i: f"encoder.down.{i}.downsample.conv",
    dec_resnet=lambda i, j, n: f"decoder.up.{n - 1 - i}.block.{j}",
    dec_upsample=lambda i, n: f"decoder.up.{n - 1 - i}.upsample.conv",
    mid_resnet=lambda part, j: f"{part}.mid.block_{j + 1}",
    mid_attention=lambda part: f"{part}.mid.attn_1",
    attention_names={"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"},
    attention_transform=CONV1X1_AS_LINEAR,
    shortcut="nin_shortcut",
    norm_out=lambda part: f"{part}.norm_out",
    quant_conv="encoder.quant_conv",
    post_quant_conv="decoder.post_quant_conv",
    marker="encoder.down.0.block.0.conv1.weight",
)

LAYOUTS = {layout.name: layout for layout in (DIFFUSERS, BFL)}


def _conv(target: str, source: str) -> list[Rule]:
    return [Rule(f"{target}.kernel", f"{source}.weight", CONV2D), Rule(f"{target}.bias", f"{source}.bias")]


def _norm(target: str, source: str) -> list[Rule]:
    return [Rule(f"{target}.weight", f"{source}.weight"), Rule(f"{target}.bias", f"{source}.bias")]


def _resnet(target: str, source: str, shortcut: bool, layout: Layout) -> list[Rule]:
    rules = _norm(f"{target}.norm1", f"{source}.norm1") + _conv(f"{target}.conv1", f"{source}.conv1")
    rules += _norm(f"{target}.norm2", f"{source}.norm2") + _conv(f"{target}.conv2", f"{source}.conv2")
    if shortcut:
        rules += _conv(f"{target}.conv_shortcut", f"{source}.{layout.shortcut}")
    return rules


def _mid_block(part: str, config: VAEConfig, width: int, layout: Layout) -> list[Rule]:
    rules = []
    for j in range(2):
        rules += _resnet(f"{part}.mid_block.resnets.{j}", layout.mid_resnet(part, j), False, layout)
    if config.mid_block_add_attention:
        target, source = f"{part}.mid_block.attentions.0", layout.mid_attention(part)
        names = layout.attention_names
        rules += _norm(f"{target}.group_norm", f"{source}.{names['group_norm']}")
        for ours in ("to_q", "to_k", "to_v", "to_out.0"):
            rules += [Rule(f"{target}.{ours}.kernel", f"{source}.{names[ours]}.weight", layout.attention_transform),
                      Rule(f"{target}.{ours}.bias", f"{source}.{names[ours]}.bias")]
    return rules


def vae_rules(config: VAEConfig, layout: Layout = DIFFUSERS) -> list[Rule]:
    """Every parameter of `init_params(config)` with its checkpoint key in `layout`."""
    rules = _conv("encoder.conv_in", "encoder.conv_in")
    chans = config.block_out_channels
    cout = chans[0]
    for i, width in enumerate(chans):
        cin, cout = cout, width
        for j in range(config.layers_per_block):
            rules += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", layout.enc_resnet(i, j),
                             j == 0 and cin != cout, layout)
        if i < len(chans) - 1:
            rules += _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", layout.enc_downsample(i))
    rules += _mid_block("encoder", config, chans[-1], layout)
    rules += _norm("encoder.conv_norm_out", layout.norm_out("encoder")) + _conv("encoder.conv_out", "encoder.conv_out")

    rev = tuple(reversed(config.decoder_channels))
    n = len(rev)
    rules += _conv("decoder.conv_in", "decoder.conv_in")
    rules += _mid_block("decoder", config, rev[0], layout)
    cout = rev[0]
    for i, width in enumerate(rev):
        cin, cout = cout, width
        for j in range(config.layers_per_block + 1):
            rules += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", layout.dec_resnet(i, j, n),
                             j == 0 and cin != cout, layout)
        if i < n - 1:
            rules += _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", layout.dec_upsample(i, n))
    rules += _norm("decoder.conv_norm_out", layout.norm_out("decoder")) + _conv("decoder.conv_out", "decoder.conv_out")

    if config.use_quant_conv:
        rules += _conv("quant_conv", layout.quant_conv)
    if config.use_post_quant_conv:
        rules += _conv("post_quant_conv", layout.post_quant_conv)
    rules += [Rule("bn.running_mean", "bn.running_mean", COPY), Rule("bn.running_var", "bn.running_var", COPY)]
    return rules


def detect_layout(keys) -> Layout:
    """The layout whose marker key is present; CheckpointError if none is."""
    keys = set(keys)
    for layout in LAYOUTS.values():
        if layout.marker in keys:
            return layout
    sample = sorted(keys)[:8]
    raise CheckpointError(
        "not a FLUX.2 VAE checkpoint in a known layout: expected a key like "
        + " or ".join(repr(lay.marker) for lay in LAYOUTS.values())
        + f"; the file starts with {sample}."
    )


def _find_config(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    candidate = folder / "config.json"
    return candidate if candidate.exists() else None


def convert_vae(path: str | os.PathLike, dtype=jnp.float32, *, config: VAEConfig | None = None,
                layout: str | Layout | None = None) -> tuple[VAEConfig, dict]:
    """Read a FLUX.2 VAE checkpoint into (config, params pytree with numpy leaves).

    `path`: a diffusers `vae/` folder (config.json + safetensors) or a single safetensors file.
    The config comes from `config` if given, else from a config.json beside the weights; a
    bare file without one uses the real FLUX.2 config. The key layout is detected unless given.
    Parameters are cast to `dtype`; the BatchNorm statistics stay float32.
    """
    p = Path(path)
    reader = open_checkpoint(p)
    if config is None:
        cfg_path = _find_config(p)
        if cfg_path is not None:
            try:
                config = VAEConfig.from_json(cfg_path)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{cfg_path}: {e}") from None
        elif p.is_dir():
            raise CheckpointError(
                f"{p} has no config.json; a diffusers vae/ folder needs one (or pass config=VAEConfig(...))."
            )
        else:
            config = VAEConfig()
    if layout is None:
        layout = detect_layout(reader.keys())
    elif isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown VAE checkpoint layout {layout!r}; choose from {sorted(LAYOUTS)}.")
        layout = LAYOUTS[layout]
    abstract = jax.eval_shape(partial(init_params, config, dtype=jnp.dtype(dtype)), jax.random.PRNGKey(0))
    flat = convert_state_dict(reader, vae_rules(config, layout), expected_shapes(abstract), ignore=IGNORE,
                              what=f"VAE checkpoint ({layout.name} layout)")
    return config, unflatten(flat)


def load(path: str | os.PathLike, dtype: DTypeLike = jnp.float32, *, config: VAEConfig | None = None) -> VAE:
    """Load a FLUX.2 VAE from a diffusers `vae/` folder (config.json + safetensors).

    Also accepts a single safetensors file in diffusers or original BFL (`ae.safetensors`)
    naming; without a config.json beside it, `config` (default: the real FLUX.2 config) is used.
    """
    cfg, params = convert_vae(path, resolve_dtype(dtype), config=config)
    return VAE(jax.device_put(params), cfg)
