#!/usr/bin/env python
"""Benchmark one Lens DiT forward with random weights (no checkpoint needed).

    python scripts/benchmark_transformer.py --config full --height 1024 --width 1024   # GPU
    python scripts/benchmark_transformer.py                                              # CPU: small config

Prints compile time, median step time, achieved TFLOP/s from an analytic FLOP count (and
XLA's own count), MFU against a peak you pass (default: H100 SXM dense bf16, 989 TFLOP/s),
and peak device memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax import transformer as T

CONFIGS = {
    "full": T.TransformerConfig(),
    # Full width, 4 of the 48 blocks: representative per-block cost, CPU-friendly.
    "small": dataclasses.replace(T.TransformerConfig(), num_layers=4),
    "tiny": T.TransformerConfig(
        in_channels=32, out_channels=8, num_layers=2, num_attention_heads=2, attention_head_dim=16,
        enc_hidden_dim=64, axes_dims_rope=(4, 6, 6), selected_layer_index=(0, 1, 2, 3),
    ),
}


def dit_flops(c: T.TransformerConfig, batch: int, n_img: int, n_txt: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward; elementwise work is ignored."""
    d, f, t = c.inner_dim, c.mlp_hidden_dim, n_img + n_txt
    per_block = (
        t * 2 * d * (3 * d + d + 3 * f)  # qkv, out projection, SwiGLU (w1, w3, w2), both streams
        + 2 * 2 * t * t * d  # QK^T and PV over the joint sequence
        + 2 * 2 * d * 6 * d  # img_mod and txt_mod (once per sample)
    )
    embed = 2 * n_img * c.in_channels * d + 2 * n_txt * c.num_text_layers * c.enc_hidden_dim * d
    out = 2 * n_img * d * c.out_dim + 2 * d * 2 * d + 2 * (256 * d + d * d)
    return batch * (c.num_layers * per_block + embed + out)


def random_inputs(c: T.TransformerConfig, batch: int, text_tokens: int, h: int, w: int, dtype):
    """Random DiT weights and one step's inputs: (params, latents [B, h*w, C], text features per selected
    layer, text mask (every other row padded to 3/4), sigma [B])."""
    params = jax.jit(lambda k: T.init_params(c, k, dtype))(jax.random.key(0))
    rng = np.random.default_rng(0)
    b, s = batch, text_tokens
    x = jnp.asarray(rng.standard_normal((b, h * w, c.in_channels)), dtype)
    feats = [jnp.asarray(rng.standard_normal((b, s, c.enc_hidden_dim)), dtype) for _ in range(c.num_text_layers)]
    mask = jnp.asarray(np.arange(s)[None, :] < np.array([s, s * 3 // 4] * b)[:b, None])
    sigma = jnp.asarray(rng.uniform(size=b), jnp.float32)
    return params, x, feats, mask, sigma


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: full on GPU/TPU, small on CPU")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="2 = one CFG step")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--check", action="store_true", help="also report cosine vs an f32 XLA-attention forward")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 SXM bf16 dense)")
    args = ap.parse_args()

    backend = jax.default_backend()
    name = args.config or ("small" if backend == "cpu" else "full")
    c = CONFIGS[name]
    if args.height % 16 or args.width % 16:
        raise SystemExit("--height and --width must be multiples of 16")
    h, w = args.height // 16, args.width // 16
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    impl = {"auto": T.default_attention_impl(dtype), "xla": None, "cudnn": "cudnn"}[args.attention]

    b, s = args.batch, args.text_tokens
    params, x, feats, mask, sigma = random_inputs(c, b, s, h, w, dtype)

    fwd = jax.jit(T.apply, static_argnames=("config", "img_shape", "compute_dtype", "attention_impl"))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, c, x, feats, mask, sigma, (h, w), dtype, impl).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: compiled(params, x, feats, mask, sigma).block_until_ready()  # noqa: E731
    run()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)

    flops = dit_flops(c, b, h * w, s)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    mem = compiled.memory_analysis()
    tflops = flops / step / 1e12

    rows = [
        ("device", f"{jax.devices()[0].device_kind} ({backend})"),
        ("config", f"{name}: {c.num_layers} blocks, inner {c.inner_dim}, {h}x{w} tokens + {s} text, batch {b}"),
        ("dtype / attention", f"{args.dtype} / {impl or 'xla'}"),
        ("compile", f"{compile_s:.2f} s"),
        ("step (median of %d)" % args.runs, f"{step * 1e3:.2f} ms"),
        ("FLOPs (analytic)", f"{flops / 1e9:.1f} GFLOP"),
        ("FLOPs (XLA, scan body once)", f"{xla_flops / 1e9:.1f} GFLOP"),
        ("achieved", f"{tflops:.3g} TFLOP/s"),
        ("MFU", f"{100 * tflops / args.peak_tflops:.3g} % of {args.peak_tflops:.0f} TFLOP/s"),
        ("peak device memory", f"{peak / 2**30:.2f} GiB" if peak else "n/a (CPU)"),
        ("XLA temp allocation", f"{mem.temp_size_in_bytes / 2**30:.2f} GiB" if mem else "n/a"),
    ]
    if args.check:
        with jax.default_matmul_precision("highest"):
            p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
            ref = fwd(p32, c, x.astype(jnp.float32), [f.astype(jnp.float32) for f in feats], mask, sigma,
                      (h, w), jnp.float32, None)
        out = np.asarray(run(), np.float64).ravel()
        ref = np.asarray(ref, np.float64).ravel()
        rows.append(("cosine vs f32/xla", f"{out @ ref / np.linalg.norm(out) / np.linalg.norm(ref):.6f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
