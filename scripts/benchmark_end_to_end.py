#!/usr/bin/env python
"""End to end: prompt -> text encoder -> sampler -> VAE decode, per DiT quantisation, with random weights.

    python scripts/benchmark_end_to_end.py                                   # GPU: 1024², lens + turbo, bf16
    python scripts/benchmark_end_to_end.py --quantize none,fp8,int8 --variants lens   # + cosine vs bf16
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.10 python scripts/benchmark_end_to_end.py --offload all --quantize none
    python scripts/benchmark_end_to_end.py --config tiny --size 64x64 --runs 1          # CPU smoke run

Issue 11's end-to-end rows (Lens 1024² 20 steps CFG, Turbo 4 steps, FP8 / int8 DiT with the cosine
of the final latents against the unquantised DiT) and, with `--offload`, issue 16's peak over
encoding + sampling. Every component has the real layout and random weights (no checkpoint): the
DiT and VAE initialised straight into their shardings (DiT blocks in pinned host memory when they
stream), the GPT-OSS encoder (only the layers the DiT selects, MXFP4-packed experts) likewise, its
layers in host memory under `--offload text_encoder|all`. The tokenizer is the packaged tiny one
(its ids are valid real-vocabulary ids); the prompt is sized to `--text-tokens` valid tokens after
the template prefix. The text encoder stays loaded between images (`keep_text_encoder=True`), so the
time per image is encode + sample + decode with every model resident, as in a server.

Prints one line per (quantize, variant) and, with `--json PATH`, writes the rows. "peak" is the
process's running maximum of device memory (the runtime's `peak_bytes_in_use`): the unquantised DiT
stays alive as the source of each quantised copy, so for int8 / fp8 read "DiT on device" (the
quantised DiT's device-resident bytes; its bf16 modulation kernels wait in pinned host memory).
"""

from __future__ import annotations

