"""The service's request checks that need no batch to run: a body without Content-Length (chunked)
cannot slip past the size limit, a NaN/infinite guidance is named as such, and seeds never wrap."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from lens_jax.tools.serve.app import ServeConfig, create_app

URL = "/v1/images/generations"


def never_run(jobs, callback):
    raise AssertionError("no request of these tests may reach the sampler")


@pytest.fixture(scope="module")
def app():
    # a short timeout: a request that wrongly got past the checks answers 504 instead of hanging
    return create_app(None, ServeConfig(max_body_bytes=10_000, max_batch=4, timeout_s=3), runner=never_run,
                      defaults={"num_inference_steps": 2, "guidance_scale": 4.0})


def post(app, **kwargs) -> httpx.Response:
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://lens") as c:
            return await c.post(URL, **kwargs)

    return asyncio.run(main())


def test_a_chunked_body_is_refused_not_read_unmeasured(app):
    async def chunks():  # no Content-Length: httpx sends it chunked
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = post(app, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 411, (r.status_code, r.text[:200])
    assert "Content-Length" in r.json()["detail"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_guidance_is_named(app, value):
    body = '{"prompt": "a", "size": "32x32", "guidance": %s}' % value  # Python's JSON parser takes these
    r = post(app, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "guidance"] and "finite" in err["msg"], err


def test_seed_plus_n_past_the_range_is_named_not_wrapped(app):
    r = post(app, json={"prompt": "a", "size": "32x32", "seed": 2**64 - 1, "n": 2})  # image 1 was given seed 0
    assert r.status_code == 422, (r.status_code, r.text[:200])
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "seed"] and f"at most {2**64 - 2}" in err["msg"], err


@pytest.mark.parametrize("field, value", [("n", True), ("steps", "3"), ("seed", "5"), ("guidance", "4"),
                                          ("stream", "yes"), ("steps", 2.0)])
def test_numbers_and_flags_are_not_coerced(app, field, value):
    r = post(app, json={"prompt": "a", "size": "32x32", field: value})
    assert r.status_code == 422, (field, value, r.status_code, r.text[:200])
    assert r.json()["detail"][0]["loc"] == ["body", field]


def test_an_integer_guidance_is_still_a_number(app):
    r = post(app, json={"prompt": "a", "size": "32x32", "guidance": -1})  # int for a float: validated as a number
    assert r.status_code == 422 and "greater than or equal to 0" in r.json()["detail"][0]["msg"]
