#!/usr/bin/env python
"""Benchmark Lens' GPT-OSS text encoder (features after layers 5, 11, 17, 23) with random weights.

    python scripts/benchmark_text_encoder.py --config full            # GPU: real config, packed MXFP4, bf16
    python scripts/benchmark_text_encoder.py                          # CPU: small config vs transformers
    python scripts/benchmark_text_encoder.py --config small --moe all # every MoE dispatch

Reports compile time, median forward time (batch 2 x 512 tokens by default), parameter bytes
and peak device memory (GPU/TPU memory stats). With --compare-torch (default on CPU) the
same weights run through transformers' GptOssForCausalLM (eager attention) in the same
process and the ratio is printed; the experts are MXFP4-representable so the packed JAX
model and the float PyTorch model hold identical weights. --moe-layer times one MoE layer
alone for each dispatch (grouped / ragged / dense all-experts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax import configs
from lens_jax import text_encoder as T_public
from lens_jax.models import mxfp4
from lens_jax.models import text_encoder as T

# openai/gpt-oss-20b as shipped in Lens (the packaged text_encoder/config.json), kept to the fields the
# encoder and its transformers twin read: the file's others would change the twin (e.g. pad_token_id
# 199999 is no embedding row of the smaller vocabularies below; dtype, initializer_range).
TWIN_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
               "sliding_window", "rms_norm_eps", "swiglu_limit", "attention_bias", "max_position_embeddings",
               "initial_context_length", "layer_types", "rope_parameters", "quantization_config")
REAL = {k: v for k, v in configs.load_json("lens/text_encoder.json").items() if k in TWIN_FIELDS}
REAL["quantization_config"] = {"quant_method": REAL["quantization_config"]["quant_method"]}
CONFIGS = {
    "full": REAL,
    # The real routing shape (32 experts, top-4, window 128, GQA 8) at a CPU-friendly width/depth.
    "small": {**REAL, "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2, "layer_types": ["sliding_attention", "full_attention"] * 2},
    # The golden tiny checkpoint's shape.
    "tiny": {**REAL, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
             "num_experts_per_tok": 2, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"] * 2},
}


def tree_bytes(tree) -> int:
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def temp_bytes(compiled) -> int | None:
    """Scratch memory XLA reserves for one call (besides parameters, inputs and outputs)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def build_torch_twin(cfg_dict: dict, folder: Path, seed: int = 0):
    """A random GptOssForCausalLM whose experts are MXFP4-representable, plus its MXFP4 folder on disk."""
    import torch
    import transformers
    from safetensors.numpy import save_file

    hf_cfg = {k: v for k, v in cfg_dict.items() if k not in ("model_type", "quantization_config")}
    config = transformers.GptOssConfig(**hf_cfg, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-2] if name.endswith("_proj") and "experts" in name else p.shape[-1]
            std = 1.0 if ("sinks" in name or "embed" in name) else (0.2 if name.endswith("bias") else fan_in**-0.5)
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "layernorm" in name or name == "model.norm.weight" else 0.0))
            value = p.numpy()
            if "experts" in name and name.endswith("_proj"):  # [E, in, out] -> MXFP4 over `in`
                # one expert at a time: quantize_np's temporaries are ~10x the input (a real-width layer
                # at once needs ~20 GB)
                packed = [mxfp4.quantize_np(value[e].T) for e in range(value.shape[0])]
                blocks, scales = (np.stack([q[i] for q in packed]) for i in (0, 1))
                for e in range(value.shape[0]):
                    p[e].copy_(torch.from_numpy(mxfp4.dequantize_np(blocks[e], scales[e]).T.copy()))
                tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            else:
                tensors[name] = np.ascontiguousarray(value)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg_dict))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: full on GPU/TPU, small on CPU")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default=None, help="default: bf16 on GPU/TPU, f32 on CPU")
    ap.add_argument("--moe", choices=[*T.MOE_IMPLS, "all"], default="grouped")
    ap.add_argument("--moe-chunk", type=int, default=None, help="rows per expert chunk (grouped dispatch)")
    ap.add_argument("--dequantized", action="store_true", help="dequantise the experts up front instead of packed")
    ap.add_argument("--layers", default="5,11,17,23", help="selected layers (clipped to the config's depth)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compare-torch", action=argparse.BooleanOptionalAction, default=None,
                    help="time transformers on the same weights (default: on for CPU non-full configs)")
    ap.add_argument("--moe-layer", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one MoE layer alone per dispatch")
    args = ap.parse_args()

    backend = jax.default_backend()
    name = args.config or ("small" if backend == "cpu" else "full")
    cfg_dict = CONFIGS[name]
    config = T.TextEncoderConfig.from_dict(cfg_dict)
    dtype = jnp.dtype({"bf16": jnp.bfloat16, "f32": jnp.float32}[args.dtype or ("f32" if backend == "cpu" else "bf16")])
    n_layers = config.num_hidden_layers
    selected = tuple(sorted({min(int(i), n_layers - 1) for i in args.layers.split(",")}))
    compare = args.compare_torch if args.compare_torch is not None else (backend == "cpu" and name != "full")
    # "all": every dispatch, less the GPU kernels on CPU (Pallas interpret mode there: tests only)
    every = [i for i in T.MOE_IMPLS if backend != "cpu" or i not in T.MOE_KERNEL_IMPLS]
    impls = every if args.moe == "all" else [args.moe]
    b, s = args.batch, args.tokens
    print(f"backend {backend} ({jax.devices()[0].device_kind}), config {name}, dtype {dtype.name}, batch {b} x {s} "
          f"tokens, layers {selected}, experts {'dequantised' if args.dequantized else 'MXFP4 packed'}")

    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(b, s))
    mask = np.ones((b, s), np.int64)
    mask[1:, s * 3 // 4:] = 0  # second prompt right-padded, as in a CFG batch

    tmp = None
    torch_model = None
    t0 = time.perf_counter()
    if compare:
        tmp = tempfile.TemporaryDirectory()
        torch_model = build_torch_twin(cfg_dict, Path(tmp.name))
        te = T_public.load(tmp.name, selected, dtype, keep_mxfp4=not args.dequantized)
        params = te.params
    else:
        init = jax.jit(lambda k: T.init_params(config, k, dtype, packed=not args.dequantized))
        params = jax.block_until_ready(init(jax.random.key(0)))
    print(f"weights ready in {time.perf_counter() - t0:.1f} s; parameter bytes {tree_bytes(params) / 2**30:.2f} GiB")

    ids_j, mask_j = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
    rows = []
    outputs = {}
    for impl in impls:
        t0 = time.perf_counter()
        compiled = T.apply.lower(params, config, ids_j, mask_j, selected, impl, args.moe_chunk).compile()
        compile_s = time.perf_counter() - t0
        outputs[impl] = compiled(params, ids_j, mask_j)
        jax.block_until_ready(outputs[impl])
        run_s = median_time(lambda: compiled(params, ids_j, mask_j), args.runs)
        rows.append((f"jax encoder, moe={impl}", compile_s, run_s, temp_bytes(compiled)))

    torch_s = None
    if torch_model is not None:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        hooks_out = {}
        hooks = [torch_model.model.layers[i].register_forward_hook(
            lambda m, inp, out, i=i: hooks_out.__setitem__(i, out[0] if isinstance(out, tuple) else out))
            for i in selected]
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

        def torch_forward():
            with torch.no_grad():
                torch_model.model(input_ids=t_ids, attention_mask=t_mask)

        torch_forward()
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            torch_forward()
            times.append(time.perf_counter() - t0)
        torch_s = statistics.median(times)
        rows.append(("transformers GptOss (eager attn, all layers)", None, torch_s, None))
        for h in hooks:
            h.remove()
        for impl, outs in outputs.items():
            errs = [float(np.max(np.abs(np.asarray(o, np.float32) - hooks_out[i].float().numpy())))
                    for i, o in zip(selected, outs)]
            scale = max(float(np.max(np.abs(hooks_out[i].float().numpy()))) for i in selected)
            print(f"parity moe={impl}: max abs error per selected layer {['%.2e' % e for e in errs]} "
                  f"(max |value| {scale:.1f})")

    moe_rows = []
    if args.moe_layer:
        x = jnp.asarray(rng.standard_normal((b * s, config.hidden_size)), dtype)
        router = jax.tree.map(lambda a: a[0], params["layers"]["mlp"]["router"])
        experts = params["layers"]["mlp"]["experts"]
        for impl in every if args.moe == "all" or backend == "cpu" else impls:
            def one_layer(x, experts, router, impl=impl):
                w, idx = T.route(x, router, config.num_experts_per_tok)
                return T.moe(x, experts, 0, w, idx, config, impl, args.moe_chunk)

            fn = jax.jit(one_layer).lower(x, experts, router).compile()
            jax.block_until_ready(fn(x, experts, router))
            moe_rows.append((impl, median_time(lambda: fn(x, experts, router), args.runs)))

    peak = peak_memory()
    print()
    print("| what | compile s | median s | transformers time / this | forward temp GiB (XLA) |")
    print("|---|---|---|---|---|")
    for what, comp, run, temp in rows:
        ratio = f"{torch_s / run:.2f}" if torch_s and comp is not None else ""
        temp_s = "" if temp is None else f"{temp / 2**30:.3f}"
        print(f"| {what} | {'' if comp is None else f'{comp:.1f}'} | {run:.4f} | {ratio} | {temp_s} |")
    if moe_rows:
        dense_s = dict(moe_rows).get("dense")
        print()
        print(f"| one MoE layer ({b * s} tokens, {config.num_local_experts} experts, top-{config.num_experts_per_tok}) "
              f"| median s | vs dense all-experts |")
        print("|---|---|---|")
        for impl, run in moe_rows:
            print(f"| {impl} | {run:.4f} | {f'{dense_s / run:.2f}x' if dense_s else ''} |")
    print()
    print(f"parameter bytes: {tree_bytes(params) / 2**30:.2f} GiB"
          + (f"; peak device memory (process, incl. random init): {peak / 2**30:.2f} GiB" if peak
             else " (no device memory stats on this backend)"))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
