"""TPU readiness without a TPU: compile Lens programs ahead of time for TPU topologies on a CPU host.

Needs `libtpu` (pip install -e '.[tpu-aot]'). For each topology it builds a (data, fsdp,
tensor) mesh from the topology's abstract devices, takes abstract bf16 parameters
(jax.eval_shape of init_params) sharded by lens_jax.parallel's logical rules, lowers and compiles

- the sampler (`sampling.build_programs(...).whole`: every denoising step + the VAE decode) at the
  given resolutions, Lens (CFG, 20 steps) and Lens-Turbo (no CFG, 4 steps), and
- the GPT-OSS text encoder (MXFP4-packed experts as the checkpoint ships them) for a CFG pair,

and prints per-chip memory from `compiled.memory_analysis()` against the chip's HBM and XLA's
FLOP count from `cost_analysis()`. Nothing runs: these are compiler figures, not measurements.

    python scripts/aot_tpu.py                                  # v5e-8, v5p-8, v6e-8; 1024 and 1440
    python scripts/aot_tpu.py --topology v5e:2x2 --config tiny --sizes 64 --text-tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# libtpu takes a lock file and probes for TPU hosts; neither applies to a compile-only client.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

GIB = 1024**3
# name -> (topology, HBM per chip in GiB); public chip specifications.
TOPOLOGIES = {
    "v5e-8": ("v5e:2x4", 16),
    "v5p-8": ("v5p:2x2x1", 95),
    "v6e-8": ("v6e:2x4", 32),
}
HBM_BY_PREFIX = {"v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32, "v4": 32}


@dataclass
class Row:
    topology: str
    program: str
    mesh: str
    args_gib: float
    temp_gib: float
    hbm_gib: float
    tflop: float
    seconds: float

    def line(self) -> str:
        total = self.args_gib + self.temp_gib
        return (f"| {self.topology} | {self.program} | {self.mesh} | {self.args_gib:.2f} | {self.temp_gib:.2f} | "
                f"{total:.2f} / {self.hbm_gib:g} | {self.tflop:.1f} | {self.seconds:.0f} |")


def topology_devices(name: str):
    from jax.experimental import topologies

    topo = TOPOLOGIES.get(name, (name, None))[0]
    return topologies.get_topology_desc(platform="tpu", topology_name=topo).devices


def hbm_gib(name: str) -> float:
    if name in TOPOLOGIES:
        return TOPOLOGIES[name][1]
    return HBM_BY_PREFIX.get(name.split(":")[0], float("nan"))


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _stats(compiled) -> tuple[float, float, float]:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) / GIB
    return args, mem.temp_size_in_bytes / GIB, float(cost.get("flops", float("nan"))) / 1e12


def compile_sampler(configs, mesh, size: int, cfg: bool, steps: int, text_tokens: int, batch: int):
    from lens_jax import parallel
    from lens_jax.models import transformer as dit
    from lens_jax.models import vae as vae_lib
    from lens_jax.sampling import sampler as sampler_lib
    from lens_jax.sampling.resolution import PIXELS_PER_TOKEN

    dit_config, vae_config = configs["dit"], configs["vae"]
    key = jax.random.key(0)
    dit_abs = jax.eval_shape(lambda: dit.init_params(dit_config, key, jnp.bfloat16))
    vae_abs = jax.eval_shape(lambda: vae_lib.init_params(vae_config, key, jnp.bfloat16))
    dit_sh = parallel.logical_shardings(dit_abs, dit.param_axes(dit_config), mesh)
    vae_sh = parallel.replicated_shardings(vae_abs, mesh)
    h = w = size // PIXELS_PER_TOKEN
    spec = sampler_lib.SamplerSpec(dit_config, vae_config, (h, w), steps, cfg, True, False, jnp.dtype(jnp.bfloat16),
                                   None, parallel.DEFAULT_RULES.bind(mesh))
    rows = 2 * batch if cfg else batch
    programs = sampler_lib.build_programs(spec, mesh, sampler_lib.ShardingTree(dit_sh),
                                          sampler_lib.ShardingTree(vae_sh), batch, rows)
    rep = parallel.replicated(mesh)
    sds = jax.ShapeDtypeStruct
    args = (
        _abstract(dit_abs, dit_sh), _abstract(vae_abs, vae_sh),
        sds((batch, h * w, dit_config.in_channels), jnp.float32, sharding=parallel.batch_sharding(mesh, batch, 3)),
        [sds((rows, text_tokens, dit_config.enc_hidden_dim), jnp.bfloat16,
             sharding=parallel.batch_sharding(mesh, rows, 3))] * dit_config.num_text_layers,
        sds((rows, text_tokens), jnp.bool_, sharding=parallel.batch_sharding(mesh, rows, 2)),
        sds((steps + 1,), jnp.float32, sharding=rep), sds((steps,), jnp.float32, sharding=rep),
        sds((), jnp.float32, sharding=rep), sds((), jnp.int32, sharding=rep),
    )
    return programs.whole.lower(*args).compile()


def compile_text_encoder(configs, mesh, text_tokens: int, rows: int):
    from lens_jax import parallel
    from lens_jax.models import text_encoder as te

    dit_config, config = configs["dit"], configs["te"]
    selected = tuple(dit_config.selected_layer_index)
    config = config.truncated(max(selected) + 1)
    abstract = jax.eval_shape(lambda: te.init_params(config, jax.random.key(0), jnp.bfloat16, packed=True))
    shardings = parallel.logical_shardings(abstract, te.param_axes(config, packed=True, params=abstract), mesh)
    sds = jax.ShapeDtypeStruct
    ids = sds((rows, text_tokens), jnp.int32, sharding=parallel.batch_sharding(mesh, rows, 2))
    mask = sds((rows, text_tokens), jnp.bool_, sharding=parallel.batch_sharding(mesh, rows, 2))
    fn = jax.jit(te.apply, static_argnames=("config", "selected_layers", "moe_impl", "moe_chunk", "sharding"))
    return fn.lower(_abstract(abstract, shardings), config, ids, mask, selected,
                    sharding=parallel.DEFAULT_RULES.bind(mesh)).compile()


def load_configs(which: str):
    from lens_jax.models import text_encoder as te
    from lens_jax.models import transformer as dit
    from lens_jax.models import vae as vae_lib

    root = Path(__file__).resolve().parents[1] / "lens_jax" / "configs" / which
    return {
        "dit": dit.TransformerConfig.from_json(root / "transformer.json"),
        "vae": vae_lib.VAEConfig.from_json(root / "vae.json"),
        "te": te.TextEncoderConfig.from_json(root / "text_encoder.json"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", nargs="+", default=list(TOPOLOGIES),
                    help="v5e-8 / v5p-8 / v6e-8 or a raw topology name such as v5e:2x2")
    ap.add_argument("--config", default="lens", choices=["lens", "tiny"], help="lens_jax/configs/<config>")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 1440], help="square image sizes in pixels")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the rest)")
    ap.add_argument("--batch", type=int, default=1, help="images per program")
    ap.add_argument("--text-tokens", type=int, default=192, help="text bucket (tokens)")
    ap.add_argument("--programs", nargs="+", default=["cfg", "turbo", "text"], choices=["cfg", "turbo", "text"])
    args = ap.parse_args(argv)

    from lens_jax import parallel

    configs = load_configs(args.config)
    rows = []
    print(f"jax {jax.__version__}; AOT compile only (no TPU is used); memory per chip, FLOPs per program (all chips)")
    print("| topology | program | mesh (data,fsdp,tensor) | args+out GiB/chip | temp GiB/chip | total / HBM GiB | "
          "XLA TFLOP | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.topology:
        devices = topology_devices(name)
        d, f, t = (int(x) for x in args.mesh.split(","))
        n = len(devices)
        d, f = (n // (f * t), f) if d == -1 else (d, n // (d * t) if f == -1 else f)
        mesh = parallel.make_mesh(d, f, t, devices=devices)
        jobs = []
        for size in args.sizes:
            if "cfg" in args.programs:
                jobs.append((f"sampler {size}² CFG 20 steps + decode",
                             lambda s=size: compile_sampler(configs, mesh, s, True, 20, args.text_tokens, args.batch)))
            if "turbo" in args.programs:
                jobs.append((f"sampler {size}² Turbo 4 steps + decode",
                             lambda s=size: compile_sampler(configs, mesh, s, False, 4, args.text_tokens, args.batch)))
        if "text" in args.programs:
            jobs.append((f"text encoder 2 x {args.text_tokens} tokens",
                         lambda: compile_text_encoder(configs, mesh, args.text_tokens, 2)))
        for label, job in jobs:
            t0 = time.perf_counter()
            compiled = job()
            a, tmp, tflop = _stats(compiled)
            row = Row(name, label, f"{d},{f},{t}", a, tmp, hbm_gib(name), tflop, time.perf_counter() - t0)
            rows.append(row)
            print(row.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
