"""The one-time feature cache: text features (selected layers, valid tokens only) and packed latents.

    build_cache("photos/", "cache/", encode_text, encode_image, base_resolution=1024)
    cache = FeatureCache("cache/")

`encode_text(captions) -> (features, mask)` returns one [B, S, D] array per selected encoder
layer and the [B, S] validity mask (what the pipeline hands the DiT); `encode_image(images
[B, H, W, 3] in [-1, 1]) -> tokens [B, h*w, C]` returns packed, normalised VAE latents. Both
are supplied by the caller (lens_jax.tools.train wires the pipeline's encoders), so training
itself never loads the text encoder.

Layout: `plan.json` (the samples, their buckets and the shard each belongs to, written first)
and one safetensors file per shard, `{bucket}-{k}.safetensors`, written to a temporary name and
renamed: a crash loses at most the shard being written, and a rerun encodes only the missing
shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from ..errors import InputError
from ..sampling.resolution import PIXELS_PER_TOKEN
from .data import assign_bucket, image_size, load_image, scan_folder

__all__ = ["build_cache", "FeatureCache", "PLAN_NAME"]

PLAN_NAME = "plan.json"
CACHE_VERSION = 1

EncodeText = Callable[[Sequence[str]], tuple[Sequence[np.ndarray], np.ndarray]]
EncodeImage = Callable[[np.ndarray], np.ndarray]


def _plan(image_dir: Path, base_resolution: int, shard_size: int) -> dict:
    items = scan_folder(image_dir)
    by_bucket: dict[str, list[dict]] = {}
    for it in items:  # decodes every image up front: a bad file fails before any work is done
        w, h = image_size(it.image)
        ratio, size = assign_bucket(w, h, base_resolution)
        by_bucket.setdefault(ratio, []).append(
            {"image": str(it.image.relative_to(image_dir)), "caption": it.caption, "size": list(size)})
    shards = []
    for ratio in sorted(by_bucket):
        rows = by_bucket[ratio]
        for k, start in enumerate(range(0, len(rows), shard_size)):
            shards.append({"name": f"{ratio.replace(':', 'x')}-{k:05d}.safetensors", "bucket": ratio,
                           "size": rows[0]["size"], "samples": rows[start:start + shard_size]})
    return {"version": CACHE_VERSION, "image_dir": str(image_dir), "base_resolution": base_resolution,
            "shards": shards}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_cache(image_dir: str | Path, cache_dir: str | Path, encode_text: EncodeText, encode_image: EncodeImage,
                base_resolution: int = 1024, shard_size: int = 64, progress: bool = True) -> "FeatureCache":
    """Encode an image folder into `cache_dir` (resumable); returns the opened cache."""
    from tqdm.auto import tqdm

    image_dir, cache_dir = Path(image_dir), Path(cache_dir)
    plan = _plan(image_dir, base_resolution, shard_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan_path = cache_dir / PLAN_NAME
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if {k: v for k, v in old.items() if k != "image_dir"} != {k: v for k, v in plan.items() if k != "image_dir"}:
            raise InputError(f"{cache_dir} holds a cache of different images or settings; use a new cache_dir "
                             "or delete the old one.")
    else:
        _atomic_write_text(plan_path, json.dumps(plan, indent=1))
    for stale in cache_dir.glob("*.tmp"):
        stale.unlink()
    total = sum(len(s["samples"]) for s in plan["shards"])
    done = sum(len(s["samples"]) for s in plan["shards"] if (cache_dir / s["name"]).exists())
    with tqdm(total=total, initial=done, desc="caching features", unit="img", disable=not progress) as bar:
        for shard in plan["shards"]:
            target = cache_dir / shard["name"]
            if target.exists():
                continue
            arrays: dict[str, np.ndarray] = {}
            for i, row in enumerate(shard["samples"]):
                image = load_image(image_dir / row["image"], tuple(row["size"]))
                tokens = np.asarray(encode_image(image[None]), np.float32)[0]
                feats, mask = encode_text([row["caption"]])
                valid = np.asarray(mask, bool)[0]
                arrays[f"{i}.latents"] = tokens
                for k, f in enumerate(feats):
                    arrays[f"{i}.text{k}"] = np.ascontiguousarray(np.asarray(f, np.float32)[0][valid])
                bar.update(1)
            tmp = target.with_name(target.name + ".tmp")
            save_file(arrays, str(tmp), metadata={"bucket": shard["bucket"]})
            os.replace(tmp, target)
    return FeatureCache(cache_dir)


class FeatureCache:
    """Read access to a complete cache: `buckets()` -> {ratio: [sample ids]}, `sample(id)`."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        plan_path = self.dir / PLAN_NAME
        if not plan_path.is_file():
            raise InputError(f"{self.dir} is not a feature cache (no {PLAN_NAME}); build it with build_cache "
                             "or `lens-jax train` with data.image_dir set.")
        self.plan = json.loads(plan_path.read_text())
        missing = [s["name"] for s in self.plan["shards"] if not (self.dir / s["name"]).is_file()]
        if missing:
            raise InputError(f"feature cache {self.dir} is incomplete ({len(missing)} shards missing, e.g. "
                             f"{missing[0]}); rerun the caching step to finish it.")
        self.index = [(si, j) for si, s in enumerate(self.plan["shards"]) for j in range(len(s["samples"]))]
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def buckets(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, (si, _) in enumerate(self.index):
            out.setdefault(self.plan["shards"][si]["bucket"], []).append(i)
        return out

    def caption(self, i: int) -> str:
        si, j = self.index[i]
        return self.plan["shards"][si]["samples"][j]["caption"]

    def sample(self, i: int) -> dict:
        """{"latents": [h*w, C], "features": [T, D] per layer (valid tokens), "grid": (h, w)}."""
        si, j = self.index[i]
        shard = self.plan["shards"][si]
        if si not in self._shards:
            self._shards[si] = load_file(str(self.dir / shard["name"]))
        arrays = self._shards[si]
        n_layers = sum(1 for k in arrays if k.startswith(f"{j}.text"))
        h, w = (v // PIXELS_PER_TOKEN for v in shard["size"])
        return {"latents": arrays[f"{j}.latents"], "features": [arrays[f"{j}.text{k}"] for k in range(n_layers)],
                "grid": (h, w)}
