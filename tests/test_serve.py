"""The service: batching of concurrent same-bucket requests, answers equal to lone requests, limits
(429, 422 naming the field, 401, 413), SSE progress, disconnect cancellation; in-process (httpx ASGI
transport) and as a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from lens_jax.pipelines.text_to_image import LensPipeline
from lens_jax.tools.serve import batcher as batcher_lib
from lens_jax.tools.serve.app import ServeConfig, create_app

URL = "/v1/images/generations"
SIZES = ["64x64", "32x64"]  # two buckets (W x H)
DEFAULTS = {"num_inference_steps": 2, "guidance_scale": 4.0}


@pytest.fixture(scope="module")
def pipe():
    p = LensPipeline.tiny_random()
    p.defaults.update(DEFAULTS)
    return p


class Recorder:
    """Wraps a runner: records each sampler call's prompts; `gate` (when set) holds calls until opened."""

    def __init__(self, inner, gated: bool = False):
        self.inner = inner
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, jobs, callback):
        self.calls.append([j.prompt for j in jobs])
        self.entered.set()
        assert self.gate.wait(60), "test gate never opened"
        return self.inner(jobs, callback)


def fake_runner(jobs, callback):
    """Images that encode their seed, without a model (for the limits tests)."""
    for i in range(2):
        callback(i, 1.0, None)
    return np.stack([np.full((j.height, j.width, 3), (j.seed % 97) / 97, np.float32) for j in jobs])


@contextlib.contextmanager
def running(app):
    """The app's worker thread (httpx's ASGI transport does not run the lifespan)."""
    app.state.batcher.start()
    try:
        yield app
    finally:
        app.state.batcher.stop()


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lens", timeout=120)


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def body(i: int, **kw) -> dict:
    return {"prompt": f"prompt number {i % 5}", "size": SIZES[i % 2], "seed": 1000 + i, **kw}


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    t = time.monotonic()
    while not predicate():
        assert time.monotonic() - t < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_concurrent_requests_are_batched_and_equal_lone_requests(pipe):
    rec = Recorder(batcher_lib.pipeline_runner(pipe, 4))
    app = create_app(pipe, ServeConfig(max_batch=4, max_wait_ms=2000), runner=rec)
    lone = create_app(pipe, ServeConfig(max_batch=4, max_wait_ms=0))

    async def main():
        async with client(app) as c:
            answers = await asyncio.gather(*[c.post(URL, json=body(i)) for i in range(32)])
        async with client(lone) as c:
            alone = [await c.post(URL, json=body(i)) for i in (0, 1, 6, 31)]
            pair = await c.post(URL, json=body(6, n=2))
            seven = await c.post(URL, json=body(7, seed=1007 - 1))
        return answers, alone, pair, seven

    with running(app), running(lone):
        answers, alone, pair, seven = asyncio.run(main())
    assert [r.status_code for r in answers] == [200] * 32
    # 16 requests per bucket, 4 images per sampler call: 8 calls, each full.
    assert sorted(len(c) for c in rec.calls) == [4] * 8
    for r, i in zip(alone, (0, 1, 6, 31)):
        assert r.status_code == 200
        np.testing.assert_array_equal(pixels(answers[i].json()["data"][0]), pixels(r.json()["data"][0]))
    d = answers[6].json()
    assert d["settings"]["width"] == 64 and d["data"][0]["seed"] == 1006
    # n=2: image 1 has seed + 1 (here the same prompt/size as request 6 with seed 1006 -> image 0 = answer 6).
    p = pair.json()["data"]
    assert [x["seed"] for x in p] == [1006, 1007]
    np.testing.assert_array_equal(pixels(p[0]), pixels(d["data"][0]))
    assert not np.array_equal(pixels(p[0]), pixels(p[1]))
    assert seven.json()["data"][0]["seed"] == 1006


def test_stream_reports_progress_then_the_same_result(pipe):
    app = create_app(pipe, ServeConfig(max_batch=4, max_wait_ms=0))

    async def main():
        async with client(app) as c:
            plain = await c.post(URL, json=body(3))
            async with c.stream("POST", URL, json=body(3, stream=True)) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                text = (await r.aread()).decode()
            url = await c.post(URL, json=body(3, response_format="url"))
            png = await c.get(url.json()["data"][0]["url"])
            return plain, text, png, (await c.get("/metrics")).text, (await c.get("/health")).json()

    with running(app):
        plain, text, png, metrics, health = asyncio.run(main())
    events = [blk.split("\n") for blk in text.strip().split("\n\n")]
    names = [e[0].removeprefix("event: ") for e in events]
    assert names == ["queued", "started", "progress", "progress", "result"]
    import json

    steps = [json.loads(e[1].removeprefix("data: "))["step"] for e in events if e[0] == "event: progress"]
    assert steps == [1, 2]
    result = json.loads(events[-1][1].removeprefix("data: "))
    np.testing.assert_array_equal(pixels(result["data"][0]), pixels(plain.json()["data"][0]))
    assert png.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")),
                                  pixels(plain.json()["data"][0]))
    assert 'lens_requests_total{status="200"} 3.0' in metrics and "lens_images_total 3.0" in metrics
    assert "lens_compiles_total" in metrics and "lens_request_latency_seconds_bucket" in metrics
    assert "lens_queue_length 0.0" in metrics
    assert health["status"] == "ok" and health["defaults"]["steps"] == 2


