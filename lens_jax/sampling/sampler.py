"""The jitted Lens sampler: the denoising loop (and the VAE decode) as compiled XLA programs.

Without a progress callback the whole loop and the decode are ONE program (two, loop then decode,
when DiT parameters come from host memory: `SamplerSpec.decode_apart`): a `lax.scan` over
steps (optionally keeping every step's latents), classifier-free guidance as one batched DiT
forward with Lens' norm rescaling, and a guidance of exactly 1.0 (Lens-Turbo) dropping the
unconditional half. With a callback, the host drives a one-step program and then the decode
program, calling back between them: no host callback lives inside any compiled program (so
the persistent compilation cache keeps them all), and nothing is shared between calls, so two
pipelines or two threads sample independently. A callback may raise to cancel a run; the
exception propagates at the next step boundary.

The blocks' modulation (a function of the timestep alone) is computed once per generation
(`lens_jax.sampling.modulation`): before the step scan in the whole program, by a `table`
program whose result every step program takes in the host-driven loop.

Steps before `start` are skipped (`lax.cond`): image-to-image starts later in the same
schedule without a new program. Inpainting (`SamplerSpec.inpaint`) takes `known` = (known
latents x0, their noise, latent mask [B, h*w, 1] with 1 = repaint) as arguments: after every
step the kept region is reset to x0 noised to that step's sigma, (1 - s) x0 + s noise.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from .. import parallel
from ..models import transformer as dit
from ..models import vae as vae_lib
from . import modulation as modulation_lib
from .compiler_options import compiler_options
from .guidance import guided_velocity
from .scheduler import euler_step


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
    compute_dtype: Any
    attention_impl: str | None
    sharding: parallel.BoundRules | None = None  # activation constraints (a mesh with tensor/fsdp axes)
    stream: Any = None  # DiT blocks streamed from host memory (lens_jax.parallel.HostStream) or None
    vae_tiling: Any = None  # a lens_jax.models.vae.Tiling for a tiled decode, or None
    inpaint: bool = False  # the programs take `known` = (x0, noise, latent mask) and keep x0 outside the mask
    # The blocks' modulation computed once per generation (lens_jax.sampling.modulation); the step
    # program then takes the table after `i`. `modulation_stream` reads img_mod/txt_mod from host memory.
    modulation_table: bool = True
    modulation_stream: Any = None

    @property
    def decode_apart(self) -> bool:
        """Whether the whole-loop program leaves the VAE decode to the `decode` program (run after it):
        when DiT parameters come from host memory. Inside such a program XLA:TPU lays the decode's
        activations out less tightly (about twice its temporaries: docs/offload.md, "What it costs")."""
        return self.decode and (self.stream is not None or self.modulation_stream is not None)


def velocity(spec: SamplerSpec, dit_params, x, features, mask, t, guidance, modulation=None):
    """The (guided) DiT velocity at timestep t (in [0, 1000]) for latents x [B, h*w, C], f32.
    `modulation`: this step's rows of the modulation table, or None to compute them in the DiT."""
    b = x.shape[0]
    x_in = jnp.concatenate([x, x]) if spec.use_cfg else x
    v = dit.apply(
        dit_params, spec.dit_config, x_in, features, mask, jnp.full((x_in.shape[0],), t / 1000.0, jnp.float32),
        spec.img_shape, spec.compute_dtype, spec.attention_impl, spec.sharding, spec.stream, modulation=modulation,
    )
    if spec.use_cfg:
        return guided_velocity(v[:b], v[b:], guidance)
    return v.astype(jnp.float32)


def denoise_step(spec: SamplerSpec, dit_params, x, features, mask, sigmas, timesteps, guidance, i, table=None):
    """One Euler step i of the schedule (`table`: the generation's modulation table, or None)."""
    rows = None if table is None else dit.modulation_rows(table, i)
    return euler_step(x, velocity(spec, dit_params, x, features, mask, timesteps[i], guidance, rows), sigmas[i],
                      sigmas[i + 1])


def reset_known(x, known, sigma):
    """Inpainting: keep x where the latent mask is 1, elsewhere x0 noised to `sigma` (flow matching)."""
    x0, noise, latent_mask = known
    noised = (1.0 - sigma) * x0 + sigma * noise
    return latent_mask * x + (1.0 - latent_mask) * noised


def modulation_table(spec: SamplerSpec, dit_params, timesteps):
    """The modulation table of the whole schedule, or None when the spec computes it in every step."""
    if not spec.modulation_table:
        return None
    return modulation_lib.table(dit_params, spec.dit_config, timesteps, spec.compute_dtype,
                                spec.modulation_stream or spec.stream)


def _step(spec: SamplerSpec, dit_params, x, features, mask, sigmas, timesteps, guidance, i, known, table=None):
    x = denoise_step(spec, dit_params, x, features, mask, sigmas, timesteps, guidance, i, table)
    return reset_known(x, known, sigmas[i + 1]) if spec.inpaint else x


