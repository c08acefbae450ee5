"""Throughput and latency of `lens-jax serve` under N concurrent clients, against the same number of
images generated one after another through the Python API (one `pipe(...)` call per image).

    python scripts/benchmark_serve.py --clients 32 --max-batch 8 --size 64x64 --steps 2

Runs the tiny random model (`--model tiny-random`, default) or a checkpoint (`--model PATH`). The server
is a real uvicorn on 127.0.0.1 in this process; clients are httpx; both sides are warmed up (compiled)
before timing. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, one request (one image) each")
    p.add_argument("--rounds", type=int, default=2, help="requests per client (timed)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--size", default="64x64", help="WxH")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--dtype", default=None)
    args = p.parse_args(argv)

    import httpx
    import uvicorn

    from lens_jax.tools.bulk import load_pipeline
    from lens_jax.tools.serve.app import ServeConfig, create_app

    pipe, model = load_pipeline(args.model, "lens", args.dtype)
    width, height = (int(v) for v in args.size.split("x"))
    n_images = args.clients * args.rounds
    call = dict(height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                output_type="np")

    # Sequential, Python API, one image per call.
    pipe("warm up", seed=0, **call)
    lat = []
    t0 = time.perf_counter()
    for i in range(n_images):
        t = time.perf_counter()
        pipe(f"prompt {i}", seed=i, **call)
        lat.append(time.perf_counter() - t)
    seq_s = time.perf_counter() - t0
    seq = {"images/s": n_images / seq_s, "p50": percentile(lat, 50), "p99": percentile(lat, 99)}

    # Server under N concurrent clients.
    app = create_app(pipe, ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                       queue_size=max(64, 2 * args.clients), model=model))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    body = {"size": args.size, "steps": args.steps, "guidance": args.guidance}

    async def clients():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                     limits=httpx.Limits(max_connections=args.clients + 4)) as c:
            r = await c.post("/v1/images/generations", json={"prompt": "warm up", "seed": 0, **body})
            r.raise_for_status()

            async def one(k):
                times = []
                for r_ in range(args.rounds):
                    t = time.perf_counter()
                    r = await c.post("/v1/images/generations", json={"prompt": f"prompt {k}", "seed": k * 7 + r_,
                                                                     **body})
                    r.raise_for_status()
                    times.append(time.perf_counter() - t)
                return times

            t0 = time.perf_counter()
            times = await asyncio.gather(*[one(k) for k in range(args.clients)])
            return time.perf_counter() - t0, [x for ts in times for x in ts]

    srv_s, lat = asyncio.run(clients())
    server.should_exit = True
    thread.join(30)
    srv = {"images/s": n_images / srv_s, "p50": percentile(lat, 50), "p99": percentile(lat, 99)}

    import jax

    print(f"\n{model}, {args.size}, {args.steps} steps, guidance {args.guidance}, {n_images} images, "
          f"{args.clients} clients, max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, "
          f"{jax.devices()[0].platform} x{jax.device_count()}\n")
    print("| | images/s | p50 latency (s) | p99 latency (s) |")
    print("|---|---|---|---|")
    print(f"| sequential Python API (1 image/call) | {seq['images/s']:.2f} | {seq['p50']:.3f} | {seq['p99']:.3f} |")
    print(f"| server, {args.clients} concurrent clients | {srv['images/s']:.2f} | {srv['p50']:.3f} | {srv['p99']:.3f} |")
    print(f"\nbatching gain (throughput): {srv['images/s'] / seq['images/s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
