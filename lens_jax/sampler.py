"""The jitted Lens sampler: the whole denoising loop and the VAE decode in one XLA program.

`build_sampler` returns a `jax.jit`-compiled pure function with explicit in/out shardings;
the loop is a `lax.scan` over steps (optionally keeping every step's latents), classifier-free
guidance runs as one batched DiT forward with Lens' norm rescaling, and a guidance of exactly
1.0 (Lens-Turbo) drops the unconditional half altogether. The only host round-trip per step is
the optional progress callback (`jax.debug.callback`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from . import sharding as sh
from . import transformer as dit
from . import vae as vae_lib
from .scheduler import euler_step

# Progress callbacks reach the host through one fixed trampoline, so changing the callback
# between calls does not recompile the sampler.
_progress_callback: list[Callable | None] = [None]


def _report_progress(step, timestep, latents):
    cb = _progress_callback[0]
    if cb is not None:
        cb(int(step), float(timestep), latents)


@dataclass(frozen=True)
class SamplerSpec:
    """Everything static about one compiled sampler."""

    dit_config: dit.TransformerConfig
    vae_config: Any
    img_shape: tuple[int, int]
    num_steps: int
    use_cfg: bool
    decode: bool
    keep_trajectory: bool
    report_progress: bool
    compute_dtype: Any
    attention_impl: str | None


def guided_velocity(cond: jax.Array, uncond: jax.Array, guidance: jax.Array) -> jax.Array:
    """uncond + g (cond - uncond), rescaled per token to the norm of cond (norms over channels)."""
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    comb = uncond + guidance * (cond - uncond)
    cond_norm = jnp.linalg.norm(cond, axis=-1, keepdims=True)
    comb_norm = jnp.linalg.norm(comb, axis=-1, keepdims=True)
    return jnp.where(comb_norm > 0, comb * (cond_norm / jnp.maximum(comb_norm, 1e-12)), comb)


def sample(spec: SamplerSpec, dit_params, vae_params, latents, features, mask, sigmas, timesteps, guidance):
    """Denoise packed latents [B, h*w, C] from sigma 1 to 0, then (optionally) decode.

    With CFG, `features`/`mask` hold [cond; uncond] rows (2B); otherwise B rows. Returns
    (final latents [B, h*w, C] f32, image [B, H, W, 3] in [0, 1] or None, trajectory [N, B, h*w, C] or None).
    """
    b = latents.shape[0]

    def velocity(x, t):
        x_in = jnp.concatenate([x, x]) if spec.use_cfg else x
        v = dit.apply(
            dit_params, spec.dit_config, x_in, features, mask, jnp.full((x_in.shape[0],), t, jnp.float32),
            spec.img_shape, spec.compute_dtype, spec.attention_impl,
        )
        if spec.use_cfg:
            return guided_velocity(v[:b], v[b:], guidance)
        return v.astype(jnp.float32)

    def step(x, i):
        t = timesteps[i]
        x = euler_step(x, velocity(x, t / 1000.0), sigmas[i], sigmas[i + 1])
        if spec.report_progress:
            jax.debug.callback(_report_progress, i, t, x, ordered=True)
        return x, (x if spec.keep_trajectory else None)

    x, trajectory = jax.lax.scan(step, latents.astype(jnp.float32), jnp.arange(spec.num_steps))
    image = None
    if spec.decode:
        h, w = spec.img_shape
        raw = vae_lib.decode_tokens(vae_params, spec.vae_config, x, h, w)
        image = (jnp.clip(raw.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    return x, image, trajectory


@lru_cache(maxsize=32)
def build_sampler(spec: SamplerSpec, mesh: Mesh, dit_shardings, vae_shardings, batch: int, text_rows: int):
    """jit `sample` for one spec, with declared in/out shardings on `mesh`.

    `dit_shardings`/`vae_shardings` are `ShardingTree`s (pytrees of `NamedSharding`, hashed by
    identity so this cache can key on them); the latents are donated on accelerators.
    """
    lat = sh.batch_sharding(mesh, batch, 3)
    txt = sh.batch_sharding(mesh, text_rows, 3)
    txt_mask = sh.batch_sharding(mesh, text_rows, 2)
    rep = sh.replicated(mesh)
    image = sh.batch_sharding(mesh, batch, 4) if spec.decode else None
    traj = sh.replicated(mesh) if spec.keep_trajectory else None
    in_shardings = (dit_shardings.tree, vae_shardings.tree, lat, [txt] * spec.dit_config.num_text_layers,
                    txt_mask, rep, rep, rep)
    fn = jax.jit(
        lambda *args: sample(spec, *args),
        in_shardings=in_shardings,
        out_shardings=(lat, image, traj),
        donate_argnums=(2,) if jax.default_backend() != "cpu" else (),
    )
    return fn


class ShardingTree:
    """A pytree of shardings made hashable by identity, for `build_sampler`'s cache."""

    def __init__(self, tree):
        self.tree = tree

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


def set_progress_callback(cb: Callable | None) -> None:
    _progress_callback[0] = cb
