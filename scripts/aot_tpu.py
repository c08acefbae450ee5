"""TPU readiness without a TPU: compile Lens programs ahead of time for TPU topologies on a CPU host.

Needs `libtpu` (pip install -e '.[tpu-aot]'). For each topology it builds a (data, fsdp,
tensor) mesh from the topology's abstract devices, takes abstract bf16 parameters
(jax.eval_shape of init_params) sharded by lens_jax.parallel's logical rules, lowers and compiles

- the sampler (`sampling.build_programs(...).whole`: every denoising step + the VAE decode) at the
  given resolutions, Lens (CFG, 20 steps) and Lens-Turbo (no CFG, 4 steps),
- the GPT-OSS text encoder (MXFP4-packed experts as the checkpoint ships them) for a CFG pair
  (`text`; `text-offload`: its decoder layers in pinned host memory, streamed),
- the sampler with the DiT's blocks in pinned host memory, streamed (`offload="all"`,
  `lens_jax.parallel.offload`; programs `cfg-offload` / `turbo-offload`; `cfg-textoffload` /
  `turbo-textoffload`: the sampler of `offload="text_encoder"`, modulation kernels on the host), and
- the whole train step as `lens-jax train` compiles it (`lens_jax.training.trainer.train_step`:
  sigma/noise sampling, DiT forward, backward through the remat policy, optax AdamW update), for
  LoRA (`train_lora`: rank 32 on attention + MLP, frozen bf16 base) and full fine-tuning
  (`train_full`: float32 master weights and AdamW moments),

and prints per-chip memory from `compiled.memory_analysis()` against the chip's HBM and XLA's
FLOP count from `cost_analysis()`. Nothing runs: these are compiler figures, not measurements.

    python scripts/aot_tpu.py                                  # v5e-8, v5p-8, v6e-8; 1024 and 1440
    python scripts/aot_tpu.py --topology v5e-8 --sizes 1024 --programs train_lora train_full
    python scripts/aot_tpu.py --topology v5e-8 --mesh 1,1,1 --sizes 1024 --programs cfg cfg-offload
    python scripts/aot_tpu.py --topology v5e:2x2 --config tiny --sizes 64 --text-tokens 64

A mesh smaller than the topology uses its first devices (`--mesh 1,1,1`: one chip holds the whole
model). Memory columns: "args+out" are the program's arguments and outputs in device memory
(donated/aliased buffers counted once), "host" those in pinned host memory (offloaded blocks),
"temp" XLA's temporaries; all per chip.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# libtpu takes a lock file and probes for TPU hosts; neither applies to a compile-only client.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # probe_offload_schedule
GIB = 1024**3
# name -> (topology, HBM per chip in GiB); public chip specifications.
TOPOLOGIES = {
    "v5e-8": ("v5e:2x4", 16),
    "v5p-8": ("v5p:2x2x1", 95),
    "v6e-8": ("v6e:2x4", 32),
}
HBM_BY_PREFIX = {"v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32, "v4": 32}


PROGRAMS = ("cfg", "turbo", "text", "text-offload", "cfg-textoffload", "turbo-textoffload", "cfg-offload", "turbo-offload", "cfg-offload3d", "turbo-offload3d", "train_lora",
            "train_full")


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
    host_gib: float = 0.0

    def line(self) -> str:
        total = self.args_gib + self.temp_gib
        host = f" (+{self.host_gib:.2f} host)" if self.host_gib else ""
        return (f"| {self.topology} | {self.program} | {self.mesh} | {self.args_gib:.2f}{host} | {self.temp_gib:.2f} | "
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
    """(device args + outputs - aliased, temporaries) in GiB per chip and XLA's TFLOP count."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) / GIB
    return args, mem.temp_size_in_bytes / GIB, float(cost.get("flops", float("nan"))) / 1e12


def _host_stats(compiled) -> float:
    """GiB per chip of arguments + outputs in host memory (XLA's host_* figures; 0 without offload)."""
    mem = compiled.memory_analysis()
    total = sum(getattr(mem, f"host_{k}_size_in_bytes", 0) or 0 for k in ("argument", "output"))
    return (total - (getattr(mem, "host_alias_size_in_bytes", 0) or 0)) / GIB


def _fetch_schedule(compiled) -> str:
    """How the compiled schedule fetches layers from host memory: per kind, count and the instructions
    between each start and its done (0: not overlapped); scripts/probe_offload_schedule.py."""
    from probe_offload_schedule import async_gaps

    gaps = async_gaps(compiled.as_text())
    kinds = sorted({k for k, _ in gaps})
    return "; ".join(f"{k} x{sum(1 for kk, _ in gaps if kk == k)}, {min(g for kk, g in gaps if kk == k)}-"
                     f"{max(g for kk, g in gaps if kk == k)} between start and done" for k in kinds) or "none"


