"""GPU figures without a GPU: compile Lens programs ahead of time for an H100 target on a CPU host.

Needs the CUDA plugin and the CUDA compiler pieces in the environment (NOT the project's CPU venv;
docs/aot_gpu.md gives the setup):

    python3.11 -m venv /work/venv-cuda && . /work/venv-cuda/bin/activate
    pip install "jax==0.10.2" "jaxlib==0.10.2" "jax-cuda12-plugin[with-cuda]==0.10.2" "jax-cuda12-pjrt==0.10.2"
    pip install -e .   # with jax held at 0.10.2 (pip -c a constraints file)

XLA:GPU compiles for a device it does not have from a target description (`GpuTargetConfig`:
compute capability, SM count, memory, cuDNN / CUDA versions; `TARGETS`), through
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=..., topology="1x1x1")`.
Programs are built with the real configs (lens_jax/configs/lens), bf16, abstract parameters (nothing
is materialised), by scripts/aot_tpu.py's builders, with lens_jax making the choices it makes on a GPU
host (`gpu_host()`: cuDNN attention, the GPU MoE dispatch, donated latents). Nothing runs:

- `memory`: peak device memory per offload mode (`none`, `text_encoder`, `all`): the text encoder's
  program (plus the DiT and VAE parameters that stay on the device while it runs) and the sampler's
  (CFG 20 steps and Turbo 4 steps, with the VAE decode) at each size; XLA's static estimate
  (`memory_analysis()`: arguments + outputs - aliased + temporaries, device memory only). The
  deviceless GPU target has no host memory space (jax 0.10.2), so offloaded parameters compile as
  device arguments; their bytes are moved to the "host" column here, and the temporaries are those of
  the program without host placement (the layer loop copies one layer's weights either way).
- `dit-step`: one DiT forward (one CFG step: batch 2, `--dit-text-tokens` text tokens) at each size:
  the optimised HLO's kernels per block (scripts/_hlo_kernels.py: GEMMs, attention, elementwise and
  reduction fusions, layout copies, slices), where each non-GEMM kernel comes from in lens_jax, and a
  roofline lower bound of the step (989 TFLOP/s dense bf16, 3.35 TB/s) by kind of kernel.
- `text-step`: the same kernel reading for the GPT-OSS text encoder (2 x `--te-text-tokens` tokens).
- `mxfp4`: scripts/check_mxfp4_fusion.py's question (is the MXFP4 decode fused into the expert
  GEMMs?) for one real-width GPT-OSS MoE layer, each dispatch (`--moe-impls`, including the Pallas
  kernel `gmm`), compiled for the target, and each dispatch's roofline per decode branch.

Per-kernel FLOPs and bytes are read from the optimised HLO (scripts/_hlo_kernels.py); the totals XLA's
HloCostAnalysis gives (run by the CPU client on the GPU-optimised module: the compiled GPU executable
does not implement cost_analysis()) count loop bodies once. Without a device XLA does not autotune: GEMMs
get Triton's default tiles instead of the autotuned choice between Triton and cuBLAS, so the kernel
structure is the compiler's, the GEMM tiling is not what a real H100 would run.

    python scripts/aot_gpu.py                                   # every program, 1024² and 1440² (~2-3 min)
    python scripts/aot_gpu.py --programs dit-step --sizes 1024 --dump /tmp/dit_step.hlo.txt
    python scripts/aot_gpu.py --programs memory --sizes 1024 --modes none all
    python scripts/aot_gpu.py --config tiny --sizes 64 --text-tokens 64 --programs memory dit-step
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

if "jax" not in sys.modules:  # run as a script: the compile-only client, no CUDA driver needed (imported: leave it)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _hlo_kernels as hk  # noqa: E402
import aot_tpu  # noqa: E402

GIB = 1024**3

# GpuTargetConfig (xla/stream_executor/device_description.proto) of an H100 SXM 80 GB (HBM3): the
# values XLA's own H100 spec and `get_topology_for_devices(...).target_config` on one report; CUDA
# runtime and cuDNN versions as installed by jax-cuda12-plugin[with-cuda] 0.10.2.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 12 minor: 9 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
# name -> (target config, dense bf16 peak FLOP/s, memory bandwidth B/s); public specifications.
TARGETS = {"h100": (H100_SXM, 989e12, 3.35e12)}
MODES = ("none", "text_encoder", "all")
PROGRAMS = ("memory", "dit-step", "text-step", "mxfp4")


@contextlib.contextmanager
def gpu_host():
    """lens_jax's backend choices as on a GPU host while tracing: `jax.default_backend()` reads "gpu".

    The library picks its attention kernel (cuDNN), MoE dispatch and latent donation from
    `jax.default_backend()`; on this CPU host that is "cpu", so without this the program compiled
    for the GPU target would be the one a CPU host builds. JAX itself does not read the public
    attribute (it uses its own xla_bridge), so only lens_jax's choices change.
    """
    saved = jax.default_backend
    jax.default_backend = lambda: "gpu"
    try:
        yield
    finally:
        jax.default_backend = saved


def target_device(name: str):
    from jax.experimental import topologies

    config = TARGETS[name][0] if name in TARGETS else Path(name).read_text()
    try:
        return topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1").devices[0]
    except NotImplementedError as e:  # jax without its CUDA plugin: no GPU compiler to ask
        raise SystemExit(f"no CUDA compiler in this environment ({e}); install jax-cuda12-plugin[with-cuda] and "
                         "jax-cuda12-pjrt matching jax (docs/aot_gpu.md) in a separate venv and run from there.")


def device_memory_gib(name: str) -> float:
    import re

    config = TARGETS[name][0] if name in TARGETS else Path(name).read_text()
    m = re.search(r"device_memory_size:\s*(\d+)", config)
    return int(m.group(1)) / GIB if m else float("nan")


def cost(compiled) -> dict:
    """XLA's HloCostAnalysis of the optimised module (run by the CPU client: the GPU executable has none)."""
    from jax._src import xla_bridge
    from jax._src.lib import xla_client

    module = compiled.runtime_executable().hlo_modules()[0]
    return xla_client._xla.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)


