"""One process of the two-process multi-host tests (test_multihost*.py); not collected by pytest.

    python tests/multihost_worker.py PORT PROCESS_ID WORK MODES   # one of two processes (coordinator on PORT)
    python tests/multihost_worker.py single - WORK MODES          # the one-process reference, on one device
    python tests/multihost_worker.py PORT PROCESS_ID CONVERTED_ROOT OUT.npy   # the first form's `generate` alone

MODES is a comma-separated list, run in order in one process (one `jax.distributed` session):
- `generate`: LensPipeline over WORK/converted, two images -> WORK/<who>/generate.npy (process 0 writes);
- `bulk`: `lens-jax generate --prompts WORK/prompts.txt --out WORK/<who>/bulk`, then the same again (a rerun);
- `serve`: process 0 serves the app in-process (its lifespan run, requests through httpx) and writes the
  answers' pixels to WORK/<who>/serve.npz; process 1 runs `lens-jax serve` (it follows process 0). Two
  processes: between the two requests, one asks for a LoRA that only process 0's --lora-dir holds
  (WORK/loras_p0; process 1 has WORK/loras_p1), a batch that fails on the follower alone;
- `train`: `lens-jax train WORK/train.json` into WORK/multi/train (both processes) or WORK/single/train.
<who> is p0, p1 or single. Each of the two processes has 4 simulated CPU devices; they are joined as a user
joins hosts: LENS_JAX_DISTRIBUTED=1 with JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES and
JAX_PROCESS_ID, read by `lens_jax.tools.runtime.init_distributed` (which `lens-jax` calls; the Python-API
modes call it first), and JAX's CPU backend runs the cross-process collectives through gloo
(`jax_cpu_collectives_implementation`); the mesh is (data=2, fsdp=4) across both. The reference process
has one device. Every wait is bounded (the test bounds the processes too).
"""

from __future__ import annotations

import os
import sys
import time

SINGLE = len(sys.argv) > 1 and sys.argv[1] == "single"
if not SINGLE:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np  # noqa: E402

SIZES = ("32x32", "32x48")  # the serve mode's two buckets (W x H)
MESH_FLAGS = ["--data", "1"] if SINGLE else ["--data", "2"]  # fsdp takes the rest: 4 across two processes


def _cli(*argv: str) -> None:
    from lens_jax.tools.cli import main

    code = main(list(argv))
    assert code == 0, f"lens-jax {argv[0]} returned {code}"


def generate(root: str, out: str) -> None:
    from lens_jax import LensPipeline, parallel

    _join()
    if SINGLE:
        mesh = parallel.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    else:
        mesh = parallel.make_mesh(data=2, fsdp=4)
    pipe = LensPipeline.from_pretrained(root, dtype="f32", mesh=mesh)
    result = pipe("a red cube", height=32, width=32, num_inference_steps=2, guidance_scale=4.0, seed=3,
                  num_images_per_prompt=2, output_type="np")
    if jax.process_index() == 0:
        np.save(out, np.asarray(result.images))
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, "
          f"mesh {dict(mesh.shape)}, images {np.asarray(result.images).shape}", flush=True)


def bulk(work: str, out: str) -> None:
    argv = ["generate", "--prompts", f"{work}/prompts.txt", "--out", out, "--model", f"{work}/converted",
            "--dtype", "f32", "--height", "32", "--width", "32", "--steps", "2", "--guidance", "4.0", "--seed", "10",
            *MESH_FLAGS]
    _cli(*argv)
    before = {p.name: p.stat().st_mtime_ns for p in sorted(os.scandir(out), key=lambda e: e.name)}
    print("bulk: rerun", file=sys.stderr, flush=True)
    _cli(*argv)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(os.scandir(out), key=lambda e: e.name)}
    assert after == before, f"the rerun touched files: {before} -> {after}"


def _requests() -> dict[str, dict]:
    """Name -> request body; `host0_lora` (two processes only) fails on the follower alone."""
    requests = {"r0": {"prompt": "a red cube", "size": SIZES[0], "seed": 11, "n": 2, "steps": 2, "guidance": 4.0},
                "host0_lora": {"prompt": "a red cube", "size": SIZES[0], "seed": 13, "steps": 2, "guidance": 4.0,
                               "lora": "peft:0.5"},
                "r1": {"prompt": "a lighthouse", "size": SIZES[1], "seed": 12, "steps": 2, "guidance": 4.0}}
    if SINGLE:
        del requests["host0_lora"]
    return requests


