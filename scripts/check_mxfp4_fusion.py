#!/usr/bin/env python
"""Does the compiler fuse the MXFP4 decode into the expert matmuls? Read the optimised HLO and say.

    python scripts/check_mxfp4_fusion.py                         # GPU: real width, dense + ragged + grouped
    python scripts/check_mxfp4_fusion.py --impls dense gmm       # the Pallas kernel (moe_impl="gmm")
    python scripts/check_mxfp4_fusion.py --width 256 --tokens 64 # CPU smoke run (XLA:CPU fuses nothing here)

Compiles one GPT-OSS MoE layer with MXFP4-packed experts (as `scripts/benchmark_moe.py` builds it)
for each dispatch, splits `compiled.as_text()` into computations and reports, per computation that
holds a matrix product (`dot`, or a cuBLAS / Triton GEMM custom call or fusion): whether the decode's
integer work on the packed uint8 codes (shift, and, bitcast-convert of the assembled bits) happens in
the same computation. "fused" means at least one GEMM computation contains that work, i.e. the
decoded expert is never written to memory (on the H100 a `__triton_gemm` fusion with the decode
as its prologue, or a Pallas kernel, a `__gpu$xla.gpu.triton` custom call, that takes the packed uint8
codes as operands: `moe_impl="gmm"`); "not fused" lists where the decode lands instead.
"""

from __future__ import annotations

import argparse
import json
import re

DECODE_OPS = ("shift-right-logical", "shift-left", "bitcast-convert")
OP_RE = re.compile(r"=\s*([a-z0-9\[\],{}:\s]+?)\s+([a-z][a-z0-9-]*)\(")


def computations(hlo: str) -> dict[str, str]:
    """{name: body} of every computation in an HLO module's text."""
    out, name, body = {}, None, []
    for line in hlo.splitlines():
        if name is None:
            m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$", line)
            if m and not line.startswith(" ") and not line.startswith("HloModule"):
                name, body = m.group(1), []
        elif line.startswith("}"):
            out[name] = "\n".join(body)
            name = None
        else:
            body.append(line)
    return out


def ops(body: str) -> set[str]:
    return {m.group(2) for m in OP_RE.finditer(body)}


def is_gemm(body: str) -> bool:
    """A computation that does a matrix product itself (a fusion body with the dot; a cuBLAS custom call
    takes materialised operands, so its caller does not count)."""
    return " dot(" in body


FLOAT_BITCAST_RE = re.compile(r"=\s*(?:bf16|f16|f32)\[[\d,]*\]\S*\s+bitcast-convert\(")
PALLAS_TARGET = "__gpu$xla.gpu.triton"


def decodes_packed(body: str) -> bool:
    """Decode work: shifts in a computation that reads packed u8 codes, or the float bit assembly (an
    integer -> float bitcast-convert). Shifts on int32 alone are index arithmetic (divisions by powers of
    two in the routing and the sort), not the decode."""
    found = ops(body)
    unpack = ("shift-right-logical" in found or "shift-left" in found) and "u8[" in body
    return unpack or bool(FLOAT_BITCAST_RE.search(body))


def pallas_kernels_on_packed(hlo: str) -> list[str]:
    """Pallas (Triton) kernels that take packed u8 operands: they decode inside the kernel."""
    out = []
    for line in hlo.splitlines():
        if f'custom_call_target="{PALLAS_TARGET}"' in line:
            operands = re.search(r"operand_layout_constraints=\{(.*?)\}, api_version", line)
            if operands and "u8[" in operands.group(1):
                name = re.search(r'name = "([^"]+)"', line) or re.search(r"%([\w.\-]+)\s*=", line)
                out.append(f"pallas {name.group(1) if name else '?'}")
    return out


def analyse(hlo: str) -> dict:
    comps = computations(hlo)
    gemms = {n: b for n, b in comps.items() if is_gemm(b)}
    fused = sorted(n for n, b in gemms.items() if decodes_packed(b)) + sorted(set(pallas_kernels_on_packed(hlo)))
    decode_elsewhere = sorted(n for n, b in comps.items() if n not in gemms and decodes_packed(b))
    triton = sorted(n for n, b in comps.items() if "__triton_gemm" in b or "__triton_nested_gemm" in b)  # callers
    return dict(fused=bool(fused), gemm_computations=len(gemms), fused_in=fused[:8],
                decode_outside_gemm=decode_elsewhere[:8], triton_gemm_fusions=len(triton),
                computations=len(comps))


def moe_layer(width: int, tokens: int, dtype):
    """One GPT-OSS MoE layer with MXFP4-packed experts: (layer(x, experts, router, impl), abstract (x, experts, router))."""
    import jax

    from lens_jax.models import text_encoder as T

    cfg = T.TextEncoderConfig(vocab_size=16, hidden_size=width, intermediate_size=width, num_hidden_layers=1,
                              num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                              num_experts_per_tok=4, sliding_window=128, layer_types=(T.SLIDING,))
    experts = jax.eval_shape(lambda k: T.init_params(cfg, k, dtype, packed=True), jax.random.key(0))["layers"]["mlp"]["experts"]
    router = {"kernel": jax.ShapeDtypeStruct((width, cfg.num_local_experts), dtype),
              "bias": jax.ShapeDtypeStruct((cfg.num_local_experts,), dtype)}
    x = jax.ShapeDtypeStruct((tokens, width), dtype)

    def layer(x, experts, router, impl):
        weights, idx = T.route(x, router, cfg.num_experts_per_tok)
        return T.moe(x, experts, 0, weights, idx, cfg, impl)

    return layer, (x, experts, router)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2880, help="hidden = expert width (real: 2880)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--impls", nargs="+", default=["dense", "ragged", "grouped"], help="add gmm for the Pallas kernel")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default=None, help="default: f32 on CPU, bf16 elsewhere")
    ap.add_argument("--json", default=None, help="also write the verdicts to this JSON file")
    ap.add_argument("--dump", default=None, help="write each dispatch's optimised HLO to DUMP.<impl>.txt")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    backend = jax.default_backend()
    dtype = jnp.dtype({"f32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype or ("f32" if backend == "cpu" else "bf16")])
    w = args.width
    layer, (x, experts, router) = moe_layer(w, args.tokens, dtype)

    print(f"jax {jax.__version__} ({backend}, {jax.devices()[0].device_kind}), {dtype.name}, width {w}, "
          f"{args.tokens} tokens, MXFP4-packed experts", flush=True)
    rows = {}
    for impl in args.impls:
        hlo = jax.jit(layer, static_argnums=3).lower(x, experts, router, impl).compile().as_text()
        if args.dump:
            with open(f"{args.dump}.{impl}.txt", "w") as f:
                f.write(hlo)
        rows[impl] = analyse(hlo)
        r = rows[impl]
        print(f"{impl:<8} {'FUSED' if r['fused'] else 'not fused'}: {r['gemm_computations']} GEMM computations "
              f"({r['triton_gemm_fusions']} Triton GEMM fusions); decode inside {r['fused_in'] or '-'}; "
              f"decode outside a GEMM in {r['decode_outside_gemm'] or '-'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=backend, width=w, tokens=args.tokens, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
