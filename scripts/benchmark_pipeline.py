#!/usr/bin/env python
"""Benchmark the jitted Lens sampler (denoising loop + VAE decode in one program).

Random weights at the real sizes (no checkpoint needed) and random text features (the text
encoder has its own benchmark), so the figures are the DiT loop plus the decode:

    python scripts/benchmark_pipeline.py                       # GPU: lens 20 steps CFG and turbo 4 steps, 1024^2
    python scripts/benchmark_pipeline.py --config tiny --size 256x256   # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax import LensPipeline, configs, parallel
from lens_jax import transformer as dit
from lens_jax import vae as vae_lib
from lens_jax.pipelines.components import Component
from lens_jax.pipelines.text_to_image import load_preset
from _timing import median_over_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["lens", "tiny"], default=None, help="default: lens on GPU/TPU, tiny on CPU")
    ap.add_argument("--size", default="1024x1024", help="HxW in pixels (multiples of 16)")
    ap.add_argument("--variants", default="lens,lens-turbo")
    ap.add_argument("--text-tokens", type=int, default=128, help="valid prompt tokens after the template prefix")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default=None, choices=["bf16", "f32"])
    args = ap.parse_args()

    name = args.config or ("tiny" if jax.default_backend() == "cpu" else "lens")
    dtype = jnp.dtype(jnp.bfloat16 if (args.dtype or ("f32" if name == "tiny" else "bf16")) == "bf16" else jnp.float32)
    height, width = (int(v) for v in args.size.split("x"))
    dcfg = dit.TransformerConfig.from_dict(configs.load_json(f"{name}/transformer.json"))
    vcfg = vae_lib.VAEConfig.from_dict(configs.load_json(f"{name}/vae.json"))
    mesh = parallel.make_mesh()

    def init(fn, cfg, seed, axes_fn):  # initialise straight into the pipeline's sharding: no second copy
        abstract = jax.eval_shape(lambda k: fn(cfg, k, dtype), jax.random.key(seed))
        out = (parallel.logical_shardings(abstract, axes_fn(cfg), mesh) if axes_fn else
               parallel.replicated_shardings(abstract, mesh))
        return jax.jit(fn, static_argnums=(0, 2), out_shardings=out)(cfg, jax.random.key(seed), dtype)

    pipe = LensPipeline(Component(dcfg, init(dit.init_params, dcfg, 0, dit.param_axes)),
                        Component(vcfg, init(vae_lib.init_params, vcfg, 1, None)),
                        tokenizer=None, text_encoder_factory=None, dtype=dtype, mesh=mesh)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        print(f"weights resident: {stats['bytes_in_use'] / 2**30:.2f} GiB")
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((1, args.text_tokens, dcfg.enc_hidden_dim)).astype(np.float32) for _ in range(4)]
    mask = np.ones((1, args.text_tokens), bool)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  config: {name}  dtype: {dtype.name}  "
          f"size: {height}x{width}")
    for variant in args.variants.split(","):
        preset = load_preset(variant)
        call = dict(prompt_embeds=feats, prompt_mask=mask, height=height, width=width, output_type="np",
                    num_inference_steps=preset["num_inference_steps"], guidance_scale=preset["guidance_scale"])
        t0 = time.perf_counter()
        pipe(seed=0, **call)
        first = time.perf_counter() - t0
        median = median_over_seeds(functools.partial(pipe, **call), args.runs)
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        print(f"{variant:<11} steps {preset['num_inference_steps']:>2} cfg {preset['guidance_scale']:.1f}: "
              f"first call (compile+run) {first:6.2f} s, median {median:6.3f} s per image"
              + (f", peak device memory {peak / 2**30:.2f} GiB" if peak else ""))


if __name__ == "__main__":
    main()
