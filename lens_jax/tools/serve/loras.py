"""The LoRA adapters a server offers (`lens-jax serve --lora-dir DIR`), and the DiT parameters per LoRA set.

- **Allow-list.** Every `*.safetensors` file directly in DIR whose tensor names are one of the three
  formats `lens_jax.lora.load` reads (peft, kohya, comfy), found when the server starts; its name is
  the file stem. Files of no known format are skipped with a warning, and so are files that do not fit
  the DiT once the model is loaded (`LoraLibrary.check`). Only these names can be asked for.
- **A LoRA set** is what a request asks for: `((name, multiplier), ...)`, made canonical by
  `LoraLibrary.resolve` (sorted by name, multiplier-0 entries dropped), so equal sets batch together
  and are merged in one order.
- **Parameters.** `LoraLibrary.params(pipe, loras)` merges the set onto the pipeline's DiT parameters
  (`LensPipeline.lora_params`, one kernel at a time, shardings kept) and keeps the last `cache_size`
  sets (LRU). Merged parameters are an *argument* of the pipeline's compiled sampler programs, so a new
  LoRA set costs one merge (about one [in, r] @ [r, out] product per adapted kernel), never a new
  compilation; each cached set holds its own copy of the adapted kernels (device memory). Adapters
  are read from disk again when a set is merged, not kept in memory.

Only the worker thread (or a follower host's loop) calls `adapters` and `params`; `resolve` and `names` are
pure reads.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ...errors import CheckpointError, InputError
from ...weights import lora_formats
from ...weights.safetensors_io import SafetensorsReader
from .schemas import MAX_LORA_MULTIPLIER as MAX_MULTIPLIER
from .schemas import MAX_LORAS

LoraSet = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LoraFile:
    """One allow-listed adapter file."""

    name: str
    path: Path
    format: str


def scan(directory: str | Path) -> dict[str, LoraFile]:
    """{name: LoraFile} of the LoRA files directly in `directory` (format detected from the tensor names)."""
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"--lora-dir {directory}: no such folder; pass a folder of LoRA .safetensors files.")
    found = {}
    for path in sorted(root.glob("*.safetensors")):
        if not path.is_file():
            continue
        try:
            fmt = lora_formats.detect_format(SafetensorsReader([path]).keys())
        except (CheckpointError, OSError, ValueError) as e:
            print(f"lens-jax serve: skipping {path}: {e}", file=sys.stderr)
            continue
        found[path.stem] = LoraFile(path.stem, path, fmt)
    return found


class LoraLibrary:
    """The allow-listed LoRAs of one server and an LRU of merged DiT parameters per LoRA set."""

    def __init__(self, files: dict[str, LoraFile], cache_size: int = 2, max_multiplier: float = MAX_MULTIPLIER,
                 max_loras: int = MAX_LORAS):
        if cache_size < 0:
            raise InputError(f"--lora-cache {cache_size} must be >= 0 (merged LoRA sets kept).")
        self.files = dict(files)
        self.cache_size = cache_size
        self.max_multiplier = float(max_multiplier)
        self.max_loras = max_loras
        self._cache: OrderedDict[LoraSet, tuple[Any, Any]] = OrderedDict()  # set -> (base params, merged)
        self.merges = 0  # sets merged (cache misses), for tests and logs

    @classmethod
    def from_dir(cls, directory: str | Path, cache_size: int = 2) -> "LoraLibrary":
        return cls(scan(directory), cache_size)

    def check(self, dit_config: Any) -> list[str]:
        """Read every file against the DiT's config (all shapes checked); drop and report those that do not
        fit. Returns the dropped names."""
        dropped = []
        for name, f in list(self.files.items()):
            try:
                lora_formats.load(f.path, dit_config)
            except (CheckpointError, InputError, OSError, ValueError) as e:
                print(f"lens-jax serve: skipping LoRA {name!r}: {e}", file=sys.stderr)
                del self.files[name]
                dropped.append(name)
        return dropped

    def clear(self) -> None:
        """Drop every cached merged set (their device memory is freed when no batch holds them)."""
        self._cache.clear()

    def names(self) -> list[str]:
        return sorted(self.files)

    def resolve(self, entries: Iterable[tuple[str, float]]) -> LoraSet:
        """A request's [(name, multiplier), ...] -> the canonical LoRA set; InputError names the problem."""
        entries = list(entries)
        if len(entries) > self.max_loras:
            raise InputError(f"{len(entries)} LoRAs asked for; at most {self.max_loras} per request.")
        seen: dict[str, float] = {}
        for name, mult in entries:
            if not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
                raise InputError(f"LoRA name {name!r} must be a file stem in --lora-dir, without path separators "
                                 "(GET /v1/loras lists them).")
            if name not in self.files:
                known = ", ".join(self.names()[:20]) or "none"
                raise InputError(f"unknown LoRA {name!r}; this server has: {known} (GET /v1/loras).")
            if name in seen:
                raise InputError(f"LoRA {name!r} is given twice; give each LoRA once with one multiplier.")
            mult = float(mult)
            if not math.isfinite(mult) or abs(mult) > self.max_multiplier:
                raise InputError(f"LoRA {name!r} multiplier {mult} is out of range "
                                 f"[-{self.max_multiplier:g}, {self.max_multiplier:g}].")
            seen[name] = mult
        return tuple(sorted((n, m) for n, m in seen.items() if m != 0.0))

    def adapters(self, pipe, loras: LoraSet) -> list[tuple[Any, float]] | None:
        """The host-local half of `params`: the set's adapters read from this host's files, or None when
        there is nothing to read (the empty set, or a set whose merge is cached). A file missing or
        unreadable on this host fails here, before any computation that the hosts run together."""
        if not loras:
            return None
        hit = self._cache.get(loras)
        if hit is not None and hit[0] is pipe.dit_params:
            return None
        for name, _ in loras:
            if name not in self.files:
                raise InputError(f"unknown LoRA {name!r} (not in this host's --lora-dir).")
        return [(lora_formats.load(self.files[name].path, pipe.dit_config), mult) for name, mult in loras]

    def params(self, pipe, loras: LoraSet, adapters: list[tuple[Any, float]] | None = None):
        """The pipeline's DiT parameters with `loras` merged (cached per set; None for the empty set).

        `adapters`: what `adapters(pipe, loras)` returned just before (read again when None).
        """
        if not loras:
            return None
        base = pipe.dit_params
        hit = self._cache.get(loras)
        if hit is not None and hit[0] is base:
            self._cache.move_to_end(loras)
            return hit[1]
        if adapters is None:
            adapters = self.adapters(pipe, loras)
        self._cache.pop(loras, None)
        while self._cache and len(self._cache) >= max(self.cache_size, 1):
            self._cache.popitem(last=False)  # free the oldest set before merging the next
        merged = pipe.lora_params(adapters, base)
        self.merges += 1
        if self.cache_size:
            self._cache[loras] = (base, merged)
        return merged
