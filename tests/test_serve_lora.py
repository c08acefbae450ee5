"""The service's per-request LoRAs and progress endpoint, in-process (httpx ASGI transport) on the tiny model:
a LoRA request equals LensPipeline with that LoRA loaded (bit for bit, same compiled program), requests with
different LoRA sets never share a sampler batch while equal sets do, the 422 cases name the `lora` field,
GET /v1/loras lists the allow-list, and GET /v1/progress/{id} reports queued / running k of n / done / failed,
404 for unknown ids, with finished entries expiring."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lens_jax.pipelines.text_to_image import LensPipeline
from lens_jax.sampling import sampler as sampler_lib
from lens_jax.tools import jobs as jobs_lib
from lens_jax.tools.serve import batcher as batcher_lib
from lens_jax.tools.serve.app import ServeConfig, create_app
from lens_jax.tools.serve.loras import LoraLibrary
from lens_jax.tools.serve.progress import ProgressBoard

FIXTURES = Path(__file__).parent / "fixtures" / "loras"
URL = "/v1/images/generations"
DEFAULTS = {"num_inference_steps": 2, "guidance_scale": 4.0}
SIZE = "32x32"
BATCH = 2


@pytest.fixture(scope="module")
def pipe():
    p = LensPipeline.tiny_random()
    p.defaults.update(DEFAULTS)
    return p


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """The golden adapter in its three formats (peft, kohya, comfy), a file of no LoRA format, a LoRA of
    other shapes, a non-safetensors file."""
    d = tmp_path_factory.mktemp("loras")
    for fmt in ("peft", "kohya", "comfy"):
        shutil.copy(FIXTURES / f"lora_{fmt}.safetensors", d / f"{fmt}.safetensors")
    save_file({"not.a.lora": np.zeros(2, np.float32)}, str(d / "junk.safetensors"))
    tensors = load_file(str(FIXTURES / "lora_peft.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:, :-1].copy()  # one input feature short: another model's LoRA
    save_file(tensors, str(d / "misfit.safetensors"), metadata=safe_open(str(FIXTURES / "lora_peft.safetensors"),
                                                                           "np").metadata())
    (d / "notes.txt").write_text("ignored")
    return d


def library_for(pipe, lora_dir, cache_size: int = 2) -> LoraLibrary:
    """The server's library: scanned, then checked against the model (misfit.safetensors dropped)."""
    library = LoraLibrary.from_dir(lora_dir, cache_size)
    library.check(pipe.dit_config)
    return library


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lens", timeout=120)


class running:
    """The app's worker thread (httpx's ASGI transport does not run the lifespan)."""

    def __init__(self, app):
        self.app = app

    def __enter__(self):
        self.app.state.batcher.start()
        return self.app

    def __exit__(self, *exc):
        self.app.state.batcher.stop()


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def body(seed: int, lora=None, **kw) -> dict:
    return {"prompt": f"a lighthouse {seed % 3}", "size": SIZE, "seed": seed, **({"lora": lora} if lora else {}), **kw}


def alone(pipe, seed: int) -> np.ndarray:
    """The request `body(seed)` generated straight through the pipeline as it stands (uint8)."""
    job = jobs_lib.make_job(DEFAULTS, f"a lighthouse {seed % 3}", seed=seed, height=32, width=32)
    return jobs_lib.to_uint8(jobs_lib.generate_batch(pipe, [job], BATCH, lambda *a: None)[0])


