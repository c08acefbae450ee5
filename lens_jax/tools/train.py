"""`lens-jax train CONFIG [--set section.key=value ...]`: fine-tune the Lens DiT (full or LoRA).

Wires the layers together: the pipeline's text encoder and VAE build the feature cache (once),
`lens_jax.training` trains on it, and the pipeline renders sample images with fixed prompts
and seeds every `sample.every` steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .runtime import enable_compilation_cache

TINY_RANDOM = "tiny-random"
LORA_FILE = "lora.safetensors"  # a LoRA run's final adapter (PEFT format; `--lora` and `pipe.load_lora` read it)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune the Lens DiT (full or LoRA) on an image folder",
                       description="Fine-tune Lens. CONFIG is a TOML or JSON file (see docs/training.md); "
                                   "--set overrides any key, e.g. --set optim.learning_rate=1e-4.")
    p.add_argument("config", nargs="?", default=None, help="training config (.toml or .json); optional with --set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. train.steps=200 lora.enabled=true")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def load_components(cfg):
    """The pipeline components for `model.source` (tiny-random or a checkpoint folder / hub id), float32."""
    import jax.numpy as jnp

    from lens_jax.pipelines import components as components_lib
    from lens_jax.weights import hub

    if cfg.model.source == TINY_RANDOM:
        return components_lib.tiny_random_components(cfg.model.seed, jnp.float32)
    root = hub.resolve_checkpoint(cfg.model.source)
    return components_lib.load_components(root, jnp.float32)


def ensure_cache(cfg, parts, progress: bool = True):
    """Open `data.cache_dir`, building (or finishing) it from `data.image_dir` first when that is set."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lens_jax.models import vae as vae_model
    from lens_jax.pipelines.text_to_image import LensPipeline
    from lens_jax.training import cache as cache_lib

    if cfg.data.image_dir is None:
        return cache_lib.FeatureCache(cfg.data.cache_dir)
    pipe = LensPipeline.from_components(parts, dtype=jnp.float32, keep_text_encoder=True)
    encode = jax.jit(lambda p, x: vae_model.encode_to_tokens(p, parts.vae.config, x))

    def encode_image(images):
        return np.asarray(encode(pipe.vae_params, jnp.asarray(images)))

    result = cache_lib.build_cache(cfg.data.image_dir, cfg.data.cache_dir, pipe.encode_prompt, encode_image,
                                   cfg.data.base_resolution, cfg.data.shard_size, progress=progress)
    pipe.release_text_encoder()
    return result


def make_sampler(cfg, parts, trainer):
    """sample_fn(step, state): render `sample.prompts` x `sample.seeds` with the current weights to PNGs."""
    import jax
    import jax.numpy as jnp

    from lens_jax.pipelines.text_to_image import LensPipeline

    pipe = LensPipeline.from_components(parts, dtype=jnp.float32, keep_text_encoder=True)
    out = Path(cfg.train.output_dir) / "samples"
    s = cfg.sample
    prompts = list(s.prompts)
    embeds = pipe.encode_prompt(prompts)  # once: the text encoder is frozen
    pipe.release_text_encoder()
    size = {"height": s.height, "width": s.width} if s.height else {"base_resolution": None}

    def sample_fn(step: int, state: dict) -> None:
        trained = state["ema"] if "ema" in state else state["params"]
        if cfg.lora.enabled:
            from lens_jax.models import lora as lora_lib

            params = lora_lib.merge(trainer.base, trained, cfg.lora.multiplier)
        else:
            params = trained
        # device_put, not parallel.put: on several hosts the trained arrays are not all addressable here.
        pipe.dit_params = jax.device_put(jax.tree.map(lambda x: x.astype(jnp.float32), params),
                                         pipe._dit_shardings.tree)
        out.mkdir(parents=True, exist_ok=True)
        for seed in s.seeds:
            images = pipe(prompt_embeds=embeds[0], prompt_mask=embeds[1], num_inference_steps=s.num_inference_steps,
                          guidance_scale=s.guidance_scale, seed=seed, **{k: v for k, v in size.items() if v}).images
            for i, image in enumerate(images if jax.process_index() == 0 else ()):  # every host samples, one writes
                image.save(out / f"step{step:07d}_p{i}_s{seed}.png")

    return sample_fn


def write_adapter(cfg, state: dict) -> Path:
    """The trained LoRA (EMA weights when kept) as `train.output_dir/lora.safetensors`, PEFT/diffusers format."""
    import jax

    from lens_jax import parallel
    from lens_jax.weights import lora_formats

    trained = state["ema"] if "ema" in state else state["params"]
    host = jax.tree.map(parallel.to_host, trained)  # every host joins the gather; host 0 writes
    path = Path(cfg.train.output_dir) / LORA_FILE
    if jax.process_index() == 0:
        lora_formats.save(host, path, format="peft")
    return path


def run(args) -> int:
    from lens_jax.errors import LensError
    from lens_jax.training.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except LensError as e:
        print(f"lens-jax: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    enable_compilation_cache()
    import jax

    from lens_jax.training.data import CachedBatches
    from lens_jax.training.trainer import Trainer

    try:
        parts = load_components(cfg)
        cache = ensure_cache(cfg, parts, progress=cfg.train.progress)
        batches = CachedBatches(cache, cfg.data.batch_size, cfg.data.seed, cfg.data.text_bucket,
                                jax.process_index(), jax.process_count())
        trainer = Trainer(cfg, parts.transformer.config, parts.transformer.params, batches)
        sample_fn = make_sampler(cfg, parts, trainer) if cfg.sample.every else None
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # every host has the same config; one writes it
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        state = trainer.fit(sample_fn)
        trainer.close()
        adapter_file = write_adapter(cfg, state) if cfg.lora.enabled else None
    except LensError as e:
        print(f"lens-jax: error: {e}", file=sys.stderr)
        return 2
    print(f"trained to step {int(jax.device_get(state['step']))}; checkpoints in {trainer.checkpoint_dir}")
    if adapter_file is not None:
        print(f"LoRA adapter: {adapter_file} (lens-jax generate --lora {adapter_file})")
    return 0