def decode(spec: SamplerSpec, vae_params, x):
    """Packed latents -> image [B, H, W, 3] in [0, 1]."""
    h, w = spec.img_shape
    raw = vae_lib.decode_tokens(vae_params, spec.vae_config, x, h, w, tiling=spec.vae_tiling)
    return (jnp.clip(raw.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0


def sample(spec: SamplerSpec, dit_params, vae_params, latents, features, mask, sigmas, timesteps, guidance, start,
           known=None):
    """Denoise packed latents [B, h*w, C] from step `start` to the end, then (optionally) decode.

    With CFG, `features`/`mask` hold [cond; uncond] rows (2B); otherwise B rows. `known`
    (inpainting specs only): (x0, noise, latent mask), see `reset_known`. Returns
    (final latents [B, h*w, C] f32, image [B, H, W, 3] in [0, 1] or None, trajectory [N, B, h*w, C] or None).
    """
    table = modulation_table(spec, dit_params, timesteps)  # once per generation

    def step(x, i):
        x = jax.lax.cond(
            i >= start,
            lambda x: _step(spec, dit_params, x, features, mask, sigmas, timesteps, guidance, i, known, table),
            lambda x: x,
            x,
        )
        return x, (x if spec.keep_trajectory else None)

    x, trajectory = jax.lax.scan(step, latents.astype(jnp.float32), jnp.arange(spec.num_steps))
    image = decode(spec, vae_params, x) if spec.decode else None
    return x, image, trajectory


@dataclass(frozen=True)
class Programs:
    """The compiled programs of one spec: `whole` (loop + decode; the loop alone when `spec.decode_apart`,
    then `decode` follows it), `step` and `decode` (host-driven loop),
    and `table` (the host-driven loop's modulation table, None when the spec has none)."""

    whole: Callable
    step: Callable
    decode: Callable | None
    table: Callable | None = None


def build_programs(spec: SamplerSpec, mesh: Mesh, dit_shardings, vae_shardings, batch: int, text_rows: int) -> Programs:
    """jit the sampler for one spec with declared in/out shardings on `mesh`.

    `dit_shardings`/`vae_shardings` are `ShardingTree`s (pytrees of `NamedSharding`); the latents
    are donated on accelerators. The programs compile with the mesh's platform's XLA options
    (`lens_jax.sampling.compiler_options`: cuBLAS GEMMs on GPU; `LENS_JAX_XLA_OPTIONS=off` opts out).
    The caller keeps the result (a pipeline caches its own programs).
    """
    lat = parallel.batch_sharding(mesh, batch, 3)
    txt = parallel.batch_sharding(mesh, text_rows, 3)
    txt_mask = parallel.batch_sharding(mesh, text_rows, 2)
    rep = parallel.replicated(mesh)
    image = parallel.batch_sharding(mesh, batch, 4) if spec.decode else None
    traj = rep if spec.keep_trajectory else None
    feats = [txt] * spec.dit_config.num_text_layers
    donate = (2,) if jax.default_backend() != "cpu" else ()
    jit = functools.partial(jax.jit, compiler_options=compiler_options(mesh.devices.flat[0].platform))
    known = ((lat, lat, lat),) if spec.inpaint else ()
    loop_spec = dataclasses.replace(spec, decode=False) if spec.decode_apart else spec
    whole = jit(
        lambda *args: sample(loop_spec, *args),
        in_shardings=(dit_shardings.tree, vae_shardings.tree, lat, feats, txt_mask, rep, rep, rep, rep) + known,
        out_shardings=(lat, None if spec.decode_apart else image, traj),
        donate_argnums=donate,
    )
    mod = (rep,) if spec.modulation_table else ()  # the step program's table argument, after `i`

    def one_step(p, x, f, m, s, t, g, i, *rest):
        table, k = (rest[0], rest[1:]) if mod else (None, rest)
        return _step(spec, p, x, f, m, s, t, g, i, k[0] if k else None, table)

    step = jit(
        one_step,
        in_shardings=(dit_shardings.tree, lat, feats, txt_mask, rep, rep, rep, rep) + mod + known,
        out_shardings=lat,
        donate_argnums=(1,) if donate else (),
    )
    dec = None
    if spec.decode:
        dec = jit(lambda p, x: decode(spec, p, x), in_shardings=(vae_shardings.tree, lat), out_shardings=image)
    table = None
    if spec.modulation_table:
        table = jit(lambda p, t: modulation_table(spec, p, t), in_shardings=(dit_shardings.tree, rep),
                        out_shardings=rep)
    return Programs(whole, step, dec, table)


def run(programs: Programs, spec: SamplerSpec, dit_params, vae_params, latents, features, mask, sigmas, timesteps,
        guidance, start, callback: Callable[[int, float, Any], None] | None = None, known=None):
    """Run a sampler: one program without `callback`; else a host loop over steps calling
    `callback(step, timestep, latents)` after each (latents stay on the devices). `known`:
    (x0, noise, latent mask) for an inpainting spec, else None."""
    extra = (known,) if spec.inpaint else ()
    if callback is None:
        x, image, trajectory = programs.whole(dit_params, vae_params, latents, features, mask, sigmas, timesteps,
                                              guidance, start, *extra)
        if spec.decode_apart:
            image = programs.decode(vae_params, x)
        return x, image, trajectory
    import numpy as np

    x = latents
    trajectory = []
    host_timesteps = np.asarray(timesteps)
    table = (programs.table(dit_params, timesteps),) if spec.modulation_table else ()  # once, for every step
    for i in range(int(start), spec.num_steps):
        x = programs.step(dit_params, x, features, mask, sigmas, timesteps, guidance, jnp.int32(i), *table, *extra)
        if spec.keep_trajectory:
            trajectory.append(x)
        callback(i, float(host_timesteps[i]), x)
    if spec.keep_trajectory:
        trajectory = [latents.astype(jnp.float32)] * int(start) + trajectory
    image = programs.decode(vae_params, x) if spec.decode else None
    return x, image, (jnp.stack(trajectory) if spec.keep_trajectory else None)


class ShardingTree:
    """A pytree of shardings made hashable by identity (jit caches key on static arguments)."""

    def __init__(self, tree):
        self.tree = tree

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other