def _keep_2d_on_device(shardings, abstract):
    """Stacked [layers, width] leaves (biases, norm scales) back in device memory: the TPU compiler cannot
    slice one layer (one sublane row) out of a 2-D array in pinned host memory."""
    return jax.tree.map(lambda s, a: s.with_memory_kind("device") if a.ndim <= 2 else s, shardings, abstract)


def compile_sampler(configs, mesh, size: int, cfg: bool, steps: int, text_tokens: int, batch: int,
                    offload: bool | str = False):
    """The whole sampler program; `offload`: the DiT blocks in pinned host memory, streamed (offload="all").

    offload="3d": as True, but the stacked 2-D leaves stay on the device (`_keep_2d_on_device`).
    offload="text_encoder": the sampler of that mode, the blocks on the device but their modulation
    kernels in host memory, streamed once for the modulation table (`lens_jax.sampling.modulation`).
    """
    from lens_jax import parallel
    from lens_jax.models import transformer as dit
    from lens_jax.models import vae as vae_lib
    from lens_jax.parallel import offload as offload_lib
    from lens_jax.sampling import modulation
    from lens_jax.sampling import sampler as sampler_lib
    from lens_jax.sampling.resolution import PIXELS_PER_TOKEN
    from lens_jax.weights import registry

    dit_config, vae_config = configs["dit"], configs["vae"]
    key = jax.random.key(0)
    dit_abs = jax.eval_shape(lambda: dit.init_params(dit_config, key, jnp.bfloat16))
    vae_abs = jax.eval_shape(lambda: vae_lib.init_params(vae_config, key, jnp.bfloat16))
    dit_sh = parallel.logical_shardings(dit_abs, dit.param_axes(dit_config), mesh)
    stacked_key = registry.component("transformer").stacked_key
    streams_blocks = bool(offload) and offload != "text_encoder"
    if offload == "text_encoder":  # as LensPipeline does for offload="text_encoder"
        dit_sh = modulation.on_host(dit_sh, stacked_key)
    if streams_blocks:  # as LensPipeline does for offload="all"
        dit_sh = offload_lib.on_host(dit_sh, stacked_key)
        if offload == "3d":
            dit_sh = _keep_2d_on_device(dit_sh, dit_abs)
    vae_sh = parallel.replicated_shardings(vae_abs, mesh)
    h = w = size // PIXELS_PER_TOKEN
    blocks = _abstract(dit_abs, dit_sh)[stacked_key]
    stream = offload_lib.HostStream.for_stack(blocks) if streams_blocks else None
    mod_stream = modulation.stream_for(offload == "text_encoder", blocks)
    spec = sampler_lib.SamplerSpec(dit_config, vae_config, (h, w), steps, cfg, True, False, jnp.dtype(jnp.bfloat16),
                                   None, parallel.DEFAULT_RULES.bind(mesh) if mesh.size > 1 else None,
                                   stream, modulation_stream=mod_stream)
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
    whole = programs.whole.lower(*args).compile()
    if not spec.decode_apart:
        return whole
    latents = sds((batch, h * w, dit_config.in_channels), jnp.float32, sharding=parallel.batch_sharding(mesh, batch, 3))
    return [whole, programs.decode.lower(_abstract(vae_abs, vae_sh), latents).compile()]


def compile_text_encoder(configs, mesh, text_tokens: int, rows: int, offload: bool = False, moe_impl: str = "auto"):
    """The GPT-OSS encoder program; `offload`: its decoder layers in pinned host memory, streamed
    (offload="text_encoder" / "all", as LensPipeline.text_encoder places them); `moe_impl`: the MoE dispatch."""
    from lens_jax import parallel
    from lens_jax.models import text_encoder as te
    from lens_jax.parallel import offload as offload_lib

    dit_config, config = configs["dit"], configs["te"]
    selected = tuple(dit_config.selected_layer_index)
    config = config.truncated(max(selected) + 1)
    abstract = jax.eval_shape(lambda: te.init_params(config, jax.random.key(0), jnp.bfloat16, packed=True))
    shardings = parallel.logical_shardings(abstract, te.param_axes(config, packed=True, params=abstract), mesh)
    if offload:
        shardings = offload_lib.on_host(shardings, "layers")
    sds = jax.ShapeDtypeStruct
    ids = sds((rows, text_tokens), jnp.int32, sharding=parallel.batch_sharding(mesh, rows, 2))
    mask = sds((rows, text_tokens), jnp.bool_, sharding=parallel.batch_sharding(mesh, rows, 2))
    fn = jax.jit(te.apply, static_argnames=("config", "selected_layers", "moe_impl", "moe_chunk", "sharding", "stream"))
    return fn.lower(_abstract(abstract, shardings), config, ids, mask, selected, moe_impl=moe_impl,
                    sharding=parallel.DEFAULT_RULES.bind(mesh),
                    stream=offload_lib.HostStream.for_stack(_abstract(abstract, shardings)["layers"]) if offload
                    else None).compile()


