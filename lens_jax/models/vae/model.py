"""FLUX.2 VAE (`diffusers.AutoencoderKLFlux2`): parameters, encoder and decoder, NHWC.

The parameter pytree follows the diffusers state-dict names, e.g.
`params["decoder"]["up_blocks"]["0"]["resnets"]["1"]["conv1"]["kernel"]` (HWIO) for
`decoder.up_blocks.0.resnets.1.conv1.weight` (OIHW); attention projections are `[in, out]`
kernels; norms keep `weight`/`bias`; `params["bn"]` holds `running_mean`/`running_var`
(always float32). Levels are dict keys because their widths differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from .config import VAEConfig
from .layers import (
    ATTENTION_QUERY_CHUNK,
    attention_block,
    conv2d,
    downsample,
    group_norm,
    resnet_block,
    upsample,
)
from .tiling import Tiling, decode_tiled

__all__ = ["init_params", "encoder", "decoder", "encode_moments", "encode", "decode"]

Params = dict


# ----------------------------------------------------------------------------------------------
# random initialisation (shapes are what the converter checks checkpoints against)


class _Init:
    def __init__(self, key: jax.Array, dtype):
        self.key, self.dtype = key, dtype

    def _next(self) -> jax.Array:
        self.key, sub = jax.random.split(self.key)
        return sub

    def conv(self, cin: int, cout: int, k: int) -> Params:
        std = (cin * k * k) ** -0.5
        return {"kernel": (std * jax.random.normal(self._next(), (k, k, cin, cout))).astype(self.dtype),
                "bias": jnp.zeros((cout,), self.dtype)}

    def linear(self, cin: int, cout: int) -> Params:
        std = cin**-0.5
        return {"kernel": (std * jax.random.normal(self._next(), (cin, cout))).astype(self.dtype),
                "bias": jnp.zeros((cout,), self.dtype)}

    def norm(self, c: int) -> Params:
        return {"weight": jnp.ones((c,), self.dtype), "bias": jnp.zeros((c,), self.dtype)}

    def resnet(self, cin: int, cout: int) -> Params:
        p = {"norm1": self.norm(cin), "conv1": self.conv(cin, cout, 3),
             "norm2": self.norm(cout), "conv2": self.conv(cout, cout, 3)}
        if cin != cout:
            p["conv_shortcut"] = self.conv(cin, cout, 1)
        return p

    def attention(self, c: int) -> Params:
        return {"group_norm": self.norm(c), "to_q": self.linear(c, c), "to_k": self.linear(c, c),
                "to_v": self.linear(c, c), "to_out": {"0": self.linear(c, c)}}

    def mid_block(self, c: int, attention: bool) -> Params:
        p = {"resnets": {"0": self.resnet(c, c), "1": self.resnet(c, c)}}
        if attention:
            p["attentions"] = {"0": self.attention(c)}
        return p


def init_params(config: VAEConfig, key: jax.Array, dtype: DTypeLike = jnp.float32) -> Params:
    """Random parameters with the checkpoint's structure and shapes (BN buffers: mean 0, var 1)."""
    init = _Init(key, dtype)
    chans = config.block_out_channels
    enc: Params = {"conv_in": init.conv(config.in_channels, chans[0], 3), "down_blocks": {}}
    cout = chans[0]
    for i, width in enumerate(chans):
        cin, cout = cout, width
        block = {"resnets": {str(j): init.resnet(cin if j == 0 else cout, cout)
                             for j in range(config.layers_per_block)}}
        if i < len(chans) - 1:
            block["downsamplers"] = {"0": {"conv": init.conv(cout, cout, 3)}}
        enc["down_blocks"][str(i)] = block
    enc["mid_block"] = init.mid_block(chans[-1], config.mid_block_add_attention)
    enc["conv_norm_out"] = init.norm(chans[-1])
    enc["conv_out"] = init.conv(chans[-1], 2 * config.latent_channels, 3)

    rev = tuple(reversed(config.decoder_channels))
    dec: Params = {"conv_in": init.conv(config.latent_channels, rev[0], 3),
                   "mid_block": init.mid_block(rev[0], config.mid_block_add_attention), "up_blocks": {}}
    cout = rev[0]
    for i, width in enumerate(rev):
        cin, cout = cout, width
        block = {"resnets": {str(j): init.resnet(cin if j == 0 else cout, cout)
                             for j in range(config.layers_per_block + 1)}}
        if i < len(rev) - 1:
            block["upsamplers"] = {"0": {"conv": init.conv(cout, cout, 3)}}
        dec["up_blocks"][str(i)] = block
    dec["conv_norm_out"] = init.norm(rev[-1])
    dec["conv_out"] = init.conv(rev[-1], config.out_channels, 3)

    params: Params = {"encoder": enc, "decoder": dec}
    if config.use_quant_conv:
        params["quant_conv"] = init.conv(2 * config.latent_channels, 2 * config.latent_channels, 1)
    if config.use_post_quant_conv:
        params["post_quant_conv"] = init.conv(config.latent_channels, config.latent_channels, 1)
    params["bn"] = {"running_mean": jnp.zeros((config.token_channels,), jnp.float32),
                    "running_var": jnp.ones((config.token_channels,), jnp.float32)}
    return params


