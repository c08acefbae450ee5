#!/usr/bin/env python
"""Trace the real-size programs the GPU runbook runs, abstractly (jax.eval_shape: no weights, no compile).

    python scripts/check_real_shapes.py          # a few seconds on CPU

Shape and dtype errors at the real sizes show up here on a CPU box instead of in a GPU lease: the DiT
forward (bf16, and with int8 / fp8 quantised Linears) at 1024² and 1440² with CFG batch 2 and 512 text
tokens, the GPT-OSS encoder (real config, the selected layers, MXFP4-packed experts) for one prompt and a
CFG pair at 192 tokens under every MoE dispatch, and the VAE decode of Lens tokens at both sizes.
Prints one line per program with its output shape; exits 1 if any fails to trace.
"""

from __future__ import annotations

import functools
import sys
import traceback

import jax
import jax.numpy as jnp

from lens_jax import configs
from lens_jax.models import quant
from lens_jax.models import text_encoder as te_lib
from lens_jax.models import transformer as dit
from lens_jax.models import vae as vae_lib

SIZES = (1024, 1440)
TEXT_TOKENS = 512
TE_TOKENS = 192


def spec(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def checks():
    """(name, thunk) pairs; each thunk returns the abstract output."""
    bf16 = jnp.bfloat16
    dcfg = dit.TransformerConfig.from_dict(configs.load_json("lens/transformer.json"))
    dparams = jax.eval_shape(lambda k: dit.init_params(dcfg, k, bf16), jax.random.key(0))
    variants = {"bf16": dparams}
    for mode in quant.MODES:
        variants[mode] = jax.eval_shape(functools.partial(quant.quantize_params, mode=mode), dparams)
    for size in SIZES:
        h = w = size // 16
        x = spec((2, h * w, dcfg.in_channels), bf16)
        feats = [spec((2, TEXT_TOKENS, dcfg.enc_hidden_dim), bf16) for _ in range(dcfg.num_text_layers)]
        mask, sigma = spec((2, TEXT_TOKENS), bool), spec((2,), jnp.float32)
        for name, params in variants.items():
            yield (f"DiT forward {size}² batch 2 + {TEXT_TOKENS} text tokens, {name}",
                   functools.partial(jax.eval_shape, lambda p, *a, hw=(h, w): dit.apply(p, dcfg, *a, hw, bf16, None),
                                     params, x, feats, mask, sigma))

    tcfg_full = te_lib.TextEncoderConfig.from_dict(configs.load_json("lens/text_encoder.json"))
    selected = tuple(dcfg.selected_layer_index)
    tcfg = tcfg_full.truncated(max(selected) + 1)
    tparams = jax.eval_shape(lambda k: te_lib.init_params(tcfg, k, bf16, packed=True), jax.random.key(1))
    for batch in (1, 2):
        ids, amask = spec((batch, TE_TOKENS), jnp.int32), spec((batch, TE_TOKENS), bool)
        for impl in ("auto", *te_lib.MOE_FIXED_IMPLS):
            yield (f"text encoder {batch} x {TE_TOKENS} tokens, {len(selected)} selected of {tcfg.num_hidden_layers} "
                   f"layers, MXFP4, moe={impl}",
                   functools.partial(jax.eval_shape,
                                     lambda p, i, m, impl=impl: te_lib.apply(p, tcfg_full, i, m, selected, impl),
                                     tparams, ids, amask))

    vcfg = vae_lib.VAEConfig.from_dict(configs.load_json("lens/vae.json"))
    vparams = jax.eval_shape(lambda k: vae_lib.init_params(vcfg, k, bf16), jax.random.key(2))
    for size in SIZES:
        h = w = size // 16
        tokens = spec((1, h * w, dcfg.in_channels), bf16)
        yield (f"VAE decode {size}²", functools.partial(
            jax.eval_shape, lambda p, t, h=h, w=w: vae_lib.decode_tokens(p, vcfg, t, h, w), vparams, tokens))


def main() -> int:
    failed = 0
    print(f"jax {jax.__version__} ({jax.default_backend()}): abstract traces of the real-size programs", flush=True)
    for name, thunk in checks():
        try:
            out = thunk()
            shapes = {tuple(leaf.shape) for leaf in jax.tree.leaves(out)}
            print(f"ok      {name}: {sorted(shapes)[:2]}", flush=True)
        except Exception:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAILED  {name}\n{traceback.format_exc(limit=6)}", flush=True)
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
