"""Peak device memory and seconds per image for each offload mode (docs/offload.md).

    python scripts/benchmark_offload.py --config lens --size 1024x1024 --variants lens,lens-turbo
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.10 python scripts/benchmark_offload.py ...   # an ~8 GB card on an H100

Random weights in the real layout (no checkpoint needed): the DiT and a text encoder are built
straight into their (host or device) shardings. On CPU (`--config tiny`) it checks the modes run
and times them; device memory figures need a GPU (`memory_stats()`).
"""

from __future__ import annotations

import argparse
import functools
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax import LensPipeline, configs, parallel
from lens_jax import transformer as dit
from lens_jax import vae as vae_lib
from lens_jax.parallel import offload as offload_lib
from lens_jax.pipelines.components import Component
from lens_jax.pipelines.text_to_image import load_preset
from _random_init import init_sharded
from _timing import median_over_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="lens (real sizes) or tiny; default: tiny on CPU, lens elsewhere")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--variants", default="lens,lens-turbo")
    ap.add_argument("--modes", default="none,all")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=192)
    args = ap.parse_args()
    name = args.config or ("tiny" if jax.default_backend() == "cpu" else "lens")
    dtype = jnp.dtype(jnp.float32 if name == "tiny" else jnp.bfloat16)
    height, width = (int(v) for v in args.size.split("x"))
    dcfg = dit.TransformerConfig.from_dict(configs.load_json(f"{name}/transformer.json"))
    vcfg = vae_lib.VAEConfig.from_dict(configs.load_json(f"{name}/vae.json"))
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((1, args.text_tokens, dcfg.enc_hidden_dim)).astype(np.float32) for _ in range(4)]
    mask = np.ones((1, args.text_tokens), bool)
    print(f"device: {jax.devices()[0].device_kind}  config: {name}  dtype: {dtype.name}  size: {height}x{width}")
    for mode in args.modes.split(","):
        def init(fn, cfg, seed, axes_fn, stacked=None):
            # streamed blocks: built layer by layer into host memory (a one-shot init would not fit a capped device)
            stacked = stacked if stacked and offload_lib.streams(mode, "transformer") else None
            return init_sharded(fn, cfg, seed, dtype, mesh, axes_fn(cfg) if axes_fn else None, stacked,
                                one_layer=lambda c: dataclasses.replace(c, num_layers=1))

        pipe = LensPipeline(Component(dcfg, init(dit.init_params, dcfg, 0, dit.param_axes, "transformer_blocks")),
                            Component(vcfg, init(vae_lib.init_params, vcfg, 1, None)),
                            tokenizer=None, text_encoder_factory=None, dtype=dtype, mesh=mesh, offload=mode)
        for variant in args.variants.split(","):
            preset = load_preset(variant)
            call = dict(prompt_embeds=feats, prompt_mask=mask, height=height, width=width, output_type="np",
                        num_inference_steps=preset["num_inference_steps"], guidance_scale=preset["guidance_scale"])
            pipe(seed=0, **call)
            median = median_over_seeds(functools.partial(pipe, **call), args.runs)
            stats = jax.devices()[0].memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
            print(f"offload={mode:<12} {variant:<11} median {median:7.3f} s per image"
                  + (f", peak device memory {peak / 2**30:.2f} GiB" if peak else ""))
        del pipe


if __name__ == "__main__":
    main()