# ----------------------------------------------------------------------------------------------
# forward passes


def _compute_dtype(params: Params) -> jnp.dtype:
    return params["decoder"]["conv_in"]["kernel"].dtype


def _mid_block(h: jax.Array, p: Params, config: VAEConfig, chunk: int) -> jax.Array:
    g, eps, s = config.norm_num_groups, config.norm_eps, config.output_scale_factor
    h = resnet_block(h, p["resnets"]["0"], g, eps, s)
    if "attentions" in p:
        h = attention_block(h, p["attentions"]["0"], g, eps, s, chunk)
    return resnet_block(h, p["resnets"]["1"], g, eps, s)


def encoder(params: Params, config: VAEConfig, x: jax.Array, *, attention_chunk: int = ATTENTION_QUERY_CHUNK
            ) -> jax.Array:
    """diffusers Encoder: image [B, H, W, in] -> moments [B, ~H/8, ~W/8, 2*latent] (before quant_conv)."""
    p = params["encoder"]
    g, eps, s = config.norm_num_groups, config.norm_eps, config.output_scale_factor
    h = conv2d(x, p["conv_in"])
    for i in range(len(config.block_out_channels)):
        block = p["down_blocks"][str(i)]
        for j in range(config.layers_per_block):
            h = resnet_block(h, block["resnets"][str(j)], g, eps, s)
        if "downsamplers" in block:
            h = downsample(h, block["downsamplers"]["0"])
    h = _mid_block(h, p["mid_block"], config, attention_chunk)
    h = jax.nn.silu(group_norm(h, p["conv_norm_out"], g, eps))
    return conv2d(h, p["conv_out"])


def decoder(params: Params, config: VAEConfig, z: jax.Array, *, attention_chunk: int = ATTENTION_QUERY_CHUNK
            ) -> jax.Array:
    """diffusers Decoder: latent [B, h, w, latent] (after post_quant_conv) -> image [B, 8h, 8w, out]."""
    p = params["decoder"]
    g, eps, s = config.norm_num_groups, config.norm_eps, config.output_scale_factor
    h = conv2d(z, p["conv_in"])
    h = _mid_block(h, p["mid_block"], config, attention_chunk)
    for i in range(len(config.decoder_channels)):
        block = p["up_blocks"][str(i)]
        for j in range(config.layers_per_block + 1):
            h = resnet_block(h, block["resnets"][str(j)], g, eps, s)
        if "upsamplers" in block:
            h = upsample(h, block["upsamplers"]["0"])
    h = jax.nn.silu(group_norm(h, p["conv_norm_out"], g, eps))
    return conv2d(h, p["conv_out"])


def encode_moments(params: Params, config: VAEConfig, x: jax.Array, **kw) -> tuple[jax.Array, jax.Array]:
    """Image [B, H, W, in] -> (mean, logvar) of the latent posterior, each [B, h, w, latent].

    logvar is clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution.
    """
    h = encoder(params, config, x.astype(_compute_dtype(params)), **kw)
    if config.use_quant_conv:
        h = conv2d(h, params["quant_conv"])
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def encode(params: Params, config: VAEConfig, x: jax.Array, **kw) -> jax.Array:
    """Image [B, H, W, in] in [-1, 1] -> latent mode (= posterior mean) [B, h, w, latent]."""
    return encode_moments(params, config, x, **kw)[0]


def decode(params: Params, config: VAEConfig, z: jax.Array, *, tiling: Tiling | None = None,
           attention_chunk: int = ATTENTION_QUERY_CHUNK) -> jax.Array:
    """diffusers `vae.decode(z).sample`: latent [B, h, w, latent] -> image [B, 8h, 8w, out], unclamped.

    With `tiling`, decodes overlapping tiles one at a time and blends them (lower peak memory,
    slightly different output); without it the result is diffusers' one-pass decode.
    """
    z = z.astype(_compute_dtype(params))

    def one_pass(t: jax.Array) -> jax.Array:
        if config.use_post_quant_conv:
            t = conv2d(t, params["post_quant_conv"])
        return decoder(params, config, t, attention_chunk=attention_chunk)

    if tiling is None:
        return one_pass(z)
    return decode_tiled(one_pass, z, tiling, config.spatial_factor)


def param_axes(config: VAEConfig) -> dict:
    """Logical axes of every parameter: none (the VAE is small; it is replicated on every device)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return jax.tree.map(lambda leaf: (None,) * leaf.ndim, abstract)
