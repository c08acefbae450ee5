"""Lazy, validated reading of PyTorch safetensors checkpoints (single file or sharded).

`safetensors.safe_open(..., framework="numpy")` cannot return bfloat16 tensors (numpy has
no such dtype) and the real Lens checkpoints are bf16, so this module reads the (simple,
documented) safetensors layout itself: an 8-byte little-endian header length, a JSON header
with dtype/shape/data_offsets per tensor, then the raw data. Tensors are memory-mapped and
materialised one at a time, so converting a model never holds more than one source tensor
in host memory. Pickle checkpoints (`.bin`, `.pt`, `.ckpt`, `.pth`) are refused, never loaded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

__all__ = ["CheckpointError", "TensorInfo", "SafetensorsReader", "open_checkpoint", "find_weight_files"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}




@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    nbytes: int


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path} is a pickle checkpoint ({path.suffix}). lens-jax loads weights from safetensors only "
        "and never unpickles (a pickle can run arbitrary code). Convert it first with PyTorch, e.g. "
        "`safetensors.torch.save_file(torch.load(p, weights_only=True), 'model.safetensors')`."
    )


def _read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes, no header.")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            if head[:2] == b"PK" or head[:1] == b"\x80":
                _refuse_pickle(path)
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes but the file "
                f"has {size}. Re-download or re-copy it."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e}).") from None
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}.")
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent offsets for shape {shape}.")
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} needs bytes up to {data_start + end} but the file "
                f"has {size}. Re-download or re-copy it."
            )
        infos[name] = TensorInfo(path, dtype, shape, data_start + begin, end - begin)
    return infos


class SafetensorsReader:
    """Read-only mapping from tensor name to lazily loaded numpy array, across shards."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._infos: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in _read_header(f).items():
                if name in self._infos:
                    raise CheckpointError(f"tensor {name!r} appears in both {self._infos[name].file} and {f}.")
                self._infos[name] = info

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name].shape

    def get(self, name: str, dtype=None) -> np.ndarray:
        """Return tensor `name` as an owned numpy array, cast to `dtype` if given."""
        info = self._infos[name]
        mm = np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.start, shape=info.shape or (1,))
        arr = mm.reshape(info.shape)
        out = np.array(arr, dtype=dtype if dtype is not None else info.dtype, copy=True)
        del mm
        return out


def find_weight_files(path: str | os.PathLike) -> list[Path]:
    """Resolve a checkpoint path (file, folder, or `*.index.json`) to its safetensors files."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist.")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(p)
        if p.name.endswith(".index.json"):
            return _files_from_index(p)
        return [p]
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{p} holds several shard indexes ({[i.name for i in indexes]}); pass one file.")
    if indexes:
        return _files_from_index(indexes[0])
    files = sorted(p.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(pickles[0])
    raise CheckpointError(f"no *.safetensors weights in {p} (found: {sorted(f.name for f in p.iterdir())}).")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index} is not a valid shard index ({e}).") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"shard index {index} lists files that are missing: {missing}.")
    return files


def open_checkpoint(path: str | os.PathLike) -> SafetensorsReader:
    """Open a safetensors checkpoint: a file, a folder of shards, or a shard index."""
    return SafetensorsReader(find_weight_files(path))