class Recorder:
    """Wraps a runner and records each sampler call's LoRA sets."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[list[tuple]] = []

    def __call__(self, jobs, callback):
        self.calls.append([j.loras for j in jobs])
        return self.inner(jobs, callback)


def test_lora_request_equals_pipeline_with_the_lora_and_reuses_the_program(pipe, lora_dir):
    library = LoraLibrary.from_dir(lora_dir)
    assert library.names() == ["comfy", "kohya", "misfit", "peft"]  # by format; junk.safetensors is skipped
    assert library.check(pipe.dit_config) == ["misfit"]  # shapes checked once the model is known
    app = create_app(pipe, ServeConfig(max_batch=BATCH, max_wait_ms=0), loras=library)

    async def main():
        async with client(app) as c:
            listed = (await c.get("/v1/loras")).json()
            plain = await c.post(URL, json=body(5))
            one = await c.post(URL, json=body(5, [{"name": "peft", "multiplier": 0.7}]))
            short = await c.post(URL, json=body(5, ["kohya:0.7"]))
            two = await c.post(URL, json=body(6, ["peft:0.5", {"name": "comfy", "multiplier": -0.25}]))
            return listed, plain, one, short, two

    with running(app):
        listed, plain, one, short, two = asyncio.run(main())
    assert [(x["name"], x["format"]) for x in listed["data"]] == [("comfy", "comfy"), ("kohya", "kohya"),
                                                                 ("peft", "peft")]
    assert listed["max_multiplier"] == 4.0
    assert [r.status_code for r in (plain, one, short, two)] == [200] * 4, [r.text for r in (plain, one, short, two)]
    assert one.json()["settings"]["lora"] == [{"name": "peft", "multiplier": 0.7}]
    assert two.json()["settings"]["lora"] == [{"name": "comfy", "multiplier": -0.25},
                                              {"name": "peft", "multiplier": 0.5}]  # canonical: by name
    programs = [p for p in pipe._programs.values() if isinstance(p, sampler_lib.Programs)]
    assert len(programs) == 1 and programs[0].step._cache_size() == 1  # one compile for all LoRA sets

    base = alone(pipe, 5)
    np.testing.assert_array_equal(pixels(plain.json()["data"][0]), base)
    pipe.load_lora(lora_dir / "peft.safetensors", 0.7)
    try:
        want = alone(pipe, 5)
    finally:
        pipe.unload_loras()
    np.testing.assert_array_equal(pixels(one.json()["data"][0]), want)
    assert np.abs(want.astype(int) - base).max() > 2  # the LoRA changes the picture
    # the same adapter in kohya format at the same multiplier: same image up to float rounding of the files
    assert np.abs(pixels(short.json()["data"][0]).astype(int) - want).max() <= 1
    # two LoRAs merge in name order: comfy then peft
    pipe.load_lora(lora_dir / "comfy.safetensors", -0.25).load_lora(lora_dir / "peft.safetensors", 0.5)
    try:
        want2 = alone(pipe, 6)
    finally:
        pipe.unload_loras()
    np.testing.assert_array_equal(pixels(two.json()["data"][0]), want2)
    assert programs[0].step._cache_size() == 1
    png = Image.open(io.BytesIO(base64.b64decode(one.json()["data"][0]["b64_json"])))
    assert '"loras": [["peft", 0.7]]' in png.text["parameters"]


def test_lora_sets_are_batched_apart_equal_sets_together(pipe, lora_dir):
    library = library_for(pipe, lora_dir, cache_size=2)
    rec = Recorder(batcher_lib.pipeline_runner(pipe, BATCH, library))
    app = create_app(pipe, ServeConfig(max_batch=BATCH, max_wait_ms=1000), runner=rec, loras=library)
    sets = [None, None, ["peft"], [{"name": "peft", "multiplier": 1.0}], ["comfy:0.5"], ["comfy:0.5"], ["peft:0.5"]]

    async def main():
        async with client(app) as c:
            answers = await asyncio.gather(*[c.post(URL, json=body(10 + i, s)) for i, s in enumerate(sets)])
            return answers, (await c.get("/metrics")).text

    with running(app):
        answers, metrics = asyncio.run(main())
    assert [r.status_code for r in answers] == [200] * len(sets)
    want = [[(), ()], [(("peft", 1.0),)] * 2, [(("comfy", 0.5),)] * 2, [(("peft", 0.5),)]]
    assert sorted(map(repr, rec.calls)) == sorted(map(repr, want))
    assert library.merges == 3  # one merge per LoRA set (the LRU keeps 2; no set came back)
    assert "lens_lora_merges 3.0" in metrics


def test_lora_field_errors_name_the_field(lora_dir):
    def fake_runner(jobs, callback):
        return np.zeros((len(jobs), 32, 32, 3), np.float32)

    with_dir = create_app(None, ServeConfig(max_batch=2), runner=fake_runner, defaults=DEFAULTS,
                          loras=LoraLibrary.from_dir(lora_dir))
    without = create_app(None, ServeConfig(max_batch=2), runner=fake_runner, defaults=DEFAULTS)
    cases = {
        "unknown": ["nope"], "path": ["../peft"], "subdir": [{"name": "sub/peft"}], "backslash": ["x\\peft"],
        "range": [{"name": "peft", "multiplier": 4.5}], "short range": ["peft:-5"], "short bad": ["peft:lots"],
        "twice": ["peft", "peft:0.5"], "too many": ["peft", "kohya", "comfy", "a", "b"],
        "extra key": [{"name": "peft", "mult": 1}], "not a list": 3, "junk file": ["junk"], "nan": ["peft:nan"],
    }

    async def main():
        async with client(with_dir) as c:
            bad = {k: await c.post(URL, json=body(1, v)) for k, v in cases.items()}
            fine = await c.post(URL, json=body(1, "peft:0.25"))  # one string is a list of one
        async with client(without) as c:
            no_dir = await c.post(URL, json=body(1, ["peft"]))
            listed = (await c.get("/v1/loras")).json()
        return bad, fine, no_dir, listed

    with running(with_dir), running(without):
        bad, fine, no_dir, listed = asyncio.run(main())
    for case, r in {**bad, "no --lora-dir": no_dir}.items():
        assert r.status_code == 422, (case, r.status_code, r.text)
        assert r.json()["detail"][0]["loc"][:2] == ["body", "lora"], (case, r.json())
    assert "unknown LoRA 'nope'" in bad["unknown"].json()["detail"][0]["msg"]
    assert "path separators" in bad["path"].json()["detail"][0]["msg"]
    assert "--lora-dir" in no_dir.json()["detail"][0]["msg"]
    assert fine.status_code == 200 and fine.json()["settings"]["lora"] == [{"name": "peft", "multiplier": 0.25}]
    assert listed["data"] == []


def test_progress_states_and_expiry():
    in_step = threading.Event()
    gate = threading.Event()

    def runner(jobs, callback):
        if any("boom" in j.prompt for j in jobs):
            raise RuntimeError("kaput")
        callback(0, 1.0, None)
        in_step.set()
        assert gate.wait(60), "test gate never opened"
        callback(1, 0.5, None)
        return np.zeros((len(jobs), 32, 32, 3), np.float32)

    app = create_app(None, ServeConfig(max_batch=1, max_wait_ms=0), runner=runner, defaults=DEFAULTS)
    a, b, f = "request-a-0001", "request-b-0002", "request-fail-03"

    async def until(cond, what):
        for _ in range(3000):
            if await cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    async def main():
        async with client(app) as c:
            get = lambda i: c.get(f"/v1/progress/{i}")
            first = asyncio.ensure_future(c.post(URL, json=body(1, request_id=a)))
            await until(lambda: asyncio.to_thread(in_step.is_set), "the first batch's first step")
            second = asyncio.ensure_future(c.post(URL, json=body(2, request_id=b)))

            async def queued():
                return (await get(b)).status_code == 200

            await until(queued, "the second request on the board")
            mid = {i: (await get(i)).json() for i in (a, b)}
            dup = await c.post(URL, json=body(3, request_id=a))
            unknown = await get("no-such-request")
            gate.set()
            await asyncio.gather(first, second)
            after = {i: (await get(i)).json() for i in (a, b)}
            failed = await c.post(URL, json=body(4, prompt="boom", request_id=f))
            return mid, dup, unknown, after, failed, (await get(f)).json()

    with running(app):
        mid, dup, unknown, after, failed, fail_state = asyncio.run(main())
    assert mid[a]["status"] == "running" and (mid[a]["step"], mid[a]["steps"]) == (1, 2)
    assert mid[b]["status"] == "queued" and mid[b]["step"] == 0 and mid[b]["ahead"] == 0
    assert dup.status_code == 422 and dup.json()["detail"][0]["loc"] == ["body", "request_id"]
    assert unknown.status_code == 404
    assert [after[i]["status"] for i in (a, b)] == ["done", "done"] and after[a]["step"] == 2
    assert failed.status_code == 500
    assert fail_state["status"] == "failed" and "kaput" in fail_state["detail"]


def test_progress_board_is_bounded():
    now = [0.0]
    board = ProgressBoard(ttl_s=10.0, keep=3, clock=lambda: now[0])
    for i in range(5):
        board.add(f"r{i}", 1, 4)
    board.update("r0", {"event": "progress", "step": 3})
    assert board.get("r0")["status"] == "running" and board.get("r0")["step"] == 3
    for i in range(5):
        board.finish(f"r{i}", "cancelled" if i == 4 else "done")
    assert board.get("r0") is None and board.get("r1") is None  # more than `keep` finished: oldest dropped
    assert board.get("r2")["status"] == "done" and board.get("r4")["status"] == "cancelled"
    now[0] = 10.5
    assert board.get("r4") is None and "r2" not in board  # expired after ttl_s
    board.add("live", 1, 4)
    now[0] = 1e6
    assert board.get("live")["status"] == "queued"  # live entries never expire


def test_web_page_lora_selector(pipe, lora_dir):
    """The page's LoRA <select> is filled from GET /v1/loras; the chosen LoRA is sent, shown and reused."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from .test_serve import serve
    from .test_web_page import ARGS, CHROMIUM  # skips this test too when Chromium is missing

    app = create_app(pipe, ServeConfig(max_batch=BATCH, max_wait_ms=0, model="tiny-random"),
                     loras=library_for(pipe, lora_dir))
    with serve(app) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            sync_api.expect(page.locator("#lorabox")).to_be_visible()
            assert page.eval_on_selector_all("#lora option", "os => os.map(o => o.value)") == ["", "comfy", "kohya",
                                                                                             "peft"]
            page.fill("#prompt", "a lighthouse 2")
            page.select_option("#sizemode", "size")
            page.fill("#width", "32")
            page.fill("#height", "32")
            page.fill("#seed", "5")
            page.select_option("#lora", "peft")
            page.fill("#lora_multiplier", "0.7")
            page.click("#generate")
            figure = page.locator("#gallery figure")
            sync_api.expect(figure).to_have_count(1, timeout=120_000)
            sync_api.expect(figure.locator("figcaption")).to_contain_text("LoRA peft × 0.7")
            page.select_option("#lora", "")
            figure.click()
            assert page.input_value("#lora") == "peft" and page.input_value("#lora_multiplier") == "0.7"
            assert not errors, errors
        finally:
            browser.close()


