"""CPU attention side by side in one process: lens-jax's attention paths against torch.

Workloads at real widths, float32:
- dit: one DiT block's masked joint attention, batch 2, 24 heads x 64, a 32x32 latent grid
  (1024 image tokens) + 128 text tokens, row 1 with 40 visible text tokens; torch SDPA.
- text: one GPT-OSS attention layer, batch 2, 64 query / 8 key heads x 64, 512 tokens, causal,
  sliding window 128 (alternate layers) or full, per-head sinks; torch runs transformers' eager
  formula (SDPA has no sinks).

    python scripts/benchmark_attention.py --threads 2 [--workload dit text] [--repeats 5] [--blocks 128x512 ...]

Prints the best-of-N wall time per path and the ratio to torch: the dense paths of the first
version (xla / reference), the blocked path in its batched loop order (every (batch, head) pair
in each tile: the CPU default before, the accelerator fallback now), the heads-outer order at
the tile sizes asked for, and what `attention(impl=None)` runs on this backend.
"""

from __future__ import annotations

import argparse
import os

from _timing import best_of


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="CPU cores to pin to (and torch threads)")
    ap.add_argument("--workload", nargs="+", default=["dit", "text"], choices=["dit", "text"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--blocks", nargs="*", default=[], metavar="BQxBK",
                    help="extra heads-outer tile sizes to try, e.g. 128x1152 64x512 (BK 'all': one key block)")
    ap.add_argument("--quick", action="store_true", help="skip the first-generation dense paths (xla / reference)")
    args = ap.parse_args()
    args.blocks = [(int(a), None if b == "all" else int(b)) for a, b in (x.split("x") for x in args.blocks)]
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])  # before jax/torch start threads

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from lens_jax.models import attention as A

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, {args.threads} threads")

    def run_jax(label, arrays, torch_fn, **kw):  # torch_fn: the torch callable to time alongside
        if kw.get("impl") == "blocked":  # the blocked path's own knobs (loop order, tile sizes)
            kw.pop("impl")
            f = jax.jit(lambda q, k, v, m, s: A.blocked(q, k, v, key_mask=m, sinks=s, **kw))
        else:
            f = jax.jit(lambda q, k, v, m, s: A.attention(q, k, v, key_mask=m, sinks=s, **kw))
        ms = best_of(lambda: f(*arrays).block_until_ready(), args.repeats).wall_ms
        with torch.inference_mode():  # torch again, right after: the ratio holds under a changing load
            again = best_of(torch_fn, args.repeats).wall_ms
        print(f"  {label:<44} {ms:8.1f} ms   {ms / again:5.2f}x torch ({again:.1f} ms)", flush=True)
        return ms

    if "dit" in args.workload:
        b, n_img, n_txt, h, d = 2, 1024, 128, 24, 64
        t = n_img + n_txt
        q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
        km = np.ones((b, t), bool)
        km[1, n_img + 40:] = False
        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        tm = torch.from_numpy(km)[:, None, None, :]
        def torch_fn():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm)

        with torch.inference_mode():
            print(f"dit joint attention: B={b} heads={h}x{d} tokens={n_img}+{n_txt}")
            print(f"  {'torch SDPA':<44} {best_of(torch_fn, args.repeats).wall_ms:8.1f} ms", flush=True)
        arrays = tuple(jnp.asarray(x) for x in (q, k, v, km)) + (None,)
        if not args.quick:
            run_jax("jax xla (first)", arrays, torch_fn, impl="xla")
        run_jax("jax blocked, batched order 256x512 (before)", arrays, torch_fn, impl="blocked", heads_outer=False,
                block_q=256, block_k=512)
        for bq, bk in args.blocks:
            run_jax(f"jax blocked, heads outer {bq}x{bk}", arrays, torch_fn, impl="blocked", heads_outer=True,
                    block_q=bq, block_k=bk)
        run_jax("jax default (attention(), impl=None)", arrays, torch_fn)

    if "text" in args.workload:
        b, s, h, kh, d = 2, 512, 64, 8, 64
        q = rng.standard_normal((b, s, h, d)).astype(np.float32)
        k, v = (rng.standard_normal((b, s, kh, d)).astype(np.float32) for _ in range(2))
        km = np.ones((b, s), bool)
        km[1, 300:] = False
        sinks = rng.standard_normal(h).astype(np.float32)
        tq = torch.from_numpy(q).transpose(1, 2)
        tk, tv = (torch.from_numpy(np.repeat(x, h // kh, axis=2)).transpose(1, 2) for x in (k, v))
        ts = torch.from_numpy(sinks)[None, :, None, None]
        for window in (128, None):
            i, j = torch.arange(s)[:, None], torch.arange(s)[None]
            vis = (j <= i) & torch.from_numpy(km)[:, None, None, :]
            if window:
                vis = vis & (i - j < window)

            def torch_eager():  # transformers' eager GPT-OSS attention: sink column, softmax, drop it
                sc = (tq @ tk.transpose(-1, -2)) * d**-0.5
                sc = sc.masked_fill(~vis, torch.finfo(torch.float32).min)
                sc = torch.cat([sc, ts.expand(b, h, s, 1)], dim=-1)
                p = torch.softmax(sc - sc.amax(-1, keepdim=True), dim=-1)[..., :-1]
                return p @ tv

            torch_fn = torch_eager
            with torch.inference_mode():
                print(f"text-encoder attention: B={b} heads={h}/{kh}x{d} tokens={s} window={window} sinks")
                eager_ms = best_of(torch_eager, args.repeats).wall_ms
                print(f"  {'torch eager (transformers formula)':<44} {eager_ms:8.1f} ms", flush=True)
            arrays = tuple(jnp.asarray(x) for x in (q, k, v, km, sinks))
            if not args.quick:
                run_jax("jax reference (first: dense)", arrays, torch_fn, impl="reference", causal=True, window=window)
            run_jax("jax blocked, batched order 256x512 (before)", arrays, torch_fn, impl="blocked", causal=True,
                    window=window, heads_outer=False, block_q=256, block_k=512)
            for bq, bk in args.blocks:
                run_jax(f"jax blocked, heads outer {bq}x{bk}", arrays, torch_fn, impl="blocked", causal=True,
                        window=window, heads_outer=True, block_q=bq, block_k=bk)
            run_jax("jax default (attention(), impl=None)", arrays, torch_fn, causal=True, window=window)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
