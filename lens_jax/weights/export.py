"""Export a (fine-tuned) DiT back to the upstream PyTorch layout: a diffusers folder or a ComfyUI single file.

    export_diffusers(params, config, "out/transformer")    # config.json + diffusion_pytorch_model.safetensors
    export_comfy(params, "lens_finetuned.safetensors")     # model.diffusion_model.{name}, one file

Both write `to_torch_state_dict(params)` (the inverse of conversion: upstream names, [out, in]
Linears, fused qkv [3 * inner, d]), so the result loads in diffusers / ComfyUI / the upstream code
and back into lens-jax (`lens_jax.transformer.load(folder)`, `lens-jax convert --transformer FILE`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from jax.typing import DTypeLike

from ..models.dtypes import resolve_dtype
from ..models.transformer import TransformerConfig
from .dit import to_torch_state_dict
from .staging import staged_folder

__all__ = ["export_diffusers", "export_comfy", "COMFY_PREFIX", "DIFFUSERS_WEIGHTS", "DIFFUSERS_VERSION"]

COMFY_PREFIX = "model.diffusion_model."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.37.1"  # the version the published Lens configs name


def _host_state_dict(params, config, dtype) -> dict[str, np.ndarray]:
    sd = to_torch_state_dict(params, config)
    if dtype is not None:
        dt = resolve_dtype(dtype)
        sd = {k: v.astype(dt) for k, v in sd.items()}
    return sd


def export_diffusers(params: Mapping[str, Any], config: TransformerConfig, folder: str | os.PathLike,
                     dtype: DTypeLike | str | None = None,
                     max_shard_bytes: int = 10 * 1024**3) -> Path:
    """Write a diffusers `transformer/` folder: config.json + safetensors (sharded with an index past max_shard_bytes).

    `dtype` (e.g. "bfloat16") casts every tensor; default: the params' own dtype. Every file is
    written in a staging folder first and moved in only when all are complete, so an error or
    Ctrl-C while writing leaves the folder as it was.
    """
    from safetensors.numpy import save_file

    out = Path(folder)
    sd = _host_state_dict(params, config, dtype)
    stem, ext = DIFFUSERS_WEIGHTS.rsplit(".", 1)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(sd):
        if shards[-1] and size + sd[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = sd[name]
        size += sd[name].nbytes
    meta = {"format": "pt"}
    cfg = {**config.to_dict(), "_diffusers_version": DIFFUSERS_VERSION}
    # The index last: a loader that finds it finds every shard it names.
    with staged_folder(out, last=lambda name: name.endswith(".index.json")) as stage:
        (stage / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(stage / DIFFUSERS_WEIGHTS), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
                save_file(shard, str(stage / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            index = {"metadata": {"total_size": int(sum(v.nbytes for v in sd.values()))}, "weight_map": weight_map}
            (stage / f"{DIFFUSERS_WEIGHTS}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        # An earlier export here (sharded or not) would otherwise be what loaders find: its index wins.
        stale = re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.{ext}(\.index\.json)?")
        for old in out.iterdir() if out.is_dir() else ():
            if old.is_file() and stale.fullmatch(old.name):
                old.unlink()
    return out


def export_comfy(params: Mapping[str, Any], path: str | os.PathLike, config: TransformerConfig | None = None,
                 dtype: DTypeLike | str | None = None,
                 prefix: str = COMFY_PREFIX) -> Path:
    """Write a ComfyUI single-file DiT: every upstream name behind `model.diffusion_model.` (atomically)."""
    from safetensors.numpy import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = _host_state_dict(params, config, dtype)
    partial = p.with_name(f".{p.name}.partial-{os.getpid()}")  # written whole, then renamed over `path`
    try:
        save_file({prefix + k: v for k, v in sd.items()}, str(partial), metadata={"format": "pt"})
        os.replace(partial, p)
    finally:
        partial.unlink(missing_ok=True)
    return p