def test_lora_set_travels_with_the_broadcast_batch(pipe, lora_dir, monkeypatch):
    """Host 0's broadcast payload carries the jobs' LoRA set; a follower (`follow`) runs the batch with
    the same merged weights (the collectives replaced by a list, one process)."""
    library = library_for(pipe, lora_dir)
    jobs = [replace(jobs_lib.make_job(DEFAULTS, "a lighthouse 2", seed=5, height=32, width=32),
                    loras=(("peft", 0.7),))]
    sent = []
    monkeypatch.setattr(batcher_lib, "_broadcast", lambda payload: sent.append(payload) or payload)
    host0 = batcher_lib.broadcast_runner(pipe, BATCH, library)(jobs, lambda *a: None)
    assert b'"loras": [["peft", 0.7]]' in sent[0]

    ran = []
    real = jobs_lib.generate_batch

    def spy(pipe_, jobs_, batch_size, callback=None, dit_params=None):
        out = real(pipe_, jobs_, batch_size, callback, dit_params=dit_params)
        ran.append((jobs_, dit_params, out))
        return out

    inbox = [sent[0], batcher_lib._encode(None)]
    monkeypatch.setattr(batcher_lib, "_broadcast", lambda payload: inbox.pop(0))
    monkeypatch.setattr(jobs_lib, "generate_batch", spy)
    batcher_lib.follow(pipe, BATCH, library)
    assert not inbox and len(ran) == 1
    (followed, params, images), = ran
    assert followed == jobs and params is not None
    np.testing.assert_array_equal(images, host0)