def compile_train_step(configs, mesh, size: int, lora: bool, text_tokens: int, batch: int, rank: int = 32,
                       base_dtype=jnp.bfloat16, remat: str | None = "dots"):
    """The trainer's compiled micro-step (`trainer.train_step`) on abstract state, laid out as `Trainer` lays it out.

    LoRA: the frozen base (`base_dtype`) sharded by the logical rules, the adapter replicated;
    full: float32 master weights sharded by the logical rules. The optimizer state is placed
    where XLA puts `optimizer.init(params)` (as `Trainer._init_state` does), scalars and the RNG
    replicated; the batch is split over (data, fsdp) as `Trainer.device_batch` splits it.
    """
    from lens_jax import parallel
    from lens_jax.models import lora as lora_lib
    from lens_jax.models import transformer as dit
    from lens_jax.sampling.resolution import PIXELS_PER_TOKEN
    from lens_jax.training import trainer as trainer_lib
    from lens_jax.training.config import config_from_dict

    dit_config = configs["dit"]
    cfg = config_from_dict({"model": {"compute_dtype": "bfloat16", "remat": remat},
                            "lora": {"enabled": lora, "rank": rank}, "train": {"progress": False}})
    rules = parallel.rules_from_mapping(cfg.parallel.rules)
    params32 = jax.eval_shape(lambda: dit.init_params(dit_config, jax.random.key(0), jnp.float32))
    base_sh = parallel.logical_shardings(params32, dit.param_axes(dit_config), mesh, rules)
    replicated = parallel.replicated(mesh)
    if lora:
        base = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, base_dtype), params32)
        base = _abstract(base, base_sh)
        adapter = jax.eval_shape(lambda: lora_lib.init_adapter(params32, dit_config, jax.random.key(1),
                                                               targets=cfg.lora.targets, rank=cfg.lora.rank,
                                                               alpha=cfg.lora.alpha))
        trainable = _abstract(adapter, jax.tree.map(lambda _: replicated, adapter))
    else:
        base, trainable = {}, _abstract(params32, base_sh)
    optimizer = trainer_lib.make_optimizer(cfg.optim, cfg.train.steps)
    # Trainer._init_state's state and layout (no EMA in the default config).
    init = partial(trainer_lib.init_state, optimizer, rng=jax.random.key_data(jax.random.key(cfg.train.seed)),
                   shardings=jax.tree.map(lambda a: a.sharding, trainable))
    init_compiled = jax.jit(init).lower(trainable).compile()
    shapes = jax.eval_shape(init, trainable)
    shardings = jax.tree.map(lambda a, s: replicated if a.ndim == 0 or a.dtype == jnp.uint32 else s, shapes,
                             init_compiled.output_shardings)
    state = _abstract(shapes, shardings)
    leaves, treedef = jax.tree.flatten(shardings)
    spec = trainer_lib.StepSpec.from_config(cfg, dit_config, rules.bind(mesh) if mesh.size > 1 else None,
                                            (treedef, tuple(leaves)))
    h = w = size // PIXELS_PER_TOKEN
    sds = jax.ShapeDtypeStruct
    batch_abs = {
        "latents": sds((batch, h * w, dit_config.in_channels), jnp.float32,
                       sharding=parallel.batch_sharding(mesh, batch, 3)),
        "features": [sds((batch, text_tokens, dit_config.enc_hidden_dim), jnp.float32,
                         sharding=parallel.batch_sharding(mesh, batch, 3))] * dit_config.num_text_layers,
        "mask": sds((batch, text_tokens), jnp.bool_, sharding=parallel.batch_sharding(mesh, batch, 2)),
    }
    return trainer_lib.train_step.lower(state, base, batch_abs, grid=(h, w), spec=spec).compile()


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
    ap.add_argument("--layers", type=int, default=None,
                    help="override the DiT's block count (quick structural checks at real widths)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 1440], help="square image sizes in pixels")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the rest)")
    ap.add_argument("--batch", type=int, default=1, help="images per sampler program")
    ap.add_argument("--train-batch", type=int, default=None,
                    help="train step global batch (default: 1 per data x fsdp shard, i.e. one image per chip)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank for train_lora")
    ap.add_argument("--remat", default="dots", help="train step remat policy (the trainer's default: dots)")
    ap.add_argument("--text-tokens", type=int, default=192, help="text bucket (tokens)")
    ap.add_argument("--programs", nargs="+", default=["cfg", "turbo", "text"], choices=PROGRAMS,
                    help="also: cfg-offload / turbo-offload (DiT blocks streamed from pinned host memory), "
                         "train_lora / train_full (the trainer's step)")
    args = ap.parse_args(argv)

    from lens_jax import parallel

    configs = load_configs(args.config)
    if args.layers:
        import dataclasses

        configs["dit"] = dataclasses.replace(configs["dit"], num_layers=args.layers)
    rows = []
    print(f"jax {jax.__version__}; AOT compile only (no TPU is used); memory per chip, FLOPs per program (all chips)")
    print("| topology | program | mesh (data,fsdp,tensor) | args+out GiB/chip | temp GiB/chip | device total / HBM GiB | "
          "XLA TFLOP | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.topology:
        devices = topology_devices(name)
        d, f, t = (int(x) for x in args.mesh.split(","))
        n = len(devices)
        d, f = (n // (f * t), f) if d == -1 else (d, n // (d * t) if f == -1 else f)
        mesh = parallel.make_mesh(d, f, t, devices=devices[:d * f * t])
        train_batch = args.train_batch or d * f
        jobs = []
        for size in args.sizes:
            for off, mode in (("", False), ("-offload", True), ("-offload3d", "3d"), ("-textoffload", "text_encoder")):
                tail = {"": "", "-offload": " offload=all", "-offload3d": " offload=all, 2-D stacked on device",
                        "-textoffload": " offload=text_encoder (modulation kernels on the host)"}[off]
                if "cfg" + off in args.programs:
                    jobs.append((f"sampler {size}² CFG 20 steps + decode{tail}",
                                 lambda s=size, o=mode: compile_sampler(configs, mesh, s, True, 20,
                                                                        args.text_tokens, args.batch, o)))
                if "turbo" + off in args.programs:
                    jobs.append((f"sampler {size}² Turbo 4 steps + decode{tail}",
                                 lambda s=size, o=mode: compile_sampler(configs, mesh, s, False, 4,
                                                                        args.text_tokens, args.batch, o)))
            remat = None if args.remat == "none" else args.remat
            if "train_lora" in args.programs:
                jobs.append((f"train step LoRA r{args.rank} {size}² batch {train_batch} remat={remat}",
                             lambda s=size: compile_train_step(configs, mesh, s, True, args.text_tokens, train_batch,
                                                               args.rank, remat=remat)))
            if "train_full" in args.programs:
                jobs.append((f"train step full f32 master {size}² batch {train_batch} remat={remat}",
                             lambda s=size: compile_train_step(configs, mesh, s, False, args.text_tokens, train_batch,
                                                               remat=remat)))
        if "text" in args.programs:
            jobs.append((f"text encoder 2 x {args.text_tokens} tokens",
                         lambda: compile_text_encoder(configs, mesh, args.text_tokens, 2)))
        if "text-offload" in args.programs:
            jobs.append((f"text encoder 2 x {args.text_tokens} tokens, layers streamed from host",
                         lambda: compile_text_encoder(configs, mesh, args.text_tokens, 2, offload=True)))
        for label, job in jobs:
            t0 = time.perf_counter()
            try:
                compiled = job()
            except Exception as e:  # report the compiler's refusal as a row and go on with the others
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"| {name} | {label} | {d},{f},{t} | FAILED: {type(e).__name__}: {first[:300]} | | | | "
                      f"{time.perf_counter() - t0:.0f} |", flush=True)
                continue
            seconds = time.perf_counter() - t0
            # A sampler whose decode runs as its own program after the loop (SamplerSpec.decode_apart): one
            # row each; the device holds the larger of the two.
            parts = [(label, compiled)] if not isinstance(compiled, list) else [
                (label.replace(" + decode", "") + ", denoising loop", compiled[0]),
                (label.replace(" CFG 20 steps + decode", "").replace(" Turbo 4 steps + decode", "")
                 + ", VAE decode (its own program)", compiled[1])]
            for part_label, part in parts:
                a, tmp, tflop = _stats(part)
                row = Row(name, part_label, f"{d},{f},{t}", a, tmp, hbm_gib(name), tflop, seconds, _host_stats(part))
                rows.append(row)
                print(row.line(), flush=True)
                if ("streamed" in label or "offload" in label) and "decode (its own" not in part_label:
                    print(f"|   | layer fetches: {_fetch_schedule(part)} | | | | | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