@dataclasses.dataclass
class Mem:
    """One program's device memory in GiB (XLA's static figures)."""

    args: float  # arguments + outputs - aliased, device memory
    temp: float
    host: float  # arguments + outputs in pinned host memory

    @property
    def total(self) -> float:
        return self.args + self.temp

    @classmethod
    def of(cls, compiled) -> "Mem":
        m = compiled.memory_analysis()
        args = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes) / GIB
        return cls(args, m.temp_size_in_bytes / GIB, aot_tpu._host_stats(compiled))


def _bytes(tree) -> int:
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def dit_host_gib(configs, mode: str) -> float:
    """DiT parameters the pipeline keeps in pinned host memory under `mode`."""
    from lens_jax.models import transformer as dit

    blocks = jax.eval_shape(lambda: dit.init_params(configs["dit"], jax.random.key(0), jnp.bfloat16))["transformer_blocks"]
    if mode == "all":
        return _bytes(blocks) / GIB
    if mode == "text_encoder":  # lens_jax.sampling.modulation.on_host moves the modulation kernels
        return _bytes([blocks[k]["kernel"] for k in dit.MODULATION_KEYS]) / GIB
    return 0.0


def text_encoder_host_gib(configs, mode: str) -> float:
    """Text-encoder parameters (its decoder layers, MXFP4-packed) in pinned host memory under `mode`."""
    from lens_jax.models import text_encoder as te

    if mode == "none":
        return 0.0
    config = configs["te"].truncated(max(configs["dit"].selected_layer_index) + 1)
    return _bytes(jax.eval_shape(lambda: te.init_params(config, jax.random.key(0), jnp.bfloat16, packed=True))["layers"]) / GIB


