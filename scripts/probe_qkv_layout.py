"""Probe (issue 11 item 3): does the DiT's qkv transpose go away with a tokens-first qkv einsum, and what is it worth?

`lens_jax.models.transformer._qkv` computes `einsum("btd,dchk->cbthk")` (q/k/v axis first); compiled
for an H100 (scripts/aot_gpu.py, deviceless) XLA runs that GEMM transposed and then transposes the
whole qkv tensor. This compiles the 1024² DiT step twice, as is and with `_qkv` replaced (for this
process only) by `einsum("btd,dchk->btchk")` + strided q/k/v, and prints both steps' kernels per
block and roofline, and the non-GEMM kernels with q/k/v-shaped results. The model is not changed.

    python scripts/probe_qkv_layout.py          # in the CUDA venv of docs/aot_gpu.md
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aot_gpu  # noqa: E402  (sets JAX_PLATFORMS=cpu before jax loads)
import _hlo_kernels as hk  # noqa: E402
import aot_tpu  # noqa: E402
import jax  # noqa: E402


def qkv_tokens_first(x, p, q_norm, k_norm, heads, cos, sin, sharding):
    """`transformer._qkv` with the projection's output laid out [B, T, 3, heads, head_dim]."""
    from lens_jax.models import transformer as T
    from lens_jax.models.axes import ACT_HEADS, BATCH, constrain
    from lens_jax.models.nn import rms_norm
    from lens_jax.models.quant import einsum_kernel

    y = einsum_kernel("btd,dchk->btchk", x, p) + p["bias"].astype(x.dtype)
    q, k, v = (constrain(y[:, :, c], (BATCH, None, ACT_HEADS, None), sharding) for c in range(3))
    q = T.apply_rope(rms_norm(q, q_norm, T.BLOCK_EPS), cos, sin)
    k = T.apply_rope(rms_norm(k, k_norm, T.BLOCK_EPS), cos, sin)
    return q, k, v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=512)
    args = ap.parse_args(argv)

    from lens_jax.models import transformer as T

    configs = aot_tpu.load_configs("lens")
    device = aot_gpu.target_device("h100")
    _, peak, bandwidth = aot_gpu.TARGETS["h100"]
    original = T._qkv
    print(f"jax {jax.__version__}; deviceless AOT compile for {device.device_kind}; DiT step {args.size}², batch 2, "
          f"{args.text_tokens} text tokens, bf16; roofline {peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s")
    try:
        for name, fn in (("cbthk (as is)", original), ("btchk (tokens first)", qkv_tokens_first)):
            T._qkv = fn
            jax.clear_caches()  # the jitted forward would otherwise reuse the first trace
            with aot_gpu.gpu_host():
                compiled = aot_gpu.compile_dit_step(configs, device, args.size, args.text_tokens)
            module = hk.parse(compiled.as_text())
            body = hk.layer_loop(module, configs["dit"].num_layers)
            ks = hk.kernels(module, body, peak, bandwidth)
            layers = hk.trip_count(module, body) or configs["dit"].num_layers
            kinds = collections.Counter()
            for k in ks:
                kinds[k.kind] += layers * k.roofline_ms(peak, bandwidth)
            print(f"\n{name}: {len(ks)} kernels per block, roofline {sum(kinds.values()):.2f} ms per step "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in kinds.most_common())})")
            c = configs["dit"]
            per_head = f",{c.num_attention_heads},{c.attention_head_dim}]"  # q/k/v-shaped results
            for k in ks:
                if k.kind not in ("gemm", "attention", "slice", "weight slice") and per_head in k.out_shape:
                    print(f"  {k.kind:11s} {1e3 * k.roofline_ms(peak, bandwidth):6.1f} µs  {k.out_shape.split('{')[0]:24s} "
                          f"{', '.join(f'{o} {n}' for o, n in k.ops.most_common(5))}")
    finally:
        T._qkv = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
