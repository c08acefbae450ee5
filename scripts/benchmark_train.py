"""Train-step benchmark: step time, achieved TFLOP/s, MFU and peak memory of the Lens DiT train step.

    python scripts/benchmark_train.py                         # tiny config (CPU), full fine-tune
    python scripts/benchmark_train.py --lora --rank 32        # LoRA on attention + MLP
    python scripts/benchmark_train.py --real --size 1024 --batch 1 --lora --rank 32   # real DiT (GPU)

FLOPs are counted analytically (`lens_jax.training.trainer.step_flops`): forward, backward and the
rematerialised forward (policy "full" recomputes the block; "dots" keeps matmul outputs). MFU
divides by --peak-tflops (default: H100 SXM bf16 dense 989 on GPU; none on CPU). Random weights
and features: the step's cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lens_jax import configs  # noqa: E402
from lens_jax.models import transformer as dit  # noqa: E402
from lens_jax.training.config import config_from_dict  # noqa: E402
from lens_jax.training.trainer import Trainer, step_flops  # noqa: E402

PEAK_TFLOPS = {"gpu": 989.0}


class _Batches:
    """A fixed random batch (no cache needed)."""

    def __init__(self, batch):
        self.b = batch

    def iterator(self, state=None):
        while True:
            yield self.b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="the real 3.8B DiT config (random weights)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 256 tiny, 1024 real)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--remat", default="dots", help="full | dots | none")
    ap.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--fsdp", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    args = ap.parse_args()

    backend = jax.default_backend()
    config = (dit.TransformerConfig() if args.real
              else dit.TransformerConfig.from_dict(configs.load_json("tiny/transformer.json")))
    size = args.size or (1024 if args.real else 256)
    h = w = size // 16
    dtype = args.dtype or ("bfloat16" if backend != "cpu" else "float32")
    remat = None if args.remat == "none" else args.remat
    params = jax.jit(dit.init_params, static_argnums=(0, 2))(config, jax.random.key(0), jax.numpy.float32)
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((args.batch, h * w, config.in_channels), np.float32),
             "features": [rng.standard_normal((args.batch, args.text_len, config.enc_hidden_dim), np.float32)
                          for _ in range(config.num_text_layers)],
             "mask": np.ones((args.batch, args.text_len), bool), "grid": (h, w)}
    cfg = config_from_dict({"model": {"compute_dtype": dtype, "remat": remat},
                            "lora": {"enabled": args.lora, "rank": args.rank},
                            "parallel": {"fsdp": args.fsdp},
                            "train": {"output_dir": "/tmp/lens_benchmark_train", "progress": False}})
    trainer = Trainer(cfg, config, params, _Batches(batch))
    del params
    state = trainer.state
    dev = trainer.device_batch(batch)
    t0 = time.perf_counter()
    state, m = trainer._jit_step(state, dev)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = trainer._jit_step(state, dev)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    flops = step_flops(config, args.batch, h * w, args.text_len, remat, args.lora)
    tflops = flops / step_s / 1e12
    peak = args.peak_tflops or PEAK_TFLOPS.get(backend)
    stats = jax.devices()[0].memory_stats() or {}
    result = {"backend": backend, "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
              "model": "real" if args.real else "tiny", "size": size, "batch": args.batch, "text_len": args.text_len,
              "mode": f"lora r{args.rank}" if args.lora else "full", "dtype": dtype, "remat": remat,
              "first_step_s": round(compile_s, 2), "step_s": round(step_s, 5), "flops_per_step": flops,
              "tflops": round(tflops, 4), "mfu": round(tflops / peak, 4) if peak else None,
              "peak_memory_gib": round(stats["peak_bytes_in_use"] / 2**30, 3) if "peak_bytes_in_use" in stats else None,
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
              "load_average_1min": round(os.getloadavg()[0], 1),
              "loss": float(m["loss"])}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