def resident_gib(configs, mode: str) -> float:
    """DiT + VAE parameters on the device while the text encoder runs (the pipeline keeps them loaded)."""
    from lens_jax.models import transformer as dit
    from lens_jax.models import vae as vae_lib

    key = jax.random.key(0)
    dit_abs = jax.eval_shape(lambda: dit.init_params(configs["dit"], key, jnp.bfloat16))
    vae_abs = jax.eval_shape(lambda: vae_lib.init_params(configs["vae"], key, jnp.bfloat16))
    return (_bytes(dit_abs) + _bytes(vae_abs)) / GIB - dit_host_gib(configs, mode)


def _vae_gib(configs) -> float:
    from lens_jax.models import vae as vae_lib

    return _bytes(jax.eval_shape(lambda: vae_lib.init_params(configs["vae"], jax.random.key(0), jnp.bfloat16))) / GIB


def _on_host(mem: Mem, host: float) -> Mem:
    """`mem` with `host` GiB of its arguments moved to host memory. The deviceless GPU target's devices have no
    memory spaces (jax 0.10.2: `addressable_memories()` is empty, `with_memory_kind("pinned_host")` yields
    None), so XLA compiles offloaded parameters as device arguments; the pipeline's placement is applied here."""
    if mem.host or not host:
        return mem
    return Mem(mem.args - host, mem.temp, host)


