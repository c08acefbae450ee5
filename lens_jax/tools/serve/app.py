"""The HTTP service (FastAPI): OpenAI-style image generation over a batching scheduler, a web page.

    app = create_app(pipe, ServeConfig(max_batch=4))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `POST /v1/images/generations`, `GET /v1/progress/{id}`, `GET /v1/loras`, `GET /v1/files/{name}`
(images answered as URLs), `GET /health`, `GET /metrics` (Prometheus text), `GET /` (the web page) and
`/static/*`.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import random
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ...errors import InputError
from .. import jobs as jobs_lib
from . import batcher as batcher_lib
from .loras import LoraLibrary
from .progress import ProgressBoard
from .schemas import GenerationRequest, GenerationResponse, ImageData, LoraRef, Settings


@dataclass(frozen=True)
class ServeConfig:
    """Limits and scheduling of one server."""

    max_batch: int = 4  # images per sampler call (every call runs this many rows)
    max_wait_ms: float = 50.0  # how long the oldest request waits for others of its bucket
    queue_size: int = 64  # waiting requests; more answer 429
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    timeout_s: float = 600.0  # per request, queue + generation; then 504
    max_body_bytes: int = 64 * 1024  # larger bodies answer 413
    max_pixels: int = 2080 * 2080  # per image
    base_resolution: int = 1024  # for aspect_ratio
    files_kept: int = 256  # images kept for response_format=url (oldest dropped first)
    progress_ttl_s: float = 600.0  # finished requests stay visible to GET /v1/progress/{id} this long
    progress_kept: int = 1024  # and at most this many of them
    model: str = ""


class Metrics:
    """The Prometheus metrics of one app (own registry, no process-wide state)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("lens_queue_length", "requests waiting for a batch", registry=r)
        self.requests = Counter("lens_requests", "finished requests by status", ["status"], registry=r)
        self.images = Counter("lens_images", "images generated", registry=r)
        self.batches = Counter("lens_batches", "sampler batches run", registry=r)
        self.compiles = Counter("lens_compiles", "new shape buckets run (each compiles its programs)", registry=r)
        self.latency = Histogram("lens_request_latency_seconds", "request latency, queue included", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.batch_seconds = Histogram("lens_batch_seconds", "sampler batch time", registry=r,
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.batch_images = Histogram("lens_batch_images", "images per batch (before padding)", registry=r,
                                      buckets=(1, 2, 4, 8, 16, 32, 64))

    def on_batch(self, s: batcher_lib.BatchStats) -> None:
        self.batches.inc()
        self.batch_seconds.observe(s.seconds)
        self.batch_images.observe(s.images)
        if not s.error:
            self.images.inc(s.images)
        if s.new_bucket:
            self.compiles.inc()


class Files:
    """PNG bytes served under /v1/files/, the oldest dropped beyond `keep`."""

    def __init__(self, keep: int):
        self.keep = keep
        self._files: OrderedDict[str, bytes] = OrderedDict()

    def add(self, data: bytes) -> str:
        name = f"{uuid.uuid4().hex}.png"
        self._files[name] = data
        while len(self._files) > self.keep:
            self._files.popitem(last=False)
        return name

    def get(self, name: str) -> bytes | None:
        return self._files.get(name)


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    detail: Any = message if field is None else [{"loc": ["body", field], "msg": message, "type": "value_error"}]
    return JSONResponse({"detail": detail}, status_code=status)


def _jobs(req: GenerationRequest, defaults: dict, cfg: ServeConfig,
          loras: LoraLibrary | None = None) -> list[jobs_lib.Job]:
    """The request's images as jobs (seed + i for image i); InputError names the field."""
    from ...pipelines.text_to_image import load_preset

    if req.n > cfg.max_batch:
        raise _FieldError("n", f"n={req.n} is more than this server's max batch {cfg.max_batch}.")
    lora_set = ()
    if req.lora:
        if loras is None:
            raise _FieldError("lora", "this server offers no LoRAs (start it with --lora-dir DIR).")
        try:
            lora_set = loras.resolve((x.name, x.multiplier) for x in req.lora)
        except InputError as e:
            raise _FieldError("lora", str(e)) from None
    if req.variant is not None:
        defaults = {**defaults, **{k: load_preset(req.variant)[k] for k in ("num_inference_steps", "guidance_scale")}}
    height = width = None
    if req.size is not None:
        if req.aspect_ratio is not None:
            raise _FieldError("size", "give size or aspect_ratio, not both.")
        width, height = (int(v) for v in req.size.split("x"))
        if width * height > cfg.max_pixels:
            raise _FieldError("size", f"size={req.size} is more than {cfg.max_pixels} pixels.")
    if req.seed is not None and req.seed + req.n - 1 > jobs_lib.MAX_SEED:  # image i gets seed + i, never wrapped
        raise _FieldError("seed", f"seed={req.seed} with n={req.n}: image i uses seed + i, so seed must be at most "
                                  f"{jobs_lib.MAX_SEED - req.n + 1}.")
    seed = random.randrange(jobs_lib.RANDOM_SEED_MAX - req.n + 2) if req.seed is None else req.seed
    field = "size" if req.size is not None else "aspect_ratio"
    try:
        first = jobs_lib.make_job(defaults, req.prompt, seed=seed, negative_prompt=req.negative_prompt,
                                  height=height, width=width, aspect_ratio=req.aspect_ratio,
                                  base_resolution=None if height else cfg.base_resolution, steps=req.steps,
                                  guidance=req.guidance)
    except InputError as e:
        raise _FieldError("prompt" if "prompt" in str(e) else field, str(e)) from None
    first = replace(first, loras=lora_set)
    return [first] + [replace(first, seed=seed + i, extra={}) for i in range(1, req.n)]


class _FieldError(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def create_app(pipe=None, config: ServeConfig | None = None, *, runner: batcher_lib.Runner | None = None,
               defaults: dict | None = None, on_shutdown=None, loras: LoraLibrary | None = None) -> FastAPI:
    """The FastAPI app. `pipe`: a LensPipeline (its defaults give steps/guidance); `runner` replaces
    the pipeline runner (multi-host broadcasting, tests); `on_shutdown()` runs after the worker stops;
    `loras`: the LoRAs requests may ask for (`serve.loras.LoraLibrary`; none when None)."""
    cfg = config or ServeConfig()
    if runner is None:
        runner = batcher_lib.pipeline_runner(pipe, cfg.max_batch, loras)
    defaults = dict(defaults or pipe.defaults)
    metrics = Metrics()
    files = Files(cfg.files_kept)
    board = ProgressBoard(cfg.progress_ttl_s, cfg.progress_kept)
    batcher = batcher_lib.Batcher(runner, cfg.max_batch, cfg.max_wait_ms / 1000.0, cfg.queue_size,
                                  on_batch=metrics.on_batch, on_queue=metrics.queue.set, on_event=board.update)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="lens-jax", version="1", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.config = batcher, metrics, cfg
    app.state.progress, app.state.loras = board, loras
    if loras is not None:
        merges = Gauge("lens_lora_merges", "LoRA sets merged into the DiT (cache misses)", registry=metrics.registry)
        merges.set_function(lambda: loras.merges)
    static = resources.files("lens_jax.tools.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return _error(413, f"request body over {cfg.max_body_bytes} bytes.")
        if length is None and request.method in ("POST", "PUT", "PATCH"):  # a chunked body would pass unmeasured
            return _error(411, f"send a Content-Length header (bodies of at most {cfg.max_body_bytes} bytes).")
        if cfg.api_key and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {cfg.api_key}".encode()):
                return JSONResponse({"detail": "missing or wrong API key; send 'Authorization: Bearer <key>'."},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model, "queue": batcher.queue_length(), "max_batch": cfg.max_batch,
                "defaults": {"steps": defaults["num_inference_steps"], "guidance": defaults["guidance_scale"]}}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.get("/v1/loras")
    async def list_loras():
        files = [] if loras is None else [loras.files[n] for n in loras.names()]
        return {"data": [{"name": f.name, "format": f.format} for f in files],
                "max_multiplier": None if loras is None else loras.max_multiplier,
                "max_loras": None if loras is None else loras.max_loras}

    @app.get("/v1/progress/{request_id}")
    async def progress(request_id: str):
        entry = board.get(request_id)
        if entry is None:
            return _error(404, f"no request {request_id!r} (finished requests are kept {cfg.progress_ttl_s:g} s).")
        if entry["status"] == "queued":
            entry["ahead"] = batcher.ahead(request_id)
        return entry

    @app.get("/v1/files/{name}")
    async def file(name: str):
        data = files.get(name)
        if data is None:
            return _error(404, f"no file {name!r} (files are kept for the last {cfg.files_kept} images).")
        return Response(data, media_type="image/png")

    def answer(req: GenerationRequest, ticket: batcher_lib.Ticket, images) -> dict:
        jobs = ticket.jobs
        data = []
        for job, image in zip(jobs, images):
            png = jobs_lib.to_png_bytes(image, {**job.settings(), "software": "lens-jax", "model": cfg.model})
            if req.response_format == "url":
                data.append(ImageData(url=f"/v1/files/{files.add(png)}", seed=job.seed))
            else:
                data.append(ImageData(b64_json=base64.b64encode(png).decode(), seed=job.seed))
        j = jobs[0]
        settings = Settings(prompt=j.prompt, negative_prompt=j.negative_prompt, width=j.width, height=j.height,
                            steps=j.steps, guidance=j.guidance, seed=j.seed, n=len(jobs), variant=req.variant,
                            lora=[LoraRef(name=n, multiplier=m) for n, m in j.loras] or None)
        return GenerationResponse(id=ticket.id, created=int(time.time()), data=data,
                                  settings=settings).model_dump(exclude_none=True)

    async def wait_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def finish(status: str, t0: float) -> None:
        metrics.requests.labels(status).inc()
        metrics.latency.observe(time.perf_counter() - t0)

    def track(ticket: batcher_lib.Ticket) -> None:
        """Progress of the ticket on the board, from queued to its outcome."""
        board.add(ticket.id, len(ticket.jobs), ticket.jobs[0].steps)

        def settled(future: asyncio.Future) -> None:
            error = None if future.cancelled() else future.exception()
            if future.cancelled() or isinstance(error, batcher_lib.Cancelled):
                board.finish(ticket.id, "cancelled", None if error is None else str(error))
            elif error is not None:
                board.finish(ticket.id, "failed", f"{type(error).__name__}: {error}")
            else:
                board.finish(ticket.id, "done")

        ticket.future.add_done_callback(settled)

    @app.post("/v1/images/generations")
    async def generate(req: GenerationRequest, request: Request):
        t0 = time.perf_counter()
        try:
            jobs = _jobs(req, defaults, cfg, loras)
            if req.request_id is not None and req.request_id in board:
                raise _FieldError("request_id", f"request_id {req.request_id!r} is in use; send a new one.")
        except _FieldError as e:
            finish("422", t0)
            return _error(422, str(e), e.field)
        try:
            ticket = batcher.submit(jobs, req.request_id)
        except batcher_lib.QueueFull as e:
            finish("429", t0)
            return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": "1"})
        track(ticket)
        if req.stream:
            return StreamingResponse(stream(req, ticket, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": ticket.id})
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({ticket.future, gone}, timeout=cfg.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if ticket.future in done:
                images = ticket.future.result()
            elif gone in done:
                batcher.cancel(ticket)
                finish("499", t0)
                return Response(status_code=499)
            else:
                batcher.cancel(ticket)
                finish("504", t0)
                return _error(504, f"the request took over {cfg.timeout_s:g} s.")
        except batcher_lib.Cancelled as e:
            finish("503", t0)
            return _error(503, str(e))
        except Exception as e:  # the batch failed
            finish("500", t0)
            return _error(500, f"generation failed: {type(e).__name__}: {e}")
        finally:
            gone.cancel()
            if not ticket.future.done():
                batcher.cancel(ticket)
        body = await asyncio.to_thread(answer, req, ticket, images)
        finish("200", t0)
        return JSONResponse(body, headers={"X-Request-Id": ticket.id})

    async def stream(req: GenerationRequest, ticket: batcher_lib.Ticket, t0: float):
        """SSE: `queued`, `started`, `progress` (step/steps) ..., then `result` (the JSON answer) or `error`."""

        def sse(event: str, data: dict) -> str:
            return f"event: {event}\ndata: {json.dumps(data)}\n\n"

        deadline = time.monotonic() + cfg.timeout_s
        try:
            yield sse("queued", {"id": ticket.id, "queue": batcher.queue_length()})
            while not ticket.future.done():
                getter = asyncio.ensure_future(ticket.events.get())
                done, _ = await asyncio.wait({getter, ticket.future}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    ev = getter.result()
                    yield sse(ev.pop("event"), {"id": ticket.id, **ev})
                else:
                    getter.cancel()
                if not done:
                    batcher.cancel(ticket)
                    finish("504", t0)
                    yield sse("error", {"id": ticket.id, "status": 504,
                                        "detail": f"the request took over {cfg.timeout_s:g} s."})
                    return
            while not ticket.events.empty():  # progress posted just before the answer
                ev = ticket.events.get_nowait()
                yield sse(ev.pop("event"), {"id": ticket.id, **ev})
            try:
                images = ticket.future.result()
            except Exception as e:
                status = 503 if isinstance(e, batcher_lib.Cancelled) else 500
                finish(str(status), t0)
                yield sse("error", {"id": ticket.id, "status": status, "detail": f"{type(e).__name__}: {e}"})
                return
            body = await asyncio.to_thread(answer, req, ticket, images)
            finish("200", t0)
            yield sse("result", body)
        finally:  # also when the client went away and the response was cancelled
            if not ticket.future.done():
                batcher.cancel(ticket)
                finish("499", t0)

    return app
