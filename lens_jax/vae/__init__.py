"""FLUX.2 VAE (diffusers `AutoencoderKLFlux2`) and Lens' latent packing, public entry point.

    vae = lens_jax.vae.load("Lens/vae")
    image = vae.decode_tokens(tokens, latent_h, latent_w)      # [B, 3, 16h, 16w] in [-1, 1]

The network lives in `lens_jax.models.vae`, its checkpoint mappings in `lens_jax.weights.vae`.
"""

from ..models.vae import *  # noqa: F401,F403
from ..models.vae import __all__ as _model_names
from ..weights.vae import load  # noqa: F401

__all__ = [*_model_names, "load"]
