#!/usr/bin/env python
"""The same workload through lens-jax and through PyTorch, in one process, on the same random weights.

    python scripts/benchmark_vs_torch.py --reference-dit /path/to/upstream/lens_transformer_ref.py

- DiT: the upstream PyTorch `LensTransformer2DModel` (imported from the file you give; lens-jax
  never ships it) at real width with `--dit-blocks` blocks; its state dict is converted to ours
  with the lens_jax.weights.dit mapping. Batch 2 (one CFG step), a 32x32 token grid + 128 text tokens.
- Text encoder: transformers `GptOssForCausalLM` (eager attention) at real width with
  `--te-layers` layers, experts MXFP4-representable so the packed JAX encoder holds the same weights.
- VAE: diffusers `AutoencoderKLFlux2` decode of the same latents (real config).

Prints the median time of each, the ratio torch / jax (> 1: lens-jax is faster) and the largest
difference between the two outputs. Defaults follow issue 11's CPU setup (f32, 2 threads).
Skip parts with --skip dit,text_encoder,vae. On a GPU: `--torch-device cuda --dtype bf16` (PyTorch on
the same GPU, both sides in bfloat16; the torch times include a `torch.cuda.synchronize()`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _timing import best_of

ROOT = Path(__file__).resolve().parents[1]


def torch_side(args):
    """(device, dtype, sync) for the PyTorch side: sync() waits for queued CUDA work (no-op on CPU)."""
    import torch

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.torch_device == "cuda":
        return torch.device("cuda"), dtype, torch.cuda.synchronize
    return torch.device("cpu"), dtype, lambda: None


def jax_dtype(args):
    return jnp.float32 if args.dtype == "f32" else jnp.bfloat16


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def timed_pair(jax_fn, torch_fn, runs: int) -> tuple[float, float]:
    """Median times of the two, run alternately so that a change in machine load hits both alike."""
    import torch

    times: tuple[list, list] = ([], [])
    with torch.no_grad():
        for _ in range(runs):
            for fn, out in ((jax_fn, times[0]), (torch_fn, times[1])):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def randomise(model, seed: int) -> None:
    """N(0, 1/fan_in) Linear/conv weights, small biases, norm weights ~1, so nothing is zero-initialised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("lens_transformer_ref", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--reference-dit {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LensTransformer2DModel


def bench_dit(args) -> dict:
    import torch
    from safetensors.torch import save_file

    from lens_jax.models import transformer as dit
    from lens_jax.weights.dit import convert_transformer

    ref_cls = load_reference(args.reference_dit)
    cfg = json.loads((ROOT / "lens_jax/configs/lens/transformer.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["num_layers"] = args.dit_blocks
    model = ref_cls(**{k: v for k, v in cfg.items() if k != "inner_dim"}).eval()
    randomise(model, 0)
    device, tdtype, sync = torch_side(args)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/diffusion_pytorch_model.safetensors")
        Path(tmp, "config.json").write_text(json.dumps(cfg))
        config, params = convert_transformer(tmp, np.float32)
    params = jax.tree.map(lambda a: jnp.asarray(a, jax_dtype(args)), params)
    model = model.to(device, tdtype)

    b, (h, w), s = args.batch, args.grid, args.text_tokens
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h * w, config.in_channels)).astype(np.float32)
    feats = [rng.standard_normal((b, s, config.enc_hidden_dim)).astype(np.float32) for _ in range(config.num_text_layers)]
    mask = np.arange(s)[None] < np.array([s, s * 3 // 4] * b)[:b, None]
    sigma = rng.uniform(size=b).astype(np.float32)

    fwd = jax.jit(dit.apply, static_argnames=("config", "img_shape", "compute_dtype", "attention_impl"))
    jargs = (params, config, jnp.asarray(x), [jnp.asarray(f) for f in feats], jnp.asarray(mask), jnp.asarray(sigma),
             (h, w), jax_dtype(args), dit.default_attention_impl(jax_dtype(args)))  # cuDNN for bf16 on GPU
    t0 = time.perf_counter()
    ours = np.asarray(fwd(*jargs), np.float32)
    compile_s = time.perf_counter() - t0
    t_args = (torch.from_numpy(x).to(device, tdtype), [torch.from_numpy(f).to(device, tdtype) for f in feats],
              torch.from_numpy(mask).to(device), torch.from_numpy(sigma).to(device, tdtype))
    with torch.no_grad():
        ref = to_numpy(model(*t_args, img_shapes=[(1, h, w)]))
    jax_s, torch_s = timed_pair(lambda: fwd(*jargs).block_until_ready(),
                                lambda: (model(*t_args, img_shapes=[(1, h, w)]), sync()), args.runs)
    return dict(what=f"DiT, {args.dit_blocks} blocks (width {config.inner_dim}), batch {b}, {h}x{w} + {s} tokens",
                jax_s=jax_s, torch_s=torch_s, compile_s=compile_s, max_abs=float(np.abs(ours - ref).max()),
                cosine=cosine(ours, ref), torch_name="upstream LensTransformer2DModel")


def bench_text_encoder(args) -> dict:
    import torch

    spec = importlib.util.spec_from_file_location("benchmark_text_encoder", ROOT / "scripts/benchmark_text_encoder.py")
    bte = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bte)
    from lens_jax.models import text_encoder as T
    from lens_jax.weights.text_encoder import load

    layers = args.te_layers
    # Real layer widths; a small vocabulary (the embedding lookup costs nothing, the 201k-row table 2.3 GB).
    cfg = {**bte.REAL, "num_hidden_layers": layers, "layer_types": bte.REAL["layer_types"][:layers],
           "vocab_size": args.te_vocab}
    selected = tuple(range(layers))
    b, s = args.batch, args.text_tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg["vocab_size"], size=(b, s))
    mask = np.ones((b, s), np.int64)
    mask[1:, s * 3 // 4:] = 0
    with tempfile.TemporaryDirectory() as tmp:
        model = bte.build_torch_twin(cfg, Path(tmp))
        te = load(tmp, selected, jax_dtype(args), keep_mxfp4=not args.te_dequantized)
    device, tdtype, sync = torch_side(args)
    model = model.to(device, tdtype)
    config = te.config
    fwd = jax.jit(T.apply, static_argnames=("config", "selected_layers", "moe_impl", "moe_chunk", "sharding"))
    ids_j, mask_j = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
    t0 = time.perf_counter()
    ours = [np.asarray(o, np.float32) for o in fwd(te.params, config, ids_j, mask_j, selected, args.moe)]
    compile_s = time.perf_counter() - t0
    t_ids, t_mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    got = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda m, inp, out, i=i: got.__setitem__(i, to_numpy(out[0] if isinstance(out, tuple) else out)))
        for i in selected]
    with torch.no_grad():
        model.model(input_ids=t_ids, attention_mask=t_mask)
    for hook in hooks:
        hook.remove()
    ref = [got[i] for i in selected]
    jax_s, torch_s = timed_pair(lambda: jax.block_until_ready(fwd(te.params, config, ids_j, mask_j, selected, args.moe)),
                                lambda: (model.model(input_ids=t_ids, attention_mask=t_mask), sync()), args.runs)
    if args.te_profile and device.type == "cpu":  # its torch hooks time host-side spans
        profile_text_encoder(te, config, model, ours, ids, mask, args.runs)
    valid = mask.astype(bool)
    diff = max(float(np.abs(o[valid] - r[valid]).max()) for o, r in zip(ours, ref))
    cos = min(cosine(o[valid], r[valid]) for o, r in zip(ours, ref))
    del model
    experts = "float experts" if args.te_dequantized else "MXFP4-packed experts"
    return dict(what=f"GPT-OSS encoder, {layers} real-size layers, batch {b} x {s} tokens, moe={args.moe}, {experts}",
                jax_s=jax_s, torch_s=torch_s, compile_s=compile_s, max_abs=diff, cosine=cos,
                torch_name="transformers GptOss (eager)")


def profile_text_encoder(te, config, model, ours, ids, mask, runs: int) -> None:
    """Where the time goes, per decoder layer: attention (norm + attention + o_proj) and MoE (norm + router
    + experts), in lens-jax (each part jitted alone, layer 0's weights, best of `runs`) and in transformers
    (forward hooks on every layer's self_attn / mlp during whole forwards, best per part); plus, for the
    packed lens-jax encoder, the MXFP4 dequantisation of one layer's experts alone."""
    import torch

    from lens_jax.models import mxfp4
    from lens_jax.models import nn as jnn
    from lens_jax.models import text_encoder as T

    layers = te.params["layers"]
    p0 = jax.tree.map(lambda a: a[0], {k: v for k, v in layers.items() if k != "mlp"})
    experts = layers["mlp"]["experts"]
    router = jax.tree.map(lambda a: a[0], layers["mlp"]["router"])
    b, s = ids.shape
    h_in = jnp.asarray(ours[0])  # a realistic hidden state
    cos, sin = T.rope_cos_sin(config, s)
    key_mask = jnp.asarray(mask, bool)

    @jax.jit
    def attn(p, h):
        x = jnn.rms_norm(h, p["input_layernorm"]["weight"], config.rms_norm_eps)
        return T.attention(p["self_attn"], x, cos, sin, key_mask, config, window=config.sliding_window)

    @jax.jit
    def moe(p, router, experts, h):
        x = jnn.rms_norm(h, p["post_attention_layernorm"]["weight"], config.rms_norm_eps).reshape(b * s, -1)
        w, idx = T.route(x, router, config.num_experts_per_tok)
        return T.moe(x, experts, 0, w, idx, config, te.moe_impl)

    def best(fn):
        return best_of(fn, runs).wall_ms

    jax_parts = {"attention (sliding layer)": best(lambda: attn(p0, h_in).block_until_ready()),
                 "MoE (router + experts)": best(lambda: moe(p0, router, experts, h_in).block_until_ready())}
    if T.is_packed(te.params):
        deq = jax.jit(lambda e: [mxfp4.dequantize(e[f"{n}_blocks"][0], e[f"{n}_scales"][0], jnp.float32)
                                 for n in ("gate_up_proj", "down_proj")])
        jax_parts["  of which: dequantise 32 experts"] = best(lambda: jax.block_until_ready(deq(experts)))

    spans: dict[str, list] = {"attention (sliding layer)": [], "MoE (router + experts)": []}
    start = {}
    hooks = []
    layer0 = model.model.layers[0]
    for name, mod in (("attention (sliding layer)", layer0.self_attn), ("MoE (router + experts)", layer0.mlp)):
        hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: start.__setitem__(name, time.perf_counter())))
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, name=name: spans[name].append((time.perf_counter() - start[name]) * 1e3)))
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        for _ in range(runs + 1):
            model.model(input_ids=t_ids, attention_mask=t_mask)
    for hook in hooks:
        hook.remove()
    print("| part (one decoder layer) | lens-jax | transformers |")
    print("|---|---|---|")
    for name, ms in jax_parts.items():
        t = f"{min(spans[name][1:]):.0f} ms" if name in spans else ""
        print(f"| {name} | {ms:.0f} ms | {t} |", flush=True)


