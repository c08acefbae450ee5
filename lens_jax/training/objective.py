"""The rectified-flow objective Lens is sampled with, and the timestep (sigma) samplers.

    x_t = (1 - sigma) * x0 + sigma * noise;  target = noise - x0
    pred = DiT(x_t, text features, mask, timestep=sigma);  loss = mean((pred - target)^2)

`flow_matching_loss` is pure and differentiable in the DiT params and in a LoRA adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from ..models import transformer as dit
from ..sampling.scheduler import compute_empirical_mu

__all__ = ["flow_matching_loss", "flow_matching_terms", "TimestepSampler", "sample_sigmas", "SIGMA_SAMPLERS"]

Params = dict[str, Any]

SIGMA_SAMPLERS = ("uniform", "logit_normal")


def _img_shape(img_shapes, n_tokens: int) -> tuple[int, int]:
    if len(img_shapes) != 1 or len(img_shapes[0]) != 3 or int(img_shapes[0][0]) != 1:
        raise ValueError(f"img_shapes must be a list with one (1, h, w) tuple; got {img_shapes!r}.")
    _, h, w = (int(v) for v in img_shapes[0])
    if h * w != n_tokens:
        raise ValueError(f"img_shapes (1, {h}, {w}) gives {h * w} tokens but x0 has {n_tokens}.")
    return h, w


def flow_matching_terms(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_t, target) for packed latents x0/noise [B, N, C] and per-sample sigma [B], in float32."""
    x0 = x0.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    s = sigma.astype(jnp.float32)[:, None, None]
    return (1 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(
    params: Params,
    config: dit.TransformerConfig,
    x0: jax.Array,
    noise: jax.Array,
    sigma: jax.Array,
    encoder_hidden_states: Sequence[jax.Array],
    encoder_hidden_states_mask: jax.Array,
    img_shapes: Sequence[tuple[int, int, int]],
    lora: Any = None,
    lora_multiplier: float = 1.0,
    *,
    compute_dtype: DTypeLike | None = None,
    attention_impl: str | None = None,
    sharding: Any = None,
    remat: str | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Flow-matching loss and prediction: (mean((pred - (noise - x0))^2), pred).

    x0, noise: packed normalised latents [B, h*w, in_channels]; sigma: [B] in [0, 1];
    encoder_hidden_states: one [B, S, enc_hidden_dim] array per selected text layer;
    encoder_hidden_states_mask: [B, S] (True = valid token); img_shapes: [(1, h, w)].
    `lora`: an adapter pytree (lens_jax.models.lora) applied unmerged at `lora_multiplier` inside
    the DiT's scan (differentiable in both). Keyword-only extras are for training: compute dtype, attention
    implementation, activation sharding rules, the remat policy, and optional per-sample loss
    weights [B] (a weighted mean over samples; a zero weight drops a padding sample).
    """
    h, w = _img_shape(img_shapes, x0.shape[1])
    x_t, target = flow_matching_terms(x0, noise, sigma)
    feats = [jnp.asarray(f) for f in encoder_hidden_states]
    pred = dit.apply(params, config, x_t, feats, jnp.asarray(encoder_hidden_states_mask).astype(bool),
                     jnp.asarray(sigma, jnp.float32), (h, w), compute_dtype=compute_dtype,
                     attention_impl=attention_impl, sharding=sharding, lora=lora, lora_multiplier=lora_multiplier,
                     remat=remat)
    err = jnp.square(pred.astype(jnp.float32) - target)
    if weights is None:
        return jnp.mean(err), pred
    per_sample = jnp.mean(err, axis=(1, 2))
    weights = weights.astype(jnp.float32)
    return jnp.sum(per_sample * weights) / jnp.maximum(jnp.sum(weights), 1e-12), pred


# ----------------------------------------------------------------------------- timestep samplers


@dataclass(frozen=True)
class TimestepSampler:
    """How training draws sigma in (0, 1).

    kind: "uniform" or "logit_normal" (sigmoid(mean + std * N(0, 1))). shift: apply the
    sampler's resolution-dependent exponential shift, sigma' = e^mu / (e^mu + 1/sigma - 1),
    with mu = compute_empirical_mu(image tokens, shift_steps) as the inference schedule uses,
    so training puts its mass where sampling spends its steps.
    """

    kind: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0
    shift: bool = False
    shift_steps: int = 50

    def __post_init__(self):
        if self.kind not in SIGMA_SAMPLERS:
            raise ValueError(f"unknown timestep sampler {self.kind!r}; choose one of {SIGMA_SAMPLERS}.")
        if self.std <= 0:
            raise ValueError(f"logit-normal std must be > 0; got {self.std}.")

    def mu(self, image_seq_len: int) -> float:
        """The exponential shift's mu for images of `image_seq_len` tokens (the inference schedule's)."""
        return compute_empirical_mu(image_seq_len, self.shift_steps)


def sample_sigmas(key: jax.Array, batch: int, sampler: TimestepSampler, image_seq_len: int) -> jax.Array:
    """Draw sigma [batch] (float32) with `sampler` for images of `image_seq_len` tokens."""
    if sampler.kind == "uniform":
        u = jax.random.uniform(key, (batch,), jnp.float32)
    else:
        u = jax.nn.sigmoid(sampler.mean + sampler.std * jax.random.normal(key, (batch,), jnp.float32))
    if sampler.shift:
        e = math.exp(sampler.mu(image_seq_len))
        u = e / (e + (1 / jnp.clip(u, 1e-6, 1.0) - 1))
    return jnp.clip(u, 0.0, 1.0)
