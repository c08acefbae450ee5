"""Configuration of the FLUX.2 VAE (`diffusers.AutoencoderKLFlux2`), read from its `config.json`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["VAEConfig"]

# config.json keys that do not change the computation of encode/decode.
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast",
                 "batch_norm_momentum", "scaling_factor", "shift_factor"}


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of `AutoencoderKLFlux2`; the defaults are the real FLUX.2 VAE's.

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)
    act_fn: str = "silu"
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4

    # diffusers hard-codes these inside Encoder/Decoder/UNetMidBlock2D for this model.
    norm_eps: float = 1e-6
    output_scale_factor: float = 1.0

    def __post_init__(self):
        for name in ("block_out_channels", "decoder_block_out_channels", "patch_size", "down_block_types",
                     "up_block_types"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        problems = []
        if self.act_fn != "silu":
            problems.append(f"act_fn {self.act_fn!r} (only 'silu' is implemented)")
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            problems.append(f"down_block_types {self.down_block_types} (only DownEncoderBlock2D)")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            problems.append(f"up_block_types {self.up_block_types} (only UpDecoderBlock2D)")
        if len(self.down_block_types) != len(self.block_out_channels):
            problems.append("down_block_types and block_out_channels differ in length")
        if len(self.up_block_types) != len(self.decoder_channels):
            problems.append("up_block_types and the decoder's block_out_channels differ in length")
        if self.patch_size != (2, 2):
            problems.append(f"patch_size {self.patch_size} (Lens packing assumes (2, 2))")
        for c in set(self.block_out_channels) | set(self.decoder_channels):
            if c % self.norm_num_groups:
                problems.append(f"{c} channels are not divisible by norm_num_groups={self.norm_num_groups}")
        if problems:
            raise ValueError("unsupported AutoencoderKLFlux2 config: " + "; ".join(problems) + ".")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """Channels per decoder level (diffusers' `decoder_block_out_channels`, else the encoder's)."""
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent position (8 for FLUX.2): one 2x downsample between consecutive levels."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def token_factor(self) -> int:
        """Pixels per Lens token (16 for FLUX.2): the VAE factor times the 2x2 patch."""
        return self.spatial_factor * self.patch_size[0]

    @property
    def token_channels(self) -> int:
        """Channels of a packed Lens token (128 for FLUX.2)."""
        return self.latent_channels * self.patch_size[0] * self.patch_size[1]

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """From a diffusers `vae/config.json` dict; unknown keys or another class are a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unknown AutoencoderKLFlux2 config keys {unknown}; is this a FLUX.2 VAE config?")
        cls_name = d.get("_class_name", "AutoencoderKLFlux2")
        if cls_name != "AutoencoderKLFlux2":
            raise ValueError(f"config is for {cls_name!r}, expected 'AutoencoderKLFlux2'.")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "VAEConfig":
        """Read a diffusers `vae/config.json` (or the folder holding it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        return cls.from_dict(json.loads(p.read_text()))
