"""What a LoRA set costs the server per batch: the batch time without a LoRA, with a LoRA set not in the
`--lora-cache` LRU (read the files + merge into the DiT), and with a cached set; plus the number of sampler
compilations (the jit cache of the step program), which stays 1 whatever the LoRA sets.

    python scripts/benchmark_serve_lora.py --lora-dir tests/fixtures/loras --size 64x64 --steps 4

Runs the server's runner (`serve.batcher.pipeline_runner` with a `serve.loras.LoraLibrary`) in process on
the tiny random model (`--model tiny-random`, default) or a checkpoint (`--model PATH`). Every LoRA in the
folder is used once as a single-LoRA set at multiplier 0.8 (median of `--repeats` cache misses: the LRU is
cleared before each); the cache-hit and no-LoRA figures are medians over `--repeats` batches. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--lora-dir", required=True)
    p.add_argument("--size", default="64x64", help="WxH")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="rows per sampler call (the server's --max-batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default=None)
    args = p.parse_args(argv)

    from lens_jax.sampling import sampler as sampler_lib
    from lens_jax.tools import jobs as jobs_lib
    from lens_jax.tools.bulk import load_pipeline
    from lens_jax.tools.serve import batcher as batcher_lib
    from lens_jax.tools.serve.loras import LoraLibrary

    library = LoraLibrary.from_dir(args.lora_dir, cache_size=2)
    pipe, model = load_pipeline(args.model, "lens", args.dtype)
    library.check(pipe.dit_config)
    if not library.files:
        print(f"no usable LoRA in {args.lora_dir}", file=sys.stderr)
        return 1
    run = batcher_lib.pipeline_runner(pipe, args.batch, library)
    width, height = (int(v) for v in args.size.split("x"))
    job = jobs_lib.make_job({"num_inference_steps": args.steps, "guidance_scale": 4.0}, "a lighthouse at dusk",
                            seed=1, height=height, width=width)

    def timed(loras, clear: bool = False) -> float:
        if clear:
            library.clear()
        t0 = time.perf_counter()
        run([replace(job, loras=loras)], lambda *a: None)
        return time.perf_counter() - t0

    compile_s = timed(())
    rows = [("first batch, no LoRA (compiles)", compile_s)]
    rows.append(("no LoRA", statistics.median(timed(()) for _ in range(args.repeats))))
    for name in library.names():
        lora_set = ((name, 0.8),)
        timed(lora_set, clear=True)  # the first merge also compiles the small merge programs
        rows.append((f"{name}:0.8, cache miss (read + merge)",
                     statistics.median(timed(lora_set, clear=True) for _ in range(args.repeats))))
        rows.append((f"{name}:0.8, cache hit", statistics.median(timed(lora_set) for _ in range(args.repeats))))
    programs = [v for v in pipe._programs.values() if isinstance(v, sampler_lib.Programs)]
    print(f"model {model}, {args.size}, {args.steps} steps, batch {args.batch}\n")
    print("| batch | ms |\n|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds * 1000:.1f} |")
    print(f"\nsampler programs: {len(programs)}, step-program compilations: "
          f"{sum(p.step._cache_size() for p in programs)}, LoRA sets merged: {library.merges}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
