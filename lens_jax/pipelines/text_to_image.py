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
from jax.typing import ArrayLike, DTypeLike
import numpy as np

from .. import configs, parallel
from ..parallel.compile_cache import enable_compilation_cache
from ..models import quant
from ..models import transformer as dit
from ..models import vae as vae_lib
from ..models.dtypes import resolve_dtype
from ..parallel import offload as offload_lib
from ..sampling import modulation as modulation_lib
from ..sampling import sampler as sampler_lib
from ..sampling.resolution import PIXELS_PER_TOKEN, resolve_size
from ..sampling.scheduler import SchedulerConfig, schedule
from ..weights import hub, orbax_io, registry
from ..errors import InputError
from . import components as components_lib
from . import img2img as img2img_lib
from . import prompt as prompt_lib
from . import reasoner as reasoner_lib
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
    prompts: list[str] | None = None  # the prompts the images were made from (rewritten by the reasoner if on)
    original_prompts: list[str] | None = None  # the caller's prompts when the reasoner rewrote them
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
        compilation_cache: bool | str | os.PathLike | None = None,
        quantize: str | None = None,
    ):
        # None: on (in ~/.cache/lens-jax/xla) unless LENS_JAX_COMPILATION_CACHE=off; False: off; a path.
        self.compilation_cache = enable_compilation_cache(compilation_cache)
        # "int8" (weight-only) or "fp8" (e4m3 weights and activations) DiT; img_mod/txt_mod stay as they are.
        self.quantize = quant.check_mode(quantize) or quant.params_mode(transformer.params)  # or as restored
        if quantize is not None:
            transformer = components_lib.Component(transformer.config, quant.quantize_params(transformer.params, quantize))
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        if offload == "auto":
            dit_bytes, modulation_bytes = components_lib.dit_device_bytes(transformer.params, self.quantize)
            self.offload = offload_lib.choose(offload, dit_bytes, 0, 0, modulation_bytes)
        else:
            self.offload = offload_lib.check_mode(offload)
        self.rules = rules or parallel.DEFAULT_RULES
        self.dtype = resolve_dtype(dtype)
        self.dit_config = transformer.config
        self.vae_config = vae.config
        dit_spec = registry.component("transformer")
        dit_shardings = (
            parallel.logical_shardings(transformer.params, quant.quantized_axes(dit_spec.param_axes(self.dit_config),
                                                                  transformer.params), self.mesh, self.rules)
            if fsdp else parallel.replicated_shardings(transformer.params, self.mesh)
        )
        if offload_lib.streams(self.offload, "transformer"):
            dit_shardings = offload_lib.on_host(dit_shardings, dit_spec.stacked_key)
        elif modulation_lib.hosted(self.quantize, self.offload):  # img_mod/txt_mod only feed the per-generation table
            dit_shardings = modulation_lib.on_host(dit_shardings, dit_spec.stacked_key)
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
        self.reasoner_options: dict = {}  # keyword arguments of `reasoner.make_reasoner` (see `configure_reasoner`)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype: DTypeLike | None = None,
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
        compilation_cache: bool | str | os.PathLike | None = None,
        quantize: str | None = None,
    ) -> "LensPipeline":
        """Load the upstream diffusers layout (a local folder or a hub id) or a `convert` output.

        dtype: None = bf16 on GPU/TPU, f32 on CPU. variant: 'lens' | 'lens-base' | 'lens-turbo'
        sets the default steps/guidance (otherwise upstream's call defaults, 50 and 4.0).
        offload: 'none' | 'text_encoder' | 'all' | 'auto' (`lens_jax.parallel.offload`): stream the
        text encoder's layers, or the DiT's blocks too, from pinned host memory.
        quantize: None | "int8" (weight-only) | "fp8" (e4m3 weights and activations) for the DiT. A
        checkpoint converted with `--quantize` is restored quantised as stored (None or its own mode;
        another mode is an error).
        """
        quant.check_mode(quantize)
        enable_compilation_cache(compilation_cache)  # before loading compiles anything
        root = hub.resolve_checkpoint(path_or_repo_id, revision=revision)
        if orbax_io.is_converted(root):  # `convert --quantize` output: None = as stored, another mode is refused
            quantize = orbax_io.stored_quantize(root, quantize) or quantize
        dtype = resolve_dtype(dtype)
        mesh = mesh if mesh is not None else parallel.make_mesh()
        if offload == "auto":
            needed = components_lib.estimate_bytes(root, dtype, keep_mxfp4, quantize=quantize)
            offload = offload_lib.choose(offload, *needed)
        offload_lib.check_mode(offload)
        parts = components_lib.load_components(root, dtype, keep_mxfp4=keep_mxfp4, mesh=mesh, fsdp=fsdp, rules=rules,
                                               offload=offload)
        defaults = load_preset(variant) if variant else None
        return cls.from_components(
            parts, mesh=mesh, rules=rules, dtype=dtype, keep_text_encoder=keep_text_encoder,
            template_date=template_date, defaults=defaults, fsdp=fsdp, name=str(path_or_repo_id), offload=offload,
            compilation_cache=compilation_cache, quantize=quantize,
        )

    @classmethod
    def from_components(cls, parts: components_lib.Components, **kwargs) -> "LensPipeline":
        """A pipeline from loaded `Components` (`lens_jax.pipelines.components`)."""
        return cls(parts.transformer, parts.vae, parts.tokenizer, parts.text_encoder_factory,
                   scheduler_config=parts.scheduler, txt_offset=parts.txt_offset, **kwargs)

    @classmethod
    def tiny_random(cls, seed: int = 0, dtype: DTypeLike = jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    **kwargs: Any) -> "LensPipeline":
        """A tiny randomly initialised Lens (offline; its pictures are noise) for smoke tests."""
        enable_compilation_cache(kwargs.get("compilation_cache"))
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
                te.stream = parallel.HostStream.for_stack(te.params["layers"])
            self._text_encoder = te
        return self._text_encoder

    def release_text_encoder(self) -> None:
        """Free the text encoder's device memory (it is reloaded when next needed)."""
        te, self._text_encoder = self._text_encoder, None
        if te is not None:
            for leaf in jax.tree.leaves(te.params):
                if isinstance(leaf, jax.Array):
                    leaf.delete()

    # ------------------------------------------------------------------ LoRA

    @property
    def loras(self) -> list[tuple[str, float]]:
        """The LoRAs merged into the DiT, in order: [(source, multiplier), ...]."""
        return [(name, m) for name, _, m in getattr(self, "_loras", [])]

    def load_lora(self, path_or_adapter: str | os.PathLike | dict, multiplier: float = 1.0, name: str | None = None) -> "LensPipeline":
        """Merge a LoRA (a peft/kohya/comfy file, or an adapter pytree) into the DiT at `multiplier`.

        Several calls stack. The first keeps the base parameters (the adapted kernels are held twice
        while LoRAs are loaded) so `unload_loras()` restores them bit for bit; every call re-merges all
        loaded adapters onto the base, one kernel at a time, keeping each kernel's sharding and memory
        kind (offloaded blocks stay in host memory).
        """
        from ..models import lora as lora_lib
        from ..weights import lora_formats

        multiplier = validation.check_lora_multiplier(multiplier)
        if isinstance(path_or_adapter, (str, os.PathLike)):
            adapter = lora_formats.load(path_or_adapter, self.dit_config)
            name = name or str(path_or_adapter)
        else:
            adapter = path_or_adapter
            name = name or "adapter"
        lora_lib.check_adapter(self.dit_params, adapter)
        if getattr(self, "_dit_base", None) is None:
            self._dit_base, self._loras = self.dit_params, []
        self._loras = [*self._loras, (name, adapter, float(multiplier))]
        self.dit_params = self.lora_params([(a, m) for _, a, m in self._loras], self._dit_base)
        return self

    def lora_params(self, adapters: Sequence[tuple[Any, float]], base: Any = None) -> dict:
        """DiT parameters with `[(adapter, multiplier), ...]` merged in order onto `base` (default: the
        current `dit_params`), without changing the pipeline. Each kernel keeps its sharding and memory
        kind, so `__call__(..., dit_params=...)` runs them with the same compiled programs.
        """
        from ..models import lora as lora_lib

        base = self.dit_params if base is None else base
        # One adapted kernel at a time, on the device (kernels offloaded to host memory go back there).
        merge = jax.jit(lora_lib.merge_many)
        params = base
        for path in sorted({p for a, _ in adapters for p in a}):
            kernel = lora_lib.get_path(base, path)["kernel"]
            on_device = jax.device_put(kernel, kernel.sharding.with_memory_kind("device"))
            stack = [({"m": a[path]}, jnp.float32(m)) for a, m in adapters if path in a]
            merged = merge({"m": {"kernel": on_device}}, stack)["m"]["kernel"]
            params = lora_lib.set_path(params, path + ".kernel", jax.device_put(merged, kernel.sharding))
        return params

    def unload_loras(self) -> "LensPipeline":
        """Remove every loaded LoRA: the DiT gets its base parameters back (bit-exact)."""
        if getattr(self, "_dit_base", None) is not None:
            self.dit_params, self._dit_base, self._loras = self._dit_base, None, []
        return self

    def encode_prompt(self, prompts: str | Sequence[str],
                      max_sequence_length: int = prompt_lib.MAX_SEQUENCE_LENGTH) -> tuple[list[np.ndarray], np.ndarray]:
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
        latents: ArrayLike | None = None,
        prompt_embeds: Sequence[Any] | None = None,
        prompt_mask: ArrayLike | None = None,
        negative_prompt_embeds: Sequence[Any] | None = None,
        negative_prompt_mask: ArrayLike | None = None,
        output_type: str = "pil",
        max_sequence_length: int = prompt_lib.MAX_SEQUENCE_LENGTH,
        callback: Callable[[int, float, Any], None] | None = None,
        return_trajectory: bool = False,
        image: Any = None,
        strength: float = 1.0,
        mask_image: Any = None,
        enable_reasoner: bool = False,
        min_text_length: int | None = None,
        dit_params: Any = None,
    ) -> LensPipelineOutput:
        """Generate images. `callback(step, timestep, latents)` is called after every step.

        `image` (path, PIL image or array; one image for every output) with `strength` in (0, 1]:
        image-to-image; with `mask_image` (white = repaint): inpainting (docs/img2img.md).
        `enable_reasoner`: rewrite the prompts first (`configure_reasoner`; docs/reasoner.md).
        `dit_params`: DiT parameters to use instead of `self.dit_params` for this call (e.g. from
        `lora_params`; same shapes and shardings, so the compiled programs are reused).

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
        if dit_params is not None:
            validation.check_params_like(dit_params, self.dit_params)
        num_inference_steps, guidance_scale = checked["num_inference_steps"], checked["guidance_scale"]
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}.")
        init_image, init_mask, strength = self._check_image_inputs(image, strength, mask_image)
        if init_image is not None and height is None and width is None and aspect_ratio is None:
            aspect_ratio = img2img_lib.closest_bucket(init_image.width, init_image.height, base_resolution)
        original_prompts = None
        if enable_reasoner:
            if prompt_embeds is not None or prompt is None:
                raise InputError("enable_reasoner rewrites text prompts; give `prompt` (not prompt_embeds).")
            original_prompts = _as_list(prompt, "prompt")
            prompt = self.rewrite_prompts(original_prompts, seed=0 if seed is None else int(seed))
        H, W = resolve_size(height, width, base_resolution, aspect_ratio)
        h, w = H // PIXELS_PER_TOKEN, W // PIXELS_PER_TOKEN
        steps = int(num_inference_steps or self.defaults["num_inference_steps"])
        guidance = float(self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale)
        use_cfg = guidance != 1.0
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1; got {num_images_per_prompt}.")
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable as callback(step, timestep, latents); got {callback!r}.")
        if latents is not None:  # its shape follows from the arguments: check it before the text encoder runs
            rows = len(prompt) if prompt_embeds is None else int(np.shape(prompt_embeds[0])[0])
            self._initial_latents(latents, None, (rows * num_images_per_prompt, h * w, self.dit_config.in_channels))

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
        start, known, reference = 0, None, None
        if init_image is not None:
            start, latents, known, reference = self._image_latents(init_image, init_mask, strength, latents, sigmas,
                                                                   steps, (H, W))
        spec = sampler_lib.SamplerSpec(
            self.dit_config, self.vae_config, (h, w), steps, use_cfg, output_type != "latent", return_trajectory,
            jnp.dtype(self.dtype), dit.default_attention_impl(self.dtype), self._activation_sharding,
            parallel.HostStream.for_stack(self.dit_params["transformer_blocks"])
            if offload_lib.streams(self.offload, "transformer") else None,
            self._tiling(H * W, batch),
            inpaint=known is not None,
            modulation_stream=modulation_lib.stream_for(modulation_lib.hosted(self.quantize, self.offload),
                                                        self.dit_params["transformer_blocks"]),
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
            parallel.put(np.int32(start), rep),
        )
        if known is not None:
            known = tuple(parallel.put(k, parallel.batch_sharding(mesh, batch, 3)) for k in known)
        if dit_params is None:
            dit_params = self.dit_params
        else:  # laid out like the pipeline's own (host numpy, another device, a mesh): one compiled program
            dit_params = jax.tree.map(lambda x, ref: parallel.put(x, ref.sharding), dit_params, self.dit_params)
        final, image, trajectory = sampler_lib.run(programs, spec, dit_params, self.vae_params, *args,
                                                   callback=callback, known=known)
        final = parallel.to_host(final)
        if output_type == "latent":
            images = final
        else:
            images = parallel.to_host(image).astype(np.float32)
            if reference is not None:  # inpainting: the kept region is the input's VAE round trip
                weight, kept = reference
                images = weight[None, :, :, None] * images + (1.0 - weight[None, :, :, None]) * kept
            if output_type == "pil":
                images = _to_pil(images)
        return LensPipelineOutput(
            images=images, latents=final,
            trajectory=None if trajectory is None else parallel.to_host(trajectory),
            text_features=feats, text_mask=mask, seeds=seeds,
            prompts=None if prompt is None else _as_list(prompt, "prompt"), original_prompts=original_prompts,
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


    # ------------------------------------------------------------------ image-to-image, reasoner

    def _check_image_inputs(self, image, strength, mask_image):
        """Validate the image-to-image arguments before any work: (PIL image | None, PIL mask | None, strength)."""
        strength = img2img_lib.check_strength(strength)
        if image is None:
            if mask_image is not None:
                raise InputError("mask_image needs image= (the picture to inpaint).")
            if strength != 1.0:
                raise InputError("strength < 1 needs image= (image-to-image); leave it at 1.0 for text-to-image.")
            return None, None, strength
        mask = None if mask_image is None else img2img_lib.load_mask(mask_image)
        return img2img_lib.load_image(image), mask, strength

    def _image_latents(self, image, mask, strength, noise, sigmas, steps, size):
        """(start step, start latents, known (x0, noise, latent mask) or None, (pixel weight, round trip) or None)."""
        H, W = size
        batch = noise.shape[0]
        pixels = img2img_lib.to_model_range(img2img_lib.fit_to_bucket(image, H, W))[None]
        x0 = parallel.to_host(self._vae_program("encode")(self.vae_params, self.vae_config, jnp.asarray(pixels, self.dtype)))
        x0 = np.asarray(x0, np.float32)
        x0 = np.broadcast_to(x0, noise.shape).copy()
        start = img2img_lib.start_step(steps, strength)
        s = np.float32(sigmas[start])
        latents = ((np.float32(1.0) - s) * x0 + s * noise).astype(np.float32)
        if mask is None:
            return start, latents, None, None
        pixel_mask = np.asarray(img2img_lib.fit_to_bucket(mask, H, W), np.float32) / 255.0
        tokens = img2img_lib.token_mask(pixel_mask)
        latent_mask = np.broadcast_to(tokens[None], (batch, *tokens.shape)).astype(np.float32)
        kept = np.asarray(parallel.to_host(self._vae_program("decode")(self.vae_params, self.vae_config, jnp.asarray(x0[:1]),
                                                          H // PIXELS_PER_TOKEN, W // PIXELS_PER_TOKEN)), np.float32)
        weight = img2img_lib.blend_weights(pixel_mask, tokens)
        return start, latents, (x0, noise.astype(np.float32), latent_mask), (weight, kept)

    def _vae_program(self, kind: str) -> Callable:
        """The jitted VAE encode ("encode": image -> tokens) or round-trip decode ("decode": tokens -> [0, 1]
        image) of image-to-image, kept with this pipeline's other programs."""
        key = ("img2img_vae", kind)
        if key not in self._programs:
            if kind == "encode":
                fn = jax.jit(vae_lib.encode_to_tokens, static_argnames=("config",))
            else:
                fn = jax.jit(lambda params, config, tokens, h, w: (jnp.clip(vae_lib.decode_tokens(
                    params, config, tokens, h, w).astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0, static_argnums=(1, 3, 4))
            self._programs[key] = fn
        return self._programs[key]

    def rewrite_prompts(self, prompts: str | Sequence[str], seed: int = 0) -> list[str]:
        """Prompts -> the reasoner's rewrites (`configure_reasoner` picks the route; default: local GPT-OSS)."""
        prompts = _as_list(prompts, "prompt")
        reasoner = reasoner_lib.make_reasoner(lambda: self.text_encoder, self.tokenizer,
                                              **{"seed": seed, **self.reasoner_options})
        return reasoner(prompts)

    def configure_reasoner(self, *, system_prompt: str | None = None, api_url: str | None = None,
                            api_key: str | None = None, api_model: str | None = None, api_timeout: float | None = None,
                            max_new_tokens: int | None = None, temperature: float | None = None) -> None:
        """Settings of `enable_reasoner` (None keeps the default): the system prompt, the HTTP route
        (api_url + api_model, key or $LENS_REASONER_API_KEY, timeout in s), decoding limits."""
        given = dict(system_prompt=system_prompt, api_url=api_url, api_key=api_key, api_model=api_model,
                     api_timeout=api_timeout, max_new_tokens=max_new_tokens, temperature=temperature)
        self.reasoner_options = {k: v for k, v in given.items() if v is not None}
        if api_url or api_model:  # validate the HTTP settings now, not after loading a model
            reasoner_lib.make_reasoner(lambda: None, None, **self.reasoner_options)


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


def _to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(np.round(im * 255.0).clip(0, 255).astype(np.uint8)) for im in images]
