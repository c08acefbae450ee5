"""`LensPipeline`: prompt -> image with the text encoder, the DiT and the VAE.

    pipe = LensPipeline.from_pretrained("path/to/Lens", variant="lens")
    image = pipe("a red cube on a wooden table", seed=0).images[0]

Upstream semantics (microsoft/Lens `LensPipeline.__call__`), with these JAX specifics:
- the denoising loop and the VAE decode run as one jitted program (`lens_jax.sampler`);
- text is padded to buckets of 64 tokens (masked) so new prompts reuse the compiled sampler;
- `seed` draws the initial noise with `jax.random` (not bit-compatible with torch); pass
  `latents` (packed [B*n, h*w, 128]) to reproduce a PyTorch run exactly;
- the chat template's date is frozen (`template_date`, default 2026-05-23);
- the text encoder leaves the accelerator after encoding unless `keep_text_encoder=True`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import configs, parallel
from ..models import transformer as dit
from ..models import vae as vae_lib
from ..models.dtypes import resolve_dtype
from ..parallel import offload as offload_lib
from ..sampling import sampler as sampler_lib
from ..sampling.resolution import PIXELS_PER_TOKEN, resolve_size
from ..sampling.scheduler import SchedulerConfig, schedule
from ..weights import hub, registry
from . import components as components_lib
from . import prompt as prompt_lib
from . import validation

__all__ = ["LensPipeline", "LensPipelineOutput", "UPSTREAM_DEFAULTS", "load_preset"]

TEXT_BUCKET = 64
UPSTREAM_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 4.0}
OUTPUT_TYPES = ("pil", "np", "latent")


def load_preset(variant: str) -> dict:
    """Sampling defaults of a published variant (lens_jax/configs/presets.json): lens, lens-base, lens-turbo."""
    presets = configs.load_json("presets.json")
    if variant not in presets:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(presets)}.")
    return presets[variant]


@dataclass
class LensPipelineOutput:
    """`images`: PIL images ('pil'), float32 [B, H, W, 3] in [0, 1] ('np') or packed tokens ('latent')."""

    images: Any
    latents: np.ndarray | None = None
    trajectory: np.ndarray | None = None  # [steps, B, h*w, C] when asked for
    text_features: list[np.ndarray] | None = None
    text_mask: np.ndarray | None = None
    seeds: list[int] | None = None  # image k's noise seed (seed + k); None when latents were given


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _as_list(x, name: str) -> list[str]:
    items = [x] if isinstance(x, str) else list(x)
    if not items:
        raise ValueError(f"{name} is an empty list; give at least one prompt.")
    if not all(isinstance(p, str) for p in items):
        raise TypeError(f"{name} must be a string or a list of strings.")
    return items


def _pad_text(features: Sequence[np.ndarray], mask: np.ndarray, length: int):
    extra = length - mask.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad text of length {mask.shape[1]} to {length}")
    feats = [np.pad(np.asarray(f), ((0, 0), (0, extra), (0, 0))) for f in features]
    return feats, np.pad(np.asarray(mask, bool), ((0, 0), (0, extra)))


def _cfg_batch(pos, pos_mask, neg, neg_mask):
    """[cond; uncond] rows, both right-padded (zeros, False) to a common text length."""
    length = max(pos_mask.shape[1], neg_mask.shape[1])
    pos, pos_mask = _pad_text(pos, pos_mask, length)
    neg, neg_mask = _pad_text(neg, neg_mask, length)
    return [np.concatenate([p, n]) for p, n in zip(pos, neg)], np.concatenate([pos_mask, neg_mask])


class LensPipeline:
    """Lens text-to-image. Build with `from_pretrained` (or `tiny_random` for an offline smoke test)."""

    def __init__(
        self,
        transformer: components_lib.Component,
        vae: components_lib.Component,
        tokenizer: Any,
        text_encoder_factory: Callable[[], Any],
        *,
        scheduler_config: SchedulerConfig | None = None,
        txt_offset: int = prompt_lib.REAL_TXT_OFFSET,
        mesh: jax.sharding.Mesh | None = None,
        rules: parallel.ShardingRules | None = None,
        dtype=None,
        keep_text_encoder: bool | None = None,
        template_date: str = prompt_lib.DEFAULT_DATE,
        defaults: dict | None = None,
        fsdp: bool = True,
        name: str = "",
        offload: str = "none",
        vae_tiling: bool | str = "auto",
    ):
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.offload = offload_lib.choose(offload, _nbytes(transformer.params), 0, 0) if offload == "auto" \
            else offload_lib.check_mode(offload)
        self.rules = rules or parallel.DEFAULT_RULES
        self.dtype = resolve_dtype(dtype)
        self.dit_config = transformer.config
        self.vae_config = vae.config
        dit_spec = registry.component("transformer")
        dit_shardings = (
            parallel.logical_shardings(transformer.params, dit_spec.param_axes(self.dit_config), self.mesh, self.rules)
            if fsdp else parallel.replicated_shardings(transformer.params, self.mesh)
        )
        if offload_lib.streams(self.offload, "transformer"):
            dit_shardings = offload_lib.on_host(dit_shardings, dit_spec.stacked_key)
        self._dit_shardings = sampler_lib.ShardingTree(dit_shardings)
        self._vae_shardings = sampler_lib.ShardingTree(parallel.replicated_shardings(vae.params, self.mesh))
        self.dit_params = parallel.put_tree(transformer.params, self._dit_shardings.tree)
        self.vae_params = parallel.put_tree(vae.params, self._vae_shardings.tree)
        # Activation constraints only where a mesh axis can split something.
        self._activation_sharding = self.rules.bind(self.mesh) if self.mesh.size > 1 else None
        self.tokenizer = tokenizer
        self._text_encoder_factory = text_encoder_factory
        self._text_encoder = None
        self.keep_text_encoder = jax.default_backend() == "cpu" if keep_text_encoder is None else keep_text_encoder
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.txt_offset = int(txt_offset)
        self.template_date = template_date
        self.defaults = dict(UPSTREAM_DEFAULTS, **(defaults or {}))
        self.fsdp = fsdp
        self.name = name
        self._programs: dict = {}
        if vae_tiling not in (True, False, "auto"):
            raise ValueError(f"vae_tiling={vae_tiling!r}: use True, False or 'auto' (tile where a full decode "
                             "would not fit the device's free memory).")
        self.vae_tiling = vae_tiling

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype=None,
        mesh: jax.sharding.Mesh | None = None,
        *,
        rules: parallel.ShardingRules | None = None,
        variant: str | None = None,
        keep_text_encoder: bool | None = None,
        keep_mxfp4: bool | None = None,
        template_date: str = prompt_lib.DEFAULT_DATE,
        fsdp: bool = True,
        revision: str | None = None,
        offload: str = "none",
    ) -> "LensPipeline":
        """Load the upstream diffusers layout (a local folder or a hub id) or a `convert` output.

        dtype: None = bf16 on GPU/TPU, f32 on CPU. variant: 'lens' | 'lens-base' | 'lens-turbo'
        sets the default steps/guidance (otherwise upstream's call defaults, 50 and 4.0).
        offload: 'none' | 'text_encoder' | 'all' | 'auto' (`lens_jax.parallel.offload`): stream the
        text encoder's layers, or the DiT's blocks too, from pinned host memory.
        """
        root = hub.resolve_checkpoint(path_or_repo_id, revision=revision)
        dtype = resolve_dtype(dtype)
        mesh = mesh if mesh is not None else parallel.make_mesh()
        if offload == "auto":
            offload = offload_lib.choose(offload, *components_lib.estimate_bytes(root, dtype, keep_mxfp4))
        offload_lib.check_mode(offload)
        parts = components_lib.load_components(root, dtype, keep_mxfp4=keep_mxfp4, mesh=mesh, fsdp=fsdp, rules=rules,
                                               offload=offload)
        defaults = load_preset(variant) if variant else None
        return cls.from_components(
            parts, mesh=mesh, rules=rules, dtype=dtype, keep_text_encoder=keep_text_encoder,
            template_date=template_date, defaults=defaults, fsdp=fsdp, name=str(path_or_repo_id), offload=offload,
        )

    @classmethod
    def from_components(cls, parts: components_lib.Components, **kwargs) -> "LensPipeline":
        """A pipeline from loaded `Components` (`lens_jax.pipelines.components`)."""
        return cls(parts.transformer, parts.vae, parts.tokenizer, parts.text_encoder_factory,
                   scheduler_config=parts.scheduler, txt_offset=parts.txt_offset, **kwargs)

    @classmethod
    def tiny_random(cls, seed: int = 0, dtype=jnp.float32, mesh=None, **kwargs) -> "LensPipeline":
        """A tiny randomly initialised Lens (offline; its pictures are noise) for smoke tests."""
        parts = components_lib.tiny_random_components(seed, resolve_dtype(dtype))
        return cls.from_components(parts, mesh=mesh, dtype=dtype, name="tiny-random", **kwargs)

    def _tiling(self, pixels: int, batch: int):
        """The VAE tiling for a decode of `batch` images: on when asked, or ('auto') when a one-pass decode
        would not fit the device's free memory."""
        if self.vae_tiling == "auto":
            tiled = not offload_lib.decode_fits(pixels, batch)
        else:
            tiled = bool(self.vae_tiling)
        return vae_lib.Tiling() if tiled else None

    # ------------------------------------------------------------------ text

    @property
    def text_encoder(self):
        """The text encoder, (re)loaded onto the devices on first use."""
        if self._text_encoder is None:
            te = self._text_encoder_factory()
            if self._activation_sharding is not None:
                te.sharding = self._activation_sharding
            if offload_lib.streams(self.offload, "text_encoder"):
                layers = te.params["layers"]
                on_host = jax.tree.map(lambda a: a.sharding.with_memory_kind(offload_lib.HOST), layers)
                te.params = {**te.params, "layers": parallel.put_tree(layers, on_host)}  # no-op when already there
                te.stream = parallel.HostStream()
            self._text_encoder = te
        return self._text_encoder

    def release_text_encoder(self) -> None:
        """Free the text encoder's device memory (it is reloaded when next needed)."""
        te, self._text_encoder = self._text_encoder, None
        if te is not None:
            for leaf in jax.tree.leaves(te.params):
                if isinstance(leaf, jax.Array):
                    leaf.delete()

    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = prompt_lib.MAX_SEQUENCE_LENGTH):
        """Prompts -> (features: one [B, T, enc_dim] numpy array per selected layer, mask [B, T] bool).

        Token ids are right-padded to a multiple of 64 so the encoder compiles once per bucket;
        the padding is masked and, the encoder being causal, changes no valid feature.
        """
        prompts = _as_list(prompts, "prompt")
        enc = prompt_lib.encode_prompts(self.text_encoder, self.tokenizer, prompts, self.txt_offset,
                                        max_sequence_length, self.template_date, bucket=TEXT_BUCKET)
        return [parallel.to_host(f).astype(np.float32) for f in enc.features], parallel.to_host(enc.mask).astype(bool)

    def _conditioning(self, prompts, negatives, use_cfg, max_sequence_length):
        pos, pos_mask = self.encode_prompt(prompts, max_sequence_length)
        if not use_cfg:
            return pos, pos_mask
        empty = [not n.strip() for n in negatives]
        if all(empty):
            neg = [np.zeros_like(f) for f in pos]
            neg_mask = np.zeros_like(pos_mask)
        else:
            neg, neg_mask = self.encode_prompt(negatives, max_sequence_length)
            rows = np.asarray(empty)
            neg = [np.where(rows[:, None, None], 0.0, f).astype(np.float32) for f in neg]
            neg_mask = np.where(rows[:, None], False, neg_mask)
        return _cfg_batch(pos, pos_mask, neg, neg_mask)

    # ------------------------------------------------------------------ generation

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        base_resolution: int | None = None,
        aspect_ratio: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents=None,
        prompt_embeds: Sequence[Any] | None = None,
        prompt_mask=None,
        negative_prompt_embeds: Sequence[Any] | None = None,
        negative_prompt_mask=None,
        output_type: str = "pil",
        max_sequence_length: int = prompt_lib.MAX_SEQUENCE_LENGTH,
        callback: Callable[[int, float, Any], None] | None = None,
        return_trajectory: bool = False,
        min_text_length: int | None = None,
    ) -> LensPipelineOutput:
        """Generate images. `callback(step, timestep, latents)` is called after every step.

        Every argument is checked first (`lens_jax.pipelines.validation`). Image k (prompt-major
        order) starts from the noise of `seed + k` alone. Bit-exact reproduction of image k needs
        the same shapes (XLA's summation order depends on them): the same number of images and
        text length (`min_text_length`), any prompts in the other rows; alone it matches to float
        rounding.
        """
        checked = validation.check_call(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, seed=seed, latents=latents,
            prompt_embeds=prompt_embeds)
        prompt, negative_prompt, seed, latents = (checked[k] for k in ("prompt", "negative_prompt", "seed", "latents"))
        num_inference_steps, guidance_scale = checked["num_inference_steps"], checked["guidance_scale"]
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}.")
        H, W = resolve_size(height, width, base_resolution, aspect_ratio)
        h, w = H // PIXELS_PER_TOKEN, W // PIXELS_PER_TOKEN
        steps = int(num_inference_steps or self.defaults["num_inference_steps"])
        guidance = float(self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale)
        use_cfg = guidance != 1.0
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1; got {num_images_per_prompt}.")

        feats, mask = self._text_inputs(prompt, negative_prompt, prompt_embeds, prompt_mask, negative_prompt_embeds,
                                        negative_prompt_mask, use_cfg, max_sequence_length)
        n_prompts = mask.shape[0] // (2 if use_cfg else 1)
        # Repeat each row in place: [c0, c0, c1, c1; u0, u0, u1, u1] keeps the [cond; uncond] halves.
        feats = [np.repeat(f, num_images_per_prompt, axis=0) for f in feats]
        mask = np.repeat(mask, num_images_per_prompt, axis=0)
        feats, mask = _pad_text(feats, mask, _round_up(max(mask.shape[1], int(min_text_length or 0)), TEXT_BUCKET))
        batch = n_prompts * num_images_per_prompt
        channels = self.dit_config.in_channels
        if latents is None:
            seed = random.randrange(2**31) if seed is None else seed
        seeds = None if latents is not None else [seed + k for k in range(batch)]
        latents = self._initial_latents(latents, seed, (batch, h * w, channels))

        sigmas, timesteps = schedule(steps, h * w, self.scheduler_config)
        spec = sampler_lib.SamplerSpec(
            self.dit_config, self.vae_config, (h, w), steps, use_cfg, output_type != "latent", return_trajectory,
            jnp.dtype(self.dtype), dit.default_attention_impl(self.dtype), self._activation_sharding,
            parallel.HostStream() if offload_lib.streams(self.offload, "transformer") else None,
            self._tiling(H * W, batch),
        )
        key = (spec, batch, mask.shape[0])
        programs = self._programs.get(key)
        if programs is None:  # one set of compiled programs per shape, owned by this pipeline
            programs = self._programs[key] = sampler_lib.build_programs(
                spec, self.mesh, self._dit_shardings, self._vae_shardings, batch, mask.shape[0])
        dtype, mesh = self.dtype, self.mesh
        rep = parallel.replicated(mesh)
        args = (
            parallel.put(latents, parallel.batch_sharding(mesh, batch, 3)),
            [parallel.put(f.astype(dtype), parallel.batch_sharding(mesh, mask.shape[0], 3)) for f in feats],
            parallel.put(mask, parallel.batch_sharding(mesh, mask.shape[0], 2)),
            parallel.put(sigmas, rep),
            parallel.put(timesteps, rep),
            parallel.put(np.float32(guidance), rep),
            parallel.put(np.int32(0), rep),
        )
        final, image, trajectory = sampler_lib.run(programs, spec, self.dit_params, self.vae_params, *args,
                                                   callback=callback)
        final = parallel.to_host(final)
        if output_type == "latent":
            images = final
        else:
            images = parallel.to_host(image).astype(np.float32)
            if output_type == "pil":
                images = _to_pil(images)
        return LensPipelineOutput(
            images=images, latents=final,
            trajectory=None if trajectory is None else parallel.to_host(trajectory),
            text_features=feats, text_mask=mask, seeds=seeds,
        )

    def _text_inputs(self, prompt, negative_prompt, prompt_embeds, prompt_mask, negative_prompt_embeds,
                     negative_prompt_mask, use_cfg, max_sequence_length):
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give a prompt (or prompt_embeds with prompt_mask).")
            prompts = _as_list(prompt, "prompt")
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; give one per prompt "
                    "(or a single string for all)."
                )
            if negative_prompt_embeds is not None:
                raise ValueError("negative_prompt_embeds needs prompt_embeds too.")
            feats, mask = self._conditioning(prompts, negatives, use_cfg, max_sequence_length)
            if not self.keep_text_encoder:
                self.release_text_encoder()
            return feats, mask
        pos = [np.asarray(f, np.float32) for f in prompt_embeds]
        pos_mask = self._embeds_mask(pos, prompt_mask, "prompt")
        if not use_cfg:
            return pos, pos_mask
        if negative_prompt_embeds is None:
            neg, neg_mask = [np.zeros_like(f) for f in pos], np.zeros_like(pos_mask)
        else:
            neg = [np.asarray(f, np.float32) for f in negative_prompt_embeds]
            neg_mask = self._embeds_mask(neg, negative_prompt_mask, "negative_prompt")
            if neg_mask.shape[0] != pos_mask.shape[0]:
                raise ValueError("negative_prompt_embeds must have as many rows as prompt_embeds.")
        return _cfg_batch(pos, pos_mask, neg, neg_mask)

    def _embeds_mask(self, feats, mask, name) -> np.ndarray:
        n = self.dit_config.num_text_layers
        if len(feats) != n or any(f.ndim != 3 or f.shape != feats[0].shape for f in feats):
            raise ValueError(f"{name}_embeds must be a list of {n} arrays [B, T, {self.dit_config.enc_hidden_dim}].")
        if mask is None:
            raise ValueError(f"{name}_embeds needs {name}_mask ([B, T] bool).")
        mask = np.asarray(mask, bool)
        if mask.shape != feats[0].shape[:2]:
            raise ValueError(f"{name}_mask must be [B, T] = {feats[0].shape[:2]}; got {mask.shape}.")
        return mask

    def _initial_latents(self, latents, seed, shape) -> np.ndarray:
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != shape:
                raise ValueError(
                    f"latents must be packed noise [B*num_images_per_prompt, h*w, {shape[2]}] = {list(shape)}; "
                    f"got {list(latents.shape)}."
                )
            return latents
        return image_noise(int(seed), shape)


def seed_key(seed: int) -> jax.Array:
    """The threefry key of a seed in [0, 2**64 - 1]: all 64 bits count (jax.random.key keeps only
    the low 32 without x64); equal to `jax.random.key(seed)` for seeds below 2**32."""
    return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32))


def image_noise(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Initial noise [B, h*w, C]: row k from `seed + k` alone, so an image's noise does not depend
    on the batch it is drawn in."""
    b, n, c = shape
    keys = jax.random.wrap_key_data(np.array([[(seed + k) >> 32, (seed + k) & 0xFFFFFFFF] for k in range(b)],
                                             np.uint32).reshape(b, 2))
    return np.asarray(jax.vmap(lambda k: jax.random.normal(k, (n, c), jnp.float32))(keys))


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(np.round(im * 255.0).clip(0, 255).astype(np.uint8)) for im in images]
