"""Do the tests guard what they claim? Plant realistic bugs one at a time and expect the suite to fail.

    python scripts/mutation_check.py                 # every mutation, each against its own test subset
    python scripts/mutation_check.py --only bn-eps   # one mutation
    python scripts/mutation_check.py --full          # each mutation against the whole suite (slow)
    python scripts/mutation_check.py --list

Each mutation replaces one exact piece of source text in a temporary copy of the project (the
tracked and untracked-but-not-ignored files, `git ls-files`), runs pytest there (`-x -q`) and counts
the mutation as caught when pytest fails. A mutation whose text is no longer in the source is
reported as STALE (update the table). Nothing in the working tree is touched. On demand, not in CI.
Exit status: 0 when every mutation is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (file, original text, planted bug, tests that must catch it)
MUTATIONS: dict[str, tuple[str, str, str, list[str]]] = {
    "tiles-column-major": (
        "lens_jax/models/vae/tiling.py",
        "tiles = jnp.stack([z[:, y:y + th, x:x + tw] for y in ys for x in xs])",
        "tiles = jnp.stack([z[:, y:y + th, x:x + tw] for x in xs for y in ys])",
        ["tests/test_vae.py::test_tiled_decode_equals_an_independent_tile_and_blend"],
    ),
    "bn-eps": (
        "lens_jax/models/vae/api.py",
        "p = denormalize(unpack(tokens, h, w), params[\"bn\"], config.batch_norm_eps)",
        "p = denormalize(unpack(tokens, h, w), params[\"bn\"], config.norm_eps)",
        ["tests/test_pipeline.py::test_encoder_layers_and_raw_decode_match_golden"],
    ),
    "timestep-scale": (
        "lens_jax/sampling/sampler.py",
        "t / 1000.0, jnp.float32)",
        "t / 999.0, jnp.float32)",
        ["tests/test_pipeline.py::test_sampler_feeds_the_dit_the_golden_timesteps"],
    ),
    "batch-noise": (
        "lens_jax/pipelines/text_to_image.py",
        "keys = jax.random.wrap_key_data(np.array([[(seed + k) >> 32, (seed + k) & 0xFFFFFFFF] for k in range(b)],",
        "keys = jax.random.wrap_key_data(np.array([[(seed + k) >> 32, seed & 0xFFFFFFFF] for k in range(b)],",
        ["tests/test_reliability.py::test_noise_of_image_k_depends_only_on_its_seed"],
    ),
    "steps-zero-accepted": (
        "lens_jax/pipelines/validation.py",
        "    if steps < 1:",
        "    if steps < 0:",
        ["tests/test_reliability.py::test_generate_bad_number_exits_2_before_loading",
         "tests/test_reliability.py::test_pipeline_call_refuses_bad_arguments_first"],
    ),
    "guidance-nan-accepted": (
        "lens_jax/pipelines/validation.py",
        "    if not math.isfinite(g) or g < 0:",
        "    if g < 0:",
        ["tests/test_reliability.py::test_generate_bad_number_exits_2_before_loading"],
    ),
    "png-0600": (
        "lens_jax/tools/generate.py",
        "        with open(tmp, \"xb\") as f:",
        "        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), \"wb\") as f:",
        ["tests/test_reliability.py::test_pngs_respect_the_umask_and_no_part_file_remains"],
    ),
    "no-size-check": (
        "lens_jax/weights/orbax_io.py",
        "        if got != size:",
        "        if got is None:",
        ["tests/test_reliability.py::test_damaged_converted_checkpoint_one_line"],
    ),
    "convert-interrupt-anywhere": (  # Ctrl-C raised wherever it lands, orbax's writers mid-flight (the old race)
        "lens_jax/tools/interrupts.py",
        "    previous = signal.signal(signal.SIGINT, state._handler)",
        "    previous = signal.getsignal(signal.SIGINT)",
        ["tests/test_reliability.py::test_interrupted_convert_leaves_nothing"],
    ),
    "text-encoder-checked-lazily": (
        "lens_jax/pipelines/components.py",
        "    te_weights.check_text_encoder(root / \"text_encoder\", dtype, keep_mxfp4=keep_mxfp4, num_layers=max(selected) + 1)",
        "    pass",
        ["tests/test_reliability.py::test_truncated_text_encoder_file_found_at_load"],
    ),
}


def _copy_project(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run(name: str, full: bool, timeout: float, show: bool = False) -> str:
    path, old, new, tests = MUTATIONS[name]
    with tempfile.TemporaryDirectory(prefix=f"lens-mutant-{name}-") as tmp:
        tmp = Path(tmp)
        _copy_project(tmp)
        source = (tmp / path).read_text()
        if source.count(old) != 1:
            return "STALE"
        (tmp / path).write_text(source.replace(old, new))
        env = dict(os.environ, PYTHONPATH=str(tmp), LENS_JAX_COMPILATION_CACHE="off")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *([] if full else tests)]
        try:
            r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "TIMEOUT"
        if show:
            print("\n".join(line for line in r.stdout.splitlines() if line.startswith(("E ", "FAILED")))[-3000:])
        return "caught" if r.returncode != 0 else "MISSED"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=sorted(MUTATIONS), help="run only this mutation (repeatable)")
    p.add_argument("--full", action="store_true", help="run the whole suite against each mutation")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per mutation")
    p.add_argument("--list", action="store_true")
    p.add_argument("--show", action="store_true", help="print the failing assertions of each run")
    args = p.parse_args(argv)
    if args.list:
        for name, (path, _, _, tests) in MUTATIONS.items():
            print(f"{name:28s} {path}  ->  {' '.join(tests)}")
        return 0
    results = {}
    for name in args.only or list(MUTATIONS):
        t0 = time.perf_counter()
        results[name] = run(name, args.full, args.timeout, args.show)
        print(f"{name:28s} {results[name]:8s} {time.perf_counter() - t0:6.1f} s", flush=True)
    missed = [n for n, r in results.items() if r != "caught"]
    print(f"{len(results) - len(missed)}/{len(results)} caught" + (f"; not caught: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
