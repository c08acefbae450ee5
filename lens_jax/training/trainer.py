"""The trainer: one jitted, sharded train step, the loop, checkpoints, metrics.

    trainer = Trainer(cfg, dit_config, base_params, batches)       # base_params: float32 host arrays
    trainer.fit(sample_fn=None)                                    # resumes from output_dir if it can

State (a pytree, checkpointed whole with orbax): `step` (micro-steps done), `params` (the full
DiT in float32 master weights, or the LoRA adapter), `opt_state`, optional `ema`, `rng`. The
data iterator position is saved beside it, so a resumed run continues exactly.

Per micro-step: sigma ~ the timestep sampler, noise ~ N(0, 1) from fold_in(rng, step), loss and
gradients of `flow_matching_loss` in the compute dtype (bfloat16 by default; float32 masters),
then the optax update (AdamW, warm-up + schedule, clipping, `optax.MultiSteps` accumulation).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from .. import parallel
from ..errors import InputError
from ..models import lora as lora_lib
from ..models import transformer as dit
from .config import LoraConfig, ModelConfig, OptimConfig, TimestepConfig, TrainConfig
from .objective import TimestepSampler, flow_matching_loss, sample_sigmas
from .results import write_run_info

__all__ = ["Trainer", "StepSpec", "make_optimizer", "learning_rate_schedule", "make_train_step", "train_step",
           "step_flops", "init_state"]

Params = dict[str, Any]


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine / linear decay to lr * end factor, or constant."""
    lr, end = cfg.learning_rate, cfg.learning_rate * cfg.end_learning_rate_factor
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_learning_rate_factor)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise InputError(f"unknown optim.schedule {cfg.schedule!r}; choose cosine, linear or constant.")
    if cfg.warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, cfg.warmup_steps), main], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax chain: clip by global norm -> optimizer with schedule; wrapped in MultiSteps if accumulating."""
    schedule = learning_rate_schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)
    elif cfg.optimizer == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.b1)
    else:
        raise InputError(f"unknown optim.optimizer {cfg.optimizer!r}; choose adamw, adafactor or sgd.")
    chain = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm else opt
    if cfg.grad_accum_steps < 1:
        raise InputError(f"optim.grad_accum_steps must be >= 1; got {cfg.grad_accum_steps}.")
    if cfg.grad_accum_steps > 1:
        return optax.MultiSteps(chain, every_k_schedule=cfg.grad_accum_steps)
    return chain


@dataclass(frozen=True)
class StepSpec:
    """Everything static about the train step (hashable: equal specs share one compiled program)."""

    dit_config: dit.TransformerConfig
    model: ModelConfig
    optim: OptimConfig
    lora: LoraConfig
    timesteps: TimestepConfig
    total_steps: int
    sharding: Any = None  # BoundRules for activation constraints, or None
    state_shardings: Any = None  # (treedef, tuple of NamedSharding): the state's declared layout

    @classmethod
    def from_config(cls, cfg: TrainConfig, dit_config: dit.TransformerConfig, sharding=None, state_shardings=None):
        return cls(dit_config, cfg.model, cfg.optim, cfg.lora, cfg.timesteps, cfg.train.steps, sharding,
                   state_shardings)


def make_train_step(spec: StepSpec) -> Callable:
    """(state, base_params, batch, grid) -> (state, metrics): one micro-step, pure (jit it; grid (h, w) static)."""
    optimizer = make_optimizer(spec.optim, spec.total_steps)
    t = spec.timesteps
    sampler = TimestepSampler(t.kind, t.mean, t.std, t.shift, t.shift_steps)
    compute_dtype = jnp.dtype(spec.model.compute_dtype)
    lora_mode, multiplier, ema_decay = spec.lora.enabled, spec.lora.multiplier, spec.optim.ema_decay

    def step(state, base, batch, grid):
        x0, mask, feats = batch["latents"], batch["mask"], batch["features"]
        b, n, _ = x0.shape
        h, w = grid
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_noise, k_sigma = jax.random.split(key)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        sigma = sample_sigmas(k_sigma, b, sampler, n)

        def loss_fn(trainable):
            params, lora = (base, trainable) if lora_mode else (trainable, None)
            loss, _ = flow_matching_loss(params, spec.dit_config, x0, noise, sigma, feats, mask, [(1, h, w)], lora,
                                         multiplier, compute_dtype=compute_dtype,
                                         attention_impl=spec.model.attention_impl, sharding=spec.sharding,
                                         remat=spec.model.remat)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        if ema_decay is not None:
            new["ema"] = jax.tree.map(lambda e, p: e * ema_decay + (1 - ema_decay) * p, state["ema"], params)
        if spec.state_shardings is not None:
            treedef, leaves = spec.state_shardings
            new = jax.lax.with_sharding_constraint(new, jax.tree.unflatten(treedef, leaves))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "sigma_mean": jnp.mean(sigma)}
        return new, metrics

    return step


@partial(jax.jit, donate_argnums=(0,), static_argnames=("grid", "spec"))
def train_step(state: dict, base: Params, batch: dict, grid: tuple[int, int], spec: StepSpec):
    """The compiled train step: one program per (spec, grid, shapes), shared by every Trainer."""
    return make_train_step(spec)(state, base, batch, grid)


def step_flops(config: dit.TransformerConfig, batch: int, image_tokens: int, text_tokens: int,
               remat: str | None = "dots", lora_mode: bool = False) -> float:
    """Model FLOPs of one train step: forward (2 per MAC) + backward (2x forward) + rematerialised forward.

    Matmuls only (attention scores included). The backward pass of a frozen base (LoRA) still
    needs the activation gradients (1x forward) but not the weight gradients. `remat` "full"
    recomputes the whole block forward; "dots" saves matmul outputs (about no extra matmul FLOPs).
    """
    d, L, hid = config.inner_dim, config.num_layers, config.mlp_hidden_dim
    s = image_tokens + text_tokens
    per_block = 0
    for t in (image_tokens, text_tokens):
        per_block += 2 * t * (3 * d * d + d * d + 3 * d * hid + 6 * d * d)  # qkv, out, gated MLP, modulation
    per_block += 2 * 2 * s * s * d  # QK^T and PV
    fwd = L * per_block + 2 * image_tokens * (config.in_channels * d + d * config.out_dim)
    fwd += 2 * text_tokens * config.num_text_layers * config.enc_hidden_dim * d
    fwd *= batch
    backward = fwd * (1 if lora_mode else 2)
    recompute = fwd if remat in ("full", "nothing_saveable") else 0
    return float(fwd + backward + recompute)


def init_state(optimizer: optax.GradientTransformation, params: Params, *, rng: jax.Array, ema: bool = False,
               shardings: Any = None) -> dict:
    """The fresh train state (trace under jit). With `shardings` (a tree like `params`), every
    optimizer leaf shaped like a parameter (AdamW's mu and nu) is laid out like that parameter:
    left to XLA, the zeros `optimizer.init` makes depend on no input and come out replicated,
    i.e. the whole float32 optimizer state on every chip of an FSDP mesh."""
    opt_state = optimizer.init(params)
    if shardings is not None:
        opt_state = optax.tree_map_params(optimizer, jax.lax.with_sharding_constraint, opt_state, shardings)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state, "rng": rng}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


@dataclass
class _Writers:
    jsonl: Any
    tensorboard: Any

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for k, v in metrics.items():
                self.tensorboard.add_scalar(k, v, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class Trainer:
    """Owns the mesh, the sharded state, the compiled step, the checkpoint manager and the loop.

    base_params: the DiT params (float32; host or device). Full fine-tuning trains a float32
    copy; LoRA keeps them frozen (sharded) and trains an adapter. `batches`: a
    `CachedBatches`, or anything whose `iterator(state)` (state: None, or what `get_state()` returned)
    gives an iterator with `get_state()` (saved with every checkpoint, e.g. grain's
    `DatasetIterator`) yielding dicts of `latents` [B, h*w, C], `features` (one [B, S, enc] array
    per text layer), `mask` [B, S] and `grid` (h, w).
    """

    def __init__(self, cfg: TrainConfig, dit_config: dit.TransformerConfig, base_params: Params, batches,
                 mesh: Mesh | None = None):
        self.cfg, self.dit_config, self.batches = cfg, dit_config, batches
        p = cfg.parallel
        self.mesh = mesh if mesh is not None else parallel.make_mesh(p.data, p.fsdp, p.tensor)
        self.rules = parallel.rules_from_mapping(p.rules)
        self.bound = self.rules.bind(self.mesh)
        self.accum = cfg.optim.grad_accum_steps
        self.total_micro_steps = cfg.train.steps * self.accum
        self.optimizer = make_optimizer(cfg.optim, cfg.train.steps)
        axes = dit.param_axes(dit_config)
        base_shardings = parallel.logical_shardings(base_params, axes, self.mesh, self.rules)
        params32 = jax.tree.map(lambda x: np.asarray(x, np.float32), base_params)
        self.base = parallel.put_tree(params32, base_shardings) if cfg.lora.enabled else None
        if cfg.lora.enabled:
            trainable = lora_lib.init_adapter(params32, dit_config, jax.random.key(cfg.train.seed + 1),
                                          targets=cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha)
            trainable = jax.tree.map(lambda x: parallel.put(np.asarray(x), parallel.replicated(self.mesh)), trainable)
        else:
            trainable = parallel.put_tree(params32, base_shardings)
        self.state = self._init_state(trainable)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        leaves, treedef = jax.tree.flatten(self.state_shardings)
        self.spec = StepSpec.from_config(cfg, dit_config, self.bound if self.mesh.size > 1 else None,
                                         (treedef, tuple(leaves)))
        self._manager = None

    # ------------------------------------------------------------------ state

    def _init_state(self, trainable) -> dict:
        rng = jax.random.key_data(jax.random.key(self.cfg.train.seed))
        replicated = parallel.replicated(self.mesh)
        init = partial(init_state, self.optimizer, rng=rng, ema=self.cfg.optim.ema_decay is not None,
                       shardings=jax.tree.map(lambda x: x.sharding, trainable))
        state = jax.jit(init)(trainable)
        # Scalars and the RNG replicated explicitly; everything else keeps the sharding XLA gave it.
        return jax.tree.map(lambda x: jax.device_put(x, replicated) if x.ndim == 0 or x.dtype == jnp.uint32 else x,
                            state)

    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One compiled micro-step on a batch (host arrays placed with the batch sharding)."""
        dev = self.device_batch(batch)
        return self._jit_step(state, dev)

    def _jit_step(self, state, dev_batch):
        base = self.base if self.base is not None else {}
        batch = {k: v for k, v in dev_batch.items() if k != "grid"}
        return train_step(state, base, batch, grid=dev_batch["grid"], spec=self.spec)

    def device_batch(self, batch: dict) -> dict:
        """Host batch -> global arrays split over (data, fsdp); each host contributes its rows."""
        def place(x):
            x = np.asarray(x)
            global_rows = x.shape[0] * jax.process_count()
            sharding = parallel.batch_sharding(self.mesh, global_rows, x.ndim)
            if jax.process_count() == 1:
                return parallel.put(x, sharding)
            return jax.make_array_from_process_local_data(sharding, x)

        return {"latents": place(batch["latents"]), "features": [place(f) for f in batch["features"]],
                "mask": place(batch["mask"]), "grid": tuple(int(v) for v in batch["grid"])}

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.train.output_dir).absolute() / "checkpoints"

    def manager(self):
        import orbax.checkpoint as ocp

        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.train.keep_checkpoints,
                                                   enable_async_checkpointing=self.cfg.train.async_checkpoints,
                                                   create=True)
            self._manager = ocp.CheckpointManager(self.checkpoint_dir, options=options)
        return self._manager

    def save(self, state: dict, iterator_state: dict, wait: bool = False) -> None:
        import orbax.checkpoint as ocp

        step = int(jax.device_get(state["step"]))
        self.manager().save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          data=ocp.args.JsonSave({"iterator": iterator_state})))
        if wait:
            self.manager().wait_until_finished()

    def restore(self) -> tuple[dict, dict | None]:
        """(state, iterator state) from the latest complete checkpoint, or the fresh state and None."""
        import orbax.checkpoint as ocp

        latest = self.manager().latest_step()
        if latest is None:
            return self.state, None
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        out = self.manager().restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     data=ocp.args.JsonRestore()))
        return out["state"], out["data"]["iterator"]

    # ------------------------------------------------------------------ loop

    def _writers(self) -> _Writers:
        out = Path(self.cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # the DiT config, so that results.load_trained can export the run
            write_run_info(out, self.dit_config)
        tb = None
        if self.cfg.train.tensorboard and jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter

                tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                tb = None
        # One metrics file, written by host 0 (the metrics are global: every host holds the same values).
        return _Writers(open(out / "metrics.jsonl" if jax.process_index() == 0 else os.devnull, "a"), tb)

    def fit(self, sample_fn: Callable[[int, dict], None] | None = None, stop_at: int | None = None) -> dict:
        """Train to `train.steps` optimizer steps (or `stop_at` micro-steps), resuming if a checkpoint exists.

        `sample_fn(step, state)` is called every `sample.every` optimizer steps (e.g. to render
        images with fixed prompts and seeds). Returns the final state.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg.train
        state, it_state = self.restore()
        start = int(jax.device_get(state["step"]))
        end = self.total_micro_steps if stop_at is None else min(stop_at, self.total_micro_steps)
        if not callable(getattr(self.batches, "iterator", None)):  # None is fine for restore / save alone
            raise InputError(f"batches must have iterator(state) -> an iterator with get_state(), like "
                             f"lens_jax.training.data.CachedBatches; got {type(self.batches).__name__}.")
        iterator = self.batches.iterator(it_state)
        if not callable(getattr(iterator, "get_state", None)):  # checked now, not at the first checkpoint
            raise InputError(f"batches.iterator(state) returned a {type(iterator).__name__} without get_state(); the "
                             "trainer saves the data position with every checkpoint (grain's DatasetIterator has it).")
        writers = self._writers()
        bar = tqdm(total=end, initial=start, desc="training", unit="step",
                   disable=not cfg.progress or jax.process_index() != 0)
        t_last, n_last = time.perf_counter(), start
        try:
            for micro in range(start, end):
                state, metrics = self._jit_step(state, self.device_batch(next(iterator)))
                done = micro + 1
                if done % (cfg.log_every * self.accum) == 0 or done == end:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    m["steps_per_s"] = (done - n_last) / max(now - t_last, 1e-9)
                    t_last, n_last = now, done
                    writers.write(done // self.accum, m)
                    bar.set_postfix(loss=f"{m['loss']:.4f}")
                bar.update(1)
                if done % self.accum == 0:
                    opt_step = done // self.accum
                    if cfg.checkpoint_every and opt_step % cfg.checkpoint_every == 0:
                        self.save(state, iterator.get_state())
                    if sample_fn is not None and self.cfg.sample.every and opt_step % self.cfg.sample.every == 0:
                        sample_fn(opt_step, state)
            if end > start and (not cfg.checkpoint_every or (end // self.accum) % cfg.checkpoint_every
                                or end % self.accum):
                self.save(state, iterator.get_state())
            self.manager().wait_until_finished()
        finally:
            bar.close()
            writers.close()
        self.state = state
        return state

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()

