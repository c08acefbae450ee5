"""The component registry: one entry per network, in place of string switches.

Each entry names, for one component of a Lens checkpoint, its config class, how its (abstract)
parameters are built, their logical axes, the stacked per-layer subtree, and whether it is
replicated rather than sharded. Conversion, the orbax reader and the pipeline all look here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..models import text_encoder as te
from ..models import transformer as dit
from ..models.vae import config as vae_config
from ..models.vae import model as vae_model


@dataclass(frozen=True)
class Component:
    """What the weights layer needs to know about one network."""

    name: str
    config_from_json: Callable[[Path], Any]
    init_params: Callable[..., Any]  # (config, key, dtype, **options) -> params
    param_axes: Callable[..., Any]  # (config, **options) -> logical axes tree
    stacked_key: str | None  # the subtree stacked on a leading layer axis (scanned), if any
    verify_forward: Callable[..., list]  # (config, params, dtype) -> outputs of a small fixed forward pass

    def abstract_params(self, config, dtype, **options) -> Any:
        """ShapeDtypeStructs of the parameters, as `init_params` builds them."""
        return jax.eval_shape(lambda: self.init_params(config, jax.random.key(0), dtype, **options))


def _te_init(config, key, dtype, packed: bool = False, num_layers: int | None = None, lm_head: bool = False):
    cfg = config if num_layers is None else config.truncated(num_layers)
    return te.init_params(cfg, key, dtype, packed=packed, lm_head=lm_head)


def _te_axes(config, packed: bool = False, num_layers: int | None = None, lm_head: bool = False):
    cfg = config if num_layers is None else config.truncated(num_layers)
    return te.param_axes(cfg, packed=packed, lm_head=lm_head)


def _dit_forward(config, params, dtype) -> list:
    rng = np.random.default_rng(0)
    h = w = 2
    x = jnp.asarray(rng.standard_normal((1, h * w, config.in_channels)), jnp.float32)
    feats = [jnp.asarray(rng.standard_normal((1, 5, config.enc_hidden_dim)), jnp.float32)
             for _ in range(config.num_text_layers)]
    mask = jnp.asarray([[True, True, True, True, False]])
    return [dit.apply(params, config, x, feats, mask, jnp.asarray([0.5], jnp.float32), (h, w))]


def _vae_forward(config, params, dtype) -> list:
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, config.latent_channels)), jnp.float32)
    return [jax.jit(vae_model.decode, static_argnums=1)(params, config, z.astype(dtype))]


def _te_forward(config, params, dtype) -> list:
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 6))
    encoder = te.TextEncoder(config, params, tuple(range(config.num_hidden_layers)))
    return list(encoder(ids, np.ones_like(ids)))


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("transformer", dit.TransformerConfig.from_json, dit.init_params,
                  lambda config, **_: dit.param_axes(config), "transformer_blocks", _dit_forward),
        Component("text_encoder", te.TextEncoderConfig.from_json, _te_init, _te_axes, "layers", _te_forward),
        Component("vae", vae_config.VAEConfig.from_json, vae_model.init_params,
                  lambda config, **_: vae_model.param_axes(config), None, _vae_forward),
    )
}


def component(name: str) -> Component:
    try:
        return COMPONENTS[name]
    except KeyError:
        raise ValueError(f"unknown component {name!r}; expected one of {tuple(COMPONENTS)}.") from None
