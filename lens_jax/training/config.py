"""The training configuration: a dataclass schema read from JSON or TOML, with `key=value` overrides.

    cfg = load_config("train.toml", overrides=["optim.learning_rate=1e-4", "train.steps=200"])

Every section is a frozen dataclass; an unknown key anywhere (file or override) is an
`InputError` naming it and the keys that section has.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["ModelConfig", "DataConfig", "OptimConfig", "LoraConfig", "TimestepConfig", "TrainSection",
           "ParallelConfig", "SampleConfig", "TrainConfig", "load_config", "config_from_dict", "apply_overrides",
           "check_values"]


@dataclass(frozen=True)
class ModelConfig:
    """Which DiT to fine-tune: `tiny-random` (seeded, in memory) or an upstream/converted checkpoint root."""

    source: str = "tiny-random"
    seed: int = 0
    compute_dtype: str = "bfloat16"  # activations/matmuls; master weights stay float32
    remat: str | None = "dots"  # lens_jax.models.transformer.REMAT_POLICIES key, or None
    attention_impl: str | None = None  # None: cuDNN on GPU for half precision, XLA elsewhere


@dataclass(frozen=True)
class DataConfig:
    """Where the cached features live (built by `cache.build_cache` from an image folder)."""

    cache_dir: str = "cache"
    image_dir: str | None = None  # build the cache from this folder first if cache_dir is empty
    base_resolution: int = 512
    batch_size: int = 1
    text_bucket: int = 32  # pad text to a multiple of this (fewer recompiles)
    seed: int = 0
    shard_size: int = 64
    num_workers: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """optax AdamW with linear warm-up then a schedule, global-norm clipping, accumulation."""

    optimizer: str = "adamw"  # adamw | adafactor | sgd
    learning_rate: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    end_learning_rate_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    ema_decay: float | None = None


@dataclass(frozen=True)
class LoraConfig:
    """Train a LoRA adapter instead of the full DiT when `enabled`."""

    enabled: bool = False
    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] = (r"transformer_blocks\.attn\.(img_qkv|txt_qkv|to_out|to_add_out)",
                                r"transformer_blocks\.(img|txt)_mlp\.w[123]")
    multiplier: float = 1.0


@dataclass(frozen=True)
class TimestepConfig:
    """Sigma sampling (lens_jax.training.objective.TimestepSampler)."""

    kind: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0
    shift: bool = True
    shift_steps: int = 50


@dataclass(frozen=True)
class ParallelConfig:
    """Mesh sizes over all devices (None: the rest goes to fsdp) and logical-axis rule overrides."""

    data: int | None = None
    fsdp: int | None = None
    tensor: int = 1
    rules: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleConfig:
    """Sample images with fixed prompts and seeds every `every` steps (0: never)."""

    every: int = 0
    prompts: tuple[str, ...] = ("a photo of a cat",)
    seeds: tuple[int, ...] = (0,)
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class TrainSection:
    """Loop settings: steps, seed, output folder, checkpointing and logging cadence."""

    steps: int = 1000
    seed: int = 0
    output_dir: str = "runs/lens"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a parsed value to the annotated type (tuples from lists; ints accepted as floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except InputError:
                pass
        raise InputError(f"config {where}={value!r} must be {tp}.")
    if origin is tuple:
        items = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(items, (list, tuple)):
            raise InputError(f"config {where}={value!r} must be a list.")
        return tuple(_coerce(v, args[0], where) for v in items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise InputError(f"config {where}={value!r} must be a table/object.")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"config {where}={value!r} must be true or false.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"config {where}={value!r} must be an integer.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config {where}={value!r} must be a number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InputError(f"config {where}={value!r} must be a string.")
        return value
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise InputError(f"config section {where or 'top level'} must be a table/object; got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise InputError(f"unknown config key {key!r}; {where or 'the top level'} has: {', '.join(sorted(names))}.")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        sub = f"{where}.{name}" if where else name
        kwargs[name] = _build(tp, value, sub) if dataclasses.is_dataclass(tp) else _coerce(value, tp, sub)
    return cls(**kwargs)


# The values each key accepts beyond its type, checked before any data is cached or weights loaded
# (a 0 log_every divided by zero after compiling, a NaN learning rate trained NaN weights, steps=-1
# "trained" nothing). (low, high, open at low): finite numbers in the range; None means unbounded.
# Keys whose value is None (an unset optional) are not checked.
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "train.steps": (1, None, False),
    "train.log_every": (1, None, False),
    "train.checkpoint_every": (0, None, False),  # 0: only at the end
    "train.keep_checkpoints": (1, None, False),
    "data.base_resolution": (16, None, False),
    "data.batch_size": (1, None, False),
    "data.text_bucket": (1, None, False),
    "data.shard_size": (1, None, False),
    "data.num_workers": (0, None, False),
    "optim.learning_rate": (0, None, True),
    "optim.warmup_steps": (0, None, False),
    "optim.end_learning_rate_factor": (0, None, False),
    "optim.b1": (0, 1, False),
    "optim.b2": (0, 1, False),
    "optim.eps": (0, None, True),
    "optim.weight_decay": (0, None, False),
    "optim.clip_norm": (0, None, True),
    "optim.grad_accum_steps": (1, None, False),
    "optim.ema_decay": (0, 1, False),
    "lora.rank": (1, None, False),
    "lora.alpha": (0, None, True),
    "lora.multiplier": (None, None, False),
    "timesteps.std": (0, None, True),
    "timesteps.shift_steps": (1, None, False),
    "sample.every": (0, None, False),  # 0: never
    "sample.num_inference_steps": (1, None, False),
    "sample.guidance_scale": (0, None, False),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.compute_dtype": ("bfloat16", "float32", "float16"),  # jnp.dtype names: the trainer casts with them
}


def check_values(cfg: TrainConfig) -> TrainConfig:
    """Raise InputError naming the first key whose value is outside RANGES / CHOICES."""
    import math

    def value(key: str):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key, (low, high, open_low) in RANGES.items():
        v = value(key)
        if v is None:
            continue
        ok = math.isfinite(v) and (low is None or (v > low if open_low else v >= low)) and (high is None or v <= high)
        if not ok:
            bound = " and ".join(b for b in ((f"{'>' if open_low else '>='} {low}" if low is not None else ""),
                                             (f"<= {high}" if high is not None else "")) if b)
            kind = "an integer" if isinstance(v, int) else "a finite number"
            raise InputError(f"config {key}={v!r} must be {kind}{' ' + bound if bound else ''}.")
    for key, options in CHOICES.items():
        if value(key) not in options:
            raise InputError(f"config {key}={value(key)!r} is unknown; choose one of {', '.join(options)}.")
    return cfg


def config_from_dict(data: dict) -> TrainConfig:
    """A TrainConfig from nested plain data; unknown keys and out-of-range values raise InputError naming them."""
    return check_values(_build(TrainConfig, data, ""))


def _parse_value(text: str) -> Any:
    """`--set` values are TOML/JSON literals (1e-4, true, "x", [1, 2]); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None if text in ("none", "None", "null") else text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted `section.key=value` overrides into nested config data (a copy)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} must look like section.key=value (e.g. optim.learning_rate=1e-4).")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"override {key!r}: {p!r} is not a section.")
        node[parts[-1]] = _parse_value(text.strip())
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a JSON (.json) or TOML (.toml) training config, apply overrides, validate against the schema."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"training config {p} does not exist; pass a .toml or .json file.")
        try:
            data = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise InputError(f"cannot parse training config {p}: {e}") from None
    return config_from_dict(apply_overrides(data, overrides or []))