def memory_rows(configs, mesh, sizes, modes, text_tokens: int, batch: int, hbm: float):
    """Peak device memory per offload mode: text-encoding phase and sampling phase."""
    print(f"\n### Peak device memory per offload mode (XLA static estimate, GiB; device {hbm:.1f} GiB)\n")
    print("| mode | phase | program | args+out | (+host) | temp | device total | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    peaks: dict[tuple, float] = {}
    for mode in modes:
        t0 = time.perf_counter()
        te = _on_host(Mem.of(aot_tpu.compile_text_encoder(configs, mesh, text_tokens, 2, offload=mode != "none")),
                      text_encoder_host_gib(configs, mode))
        res = resident_gib(configs, mode)
        phase_te = te.total + res
        print(f"| {mode} | text encoding | text encoder 2 x {text_tokens} tokens (+ {res:.2f} DiT/VAE resident) | "
              f"{te.args:.2f} | {te.host:.2f} | {te.temp:.2f} | {phase_te:.2f} | {time.perf_counter() - t0:.0f} |",
              flush=True)
        sampler_mode = {"none": False, "text_encoder": "text_encoder", "all": True}[mode]
        for size in sizes:
            for label, cfg, steps in (("CFG 20 steps", True, 20), ("Turbo 4 steps", False, 4)):
                t0 = time.perf_counter()
                compiled = aot_tpu.compile_sampler(configs, mesh, size, cfg, steps, text_tokens, batch, sampler_mode)
                parts = compiled if isinstance(compiled, list) else [compiled]
                mems = [_on_host(Mem.of(p), dit_host_gib(configs, mode) if i == 0 else 0.0) for i, p in enumerate(parts)]
                # The decode as its own program runs with the DiT's device part still loaded.
                dit_device = resident_gib(configs, mode) - _vae_gib(configs)
                totals = [m.total + (dit_device if i else 0.0) for i, m in enumerate(mems)]
                total = max(totals)
                for i, m in enumerate(mems):
                    what = f"sampler {size}² {label}" + (" + decode" if len(mems) == 1 else
                                                        (", loop" if i == 0 else
                                                         f", decode (own program; + {dit_device:.2f} DiT resident)"))
                    print(f"| {mode} | sampling | {what} | {m.args:.2f} | {m.host:.2f} | {m.temp:.2f} | {totals[i]:.2f} | "
                          f"{time.perf_counter() - t0:.0f} |", flush=True)
                peaks[(mode, size, label)] = (phase_te, total)
    print("\n| mode | size | sampler | text encoding GiB | sampling GiB | **peak device GiB** |\n|---|---|---|---|---|---|")
    for (mode, size, label), (te_gib, sampling) in peaks.items():
        print(f"| {mode} | {size}² | {label} | {te_gib:.2f} | {sampling:.2f} | **{max(te_gib, sampling):.2f}** |")
    return peaks


def compile_dit_step(configs, device, size: int, text_tokens: int, batch: int = 2):
    """One DiT forward as the sampler's step runs it (bf16, attention as on a GPU host), abstract inputs."""
    from lens_jax.models import transformer as dit
    from lens_jax.sampling.resolution import PIXELS_PER_TOKEN

    c = configs["dit"]
    sh = jax.sharding.SingleDeviceSharding(device)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
    params = jax.tree.map(lambda a: sds(a.shape, a.dtype),
                          jax.eval_shape(lambda: dit.init_params(c, jax.random.key(0), jnp.bfloat16)))
    h = w = size // PIXELS_PER_TOKEN
    feats = [sds((batch, text_tokens, c.enc_hidden_dim), jnp.bfloat16)] * c.num_text_layers
    return dit.apply.lower(params, c, sds((batch, h * w, c.in_channels), jnp.bfloat16), feats,
                           sds((batch, text_tokens), jnp.bool_), sds((batch,), jnp.float32), (h, w), jnp.bfloat16,
                           dit.default_attention_impl(jnp.bfloat16)).compile()


def dit_step_report(configs, device, size: int, text_tokens: int, peak: float, bandwidth: float,
                    dump: str | None = None, top: int = 12) -> dict:
    """Kernels of one DiT step's optimised HLO: per block (the layer loop's body) and outside it."""
    t0 = time.perf_counter()
    compiled = compile_dit_step(configs, device, size, text_tokens)
    title = f"DiT step {size}², batch 2 (one CFG step), {text_tokens} text tokens, bf16"
    return kernel_report(compiled, title, time.perf_counter() - t0, configs["dit"].num_layers, peak, bandwidth,
                         dump, top)


def kernel_report(compiled, title: str, seconds: float, num_layers: int, peak: float, bandwidth: float,
                  dump: str | None = None, top: int = 12, pallas_cost=None) -> dict:
    """Kernels of a compiled program with one layer loop: per layer (the loop's body) and outside it.
    `pallas_cost(kernel) -> (FLOPs, bytes)` for Pallas kernels (opaque to the HLO reader, which counts 0
    FLOPs and every operand's bytes)."""
    text = compiled.as_text()
    if dump:
        Path(dump).write_text(text)
    module = hk.parse(text)
    xla = cost(compiled)
    body = hk.layer_loop(module, num_layers)
    layers = (hk.trip_count(module, body) or num_layers) if body else 0
    per_block = hk.kernels(module, body, peak, bandwidth) if body else []
    outside = hk.kernels(module, module.entry, peak, bandwidth, skip=body)
    for k in per_block + outside:
        if k.kind == "pallas" and pallas_cost is not None:
            k.flops, k.bytes = pallas_cost(k)
    mem = Mem.of(compiled)
    print(f"\n### {title} (compile {seconds:.1f} s; args {mem.args:.2f} GiB, temp {mem.temp:.2f} GiB)\n")
    print(f"XLA HloCostAnalysis of the optimised module: {xla.get('flops', float('nan')) / 1e12:.1f} TFLOP "
          f"(loop bodies counted once, cuDNN custom calls as 0), {xla.get('bytes accessed', float('nan')) / 1e9:.1f} GB "
          f"accessed; custom calls: "
          f"{sorted({i.attr('custom_call_target') for c in module.computations.values() for i in c if i.op == 'custom-call'})}")
    kinds: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for k in per_block:
        row = kinds[k.kind]
        row[0] += k.count
        row[1] += k.count * k.flops
        row[2] += k.count * k.bytes
        row[3] += k.count * k.roofline_ms(peak, bandwidth)
    out_ms = sum(k.count * k.roofline_ms(peak, bandwidth) for k in outside)
    block_ms = sum(r[3] for r in kinds.values())
    total = layers * block_ms + out_ms
    flops = layers * sum(k.count * k.flops for k in per_block) + sum(k.count * k.flops for k in outside)
    launches = sum(k.count for k in per_block)
    print(f"\n{launches} kernel launches per layer x {layers} layers + {sum(k.count for k in outside)} outside the layer "
          f"loop; matmul + attention FLOPs {flops / 1e12:.1f} TFLOP; roofline lower bound {total:.1f} ms "
          f"({peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s)\n")
    print("| kind (per layer) | launches | GFLOP | MB moved | roofline ms (x layers) | share |")
    print("|---|---|---|---|---|---|")
    for kind, (n, f, b, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][3]):
        print(f"| {kind} | {n} | {f / 1e9:.1f} | {b / 1e6:.0f} | {layers * ms:.2f} | {100 * layers * ms / total:.1f} % |")
    print(f"| outside the layer loop | {sum(k.count for k in outside)} | | | {out_ms:.2f} | "
          f"{100 * out_ms / total:.1f} % |")
    for name, rows in (hk.conditionals(module, body, peak, bandwidth) if body else []):
        print(f"Conditional {name} in the layer loop (the costliest branch is counted above): " + "; ".join(
            f"{b}: {1e3 * ms:.0f} µs, {n} launches ({src or '-'})" for b, ms, n, src in rows))
    print("\nNon-GEMM kernels of one layer, largest first (roofline µs; where lens_jax's source puts the fused ops):\n")
    print("| kind | µs | MB | result | fused ops | source (model frame -> innermost lens_jax frame) |")
    print("|---|---|---|---|---|---|")
    rest = sorted((k for k in per_block if k.kind not in ("gemm", "attention", "pallas")),
                  key=lambda k: -k.count * k.roofline_ms(peak, bandwidth))
    for k in rest[:top]:
        ops = ", ".join(f"{o} {n}" for o, n in k.ops.most_common(6))
        times = f" (x{k.count})" if k.count > 1 else ""
        print(f"| {k.kind} | {1e3 * k.roofline_ms(peak, bandwidth):.1f}{times} | {k.bytes / 1e6:.1f} | "
              f"{k.out_shape.split('{')[0]} | {ops} | {'; '.join(k.sources[:3])} |")
    print("\nGEMMs and attention of one layer:\n\n| kind | µs | GFLOP | MB | result | source |\n|---|---|---|---|---|---|")
    for k in per_block:
        if k.kind in ("gemm", "attention", "pallas"):
            times = f" (x{k.count})" if k.count > 1 else ""
            print(f"| {k.kind} | {1e3 * k.roofline_ms(peak, bandwidth):.1f}{times} | {k.flops / 1e9:.1f} | "
                  f"{k.bytes / 1e6:.0f} | {k.out_shape.split('{')[0]} | {'; '.join(k.sources[:2])} |")
    return dict(kernels_per_layer=launches, roofline_ms=total, kinds=dict(kinds))