import argparse
import functools
import dataclasses
import json
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax import LensPipeline, configs, parallel
from lens_jax import transformer as dit
from lens_jax import vae as vae_lib
from lens_jax.models import text_encoder as te_lib
from lens_jax.parallel import offload as offload_lib
from lens_jax.pipelines import prompt as prompt_lib
from lens_jax.pipelines.components import Component, tree_bytes
from lens_jax.pipelines.text_to_image import load_preset
from _random_init import init_sharded
from _timing import median_over_seeds


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def device_bytes(tree) -> int:
    """Bytes of the leaves held in device memory (not pinned host memory)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree)
               if getattr(leaf.sharding, "memory_kind", None) != offload_lib.HOST)


def text_encoder_factory(name: str, dit_config, dtype, mesh, offload: str):
    """A factory for a random GPT-OSS encoder of config `name` holding the layers the DiT selects."""
    full = te_lib.TextEncoderConfig.from_dict(configs.load_json(f"{name}/text_encoder.json"))
    selected = tuple(dit_config.selected_layer_index)
    config = full.truncated(max(selected) + 1)
    packed = name != "tiny"  # the real checkpoint ships MXFP4 experts; the tiny one float experts

    def init(cfg, key, dt):
        return te_lib.init_params(cfg, key, dt, packed=packed)

    def factory():
        abstract = jax.eval_shape(lambda k: init(config, k, dtype), jax.random.key(2))
        axes = te_lib.param_axes(config, params=abstract)
        stacked = "layers" if offload_lib.streams(offload, "text_encoder") else None
        params = init_sharded(init, config, 2, dtype, mesh, axes, stacked, one_layer=lambda c: c.truncated(1))
        return te_lib.TextEncoder(full, params, selected)

    return factory


def sized_prompt(tokenizer, txt_offset: int, tokens: int) -> str:
    """The longest prefix of a stock sentence (repeated) with at most `tokens` valid tokens after the
    template prefix, counted with the given tokenizer and Lens' template."""
    words = ("a red fox jumps over the lazy dog under a bright moon near the quiet river " * 64).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the valid count grows with the number of words
        mid = (lo + hi + 1) // 2
        with warnings.catch_warnings():  # "prompt cut at max_sequence_length" while searching
            warnings.simplefilter("ignore")
            ids = prompt_lib.tokenize_prompts(tokenizer, [" ".join(words[:mid])]).attention_mask[0]
        if int(np.sum(ids)) - txt_offset <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["lens", "tiny"], default=None, help="default: lens on GPU/TPU, tiny on CPU")
    ap.add_argument("--size", default="1024x1024", help="HxW in pixels (multiples of 16)")
    ap.add_argument("--variants", default="lens,lens-turbo")
    ap.add_argument("--quantize", default="none", help="comma-separated DiT modes: none, int8, fp8 (the first "
                    "listed is the reference for the cosine; put none first)")
    ap.add_argument("--offload", default="none", choices=["none", "text_encoder", "all"])
    ap.add_argument("--text-tokens", type=int, default=128, help="valid prompt tokens after the template prefix")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default=None, choices=["bf16", "f32"])
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()

    name = args.config or ("tiny" if jax.default_backend() == "cpu" else "lens")
    dtype = jnp.dtype(jnp.bfloat16 if (args.dtype or ("f32" if name == "tiny" else "bf16")) == "bf16" else jnp.float32)
    height, width = (int(v) for v in args.size.split("x"))
    modes = [None if m == "none" else m for m in args.quantize.split(",")]
    dcfg = dit.TransformerConfig.from_dict(configs.load_json(f"{name}/transformer.json"))
    vcfg = vae_lib.VAEConfig.from_dict(configs.load_json(f"{name}/vae.json"))
    mesh = parallel.make_mesh()
    tokenizer = prompt_lib.load_tokenizer(configs.path("tiny") / "tokenizer")
    txt_offset = prompt_lib.read_txt_offset(configs.path(name))
    stream_dit = "transformer_blocks" if offload_lib.streams(args.offload, "transformer") else None
    dit_params = init_sharded(dit.init_params, dcfg, 0, dtype, mesh, dit.param_axes(dcfg), stream_dit,
                              one_layer=lambda c: dataclasses.replace(c, num_layers=1))
    vae_params = init_sharded(vae_lib.init_params, vcfg, 1, dtype, mesh, None)
    factory = text_encoder_factory(name, dcfg, dtype, mesh, args.offload)
    prompt = sized_prompt(tokenizer, txt_offset, args.text_tokens)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  config: {name}  "
          f"dtype: {dtype.name}  size: {height}x{width}  offload: {args.offload}  DiT {tree_bytes(dit_params) / 2**30:.2f} GiB",
          flush=True)

    rows, reference = [], {}
    for mode in modes:
        pipe = LensPipeline(Component(dcfg, dit_params), Component(vcfg, vae_params), tokenizer, factory,
                            txt_offset=txt_offset, dtype=dtype, mesh=mesh, offload=args.offload, quantize=mode,
                            keep_text_encoder=True, compilation_cache=False)
        for variant in args.variants.split(","):
            preset = load_preset(variant)
            call = dict(prompt=prompt, height=height, width=width, output_type="np",
                        num_inference_steps=preset["num_inference_steps"], guidance_scale=preset["guidance_scale"])
            t0 = time.perf_counter()
            first = pipe(seed=0, **call)
            first_s = time.perf_counter() - t0
            per_image_s = median_over_seeds(functools.partial(pipe, **call), args.runs)
            enc = []
            for _ in range(max(1, args.runs)):
                t0 = time.perf_counter()
                pipe.encode_prompt(prompt)
                enc.append(time.perf_counter() - t0)
            stats = jax.devices()[0].memory_stats() or {}
            latents = np.asarray(first.latents, np.float32)
            first_mode = variant not in reference
            reference.setdefault(variant, latents)  # the first --quantize mode is the cosine's reference
            cos = None if first_mode else cosine(latents, reference[variant])
            row = dict(quantize=mode or "none", variant=variant, size=f"{height}x{width}", offload=args.offload,
                       steps=preset["num_inference_steps"], cfg=preset["guidance_scale"],
                       text_tokens=int(first.text_mask[0].sum()), first_call_s=first_s,
                       per_image_s=per_image_s, encode_s=statistics.median(enc),
                       peak_gib=stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
                       dit_device_gib=device_bytes(pipe.dit_params) / 2**30,
                       cosine_vs_first=cos, finite=bool(np.isfinite(latents).all()))
            rows.append(row)
            print(f"quantize={row['quantize']:<5} {variant:<11} steps {row['steps']:>2} cfg {row['cfg']:.1f} "
                  f"text {row['text_tokens']} tok: first call {first_s:6.2f} s, median "
                  + (f"{row['per_image_s']:6.3f}" if per_image_s is not None else "  -   ")
                  + f" s per image (encode {row['encode_s'] * 1e3:.1f} ms)"
                  + f", DiT on device {row['dit_device_gib']:.2f} GiB"
                  + (f", peak {row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else "")
                  + (f", cosine vs {args.quantize.split(',')[0]} {cos:.6f}" if cos is not None else "")
                  + ("" if row["finite"] else ", NON-FINITE latents"), flush=True)
        pipe.release_text_encoder()
        del pipe
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
