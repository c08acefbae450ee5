#!/usr/bin/env python
"""One GPT-OSS MoE layer through every expert dispatch, at the real routing shape, per token count.

    python scripts/benchmark_moe.py                                  # CPU: 64 / 192 / 1024 tokens, f32
    python scripts/benchmark_moe.py --tokens 64 192 1024 --impls grouped ragged dense --runs 3
    python scripts/benchmark_moe.py --impls grouped --before        # also the pre-issue-11 decode, same process

Real GPT-OSS-20B widths (hidden 2880, expert width 2880, 32 experts, top-4), experts MXFP4-packed
(uint8 blocks/scales, dequantised inside the jit as the encoder does), random weights and a
random router (so routing is roughly uniform over experts; real prompts are more skewed, which
favours grouped further: fewer experts to dequantise). Prints, per token count, the best-of-N
time of each dispatch, which one won, the time of dequantising one layer's experts alone (the
floor every packed dispatch pays once all experts are hit), and the largest difference of each
dispatch's output from the dense one. Feed the winners into
`lens_jax.models.text_encoder.MOE_DISPATCH`.
"""

from __future__ import annotations

import argparse
import os
import time

from _timing import best_of


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 192, 1024])
    ap.add_argument("--impls", nargs="+", default=None, help="default: every fixed dispatch")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--width", type=int, default=2880, help="hidden = expert width (real: 2880)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default=None, help="default: f32 on CPU, bf16 elsewhere")
    ap.add_argument("--dequantized", action="store_true", help="float experts instead of MXFP4-packed")
    ap.add_argument("--threads", type=int, default=None, help="pin to this many cores (CPU)")
    ap.add_argument("--before", action="store_true",
                    help="also time each dispatch with the earlier MXFP4 path (table gathers, then a transposed "
                         "copy of every expert matrix), alternating with the current one in this process")
    args = ap.parse_args()
    if args.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lens_jax.models import mxfp4
    from lens_jax.models import text_encoder as T

    backend = jax.default_backend()
    dtype = jnp.dtype({"f32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype or ("f32" if backend == "cpu" else "bf16")])
    impls = args.impls or list(T.MOE_FIXED_IMPLS)
    w = args.width
    cfg = T.TextEncoderConfig(vocab_size=16, hidden_size=w, intermediate_size=w, num_hidden_layers=1,
                              num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                              num_experts_per_tok=4, sliding_window=128, layer_types=(T.SLIDING,))
    params = jax.jit(lambda k: T.init_params(cfg, k, dtype, packed=not args.dequantized))(jax.random.key(0))
    experts = params["layers"]["mlp"]["experts"]
    router = {"kernel": jax.random.normal(jax.random.key(1), (w, cfg.num_local_experts), dtype) * w**-0.5,
              "bias": jnp.zeros((cfg.num_local_experts,), dtype)}
    print(f"jax {jax.__version__} ({backend}, {jax.devices()[0].device_kind}), {dtype.name}, width {w}, "
          f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, "
          f"experts {'dequantised' if args.dequantized else 'MXFP4 packed'}", flush=True)

    if not args.dequantized:
        def dequant_all(experts):
            return [mxfp4.dequantize(experts[f"{n}_blocks"][0], experts[f"{n}_scales"][0], dtype)
                    for n in ("gate_up_proj", "down_proj")]

        f = jax.jit(dequant_all)
        jax.block_until_ready(f(experts))
        deq_ms, deq_cpu = best_of(lambda: jax.block_until_ready(f(experts)), args.runs, warmup=False)
        print(f"dequantise one layer's 32 experts alone: {deq_ms:.0f} ms (CPU time {deq_cpu:.0f} ms)", flush=True)

    def legacy_expert_weight(experts, name, index, dtype, fast=False):
        """The decode before issue 11 item 4: two LUT gathers, a stack, ldexp, a multiply, and a swap of
        the last two axes (a transposed copy of every expert matrix)."""
        if name in experts:
            return experts[name][index].astype(dtype), False
        blocks, scales = experts[f"{name}_blocks"][index], experts[f"{name}_scales"][index]
        lut = jnp.asarray(mxfp4.FP4_VALUES, dtype)
        lo = jnp.take(lut, (blocks & 0x0F).astype(jnp.int32), mode="clip")
        hi = jnp.take(lut, (blocks >> 4).astype(jnp.int32), mode="clip")
        vals = jnp.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], mxfp4.BLOCK)
        scale = jnp.ldexp(jnp.ones((), jnp.float32), scales.astype(jnp.int32) - mxfp4.SCALE_BIAS).astype(dtype)
        return jnp.swapaxes((vals * scale[..., None]).reshape(*blocks.shape[:-2], -1), -1, -2), False

    current = T._expert_weight  # swapped for legacy_expert_weight only while tracing a "before" program

    rows = []
    rng = np.random.default_rng(0)
    for t in args.tokens:
        x = jnp.asarray(rng.standard_normal((t, w)), dtype)

        def layer(x, experts, router, impl):
            weights, idx = T.route(x, router, cfg.num_experts_per_tok)
            return T.moe(x, experts, 0, weights, idx, cfg, impl)

        hit = int(np.unique(np.asarray(T.route(x, router, 4)[1])).size)
        outs, times, cpus = {}, {}, {}
        for impl in impls:
            t0 = time.perf_counter()
            fn = jax.jit(layer, static_argnums=3).lower(x, experts, router, impl).compile()
            compile_s = time.perf_counter() - t0
            outs[impl] = np.asarray(fn(x, experts, router), np.float32)
            if args.before and not args.dequantized:
                T._expert_weight = legacy_expert_weight
                # a new function object, so that jax traces again (a jit of `layer` itself would reuse its trace)
                old = jax.jit(lambda *a: layer(*a), static_argnums=3).lower(x, experts, router, impl).compile()
                assert "gather(" in old.as_text(), "the 'before' program did not pick up the earlier decode"
                T._expert_weight = current
                same = np.array_equal(np.asarray(old(x, experts, router), np.float32), outs[impl])
                pairs = [(best_of(lambda: jax.block_until_ready(old(x, experts, router)), 1, warmup=False),
                          best_of(lambda: jax.block_until_ready(fn(x, experts, router)), 1, warmup=False))
                         for _ in range(args.runs)]
                (bw, bc), (nw, nc) = min(p[0] for p in pairs), min(p[1] for p in pairs)
                print(f"  tokens {t:5d}  {impl:<8} before {bw:9.1f} ms (CPU {bc:9.1f})  now {nw:9.1f} ms (CPU {nc:9.1f})"
                      f"  CPU-time ratio now/before {nc / bc:.2f}; outputs bit-equal: {same}", flush=True)
            times[impl], cpu = best_of(lambda: jax.block_until_ready(fn(x, experts, router)), args.runs, warmup=False)
            cpus[impl] = cpu
            print(f"  tokens {t:5d}  {impl:<8} {times[impl]:9.1f} ms   CPU time {cpu:9.1f} ms   "
                  f"(compile {compile_s:.1f} s)", flush=True)
        ref = outs.get("dense", next(iter(outs.values())))
        scale = float(np.abs(ref).max())
        for impl in impls:
            rows.append((t, impl, times[impl], float(np.abs(outs[impl] - ref).max()) / scale, hit, cpus[impl]))
        auto = T.resolve_moe_impl(t, backend)
        print(f"  tokens {t:5d}: fastest {min(times, key=times.get)}; table ('auto') picks {auto}; "
              f"{hit} of 32 experts hit", flush=True)

    print()
    print(f"| tokens | experts hit | {' | '.join(f'{i} wall (CPU)' for i in impls)} | fastest | "
          "max abs diff vs dense / max abs |")
    print(f"|---|---|{'---|' * len(impls)}---|---|")
    for t in args.tokens:
        r = [row for row in rows if row[0] == t]
        fastest = min(r, key=lambda row: row[2])[1]
        diffs = ", ".join(f"{row[1]} {row[3]:.1e}" for row in r if row[1] != "dense")
        cells = " | ".join(f"{row[2]:.0f} ms ({row[5]:.0f})" for row in r)
        print(f"| {t} | {r[0][4]} | {cells} | {fastest} | {diffs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