def serve(work: str, out: str) -> None:
    import asyncio
    import base64
    import io

    if not SINGLE and os.environ["JAX_PROCESS_ID"] != "0":  # the follower: the real command, returns at shutdown
        _cli("serve", "--model", f"{work}/converted", "--dtype", "f32", "--max-batch", "2", *MESH_FLAGS,
             "--lora-dir", f"{work}/loras_p1")
        print("serve: the follower returned", flush=True)
        return

    import httpx
    from PIL import Image

    from lens_jax import parallel
    from lens_jax.tools.bulk import load_pipeline
    from lens_jax.tools.serve import batcher as batcher_lib
    from lens_jax.tools.serve.app import ServeConfig, create_app
    from lens_jax.tools.serve.loras import LoraLibrary

    # What `lens-jax serve` builds on process 0 (lens_jax.tools.serve.run), served in-process.
    _join()
    mesh = parallel.make_mesh(data=1 if SINGLE else 2)
    pipe, model = load_pipeline(f"{work}/converted", "lens", "f32", mesh)
    config = ServeConfig(max_batch=2, max_wait_ms=0, timeout_s=240, model=model)
    if SINGLE:
        app = create_app(pipe, config)
    else:
        loras = LoraLibrary.from_dir(f"{work}/loras_p0")
        loras.check(pipe.dit_config)
        runner = batcher_lib.broadcast_runner(pipe, config.max_batch, loras)
        app = create_app(pipe, config, runner=runner, on_shutdown=runner.stop, loras=loras)

    async def main():
        async with app.router.lifespan_context(app):  # starts the batcher; on exit stops it and the follower
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://lens", timeout=240) as c:
                return {k: await c.post("/v1/images/generations", json=r) for k, r in _requests().items()}

    answers = asyncio.run(asyncio.wait_for(main(), 300))
    failed = answers.pop("host0_lora", None)
    if failed is not None:  # the follower could not read the LoRA: host 0 answers with that host's error
        print(f"serve: the host-0-only LoRA request answered {failed.status_code}: {failed.text}", flush=True)
    pixels = {}
    for k, r in answers.items():
        assert r.status_code == 200, r.text
        for i, item in enumerate(r.json()["data"]):
            png = base64.b64decode(item["b64_json"])
            pixels[f"{k}_{i}"] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.savez(out, **pixels)
    print(f"serve: {len(answers)} answers, host 0 shut down", flush=True)


def train(work: str, out: str) -> None:
    _cli("train", f"{work}/train.json", "--set", f"train.output_dir={out}",
         "--set", f"parallel.data={1 if SINGLE else 2}")
    print(f"train: process {jax.process_index()} of {jax.process_count()}", flush=True)  # joined by the CLI


def _join() -> None:
    """Join the two-process job before using the Python API (the CLI joins by itself, from the environment)."""
    from lens_jax.tools.runtime import init_distributed

    assert init_distributed() is not SINGLE
    if not SINGLE:
        assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4


def main(port: str, process_id: str, work: str, modes: str) -> None:
    if not SINGLE:  # what a user sets on each host; lens_jax.tools.runtime.init_distributed reads it
        os.environ.update(LENS_JAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID=process_id)
    if modes.endswith(".npy"):  # the original form: CONVERTED_ROOT OUT.npy
        return generate(work, modes)
    who = "single" if SINGLE else f"p{process_id}"  # (no JAX call before the job is joined)
    os.makedirs(f"{work}/{who}", exist_ok=True)
    t0 = time.perf_counter()
    for mode in modes.split(","):
        print(f"== {mode} (at {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        if mode == "generate":
            generate(f"{work}/converted", f"{work}/{who}/generate.npy")
        elif mode == "bulk":
            bulk(work, f"{work}/{who}/bulk")
        elif mode == "serve":
            serve(work, f"{work}/{who}/serve.npz")
        elif mode == "train":  # the two processes share one output folder (orbax writes one checkpoint)
            train(work, f"{work}/{'single' if SINGLE else 'multi'}/train")
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    print(f"== done (at {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
