"""`lens-jax serve`: an HTTP service that batches concurrent requests, with a web page at `/`.

    lens-jax serve --model PATH [--host 127.0.0.1 --port 8000 --api-key KEY --max-batch 4
                                 --max-wait-ms 50 --queue-size 64 --lora-dir DIR]

See docs/serving.md. Multi-host: run the same command on every host with LENS_JAX_DISTRIBUTED=1
(`lens_jax.tools.runtime.init_distributed`); host 0 serves HTTP and broadcasts each batch, the other
hosts run it with host 0.
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an HTTP API (OpenAI images shape) and a web page",
                       description="Serve Lens over HTTP: POST /v1/images/generations, GET /health, GET /metrics, "
                                   "and a web page at /. `--model tiny-random` runs offline on a tiny random model.")
    p.add_argument("--model", default=None, help="checkpoint folder, hub id, or 'tiny-random'")
    p.add_argument("--variant", default="lens", choices=["lens", "lens-base", "lens-turbo"],
                   help="default steps/guidance of requests that do not set them")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: env LENS_JAX_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="images per sampler call (default: the mesh's data axis size, at least 4)")
    p.add_argument("--max-wait-ms", type=float, default=50.0, help="how long a request waits for batch mates")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request limit in seconds (504 after)")
    p.add_argument("--dtype", default=None, choices=["bf16", "f32"], help="default: bf16 on GPU/TPU, f32 on CPU")
    p.add_argument("--data", type=int, default=None, help="mesh data-parallel size (default 1)")
    p.add_argument("--fsdp", type=int, default=None, help="mesh fsdp size (default: the remaining devices)")
    p.add_argument("--tensor", type=int, default=1, help="mesh tensor-parallel size")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="offer the LoRA .safetensors files in DIR (peft, kohya or comfy) to requests by file stem")
    p.add_argument("--lora-cache", type=int, default=2, metavar="N",
                   help="LoRA sets whose merged DiT weights are kept (each holds a copy of the adapted kernels)")
    p.add_argument("--offload", default="none", choices=["none", "text_encoder", "all", "auto"],
                   help="stream layers from host memory (see `lens-jax generate --help`)")


def check_args(args) -> None:
    """The server's flags, before anything is loaded (a bad port or limit would surface only after the weights)."""
    import math

    from lens_jax.errors import InputError

    from ..generate import NO_MODEL

    if args.model is None:
        raise InputError(NO_MODEL)
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a TCP port; give one in [1, 65535] (0 picks a free one).")
    for flag, value in (("--max-batch", args.max_batch), ("--queue-size", args.queue_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1; got {value}.")
    if not (math.isfinite(args.max_wait_ms) and args.max_wait_ms >= 0):
        raise InputError(f"--max-wait-ms must be a finite number >= 0 (milliseconds); got {args.max_wait_ms}.")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InputError(f"--timeout must be a finite number of seconds > 0; got {args.timeout}.")


def run(args) -> int:
    import os

    import jax

    from lens_jax import parallel

    from ..bulk import load_pipeline
    from ..runtime import enable_compilation_cache
    from . import batcher as batcher_lib
    from .loras import LoraLibrary

    check_args(args)
    enable_compilation_cache()
    loras = None if args.lora_dir is None else LoraLibrary.from_dir(args.lora_dir, args.lora_cache)
    mesh = parallel.make_mesh(args.data, args.fsdp, args.tensor)
    max_batch = args.max_batch or max(4, mesh.shape["data"])
    pipe, model = load_pipeline(args.model, args.variant, args.dtype, mesh, args.offload)
    if loras is not None:
        loras.check(pipe.dit_config)  # every host drops the same files (same --lora-dir contents)
    if jax.process_count() > 1 and jax.process_index() != 0:
        print(f"lens-jax serve: host {jax.process_index()} follows host 0's batches", file=sys.stderr)
        batcher_lib.follow(pipe, max_batch, loras)
        return 0

    import uvicorn

    from .app import ServeConfig, create_app

    multi = jax.process_count() > 1
    config = ServeConfig(max_batch=max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                         api_key=args.api_key or os.environ.get("LENS_JAX_API_KEY") or None,
                         timeout_s=args.timeout, model=model)
    runner = batcher_lib.broadcast_runner(pipe, max_batch, loras) if multi else None
    app = create_app(pipe, config, runner=runner, on_shutdown=runner.stop if multi else None, loras=loras)
    if loras is not None:
        print(f"lens-jax serve: {len(loras.files)} LoRAs from {args.lora_dir}: {', '.join(loras.names()) or 'none'}",
              file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it.",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
