"""Image-to-image and inpainting inputs: loading, fitting to the bucket, strength, masks.

* The input image (a path, a PIL image or an array [H, W, 3] / [H, W] of uint8 0..255 or floats
  in [0, 1]) is converted to RGB, scaled so that it COVERS the output bucket (aspect ratio kept,
  Lanczos) and centre-cropped to it. Without an explicit size the pipeline picks the aspect-ratio
  bucket (at the base resolution) closest to the image's aspect ratio.
* `strength` in (0, 1] selects where the schedule starts: like diffusers, the last
  max(1, int(steps * strength)) steps run, i.e. start = steps - that. The start latents are
  x = (1 - sigma_start) x0 + sigma_start noise (flow matching); at strength 1, sigma_start = 1,
  so x = noise exactly and the result equals text-to-image with the same noise.
* The mask (white = repaint, black = keep; any image/array, converted to grey, fitted like the
  image) becomes (a) a latent-token mask: a 16x16-pixel token is repainted when any of its pixels
  is >= 0.5, so the repainted tokens cover every white pixel; (b) a pixel blend weight: 1 on
  white pixels, fading outward with a Gaussian of `FEATHER_SIGMA` px, and exactly 0 outside the
  repainted tokens (so the feather lies in the repainted tokens around the mask). The final image is
  weight * generated + (1 - weight) * decode(x0), decode(x0) being the VAE round trip of the
  input: the kept region is exactly the round trip (the decoder's attention would otherwise let
  the repainted area shift it slightly) and the seam is feathered.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..errors import InputError
from ..sampling.resolution import ASPECT_RATIOS, DEFAULT_BASE_RESOLUTION, PIXELS_PER_TOKEN

__all__ = [
    "FEATHER_SIGMA",
    "check_strength",
    "start_step",
    "load_image",
    "load_mask",
    "closest_bucket",
    "fit_to_bucket",
    "to_model_range",
    "token_mask",
    "blend_weights",
]

FEATHER_SIGMA = 4.0  # pixels


def check_strength(strength) -> float:
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise InputError(f"strength must be a number in (0, 1], got {strength!r}.") from None
    if not 0.0 < s <= 1.0 or math.isnan(s):
        raise InputError(f"strength must be in (0, 1] (1 = ignore the image's content, small = stay close to it); "
                         f"got {strength!r}.")
    return s


def start_step(num_steps: int, strength: float) -> int:
    """The first schedule step that runs: the last max(1, int(num_steps * strength)) steps run."""
    return num_steps - max(1, min(num_steps, int(num_steps * strength)))


def _as_pil(image: Any, what: str, mode: str):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise InputError(f"{what} {path!r} does not exist; pass an image file (PNG, JPEG, ...).")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert(mode)
        except OSError as e:
            raise InputError(f"{what} {path!r} is not a readable image ({e}).") from None
    if isinstance(image, Image.Image):
        return image.convert(mode)
    try:
        arr = np.asarray(image)
    except Exception:
        arr = None
    if arr is None or arr.dtype == object or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InputError(f"{what} must be a path, a PIL image or an array [H, W] / [H, W, 3]; got {type(image).__name__}"
                         f"{'' if arr is None else ' of shape ' + str(arr.shape)}.")
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(np.asarray(arr, np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert(mode)


def load_image(image: Any):
    """A path, PIL image or array -> RGB PIL image (InputError when unreadable)."""
    return _as_pil(image, "image", "RGB")


def load_mask(mask: Any):
    """A path, PIL image or array -> greyscale PIL image (white = repaint)."""
    return _as_pil(mask, "mask_image", "L")


def closest_bucket(width: int, height: int, base_resolution: int | None = None) -> str:
    """The aspect-ratio bucket name whose ratio is closest (in log scale) to width / height."""
    base = DEFAULT_BASE_RESOLUTION if base_resolution is None else base_resolution
    buckets = ASPECT_RATIOS.get(base)
    if buckets is None:
        raise InputError(f"unknown base_resolution {base!r}; choose one of {sorted(ASPECT_RATIOS)}.")
    target = math.log(width / height)
    return min(buckets, key=lambda name: abs(math.log(buckets[name][1] / buckets[name][0]) - target))


def fit_to_bucket(image, height: int, width: int, resample=None):
    """Scale to cover (height, width) keeping the aspect ratio, then centre-crop."""
    from PIL import Image

    resample = Image.Resampling.LANCZOS if resample is None else resample
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, resample)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_model_range(image) -> np.ndarray:
    """RGB PIL image -> float32 [H, W, 3] in [-1, 1]."""
    return np.asarray(image, np.float32) / 127.5 - 1.0


def token_mask(mask: np.ndarray) -> np.ndarray:
    """Pixel mask [H, W] in [0, 1] -> token mask [h*w, 1] float32 (1 where any pixel >= 0.5)."""
    p = PIXELS_PER_TOKEN
    h, w = mask.shape[0] // p, mask.shape[1] // p
    cells = (mask >= 0.5).reshape(h, p, w, p).any(axis=(1, 3))
    return cells.reshape(h * w, 1).astype(np.float32)


def blend_weights(mask: np.ndarray, tokens: np.ndarray, sigma: float = FEATHER_SIGMA) -> np.ndarray:
    """Pixel blend weight [H, W] of the generated image (see the module docstring)."""
    from PIL import Image, ImageFilter

    binary = (mask >= 0.5).astype(np.float32)
    blurred = Image.fromarray((binary * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(sigma))
    weight = np.maximum(np.asarray(blurred, np.float32) / 255.0, binary)
    p = PIXELS_PER_TOKEN
    h, w = mask.shape[0] // p, mask.shape[1] // p
    repainted = np.repeat(np.repeat(tokens.reshape(h, w), p, axis=0), p, axis=1)
    return np.where(repainted > 0, weight, 0.0).astype(np.float32)
