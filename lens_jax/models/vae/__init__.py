"""FLUX.2 VAE (diffusers `AutoencoderKLFlux2`) in pure-functional JAX, and Lens' latent packing.

Entry point: `vae = lens_jax.vae.load(path, dtype)`, with NCHW methods `decode`, `encode`,
`decode_tokens`, `encode_to_tokens`. Pure NHWC functions for use inside a jit:
`decode(params, config, z)`, `encode(params, config, x)`, `decode_tokens(params, config, tokens, h, w)`,
`encode_to_tokens(params, config, image)` and the packing helpers.
"""

from .api import VAE, decode_tokens, encode_to_tokens, latent_to_tokens, tokens_to_latent
from .config import VAEConfig
from .model import decode, decoder, encode, encode_moments, encoder, init_params, param_axes
from .packing import denormalize, normalize, pack, patchify, unpack, unpatchify
from .tiling import Tiling

__all__ = [
    "VAE", "VAEConfig", "Tiling", "init_params", "param_axes",
    "encode", "encode_moments", "decode", "encoder", "decoder",
    "decode_tokens", "encode_to_tokens", "tokens_to_latent", "latent_to_tokens",
    "patchify", "unpatchify", "pack", "unpack", "normalize", "denormalize",
]
