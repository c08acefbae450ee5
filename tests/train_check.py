"""Trainer checks that need their own process (see test_training.py); prints JSON.

    python tests/train_check.py leg CACHE OUT STOP_AT      # train to STOP_AT micro-steps, checkpoint, exit
    python tests/train_check.py crash CACHE OUT STOP_AT    # same, then die while a further checkpoint is written
    python tests/train_check.py mesh CACHE OUT             # one step on 8 simulated devices vs one device
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and sys.argv[1] == "mesh":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lens_jax import configs, parallel  # noqa: E402
from lens_jax.models import transformer as dit  # noqa: E402
from lens_jax.training.cache import FeatureCache  # noqa: E402
from lens_jax.training.config import config_from_dict  # noqa: E402
from lens_jax.training.data import CachedBatches  # noqa: E402
from lens_jax.training.trainer import Trainer  # noqa: E402

MESHES = ((2, 2, 2), (1, 4, 2))


def tiny(heads: int = 2, head_dim: int = 16):
    config = dit.TransformerConfig.from_dict(dict(configs.load_json("tiny/transformer.json"),
                                                  num_attention_heads=heads, attention_head_dim=head_dim,
                                                  axes_dims_rope=[4, 6, 6] if head_dim == 16 else [4, 4, 4]))
    init = jax.jit(dit.init_params, static_argnums=(0,), compiler_options={"xla_backend_optimization_level": 0})
    return config, jax.tree.map(np.asarray, init(config, jax.random.key(0)))


def make_cfg(out: str, **sections) -> object:
    base = {"model": {"compute_dtype": "float32", "remat": None},
            "optim": {"learning_rate": 1e-2, "warmup_steps": 5, "schedule": "constant", "clip_norm": 1.0},
            "timesteps": {"shift": False},
            "train": {"output_dir": out, "steps": 30, "checkpoint_every": 2, "keep_checkpoints": 2,
                      "log_every": 1, "progress": False, "tensorboard": False},
            "data": {"batch_size": 4, "text_bucket": 4}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return config_from_dict(base)


def host_state(state) -> dict:
    return {"/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path): np.asarray(parallel.to_host(x))
            for path, x in jax.tree_util.tree_leaves_with_path(state)}


def main() -> None:
    mode, cache_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    cache = FeatureCache(cache_dir)
    if mode in ("leg", "crash"):
        config, params = tiny()
        cfg = make_cfg(out)
        trainer = Trainer(cfg, config, params, CachedBatches(cache, 4, 0, 4),
                          mesh=parallel.make_mesh(devices=jax.devices()[:1]))
        state = trainer.fit(stop_at=int(sys.argv[4]))
        if mode == "crash":  # one more step, start writing its checkpoint, die before the write completes
            state, _ = trainer.train_step(state, trainer.batches.batch(999))
            trainer.save(state, {"next_index": 999})
            os._exit(3)
        trainer.close()
        print(json.dumps({"step": int(state["step"])}))
        return
    config, params = tiny(heads=8, head_dim=12)  # every width divides 8 devices
    batches = CachedBatches(cache, 8, 0, 4)
    batch = batches.batch(0)
    results = {}
    import importlib.util

    for lora in (False, True) if importlib.util.find_spec("lens_jax.models.lora") else (False,):
        cfg = make_cfg(out, lora={"enabled": lora, "rank": 4}, model={"remat": "full"})
        ref_trainer = Trainer(cfg, config, params, batches, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
        ref = host_state(ref_trainer.train_step(ref_trainer.state, batch)[0])
        for mesh in MESHES if not lora else MESHES[:1]:
            trainer = Trainer(cfg, config, params, batches, mesh=parallel.make_mesh(*mesh))
            got = host_state(trainer.train_step(trainer.state, batch)[0])
            results[f"lora={lora} mesh={mesh}"] = max(
                float(np.abs(got[k].astype(np.float64) - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-30))
                for k in ref if ref[k].dtype.kind == "f")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