def moe_branches(text: str, width: int, rows: int, peak: float, bandwidth: float) -> dict[str, list]:
    """Kernels of a one-MoE-layer program per branch of its top-level conditional (the MXFP4 decode's
    choice: `lax.cond(fast_ok, fast, general)`), each with the kernels
    outside it. Pallas kernels (opaque to XLA's cost model) get their FLOPs from the shapes: 2 x `rows`
    routed rows x out x in (`width`, the harness's hidden = expert width); their bytes are their operands
    + result (each byte once: a lower bound of the kernel's traffic)."""
    module = hk.parse(text)

    def patched(ks):
        for k in ks:
            if k.kind == "pallas":
                k.flops = 2.0 * rows * hk.dims_of(k.out_shape)[-1] * width
        return ks

    full = patched(hk.kernels(module, module.entry, peak, bandwidth))
    cond = next((i for i in module.computations[module.entry] if i.op == "conditional"), None)
    if cond is None:
        return {"only": full}
    branches = [patched(hk.kernels(module, n, peak, bandwidth)) for n in hk.branch_names(module, cond)]
    inside = {k.name for ks in branches for k in ks}
    outside = [k for k in full if k.name not in inside]
    # a two-way cond is a pred conditional (branch_names lists true, then false) or an index one (0 = false)
    pred_form = "true_computation=" in cond.rest
    labels = (["fast", "general"] if pred_form else ["general", "fast"]) if len(branches) == 2 else \
        [f"branch {i}" for i in range(len(branches))]
    return {label: outside + ks for label, ks in zip(labels, branches)}


