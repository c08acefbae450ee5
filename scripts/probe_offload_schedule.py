"""Does the streamed DiT's layer fetch overlap the block's compute on TPU? AOT-compile the DiT forward with
its blocks in pinned host memory for one v5e chip and read the compiled schedule (no TPU is used).

Two ways of fetching a layer are compared (docs/offload.md, "What it costs, and the next step"):

    host-slice    HostStream() (no layouts): the layer is sliced out of the host stack in a host
                  computation (compute_on("device_host")) on TPU; not overlapped.
    layer-major   HostStream.for_stack(...) as the library builds it: layer-major >= 3-D leaves by the
                  device-side asynchronous dynamic slice, constrained to the host array's layout; 2-D
                  leaves brought to the device whole before the loop and indexed there.

For each, prints memory_analysis() and, in the layer loop's body, how many instructions the scheduler
put between the start and the done of each asynchronous fetch (0: the transfer is not overlapped).

    python scripts/probe_offload_schedule.py --layers 2 --tokens 16 --fetch host-slice layer-major
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aot_tpu  # noqa: E402

MIB = 2**20


def async_gaps(hlo: str) -> list[tuple[str, int]]:
    """(kind, instructions between start and done) for every asynchronous fetch from host memory (S(5))
    outside the entry computation (in the layer and step loops): 0 means the transfer is not overlapped."""
    gaps = []
    for comp in hlo.split("\n\n"):
        if comp.lstrip().startswith("ENTRY"):
            continue
        lines = [line for line in comp.splitlines() if re.match(r"\s+(ROOT )?%\S+ = ", line)]
        names = [re.match(r"\s+(?:ROOT )?(%\S+) = ", line).group(1) for line in lines]
        for k, line in enumerate(lines):
            start = re.search(r"(dynamic-slice|custom-call|call|copy)-start\(", line)
            if "S(5)" in line and start:
                done = next(j for j in range(k + 1, len(lines)) if re.search(re.escape(names[k]) + r"\)", lines[j])
                            and "-done(" in lines[j])
                kind = "host slice" if "HostExecute" in line or start.group(1) == "call" else {
                    "dynamic-slice": "async dynamic slice", "copy": "copy"}.get(start.group(1), start.group(1))
                gaps.append((kind, done - k - 1))
    return gaps


def main(argv=None) -> int:
    from lens_jax import parallel
    from lens_jax.models import transformer as dit
    from lens_jax.parallel import offload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="lens", choices=["lens", "tiny"])
    ap.add_argument("--layers", type=int, default=2, help="DiT blocks (the loop body is the same for any count)")
    ap.add_argument("--tokens", type=int, default=16, help="image token grid side (16: 256², 64: 1024²)")
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--fetch", nargs="+", default=["host-slice", "layer-major"], choices=["host-slice", "layer-major"])
    args = ap.parse_args(argv)

    config = dataclasses.replace(aot_tpu.load_configs(args.config)["dit"], num_layers=args.layers)
    abstract = jax.eval_shape(lambda: dit.init_params(config, jax.random.key(0), jnp.bfloat16))
    device = aot_tpu.topology_devices(args.topology)[0]
    mesh = parallel.make_mesh(1, 1, 1, devices=[device])
    shardings = offload.on_host(parallel.logical_shardings(abstract, dit.param_axes(config), mesh), "transformer_blocks")
    rep = parallel.replicated(mesh)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
    n = args.tokens
    rest = (sds((2, n * n, config.in_channels), jnp.bfloat16),
            [sds((2, 192, config.enc_hidden_dim), jnp.bfloat16)] * config.num_text_layers,
            sds((2, 192), jnp.bool_), sds((2,), jnp.float32))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    for fetch in args.fetch:
        stream = offload.HostStream() if fetch == "host-slice" else offload.HostStream.for_stack(
            params["transformer_blocks"])
        t0 = time.perf_counter()
        compiled = dit.apply.lower(params, config, *rest, img_shape=(n, n), stream=stream).compile()
        mem = compiled.memory_analysis()
        gaps = async_gaps(compiled.as_text())
        print(f"{fetch}: compiled in {time.perf_counter() - t0:.0f} s; host args {mem.host_argument_size_in_bytes / MIB:.0f}"
              f" MiB, device args {mem.argument_size_in_bytes / MIB:.0f} MiB, temp {mem.temp_size_in_bytes / MIB:.0f} MiB")
        for kind in sorted({k for k, _ in gaps}):
            between = [g for k, g in gaps if k == kind]
            print(f"  {kind}: {len(between)} in loop bodies, instructions between start and done: "
                  f"min {min(between)}, max {max(between)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
