"""Device-resident DiT bytes of the compiled sampler, with and without the precomputed modulation table.

For the real DiT config (or `--config tiny`), bf16 / int8 / fp8, this lowers and compiles the
sampler's whole-loop program (`sampling.build_programs(...).whole`, CFG, `--steps` steps, no
decode so the figures are the DiT's) on abstract parameters laid out as `LensPipeline` lays them
out, and prints

- "DiT on device": the bytes of the DiT parameters whose sharding's memory kind is device memory
  (exact, from the shapes and placements);
- "args device / host": `compiled.memory_analysis()` argument bytes in device and in pinned host
  memory (the DiT plus latents, text features and the schedule);
- "temp": XLA's temporaries.

Rows: "per step" (today's path, every block runs its img_mod/txt_mod Linear at every step, so
they sit in device memory) and "table" (computed once per generation; for a quantised DiT the
modulation kernels stay in pinned host memory and stream in while the table is computed, as
`LensPipeline(quantize=...)` does; `--offload text_encoder` does the same for a bf16 DiT, as
`LensPipeline(offload="text_encoder")` does). `--tpu TOPOLOGY` compiles for one chip of a TPU topology
ahead of time instead (needs libtpu; e.g. `--tpu v5e:2x2`); nothing runs either way.

    python scripts/benchmark_modtable.py                       # real config, CPU compile, 256^2
    python scripts/benchmark_modtable.py --tpu v5e:2x2 --size 1024
    python scripts/benchmark_modtable.py --tpu v5e:2x2 --size 1024 --modes bf16 --offload text_encoder
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GIB = 1024**3


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def measure(dit_config, devices, mode: str | None, table: bool, size: int, steps: int, text_tokens: int,
            compile_: bool = True, offload: str = "none") -> dict:
    from lens_jax import parallel
    from lens_jax.models import quant
    from lens_jax.models import transformer as dit
    from lens_jax.sampling import modulation
    from lens_jax.sampling import sampler as sampler_lib
    from lens_jax.sampling.resolution import PIXELS_PER_TOKEN

    mesh = jax.sharding.Mesh(np.array(devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    abstract = jax.eval_shape(lambda: dit.init_params(dit_config, jax.random.key(0), jnp.bfloat16))
    if mode is not None:
        abstract = jax.eval_shape(lambda p: quant.quantize_params(p, mode), abstract)
    axes = quant.quantized_axes(dit.param_axes(dit_config), abstract)
    shardings = parallel.logical_shardings(abstract, axes, mesh)
    on_host = table and modulation.hosted(mode, offload)  # what LensPipeline(quantize=..., offload=...) does
    if on_host:
        shardings = modulation.on_host(shardings)
    params = _abstract(abstract, shardings)
    h = w = size // PIXELS_PER_TOKEN
    spec = sampler_lib.SamplerSpec(dit_config, None, (h, w), steps, True, False, False, jnp.dtype(jnp.bfloat16), None,
                                   modulation_table=table, modulation_stream=modulation.stream_for(on_host))
    programs = sampler_lib.build_programs(spec, mesh, sampler_lib.ShardingTree(shardings),
                                          sampler_lib.ShardingTree(None), 1, 2)
    rep = parallel.replicated(mesh)
    sds = jax.ShapeDtypeStruct
    args = (params, None,
            sds((1, h * w, dit_config.in_channels), jnp.float32, sharding=parallel.batch_sharding(mesh, 1, 3)),
            [sds((2, text_tokens, dit_config.enc_hidden_dim), jnp.bfloat16,
                 sharding=parallel.batch_sharding(mesh, 2, 3))] * dit_config.num_text_layers,
            sds((2, text_tokens), jnp.bool_, sharding=parallel.batch_sharding(mesh, 2, 2)),
            sds((steps + 1,), jnp.float32, sharding=rep), sds((steps,), jnp.float32, sharding=rep),
            sds((), jnp.float32, sharding=rep), sds((), jnp.int32, sharding=rep))
    row = {"mode": mode or "bf16", "path": "table" if table else "per step",
           "dit_device": modulation.device_bytes(params),
           "dit_total": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))}
    if compile_:
        t0 = time.perf_counter()
        mem = programs.whole.lower(*args).compile().memory_analysis()
        row.update(seconds=time.perf_counter() - t0, args_device=mem.argument_size_in_bytes,
                   args_host=getattr(mem, "host_argument_size_in_bytes", 0) or 0, temp=mem.temp_size_in_bytes)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="lens", choices=["lens", "tiny"], help="lens_jax/configs/<config>")
    ap.add_argument("--size", type=int, default=256, help="square image size (pixels); args barely depend on it")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--text-tokens", type=int, default=192)
    ap.add_argument("--modes", nargs="+", default=["bf16", "int8", "fp8"])
    ap.add_argument("--tpu", default=None, help="compile for the first chip of this TPU topology (e.g. v5e:2x2)")
    ap.add_argument("--no-compile", action="store_true", help="placement bytes only")
    ap.add_argument("--offload", default="none", choices=["none", "text_encoder"],
                    help="the pipeline's offload mode: text_encoder keeps a bf16 DiT's modulation kernels on the host")
    args = ap.parse_args(argv)

    from lens_jax.models import transformer as dit

    root = Path(__file__).resolve().parents[1] / "lens_jax" / "configs" / args.config
    config = dit.TransformerConfig.from_json(root / "transformer.json")
    if args.tpu:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=args.tpu).devices
        where = f"AOT for one chip of TPU {args.tpu}"
    else:
        devices = jax.devices()
        where = f"{jax.devices()[0].platform} compile"
    print(f"jax {jax.__version__}; {where}; {args.config} DiT, {args.size}^2, CFG, {args.steps} steps, "
          f"{args.text_tokens} text tokens, no decode; GiB")
    print("| DiT | modulation | DiT on device | DiT total | args device | args host | temp | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for table in (False, True):
            r = measure(config, devices, None if mode == "bf16" else mode, table, args.size, args.steps,
                        args.text_tokens, compile_=not args.no_compile, offload=args.offload)
            cells = [r["mode"], r["path"], f"**{r['dit_device'] / GIB:.2f}**", f"{r['dit_total'] / GIB:.2f}"]
            if "args_device" in r:
                cells += [f"{r['args_device'] / GIB:.2f}", f"{r['args_host'] / GIB:.2f}", f"{r['temp'] / GIB:.2f}",
                          f"{r['seconds']:.0f}"]
            else:
                cells += ["-"] * 4
            print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
