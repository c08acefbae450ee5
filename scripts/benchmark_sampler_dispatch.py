#!/usr/bin/env python
"""Dispatch overhead of the host-driven step loop (progress callback) against the one-program sampler.

    python scripts/benchmark_sampler_dispatch.py --steps 20 --runs 5      # tiny random model (CPU)

Both paths sample the same latents with prompt embeddings given (no text encoder); the
difference per step is what the host loop costs (one dispatch + one callback per step).
"""

from __future__ import annotations

import argparse

import numpy as np
from _timing import best_of

from lens_jax import LensPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="square image side in pixels")
    args = ap.parse_args()

    pipe = LensPipeline.tiny_random(seed=0, dtype="f32", compilation_cache=False)
    cfg = pipe.dit_config
    feats = [np.random.default_rng(i).standard_normal((1, 64, cfg.enc_hidden_dim)).astype(np.float32)
             for i in range(cfg.num_text_layers)]
    mask = np.ones((1, 64), bool)
    call = dict(prompt_embeds=feats, prompt_mask=mask, height=args.size, width=args.size,
                num_inference_steps=args.steps, guidance_scale=4.0, seed=0, output_type="np")
    results = {}
    for name, callback in (("one program", None), ("host step loop", lambda i, t, x: None)):
        # The warm-up call compiles; `np.asarray` waits for the images.
        best = best_of(lambda: np.asarray(pipe(**call, callback=callback).images), args.runs).wall_ms / 1e3
        results[name] = best
        print(f"{name:15s} {best * 1e3:8.2f} ms (min of {args.runs}), {best / args.steps * 1e3:.3f} ms/step")
    extra = (results["host step loop"] - results["one program"]) / args.steps
    print(f"host loop overhead: {extra * 1e3:+.3f} ms per step")


if __name__ == "__main__":
    main()
