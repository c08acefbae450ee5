#!/usr/bin/env python
"""Where the DiT step's time goes: a jax.profiler trace of a few steps, summed per kernel and per kind.

    python scripts/profile_dit_step.py --config full --height 1024 --width 1024     # GPU (issue 11 item 3)
    python scripts/profile_dit_step.py --config tiny --height 64 --width 64 --dtype f32 --runs 1   # CPU smoke run

Same forward as `scripts/benchmark_transformer.py` (random weights, batch 2 = one CFG step, 512 text
tokens). After a warm-up call, `--runs` calls run under `jax.profiler.trace(..., create_perfetto_trace=True)`;
the Perfetto trace (Chrome JSON) is read back and its complete events are summed by name, on the
device's streams when the trace has any (GPU kernels), else over every event. Prints the share of
each kind of work (GEMM, attention, elementwise / reduction fusions, copies and transposes, other)
and the top kernels; `--json` writes both, `--keep-trace PATH` copies the trace (.json.gz) out.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from benchmark_transformer import CONFIGS, random_inputs

from lens_jax import transformer as T

# First matching substring (lower case) names the kind of a kernel / op.
KINDS = (
    ("attention", ("fmha", "flash", "cudnn", "attention", "softmax")),
    ("gemm", ("gemm", "cublas", "cutlass", "xmma", "gmma", "dot", "matmul", "sm90_")),
    ("copy / transpose", ("copy", "transpose", "memcpy", "memset", "bitcast", "dynamic-update-slice",
                          "dynamic_update_slice", "slice")),
    ("fusion (elementwise / reduction)", ("fusion", "reduce", "convert", "multiply", "add", "exp", "rsqrt")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def summarise(trace: dict, runs: int, top: int = 25) -> dict:
    """Per-name and per-kind totals (ms per step) of the trace's complete events."""
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    # "$file:line fn" events are the Python tracer's; "ThunkExecutor" rows nest the CPU ops.
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e
                and not str(e.get("name", "")).startswith(("$", "ThunkExecutor"))]
    # Accelerator lines only ("/device:GPU:0", "/device:TPU:0"); an installed libtpu adds an empty
    # "/device:CUSTOM:..." line even on CPU, which would otherwise leave nothing to sum.
    busy = {e.get("pid") for e in complete}
    device_pids = {pid for pid, n in names.items() if re.search(r"/device:(GPU|TPU)", n) and pid in busy}
    if device_pids:
        complete = [e for e in complete if e.get("pid") in device_pids]
        # Device lines also hold "XLA Modules" / "XLA Ops" rows that nest the kernels: keep the streams only.
        streams = {(e.get("pid"), e.get("tid")) for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
                   and e.get("pid") in device_pids and "stream" in e.get("args", {}).get("name", "").lower()}
        if streams:
            complete = [e for e in complete if (e.get("pid"), e.get("tid")) in streams]
    per_name: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in complete:
        per_name[e["name"]] += float(e["dur"]) / 1e3  # µs -> ms
        count[e["name"]] += 1
    total = sum(per_name.values()) or float("nan")
    per_kind: collections.Counter = collections.Counter()
    for name, ms in per_name.items():
        per_kind[kind_of(name)] += ms
    return dict(
        source="device streams" if device_pids else "all events (no device streams in the trace)",
        total_ms_per_step=total / runs,
        kinds=[dict(kind=k, ms_per_step=v / runs, share=v / total) for k, v in per_kind.most_common()],
        top=[dict(name=n, kind=kind_of(n), ms_per_step=v / runs, calls_per_step=count[n] / runs, share=v / total)
             for n, v in per_name.most_common(top)],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: full on GPU/TPU, small on CPU")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--runs", type=int, default=3, help="steps inside the trace")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=None, help="also write the summary to this JSON file")
    ap.add_argument("--keep-trace", default=None, help="copy the Perfetto trace (.json.gz) here")
    args = ap.parse_args()

    name = args.config or ("small" if jax.default_backend() == "cpu" else "full")
    c = CONFIGS[name]
    h, w = args.height // 16, args.width // 16
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    b, s = args.batch, args.text_tokens
    params, x, feats, mask, sigma = random_inputs(c, b, s, h, w, dtype)
    fwd = jax.jit(T.apply, static_argnames=("config", "img_shape", "compute_dtype", "attention_impl"))
    compiled = fwd.lower(params, c, x, feats, mask, sigma, (h, w), dtype, T.default_attention_impl(dtype)).compile()
    run = lambda: compiled(params, x, feats, mask, sigma).block_until_ready()  # noqa: E731
    run()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.runs):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        found = sorted(Path(tmp).rglob("perfetto_trace.json.gz"))
        if not found:
            raise SystemExit(f"no perfetto_trace.json.gz under the trace folder: {sorted(Path(tmp).rglob('*'))}")
        with gzip.open(found[0], "rt") as f:
            trace = json.load(f)
        if args.keep_trace:
            shutil.copy(found[0], args.keep_trace)
    summary = summarise(trace, args.runs, args.top)
    summary.update(device=jax.devices()[0].device_kind, config=name, size=f"{args.height}x{args.width}",
                   dtype=args.dtype, step_ms_traced=statistics.median(times) * 1e3)
    print(f"{summary['device']}: DiT {name} {summary['size']} batch {b} + {s} text, {args.dtype}; traced step "
          f"{summary['step_ms_traced']:.1f} ms; summed events ({summary['source']}) {summary['total_ms_per_step']:.1f} ms/step")
    print("| kind | ms per step | share |\n|---|---|---|")
    for k in summary["kinds"]:
        print(f"| {k['kind']} | {k['ms_per_step']:.2f} | {100 * k['share']:.1f} % |")
    print("\n| kernel / op | kind | ms per step | calls per step | share |\n|---|---|---|---|---|")
    for t in summary["top"]:
        print(f"| {t['name'][:90]} | {t['kind']} | {t['ms_per_step']:.3f} | {t['calls_per_step']:.0f} | "
              f"{100 * t['share']:.1f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
