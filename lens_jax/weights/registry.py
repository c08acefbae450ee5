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

    def abstract_params(self, config, dtype, **options) -> Any:
        """ShapeDtypeStructs of the parameters, as `init_params` builds them."""
        return jax.eval_shape(lambda: self.init_params(config, jax.random.key(0), dtype, **options))


def _te_init(config, key, dtype, packed: bool = False, num_layers: int | None = None):
    cfg = config if num_layers is None else config.truncated(num_layers)
    return te.init_params(cfg, key, dtype, packed=packed)


def _te_axes(config, packed: bool = False, num_layers: int | None = None):
    cfg = config if num_layers is None else config.truncated(num_layers)
    return te.param_axes(cfg, packed=packed)


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("transformer", dit.TransformerConfig.from_json, dit.init_params,
                  lambda config, **_: dit.param_axes(config), "transformer_blocks"),
        Component("text_encoder", te.TextEncoderConfig.from_json, _te_init, _te_axes, "layers"),
        Component("vae", vae_config.VAEConfig.from_json, vae_model.init_params,
                  lambda config, **_: vae_model.param_axes(config), None),
    )
}


def component(name: str) -> Component:
    try:
        return COMPONENTS[name]
    except KeyError:
        raise ValueError(f"unknown component {name!r}; expected one of {tuple(COMPONENTS)}.") from None
