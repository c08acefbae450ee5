"""What a training run leaves behind, read back: the trained DiT parameters or LoRA adapter.

    run = load_trained("demo/run")                 # the `train.output_dir` of `lens-jax train` (or a Trainer)
    run.adapter                                    # LoRA run: {module_path: LoraWeights}, numpy leaves
    run.params                                     # full fine-tuning: the DiT pytree, float32 numpy
    lens_jax.lora.save(run.adapter, "style.safetensors", format="kohya")
    lens_jax.transformer.export_diffusers(run.params, run.dit_config, "out/transformer")

Only the trained tree (`params`, or `ema` when the run kept one) is read from the orbax checkpoint,
as host numpy arrays: the optimizer state (twice the parameters for AdamW) is never loaded, and
the checkpoint restores on any device count, whatever mesh wrote it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError
from ..models import lora as lora_lib
from ..models import transformer as dit
from .config import TrainConfig, config_from_dict

__all__ = ["TrainedRun", "load_trained", "checkpoint_steps", "write_run_info", "RUN_CONFIG", "DIT_CONFIG"]

Params = dict[str, Any]

RUN_CONFIG = "config.json"  # the resolved TrainConfig (`lens-jax train` writes it)
DIT_CONFIG = "transformer_config.json"  # the DiT's config (the Trainer writes it)


@dataclass(frozen=True)
class TrainedRun:
    """A run's trained weights at `step` (optimizer steps) with the configs that made them.

    Exactly one of `params` (full fine-tuning) and `adapter` (LoRA) is set. `dit_config` is None
    only for a run folder written before the Trainer recorded it (pass `dit_config=` then).
    """

    step: int
    config: TrainConfig
    dit_config: dit.TransformerConfig | None
    params: Params | None = None
    adapter: dict[str, lora_lib.LoraWeights] | None = None
    ema: bool = False

    def merged_params(self, base: Params, multiplier: float | None = None) -> Params:
        """The DiT parameters to sample with: `params`, or `base` with the adapter merged at
        `multiplier` (default: the run's `lora.multiplier`)."""
        if self.adapter is None:
            return self.params
        m = self.config.lora.multiplier if multiplier is None else multiplier
        return lora_lib.merge(base, self.adapter, m)


def write_run_info(output_dir: str | os.PathLike, dit_config: dit.TransformerConfig) -> None:
    """Record the DiT config beside the checkpoints, so `load_trained` can export without the source."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DIT_CONFIG).write_text(json.dumps(dit_config.to_dict(), indent=1))


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """The micro-steps of the complete checkpoints in `run_dir/checkpoints`, ascending."""
    ckpt = Path(run_dir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    # orbax renames a step's temporary folder to its final name only once every item is written
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def _read_config(run: Path, config: TrainConfig | None) -> TrainConfig:
    if config is not None:
        return config
    path = run / RUN_CONFIG
    if not path.exists():
        raise CheckpointNotFoundError(
            f"no {RUN_CONFIG} in {run}: pass the train.output_dir of a `lens-jax train` run, or the TrainConfig "
            "the run was made with (load_trained(run_dir, config=cfg)).")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); was the run folder edited?") from None


def _read_dit_config(run: Path, dit_config: dit.TransformerConfig | None) -> dit.TransformerConfig | None:
    if dit_config is not None:
        return dit_config
    path = run / DIT_CONFIG
    return dit.TransformerConfig.from_json(path) if path.exists() else None


def _restore(state_dir: Path, key: str) -> Params:
    """`state[key]` of one checkpoint as host numpy arrays (partial restore: nothing else is read)."""
    import jax
    import orbax.checkpoint as ocp

    ckptr = ocp.PyTreeCheckpointer()
    # the handler's metadata: the checkpointer's would look for step metadata inside the item and warn
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    if key not in tree:
        raise CheckpointError(f"{state_dir} holds no {key!r} (it has {sorted(tree)}); is this a lens-jax training checkpoint?")
    item = {key: tree[key]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                               partial_restore=True))
    return out[key]


def _as_adapter(tree: Params, lora: Any) -> dict[str, lora_lib.LoraWeights]:
    """Restored {module: {lora_A, lora_B}} dicts -> LoraWeights with the alpha the Trainer gave them."""
    adapter = {}
    for path, w in tree.items():
        if not isinstance(w, dict) or set(w) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"checkpoint entry {path!r} is not a LoRA module (keys {sorted(w) if isinstance(w, dict) else type(w).__name__}).")
        a, b = np.asarray(w["lora_A"]), np.asarray(w["lora_B"])
        alpha = float(lora.alpha if lora.alpha is not None else a.shape[-1])  # init_adapter's rule
        adapter[path] = lora_lib.LoraWeights(a, b, alpha if a.ndim == 2 else (alpha,) * a.shape[0])
    return adapter


def load_trained(run_dir: str | os.PathLike, step: int | None = None, *, ema: bool | None = None,
                 config: TrainConfig | None = None, dit_config: dit.TransformerConfig | None = None) -> TrainedRun:
    """Read the trained DiT parameters or LoRA adapter of a training run (host numpy, float32).

    run_dir: the run's `train.output_dir` (holds `checkpoints/<step>/`, and `config.json` when
    `lens-jax train` made it; for a run driven from Python pass its TrainConfig as `config`).
    step: an optimizer step with a checkpoint (default: the latest complete one). ema: read the
    EMA weights (default: when the run kept them). Raises `CheckpointNotFoundError` naming what
    is missing.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointNotFoundError(f"training run folder {run} does not exist; pass the run's train.output_dir.")
    cfg = _read_config(run, config)
    steps = checkpoint_steps(run)
    if not steps:
        raise CheckpointNotFoundError(f"{run}/checkpoints holds no complete checkpoint; train at least "
                                      "train.checkpoint_every steps (or to the end) first.")
    accum = cfg.optim.grad_accum_steps
    if step is None:
        micro = steps[-1]
    else:
        micro = int(step) * accum
        if micro not in steps:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {run}/checkpoints; it has steps "
                                          f"{[s // accum for s in steps]}.")
    state_dir = (run / "checkpoints" / str(micro) / "state").absolute()
    if ema is None:
        ema = cfg.optim.ema_decay is not None
    elif ema and cfg.optim.ema_decay is None:
        raise CheckpointError(f"the run in {run} kept no EMA weights (optim.ema_decay is unset); use ema=False.")
    tree = _restore(state_dir, "ema" if ema else "params")
    adapter = _as_adapter(tree, cfg.lora) if cfg.lora.enabled else None
    return TrainedRun(step=micro // accum, config=cfg, dit_config=_read_dit_config(run, dit_config),
                      params=None if cfg.lora.enabled else tree, adapter=adapter, ema=ema)