def _unknown_trip_loops(text: str) -> bool:
    module = hk.parse(text)
    return any(hk.trip_count(module, body) is None for _, body in hk.while_bodies(module))


def mxfp4_report(device, width: int, tokens: int, impls, top_k: int = 4, peak: float = 989e12,
                 bandwidth: float = 3.35e12) -> None:
    """scripts/check_mxfp4_fusion.py's verdict for the GPU target, and each dispatch's roofline."""
    import check_mxfp4_fusion as cm

    sh = jax.sharding.SingleDeviceSharding(device)
    print(f"\n### MXFP4 decode fused into the expert GEMMs? (one GPT-OSS MoE layer, width {width}, {tokens} tokens, bf16)\n")
    print("| dispatch | verdict | GEMM computations | Triton GEMM fusions | decode inside | decode outside a GEMM |")
    print("|---|---|---|---|---|---|")
    rooflines = []
    for impl in impls:
        layer, args = cm.moe_layer(width, tokens, jnp.bfloat16)
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), args)
        try:
            text = jax.jit(layer, static_argnums=3).lower(*args, impl).compile().as_text()
            r = cm.analyse(text)
        except Exception as e:  # a refusal is a finding: print it as the row
            print(f"| {impl} | FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]} | | | | |", flush=True)
            continue
        print(f"| {impl} | {'FUSED' if r['fused'] else 'not fused'} | {r['gemm_computations']} | "
              f"{r['triton_gemm_fusions']} | {', '.join(r['fused_in']) or '-'} | "
              f"{', '.join(r['decode_outside_gemm']) or '-'} |", flush=True)
        rooflines.append((impl, text))
    print(f"\nRoofline of the layer per decode branch ({peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s; routed rows "
          f"{tokens} x top-{top_k}; Pallas kernels' FLOPs from their shapes, bytes = operands + result once):\n")
    print("| dispatch | branch | kernels | GEMM GFLOP | MB moved | roofline µs | of which GEMM / Pallas µs |")
    print("|---|---|---|---|---|---|---|")
    for impl, text in rooflines:
        if _unknown_trip_loops(text):
            print(f"| {impl} | - | data-dependent loops (trip counts unknown at compile time): no static roofline | | | | |")
            continue
        for label, ks in moe_branches(text, width, tokens * top_k, peak, bandwidth).items():
            ms = sum(k.count * k.roofline_ms(peak, bandwidth) for k in ks)
            mm = sum(k.count * k.roofline_ms(peak, bandwidth) for k in ks if k.kind in ("gemm", "pallas"))
            print(f"| {impl} | {label} | {sum(k.count for k in ks)} | {sum(k.count * k.flops for k in ks) / 1e9:.0f} | "
                  f"{sum(k.count * k.bytes for k in ks) / 1e6:.0f} | {1e3 * ms:.0f} | {1e3 * mm:.0f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="h100", help="h100, or a file holding a GpuTargetConfig text proto")
    ap.add_argument("--config", default="lens", choices=["lens", "tiny"], help="lens_jax/configs/<config>")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 1440], help="square image sizes in pixels")
    ap.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="offload modes for `memory`")
    ap.add_argument("--batch", type=int, default=1, help="images per sampler program")
    ap.add_argument("--text-tokens", type=int, default=192, help="text bucket of the sampler and the encoder")
    ap.add_argument("--dit-text-tokens", type=int, default=512,
                    help="text tokens of `dit-step` (512: scripts/benchmark_transformer.py's workload)")
    ap.add_argument("--te-text-tokens", type=int, default=512,
                    help="text tokens per row of `text-step` (512: scripts/benchmark_text_encoder.py's workload)")
    ap.add_argument("--te-moe", default="auto", help="text-step: the MoE dispatch (auto: the GPU row of MOE_DISPATCH; gmm: "
                    "the MXFP4 grouped-matmul kernel)")
    ap.add_argument("--moe-width", type=int, default=2880)
    ap.add_argument("--moe-tokens", type=int, default=1024)
    ap.add_argument("--moe-impls", nargs="+", default=["dense", "ragged", "grouped", "gmm"])
    ap.add_argument("--dump", default=None, help="dit-step: write the optimised HLO to DUMP (.<size> appended)")
    args = ap.parse_args(argv)

    from lens_jax import parallel
    from lens_jax.models import mxfp4

    configs = aot_tpu.load_configs(args.config)
    device = target_device(args.target)
    peak, bandwidth = TARGETS.get(args.target, (None, 989e12, 3.35e12))[1:]
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"jax {jax.__version__}; deviceless AOT compile for {device.device_kind} (target {args.target}) on a CPU "
          f"host; no GPU ran; memory is XLA's static estimate{'; XLA_FLAGS=' + flags if flags else ''}")
    mesh = parallel.make_mesh(1, 1, 1, devices=[device])
    with gpu_host():
        if "memory" in args.programs:
            memory_rows(configs, mesh, args.sizes, args.modes, args.text_tokens, args.batch,
                        device_memory_gib(args.target))
        if "dit-step" in args.programs:
            for size in args.sizes:
                dit_step_report(configs, device, size, args.dit_text_tokens, peak, bandwidth,
                                f"{args.dump}.{size}" if args.dump else None)
        if "text-step" in args.programs:
            t0 = time.perf_counter()
            compiled = aot_tpu.compile_text_encoder(configs, mesh, args.te_text_tokens, 2, moe_impl=args.te_moe)
            te, layers = configs["te"], max(configs["dit"].selected_layer_index) + 1
            routed = 2 * args.te_text_tokens * te.num_experts_per_tok

            def pallas_cost(k):
                """mxfp4_gemm: 2 x routed rows x out x in FLOPs (gate_up: in = hidden, down: in = intermediate);
                its operands hold every layer's packed experts, of which it reads one layer's."""
                out = hk.dims_of(k.out_shape)[-1]
                fan_in = te.hidden_size if out == 2 * te.intermediate_size else te.intermediate_size
                stack = layers * te.num_local_experts * out * (fan_in // 2 + fan_in // mxfp4.BLOCK)
                return 2.0 * routed * out * fan_in, k.bytes - stack + stack / layers

            kernel_report(compiled, f"text encoder, 2 x {args.te_text_tokens} tokens (one CFG pair), MXFP4-packed "
                          f"experts, bf16, layers up to the last selected one, moe_impl={args.te_moe}",
                          time.perf_counter() - t0, max(configs["dit"].selected_layer_index) + 1, peak, bandwidth,
                          f"{args.dump}.text" if args.dump else None, pallas_cost=pallas_cost)
        if "mxfp4" in args.programs:
            mxfp4_report(device, args.moe_width, args.moe_tokens, args.moe_impls, peak=peak, bandwidth=bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