def test_limits_full_queue_bad_fields_api_key_body_size():
    rec = Recorder(fake_runner, gated=True)
    app = create_app(None, ServeConfig(max_batch=2, max_wait_ms=0, queue_size=2, api_key="sesame",
                                       max_body_bytes=10_000), runner=rec, defaults=DEFAULTS)
    auth = {"Authorization": "Bearer sesame"}

    async def main():
        async with client(app) as c:
            assert (await c.post(URL, json=body(0))).status_code == 401
            bad = {}
            for field, extra in [("size", {"size": "72x64"}), ("steps", {"steps": 0}), ("n", {"n": 3}),
                                 ("promt", {"promt": "x"}), ("prompt", {"prompt": ""}),
                                 ("aspect_ratio", {"size": None, "aspect_ratio": "5:7"}),
                                 ("response_format", {"response_format": "jpeg"})]:
                r = await c.post(URL, json={**body(0), **extra}, headers=auth)
                bad[field] = (r.status_code, r.json()["detail"][0]["loc"])
            big = await c.post(URL, json=body(0, prompt="x" * 20_000), headers=auth)
            first = asyncio.ensure_future(c.post(URL, json=body(0), headers=auth))
            await until(rec.entered.is_set, "the first batch to start")
            queued = [asyncio.ensure_future(c.post(URL, json=body(i), headers=auth)) for i in (1, 2)]
            await until(lambda: app.state.batcher.queue_length() == 2, "two queued requests")
            full = await c.post(URL, json=body(3), headers=auth)
            rec.gate.set()
            rest = await asyncio.gather(first, *queued)
            return bad, big, full, rest

    with running(app):
        bad, big, full, rest = asyncio.run(main())
    for field, (status, loc) in bad.items():
        assert status == 422 and loc == ["body", field], (field, status, loc)
    assert big.status_code == 413
    assert full.status_code == 429 and "queue is full" in full.json()["detail"]
    assert [r.status_code for r in rest] == [200, 200, 200]


def test_failing_batch_fails_only_its_requests():
    def runner(jobs, callback):
        if any("boom" in j.prompt for j in jobs):
            raise RuntimeError("kaput")
        return fake_runner(jobs, callback)

    app = create_app(None, ServeConfig(max_batch=2, max_wait_ms=200), runner=runner, defaults=DEFAULTS)

    async def main():
        async with client(app) as c:
            return await asyncio.gather(c.post(URL, json=body(0, prompt="boom")), c.post(URL, json=body(0)),
                                        c.post(URL, json=body(1)), c.post(URL, json=body(3)))

    with running(app):
        r = asyncio.run(main())
    # boom + request 0 share a batch (size 64x64): both fail; the 32x64 batch succeeds.
    assert [x.status_code for x in r] == [500, 500, 200, 200]
    assert "kaput" in r[0].json()["detail"]


# ---------------------------------------------------------------------- a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app):
    """uvicorn on 127.0.0.1 and a free port, in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - t < 30, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_real_server_concurrent_clients_and_disconnect(pipe):
    rec = Recorder(batcher_lib.pipeline_runner(pipe, 4))
    app = create_app(pipe, ServeConfig(max_batch=4, max_wait_ms=2000), runner=rec)
    with serve(app) as base:
        async def clients():
            async with httpx.AsyncClient(base_url=base, timeout=120) as c:
                return await asyncio.gather(*[c.post(URL, json=body(i, n=1 + (i % 3 == 0))) for i in range(32)])

        answers = asyncio.run(clients())
        assert [r.status_code for r in answers] == [200] * 32
        assert len(rec.calls) < 32  # batched
        assert sum(len(c) for c in rec.calls) == sum(1 + (i % 3 == 0) for i in range(32))
        for i in (0, 5):  # equal to the in-process answers of the same requests
            assert answers[i].json()["data"][0]["seed"] == 1000 + i

        # A client that goes away while its request waits is cancelled; the others are not hurt.
        rec.calls.clear()
        rec.gate.clear()
        rec.entered.clear()

        async def disconnect():
            async with httpx.AsyncClient(base_url=base, timeout=120) as c:
                running_one = asyncio.ensure_future(c.post(URL, json=body(0, prompt="kept")))
                await until(rec.entered.is_set, "the first batch to start")
                async with httpx.AsyncClient(base_url=base, timeout=120) as leaver:
                    gone = asyncio.ensure_future(leaver.post(URL, json=body(1, prompt="leaves")))
                    await until(lambda: app.state.batcher.queue_length() == 1, "the leaving request to queue")
                    gone.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await gone
                await until(lambda: app.state.batcher.queue_length() == 0, "the cancellation")
                rec.gate.set()
                after = await c.post(URL, json=body(2, prompt="after"))
                return await running_one, after, (await c.get("/metrics")).text

        kept, after, metrics = asyncio.run(disconnect())
    assert kept.status_code == 200 and after.status_code == 200
    assert all("leaves" not in c for c in rec.calls), rec.calls
    assert 'lens_requests_total{status="499"} 1.0' in metrics