def bench_vae(args) -> dict:
    import torch
    from diffusers import AutoencoderKLFlux2

    from lens_jax.models import vae as V
    from lens_jax.weights.vae import load

    kw = json.loads((ROOT / "lens_jax/configs/lens/vae.json").read_text())
    torch.manual_seed(0)
    accepted = inspect.signature(AutoencoderKLFlux2.__init__).parameters
    model = AutoencoderKLFlux2(**{k: v for k, v in kw.items() if k in accepted}).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        vae = load(tmp, dtype=jax_dtype(args))
    device, tdtype, sync = torch_side(args)
    model = model.to(device, tdtype)
    h, w = args.grid
    lh, lw = 2 * h, 2 * w  # a patch of 2x2 latents per token
    z = torch.randn(1, vae.config.latent_channels, lh, lw)
    fn = jax.jit(V.decode, static_argnames=("config",))
    zj = jnp.transpose(jnp.asarray(z.numpy(), jax_dtype(args)), (0, 2, 3, 1))
    z = z.to(device, tdtype)
    t0 = time.perf_counter()
    ours = np.asarray(fn(vae.params, vae.config, zj), np.float32)
    compile_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = to_numpy(model.decode(z).sample)
    jax_s, torch_s = timed_pair(lambda: fn(vae.params, vae.config, zj).block_until_ready(),
                                lambda: (model.decode(z), sync()), args.runs)
    ours = np.transpose(ours, (0, 3, 1, 2))
    return dict(what=f"FLUX.2 VAE decode, batch 1, {lh}x{lw} latents -> {16 * h}x{16 * w}", jax_s=jax_s,
                torch_s=torch_s, compile_s=compile_s, max_abs=float(np.abs(ours - ref).max()), cosine=cosine(ours, ref),
                torch_name="diffusers AutoencoderKLFlux2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dit", default=None, help="path to the upstream PyTorch Lens transformer .py")
    ap.add_argument("--dit-blocks", type=int, default=2)
    ap.add_argument("--te-layers", "--text-layers", type=int, default=1,
                    help="real-size GPT-OSS layers (each ~3.2 GB in torch f32; 2-4 fit in 24 GB)")
    ap.add_argument("--te-dequantized", action="store_true",
                    help="lens-jax holds float experts, as the torch twin does (default: MXFP4-packed, dequantised "
                         "in the forward)")
    ap.add_argument("--te-vocab", type=int, default=8192, help="vocabulary of the encoder twin (real: 201088)")
    ap.add_argument("--te-profile", action="store_true",
                    help="also time one layer's attention and MoE (and MXFP4 dequantisation) on both sides")
    ap.add_argument("--moe", default="auto", help="lens-jax MoE dispatch (auto: the per-backend table; grouped, "
                    "ragged, dense)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--grid", default="32x32", help="image token grid h x w (16 pixels per token)")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (set XLA's with the environment)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: dit,text_encoder,vae")
    ap.add_argument("--torch-device", choices=["cpu", "cuda"], default="cpu",
                    help="where PyTorch runs (cuda: the GPU JAX uses too)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="parameters and activations, both sides")
    args = ap.parse_args()
    args.grid = tuple(int(v) for v in args.grid.split("x"))
    skip = {p for p in args.skip.split(",") if p}

    import torch

    torch.set_num_threads(args.threads)
    if args.dtype == "f32":
        jax.config.update("jax_default_matmul_precision", "highest")
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({args.torch_device}, {torch.get_num_threads()} threads), {args.dtype}", flush=True)
    parts = []
    if "dit" not in skip:
        if args.reference_dit is None:
            print("DiT skipped: give --reference-dit PATH (the upstream lens/transformer.py)", file=sys.stderr)
        else:
            parts.append(bench_dit)
    if "text_encoder" not in skip:
        parts.append(bench_text_encoder)
    if "vae" not in skip:
        parts.append(bench_vae)
    rows = []
    for part in parts:
        row = part(args)
        rows.append(row)
        print(f"{row['what']}: jax {row['jax_s'] * 1e3:.0f} ms, torch {row['torch_s'] * 1e3:.0f} ms, "
              f"torch/jax {row['torch_s'] / row['jax_s']:.2f}, max |diff| {row['max_abs']:.2e}, "
              f"cosine {row['cosine']:.6f}", flush=True)
    print()
    print("| workload | lens-jax (median) | PyTorch (median) | PyTorch / lens-jax | jax compile | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['jax_s'] * 1e3:.0f} ms | {r['torch_s'] * 1e3:.0f} ms ({r['torch_name']}) | "
              f"{r['torch_s'] / r['jax_s']:.2f}x | {r['compile_s']:.1f} s | {r['max_abs']:.1e} |")


if __name__ == "__main__":
    main()
