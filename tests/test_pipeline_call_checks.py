"""`LensPipeline.__call__` refuses a wrong latents shape or a non-callable callback before the text
encoder runs (with real weights: GPT-OSS-20B, and possibly the prompt reasoner, before the error)."""

from __future__ import annotations

import numpy as np
import pytest

from lens_jax.pipelines.text_to_image import LensPipeline


class Encoded(Exception):
    """The stand-in text encoder was reached: the check came too late."""


@pytest.fixture(scope="module")
def pipe():
    return LensPipeline.tiny_random()  # as test_serve builds it: the persistent compile cache shares its init


@pytest.fixture
def no_encoding(pipe, monkeypatch):
    def encode(*args, **kwargs):
        raise Encoded()

    monkeypatch.setattr(pipe, "_text_inputs", encode)
    return pipe


CALL = dict(height=32, width=32, num_inference_steps=1)


@pytest.mark.parametrize("prompts, n, shape", [
    ("a cat", 1, (1, 3, 128)),            # wrong token count
    (["a", "b"], 1, (1, 4, 128)),          # one row for two prompts
    ("a cat", 2, (1, 4, 128)),             # one row for two images
])
def test_wrong_latents_shape_is_refused_before_encoding(no_encoding, prompts, n, shape):
    channels = no_encoding.dit_config.in_channels
    shape = (*shape[:2], channels)
    with pytest.raises(ValueError, match="latents must be packed noise"):
        no_encoding(prompts, latents=np.zeros(shape, np.float32), num_images_per_prompt=n, **CALL)


def test_right_latents_shape_reaches_the_encoder(no_encoding):
    channels = no_encoding.dit_config.in_channels
    with pytest.raises(Encoded):
        no_encoding(["a", "b"], latents=np.zeros((4, 4, channels), np.float32), num_images_per_prompt=2, **CALL)


def test_non_callable_callback_is_refused_before_encoding(no_encoding):
    with pytest.raises(ValueError, match="callback must be callable"):
        no_encoding("a cat", callback=5, **CALL)
