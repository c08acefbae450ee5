#!/usr/bin/env python
"""Benchmark the FLUX.2 VAE decoder (real config, random weights): compile time, run time, memory.

Each size runs in its own subprocess so that the device's peak-memory counter belongs to that
size alone. Per size it reports the compile time, the median of --repeats timed decodes, the
device's peak bytes in use (GPU: memory_stats()['peak_bytes_in_use']) and XLA's own buffer
assignment for the compiled program (arguments + outputs + temporaries).

On CPU it also decodes --cpu-size with diffusers.AutoencoderKLFlux2 on the same weights and
prints the time ratio (and the max abs difference of the two images).

  GPU:  python scripts/benchmark_vae.py                      # 1024x1024, 1440x1440, 2080x1040, bf16
        python scripts/benchmark_vae.py --tiled --sizes 2080x1040
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.28 python scripts/benchmark_vae.py   # ~22 GB of an 80 GB card
  CPU:  python scripts/benchmark_vae.py --sizes 256x256 --dtype f32 --repeats 3
        python scripts/benchmark_vae.py --analyze-only        # memory of the real sizes, compile only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1024**3


def _parse_size(s: str) -> tuple[int, int]:
    h, w = (int(v) for v in s.lower().split("x"))
    if h % 16 or w % 16:
        raise SystemExit(f"size {s}: height and width must be multiples of 16")
    return h, w


def _params_and_config(args, dtype):
    import jax

    import lens_jax.vae as V

    config = V.VAEConfig.from_json(args.config) if args.config else V.VAEConfig()
    params = jax.jit(V.init_params, static_argnums=(0, 2))(config, jax.random.PRNGKey(0), dtype)
    # non-trivial BN statistics, as a trained VAE has
    params["bn"]["running_var"] = params["bn"]["running_var"] * 1.5
    return params, config


def run_one(args) -> dict:
    """Benchmark one size in this process; returns a dict of results."""
    import jax
    import jax.numpy as jnp

    import lens_jax.vae as V
    from lens_jax.models.dtypes import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    h, w = _parse_size(args.single)
    params, config = _params_and_config(args, dtype)
    tiling = V.Tiling(args.tile, args.overlap) if args.tiled else None
    th, tw = h // config.token_factor, w // config.token_factor
    tokens = jax.random.normal(jax.random.PRNGKey(1), (args.batch, th * tw, config.token_channels), jnp.float32)

    fn = jax.jit(V.decode_tokens, static_argnames=("config", "h", "w", "tiling"))
    t0 = time.perf_counter()
    compiled = fn.lower(params, config, tokens, th, tw, tiling=tiling).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    xla_bytes = None
    if ma is not None:
        xla_bytes = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    out = {"size": f"{h}x{w}", "dtype": str(jnp.dtype(dtype)), "tiled": bool(tiling), "batch": args.batch,
           "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
           "compile_s": compile_s, "xla_total_gb": xla_bytes / GB if xla_bytes else None,
           "xla_temp_gb": ma.temp_size_in_bytes / GB if ma is not None else None}
    if args.analyze_only:
        return out
    times = []
    img = compiled(params, tokens)
    img.block_until_ready()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        compiled(params, tokens).block_until_ready()
        times.append(time.perf_counter() - t0)
    out["median_s"] = statistics.median(times)
    out["min_s"] = min(times)
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_gb"] = stats["peak_bytes_in_use"] / GB if "peak_bytes_in_use" in stats else None
    out["finite"] = bool(jnp.isfinite(img).all())
    return out


def compare_diffusers(args) -> dict:
    """CPU: decode --cpu-size with diffusers and with lens_jax on the same random weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import AutoencoderKLFlux2

    import lens_jax.vae as V

    torch.manual_seed(0)
    kw = json.loads(Path(args.config).read_text()) if args.config else {}
    kw = {k: v for k, v in kw.items() if not k.startswith("_")}
    model = AutoencoderKLFlux2(**kw).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        vae = V.load(tmp, dtype=jnp.float32)
    h, w = _parse_size(args.cpu_size)
    z = torch.randn(1, vae.config.latent_channels, h // vae.config.spatial_factor, w // vae.config.spatial_factor)
    fn = jax.jit(V.decode, static_argnames=("config",))
    zj = jnp.transpose(jnp.asarray(z.numpy()), (0, 2, 3, 1))
    t0 = time.perf_counter()
    compiled = fn.lower(vae.params, vae.config, zj).compile()
    compile_s = time.perf_counter() - t0
    ours = compiled(vae.params, zj).block_until_ready()
    jt, tt = [], []
    with torch.no_grad():
        ref = model.decode(z).sample
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            compiled(vae.params, zj).block_until_ready()
            jt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.decode(z)
            tt.append(time.perf_counter() - t0)
    diff = float(np.abs(np.transpose(np.asarray(ours), (0, 3, 1, 2)) - ref.numpy()).max())
    return {"size": f"{h}x{w}", "jax_compile_s": compile_s, "jax_median_s": statistics.median(jt),
            "diffusers_median_s": statistics.median(tt), "ratio_diffusers_over_jax":
            statistics.median(tt) / statistics.median(jt), "max_abs_diff": diff,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024x1024,1440x1440,2080x1040", help="HxW pixel sizes, comma separated")
    ap.add_argument("--dtype", default="bf16", help="bf16 or f32 (parameters and activations)")
    ap.add_argument("--tiled", action="store_true", help="tiled decoding with overlap blending")
    ap.add_argument("--tile", type=int, default=64, help="tile side in latent positions (x8 pixels)")
    ap.add_argument("--overlap", type=int, default=16, help="tile overlap in latent positions")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--config", default=None, help="a vae/config.json (default: the real FLUX.2 config)")
    ap.add_argument("--analyze-only", action="store_true", help="compile and report XLA memory, do not run")
    ap.add_argument("--cpu-size", default="256x256", help="size for the diffusers comparison on CPU")
    ap.add_argument("--compare-diffusers", choices=["auto", "yes", "no"], default="auto",
                    help="auto: only when JAX runs on CPU")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--in-process", action="store_true", help="do not spawn a subprocess per size")
    args = ap.parse_args()

    if args.single:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    results = []
    for size in args.sizes.split(","):
        size = size.strip()
        if args.in_process:
            args.single = size
            results.append(run_one(args))
            args.single = None
            continue
        cmd = [sys.executable, __file__, "--single", size] + [a for a in sys.argv[1:]]
        env = dict(os.environ)
        if args.analyze_only and "ynn_fusion_type" not in env.get("XLA_FLAGS", ""):
            # XLA:CPU's memory_analysis does not count buffers inside YNNPACK fusions; without
            # them the CPU buffer assignment is a fair estimate of the program's live memory.
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            results.append({"size": size, "error": " | ".join(tail)})
        else:
            results.append(json.loads(lines[-1][7:]))
        print(json.dumps(results[-1]), flush=True)

    comparison = None
    import jax

    if args.compare_diffusers == "yes" or (args.compare_diffusers == "auto" and jax.default_backend() == "cpu"
                                           and not args.analyze_only):
        comparison = compare_diffusers(args)
        print(json.dumps(comparison), flush=True)

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    print("\nFLUX.2 VAE decode (tokens -> image), real config, random weights")
    print(f"device: {results[0].get('device', '?')} ({results[0].get('backend', '?')})")
    hdr = f"{'size':>10} {'dtype':>9} {'tiled':>5} {'compile s':>9} {'median s':>9} {'peak GB':>8} {'XLA GB':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "error" in r:
            print(f"{r['size']:>10}  ERROR {r['error'][:100]}")
            continue
        print(f"{r['size']:>10} {r['dtype']:>9} {str(r['tiled']):>5} {f(r['compile_s'], '9.1f')} "
              f"{f(r.get('median_s'), '9.3f')} {f(r.get('peak_gb'), '8.2f')} {f(r.get('xla_total_gb'), '7.2f')}")
    if comparison:
        c = comparison
        print(f"\nCPU float32 {c['size']} vs diffusers on the same weights ({c['threads']} torch threads): "
              f"lens_jax {c['jax_median_s']:.3f} s, diffusers {c['diffusers_median_s']:.3f} s, "
              f"diffusers/jax = {c['ratio_diffusers_over_jax']:.2f}x, max |diff| {c['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
