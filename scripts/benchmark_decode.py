#!/usr/bin/env python
"""Benchmark GPT-OSS decoding (the prompt reasoner's local route) with random weights: tokens/s.

    python scripts/benchmark_decode.py                         # CPU: "small" config, batch 1 and 8
    python scripts/benchmark_decode.py --config full --batch 1 8 --prompt-len 256 --new-tokens 256   # GPU, real size

Random weights (MXFP4-packed experts as in the real checkpoint, bf16 elsewhere on GPU/TPU,
f32 on CPU) with the causal-LM head; random prompt ids; `stop_tokens=()` so every run
decodes exactly `--new-tokens` tokens. Reports the compile time, the prefill time (one call
with max_new_tokens=1) and the decode rate: (new tokens - 1) * batch / (total - prefill),
medians over --runs. Decode speed does not depend on the weights' values, except that the
MoE routing decides which experts are read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax import configs
from lens_jax import text_encoder as T
from lens_jax.models import gpt_oss_decode as dec

# openai/gpt-oss-20b as shipped in Lens (the packaged text_encoder/config.json).
REAL = configs.load_json("lens/text_encoder.json")
CONFIGS = {
    "full": REAL,
    # The real routing shape (32 experts, top-4, window 128, GQA 8) at a CPU-friendly width/depth.
    "small": {**REAL, "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2,
              "layer_types": ["sliding_attention", "full_attention"] * 2},
}


def run_generate(te, ids, new_tokens):
    t0 = time.perf_counter()
    out = te.generate(ids, max_new_tokens=new_tokens, stop_tokens=())
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default: bf16 on GPU/TPU, f32 on CPU")
    ap.add_argument("--moe", default="grouped", choices=list(T.MOE_IMPLS))
    args = ap.parse_args()

    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    config = T.TextEncoderConfig.from_dict(CONFIGS[args.config])
    params = jax.jit(lambda k: T.init_params(config, k, dtype, packed=True, lm_head=True))(jax.random.key(0))
    te = T.CausalLM(config, params, (config.num_hidden_layers - 1,), moe_impl=args.moe)
    assert dec.has_lm_head(te.params)
    rng = np.random.default_rng(0)
    results = []
    for b in args.batch:
        ids = rng.integers(0, 1000, (b, args.prompt_len))
        t_first, _ = run_generate(te, ids, 1)  # compiles the max_new_tokens=1 program
        t_first_full, out = run_generate(te, ids, args.new_tokens)  # compiles the full program
        assert out.shape == (b, args.new_tokens)
        prefill = statistics.median(run_generate(te, ids, 1)[0] for _ in range(args.runs))
        total = statistics.median(run_generate(te, ids, args.new_tokens)[0] for _ in range(args.runs))
        rate = (args.new_tokens - 1) * b / max(total - prefill, 1e-9)
        row = dict(config=args.config, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                   dtype=str(dtype), batch=b, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                   first_call_s=round(t_first_full, 2), prefill_s=round(prefill, 4), total_s=round(total, 3),
                   decode_tokens_per_s=round(rate, 1), per_row_tokens_per_s=round(rate / b, 1))
        results.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
