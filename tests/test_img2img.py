"""Image-to-image and inpainting on the tiny random pipeline (offline).

Every call uses the same text embeddings, size (64x64 px = 4x4 tokens), 4 steps and guidance 1.0
(the Turbo path, no CFG), so the whole file compiles one plain and one inpainting sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.errors import InputError
from lens_jax.models import vae as vae_lib
from lens_jax.pipelines import img2img
from lens_jax.pipelines.text_to_image import LensPipeline

SIZE = 64
STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return LensPipeline.tiny_random(seed=0)


@pytest.fixture(scope="module")
def image():
    # a smooth picture, wider than the bucket: fit_to_bucket scales it to 64x96 and crops the middle
    y, x = np.mgrid[0:SIZE, 0:96] / 64.0
    rgb = np.stack([np.sin(3 * x + y), np.cos(2 * y - x), np.sin(x * y * 4)], -1)
    return ((rgb + 1) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def kwargs(pipe):
    c = pipe.dit_config
    rng = np.random.default_rng(0)
    embeds = [rng.standard_normal((1, 8, c.enc_hidden_dim)).astype(np.float32) for _ in range(c.num_text_layers)]
    mask = np.ones((1, 8), bool)
    return dict(prompt_embeds=embeds, prompt_mask=mask, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=1.0, seed=7, output_type="np")


@pytest.fixture(scope="module")
def round_trip(pipe, image):
    """The input fitted to the bucket, encoded and decoded by the VAE, in [0, 1]."""
    pixels = img2img.to_model_range(img2img.fit_to_bucket(img2img.load_image(image), SIZE, SIZE))[None]
    tokens = jax.jit(vae_lib.encode_to_tokens, static_argnums=1)(pipe.vae_params, pipe.vae_config, jnp.asarray(pixels))
    raw = jax.jit(vae_lib.decode_tokens, static_argnums=(1, 3, 4))(pipe.vae_params, pipe.vae_config, tokens,
                                                                   SIZE // 16, SIZE // 16)
    return (np.clip(np.asarray(raw), -1, 1) + 1) / 2, np.asarray(tokens)


@pytest.fixture(scope="module")
def outputs(pipe, image, kwargs):
    black, white = np.zeros((SIZE, SIZE), np.uint8), np.full((SIZE, SIZE), 255, np.uint8)
    half = np.zeros((SIZE, SIZE), np.uint8)
    half[:, 32:] = 255
    return {
        "t2i": pipe(**kwargs),
        "s1": pipe(image=image, strength=1.0, **kwargs),
        "s025": pipe(image=image, strength=0.25, **kwargs),
        "white": pipe(image=image, strength=1.0, mask_image=white, **kwargs),
        "black": pipe(image=image, strength=1.0, mask_image=black, **kwargs),
        "half": pipe(image=image, strength=0.75, mask_image=half, **kwargs),
    }


def test_strength_one_equals_text_to_image(outputs):
    np.testing.assert_array_equal(outputs["s1"].images, outputs["t2i"].images)
    np.testing.assert_array_equal(outputs["s1"].latents, outputs["t2i"].latents)


def test_small_strength_stays_close_to_the_input(pipe, image, kwargs, round_trip):
    """Measure: relative L2 distance of the final latents to the input's latents x0.

    With a DiT whose velocity is zero (its output projection zeroed: same compiled program, other
    parameter values) the sampler leaves the start latents alone, so the result is exactly the
    flow-matching start (1 - s) x0 + s noise at the start step's sigma s, and the distance is
    s * |noise - x0| / |x0|: it shrinks with the strength (steps that run) down to 0.7x the strength-1
    figure at 1 of 4 steps here (Lens' shifted schedule: sigmas 1, 0.95, 0.87, 0.70; with 50 steps
    at 1024 px, strength 0.2 starts at sigma 0.65, see docs/img2img.md). The random tiny DiT's own
    velocity is not a denoiser, so only the monotonic trend is checked with it.
    """
    _, x0 = round_trip
    noise = pipe._initial_latents(None, kwargs["seed"], x0.shape)
    sigmas = np.asarray([1.0, 0.95451534, 0.8749241, 0.69985425], np.float32)
    dit_params = pipe.dit_params
    zero = {"kernel": jnp.zeros_like(dit_params["proj_out"]["kernel"]),
            "bias": jnp.zeros_like(dit_params["proj_out"]["bias"])}
    pipe.dit_params = {**dit_params, "proj_out": zero}
    try:
        dist = {}
        for strength, start in ((0.25, 3), (0.5, 2), (1.0, 0)):
            out = pipe(image=image, strength=strength, **kwargs)
            s = sigmas[start]
            np.testing.assert_allclose(out.latents, (1 - s) * x0 + s * noise, atol=1e-5)
            dist[strength] = np.linalg.norm(out.latents - x0) / np.linalg.norm(x0)
    finally:
        pipe.dit_params = dit_params
    assert dist[0.25] < dist[0.5] < dist[1.0]
    assert dist[0.25] / dist[1.0] == pytest.approx(0.69985425, rel=1e-4)  # = sigma at the start step
    # the random DiT: still monotonic in the strength
    d = [np.linalg.norm(pipe(image=image, strength=st, **kwargs).latents - x0) for st in (0.25, 0.75)]
    assert d[0] < d[1]


def test_inpainting_all_black_mask_is_the_vae_round_trip(outputs, round_trip):
    ref, tokens = round_trip
    np.testing.assert_allclose(outputs["black"].latents, tokens, atol=1e-6)
    np.testing.assert_allclose(outputs["black"].images, ref, atol=1e-5)


def test_inpainting_all_white_mask_is_img2img_at_strength_one(outputs):
    np.testing.assert_allclose(outputs["white"].latents, outputs["s1"].latents, atol=1e-6)
    np.testing.assert_allclose(outputs["white"].images, outputs["s1"].images, atol=1e-6)


def test_inpainting_keeps_the_left_half(outputs, round_trip):
    ref, tokens = round_trip
    out = outputs["half"]
    lat = out.latents.reshape(1, 4, 4, -1)
    np.testing.assert_allclose(lat[:, :, :2], tokens.reshape(1, 4, 4, -1)[:, :, :2], atol=1e-6)
    assert np.abs(lat[:, :, 2:] - tokens.reshape(1, 4, 4, -1)[:, :, 2:]).max() > 1e-2
    np.testing.assert_allclose(out.images[:, :, :32], ref[:, :, :32], atol=1e-5)  # weight 0 on kept tokens


def test_bad_inputs_fail_before_any_work(pipe, kwargs, image, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        pipe(image=tmp_path / "nope.png", **kwargs)
    for bad in (0.0, -0.5, 1.5, float("nan"), "x"):
        with pytest.raises(InputError, match="strength"):
            pipe(image=image, strength=bad, **kwargs)
    with pytest.raises(InputError, match="needs image"):
        pipe(mask_image=image, **kwargs)
    with pytest.raises(InputError, match="needs image"):
        pipe(strength=0.5, **kwargs)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a readable image"):
        pipe(image=tmp_path / "junk.png", **kwargs)


def test_bucket_and_schedule_helpers():
    assert img2img.closest_bucket(1920, 1080) == "16:9"
    assert img2img.closest_bucket(600, 800) == "3:4"
    assert [img2img.start_step(4, s) for s in (1.0, 0.75, 0.5, 0.25, 0.01)] == [0, 1, 2, 3, 3]
    from PIL import Image

    fitted = img2img.fit_to_bucket(Image.new("RGB", (300, 100)), 64, 64)
    assert fitted.size == (64, 64)
    mask = np.zeros((32, 32), np.float32)
    mask[3, 20] = 1.0  # one white pixel marks its whole 16x16 token
    assert img2img.token_mask(mask).ravel().tolist() == [0, 1, 0, 0]
