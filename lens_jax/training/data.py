"""Training data: an image folder with captions -> aspect-ratio buckets -> batches from the feature cache.

Folder conventions (Hugging Face imagefolder): a `metadata.jsonl` with one JSON object per line
holding `file_name` and `text`, or, without it, every image with a `.txt` sidecar of the same stem.
Each image goes to the nearest (in log aspect ratio) of Lens' nine aspect-ratio buckets at a base
resolution (512, 1024 or 1440), is resized to cover the bucket and centre-cropped.

Batches come from the cache (`lens_jax.training.cache`) through grain: a deterministic shuffled,
repeated `MapDataset` over fixed batches (each within one bucket), whose iterator state (one
integer) is saved with the checkpoint so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from ..errors import InputError
from ..sampling.resolution import ASPECT_RATIOS, PIXELS_PER_TOKEN

__all__ = ["Item", "scan_folder", "bucket_sizes", "assign_bucket", "load_image", "CachedBatches", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BASE_RESOLUTIONS = (512, 1024, 1440)


@dataclass(frozen=True)
class Item:
    """One training example on disk."""

    image: Path
    caption: str


def scan_folder(folder: str | Path) -> list[Item]:
    """The (image, caption) pairs of an imagefolder, sorted by file name.

    Raises InputError naming the file for a caption that is missing or empty and for a
    metadata line that names an image that does not exist.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist.")
    meta = root / "metadata.jsonl"
    items: list[Item] = []
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{meta} line {n} is not JSON ({e}); each line needs file_name and text.") from None
            if "file_name" not in row:
                raise InputError(f"{meta} line {n} has no file_name.")
            image = root / row["file_name"]
            if not image.is_file():
                raise InputError(f"{meta} line {n} names {row['file_name']}, which does not exist in {root}.")
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"caption missing for {image}: give {meta} line {n} a non-empty \"text\".")
            items.append(Item(image, text.strip()))
    else:
        for image in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            sidecar = image.with_suffix(".txt")
            text = sidecar.read_text().strip() if sidecar.is_file() else ""
            if not text:
                raise InputError(f"caption missing for {image}: write {sidecar.name} or a metadata.jsonl "
                                 "with file_name and text.")
            items.append(Item(image, text))
    if not items:
        raise InputError(f"no captioned images in {root} (looked for metadata.jsonl or images with .txt sidecars).")
    return sorted(items, key=lambda it: str(it.image))


def bucket_sizes(base_resolution: int) -> dict[str, tuple[int, int]]:
    """(height, width) per aspect ratio at `base_resolution`; 512 halves the 1024 buckets."""
    if base_resolution not in BASE_RESOLUTIONS:
        raise InputError(f"base_resolution {base_resolution} is not one of {BASE_RESOLUTIONS}.")
    if base_resolution in ASPECT_RATIOS:
        return dict(ASPECT_RATIOS[base_resolution])
    f = base_resolution / 1024
    return {r: (int(round(h * f / PIXELS_PER_TOKEN)) * PIXELS_PER_TOKEN, int(round(w * f / PIXELS_PER_TOKEN))
                * PIXELS_PER_TOKEN) for r, (h, w) in ASPECT_RATIOS[1024].items()}


def assign_bucket(width: int, height: int, base_resolution: int) -> tuple[str, tuple[int, int]]:
    """The bucket (ratio name, (H, W)) nearest to an image's aspect ratio (in log space)."""
    sizes = bucket_sizes(base_resolution)
    target = math.log(width / height)
    ratio = min(sizes, key=lambda r: abs(math.log(sizes[r][1] / sizes[r][0]) - target))
    return ratio, sizes[ratio]


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot decode image {path} ({type(e).__name__}); remove or replace the file.") from None
    return img


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file; InputError naming it when it cannot be decoded."""
    return _open(path).size


def load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Image -> float32 [H, W, 3] in [-1, 1]: RGB, resized to cover (H, W), centre-cropped."""
    from PIL import Image

    img = _open(path).convert("RGB")
    h, w = size
    s = max(h / img.height, w / img.width)
    rw, rh = max(w, round(img.width * s)), max(h, round(img.height * s))
    img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - w) // 2, (rh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    return np.asarray(img, np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- batches from the cache


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


class CachedBatches:
    """Deterministic, resumable batches from a feature cache, through a grain MapDataset.

    Batches are fixed groups of `batch_size` samples of one bucket (a short last group wraps
    around within its bucket); the order is a seeded shuffle, repeated with a new shuffle per
    epoch. `batch(i)` is a pure function of i, and `iterator(state)` resumes at a saved state.
    Text is right-padded to a multiple of `text_bucket` (fewer shapes to compile).
    Each host (process) reads only the rows of its own slice of the global batch.
    """

    def __init__(self, cache, batch_size: int, seed: int = 0, text_bucket: int = 32,
                 process_index: int = 0, process_count: int = 1):
        if batch_size < 1 or batch_size % process_count:
            raise InputError(f"batch_size {batch_size} must be a positive multiple of the {process_count} hosts.")
        self.cache, self.batch_size, self.text_bucket = cache, batch_size, text_bucket
        self.process_index, self.process_count = process_index, process_count
        groups: list[tuple[int, ...]] = []
        for members in cache.buckets().values():
            for start in range(0, len(members), batch_size):
                chunk = [members[(start + j) % len(members)] for j in range(batch_size)]
                groups.append(tuple(chunk))
        self.groups = groups
        self.dataset = grain.MapDataset.source(groups).shuffle(seed=seed).repeat().map(self._load)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.groups)

    def _load(self, group: tuple[int, ...]) -> dict[str, Any]:
        per_host = self.batch_size // self.process_count
        rows = group[self.process_index * per_host:(self.process_index + 1) * per_host]
        samples = [self.cache.sample(i) for i in rows]
        length = _round_up(max(s["features"][0].shape[0] for s in samples), self.text_bucket)
        n_layers = len(samples[0]["features"])
        feats = [np.zeros((len(samples), length, samples[0]["features"][k].shape[-1]), np.float32)
                 for k in range(n_layers)]
        mask = np.zeros((len(samples), length), bool)
        for b, s in enumerate(samples):
            t = s["features"][0].shape[0]
            for k in range(n_layers):
                feats[k][b, :t] = s["features"][k]
            mask[b, :t] = True
        return {
            "latents": np.stack([s["latents"] for s in samples]).astype(np.float32),
            "features": feats,
            "mask": mask,
            "grid": samples[0]["grid"],
        }

    def batch(self, index: int) -> dict[str, Any]:
        return self.dataset[index]

    def iterator(self, state: dict | None = None):
        it = iter(self.dataset.to_iter_dataset())
        if state is not None:
            it.set_state(state)
        return it
