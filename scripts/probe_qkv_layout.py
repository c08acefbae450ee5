"""Probe (issue 11 item 3): the DiT's qkv-to-joint-sequence work on the H100 for three formulations of the block's q/k/v.

Compiled for an H100 (scripts/aot_gpu.py, deviceless; nothing runs) at 1024², one CFG step, each with
`lens_jax.models.transformer._joint_qkv` replaced for this process only (the model is not changed):

- `per stream, qkv first` (the model until 2026-11-24): each stream's `einsum("btd,dchk->cbthk")` (q/k/v
  axis first: XLA computes the GEMM transposed, then transposes the whole qkv), QK RMSNorm, RoPE with
  the pairs sliced apart, then the `[image; text]` concatenation of q, k and v;
- `per stream, tokens first`: the same with `einsum("btd,dchk->btchk")` and strided q/k/v;
- `joint` (the model now): tokens first, the streams concatenated before the norm (per-token norm
  weights) and RoPE as a pair rotation table (`rotate_pairs`, "sum" form), which XLA:GPU writes as one
  kernel per q / k / v.

Prints each step's kernels per block, its roofline and the non-GEMM kernels with q/k/v-shaped results.

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
import jax.numpy as jnp  # noqa: E402


def _sliced_rope(x, cos, sin):
    """RoPE with the pairs sliced apart and stacked back (the model's form until 2026-11-24)."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = x32[..., 0], x32[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.stack([re * c - im * s, re * s + im * c], axis=-1).reshape(x.shape).astype(x.dtype)


def per_stream(order: str):
    """`_joint_qkv` as each stream normed and rotated on its own, then concatenated; `order` of the qkv einsum."""
    from lens_jax.models import transformer as T
    from lens_jax.models.axes import ACT_HEADS, BATCH, constrain
    from lens_jax.models.nn import rms_norm
    from lens_jax.models.quant import einsum_kernel

    def stream(x, p, q_norm, k_norm, rotation, sharding):
        cos, sin = rotation[..., 0, 0], rotation[..., 1, 0]
        y = einsum_kernel(f"btd,dchk->{order}", x, p) + (
            p["bias"].astype(x.dtype)[:, None, None] if order == "cbthk" else p["bias"].astype(x.dtype))
        parts = y if order == "cbthk" else (y[:, :, c] for c in range(3))
        q, k, v = (constrain(z, (BATCH, None, ACT_HEADS, None), sharding) for z in parts)
        return (_sliced_rope(rms_norm(q, q_norm, T.BLOCK_EPS), cos, sin),
                _sliced_rope(rms_norm(k, k_norm, T.BLOCK_EPS), cos, sin), v)

    def qkv(a, x_img, x_txt, rotation, sharding):
        n = x_img.shape[1]
        img = stream(x_img, a["img_qkv"], a["norm_q"]["weight"], a["norm_k"]["weight"], rotation[:n], sharding)
        txt = stream(x_txt, a["txt_qkv"], a["norm_added_q"]["weight"], a["norm_added_k"]["weight"], rotation[n:],
                     sharding)
        return tuple(jnp.concatenate([i, t], 1) for i, t in zip(img, txt))

    return qkv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=512)
    args = ap.parse_args(argv)

    from lens_jax.models import transformer as T

    configs = aot_tpu.load_configs("lens")
    device = aot_gpu.target_device("h100")
    _, peak, bandwidth = aot_gpu.TARGETS["h100"]
    current = T._joint_qkv
    print(f"jax {jax.__version__}; deviceless AOT compile for {device.device_kind}; DiT step {args.size}², batch 2, "
          f"{args.text_tokens} text tokens, bf16; roofline {peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s")
    variants = (("per stream, qkv first (cbthk)", per_stream("cbthk")),
                ("per stream, tokens first (btchk)", per_stream("btchk")), ("joint (the model)", current))
    try:
        for name, fn in variants:
            T._joint_qkv = fn
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
            c = configs["dit"]
            per_head = f",{c.num_attention_heads},{c.attention_head_dim}]"  # q/k/v-shaped results
            paired = f",{c.num_attention_heads},{c.attention_head_dim // 2},2]"  # rotate_pairs' [.., D/2, 2] view
            qkv = [k for k in ks if k.kind not in ("gemm", "attention", "weight slice")
                   and (per_head in k.out_shape or paired in k.out_shape) and not any("attention" in s for s in k.sources)]
            print(f"\n{name}: {len(ks)} kernels per block, roofline {sum(kinds.values()):.2f} ms per step "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in kinds.most_common())}); qkv -> joint q/k/v: {len(qkv)} "
                  f"kernels, {sum(k.bytes for k in qkv) / 1e6:.0f} MB, "
                  f"{sum(1e3 * k.roofline_ms(peak, bandwidth) for k in qkv):.1f} µs per block")
            for k in qkv:
                print(f"  {k.kind:11s} {1e3 * k.roofline_ms(peak, bandwidth):6.1f} µs {k.bytes / 1e6:6.1f} MB  "
                      f"{k.out_shape.split('{')[0]:28s} {', '.join(f'{o} {n}' for o, n in k.ops.most_common(5))}")
    finally:
        T._joint_qkv = current
    return 0


if __name__ == "__main__":
    sys.exit(main())
