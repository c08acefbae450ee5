#!/usr/bin/env python
"""Peak memory of restoring a quantised DiT: stored quantised (`convert --quantize`) vs quantised at load.

Writes a synthetic full-width DiT (`benchmark_convert.build_source`), converts it twice (bf16, and
bf16 with `--quantize`), then restores it in fresh child processes on the CPU backend, where device
memory is host memory, and reports each child's VmHWM above its baseline (after imports):

  * stored:     orbax_io.load_component(int8 output)                       (what from_pretrained does now)
  * at load:    quantize_params(load_component(bf16 output)) with both alive (from_pretrained(quantize=)
                on an unquantised checkpoint: the float DiT is held while its quantised copy is built)
  * bf16 only:  load_component(bf16 output), for the reader's own overhead over the parameter bytes

    python scripts/benchmark_quantized_load.py --layers 14 --quantize int8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark_convert import MiB, build_source, run_convert  # noqa: E402

_CHILD = r"""
import json, sys
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
import jax, jax.numpy as jnp
from lens_jax.models import quant
from lens_jax.weights import orbax_io
base = hwm()
out, how, mode = sys.argv[1:4]
_, params = orbax_io.load_component(out, "transformer", jnp.bfloat16)
if how == "at_load":
    q = quant.quantize_params(params, mode)
    jax.block_until_ready(q)
print("BENCH " + json.dumps({"baseline": base, "peak": hwm(), "mode": quant.params_mode(params)}))
"""


def restore(out: Path, how: str, mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), how, mode], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"restore failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][6:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--quantize", choices=["int8", "fp8"], default="int8")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qload_bench_", dir=args.workdir))
    try:
        extra, size = build_source("dit", args.layers, root)
        common = ["--src", str(root / "src"), "--dtype", "bf16", "--no-progress", *extra]
        run_convert(common + ["--dst", str(root / "bf16")])
        run_convert(common + ["--dst", str(root / "q"), "--quantize", args.quantize])
        stored = restore(root / "q", "stored", args.quantize)
        at_load = restore(root / "bf16", "at_load", args.quantize)
        plain = restore(root / "bf16", "plain", args.quantize)
        above = lambda r: round((r["peak"] - r["baseline"]) / MiB)  # noqa: E731
        print(json.dumps({
            "layers": args.layers, "quantize": args.quantize, "bf16_source_GiB": round(size / 2**30, 3),
            "stored_peak_above_baseline_MiB": above(stored), "at_load_peak_above_baseline_MiB": above(at_load),
            "bf16_only_peak_above_baseline_MiB": above(plain),
            "baseline_MiB": round(stored["baseline"] / MiB), "stored_mode": stored["mode"],
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
