"""Multi-host training for real: `lens-jax train` run by two processes on localhost (4 CPU devices each,
gloo collectives, a (data=2, fsdp=4) mesh across both), each reading its own rows of the global batch,
against one process on one device with the same global batch; the orbax checkpoint the two processes
wrote together restores in one process (`Trainer.restore`, the resume path); the sample images rendered
during training on both hosts equal the one-process ones."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

import lens_jax.transformer as lens_transformer
from lens_jax import parallel
from lens_jax.training.config import load_config
from lens_jax.training.trainer import Trainer

from . import train_check
from .conftest import FIXTURES
from .test_multihost import PNG_ATOL, launch
from .test_training import write_cache

STEPS = 3
TRAIN = {
    # the tiny checkpoint in the upstream layout: converted on load, no init program to compile
    "model": {"source": str(FIXTURES / "tiny_lens"), "compute_dtype": "float32", "remat": None},
    "data": {"batch_size": 4, "text_bucket": 4},
    "optim": {"learning_rate": 1e-3, "schedule": "constant", "warmup_steps": 0, "clip_norm": 1.0},
    "timesteps": {"shift": False},
    # sample images at the last step: the sampler runs on every host over the trainer's weights, host 0 writes
    "sample": {"every": STEPS, "prompts": ["a red cube"], "seeds": [5], "num_inference_steps": 2,
               "guidance_scale": 4.0, "height": 32, "width": 32},
    "train": {"steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1, "progress": False,
              "tensorboard": False},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("multihost_train")
    write_cache(work / "cache", 8)
    (work / "train.json").write_text(json.dumps({**TRAIN, "data": {**TRAIN["data"], "cache_dir": str(work / "cache")}}))
    return work, launch(work, "train")


def restore(run_dir, dit):
    """(state as host numpy by path, iterator state) of the latest checkpoint in `run_dir`, in this process
    (`dit`: the model trained, whose parameters give the state's shapes)."""
    cfg = load_config(run_dir / "config.json")
    trainer = Trainer(cfg, dit.config, dit.params, batches=None, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
    state, iterator = trainer.restore()
    trainer.close()
    return train_check.host_state(state), iterator


def test_two_process_training_equals_one_process_and_its_checkpoint_restores_in_one(runs):
    work, logs = runs
    multi, single = work / "multi" / "train", work / "single" / "train"
    assert "train: process 0 of 2" in logs["p0"] and "train: process 1 of 2" in logs["p1"]  # joined by `lens-jax`
    for run in (multi, single):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "3"]
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3]  # written once (host 0), not once per host
    samples = [sorted((run / "samples").iterdir()) for run in (multi, single)]
    assert [p.name for p in samples[0]] == [p.name for p in samples[1]] == ["step0000003_p0_s5.png"]
    a, b = (np.asarray(Image.open(p[0]).convert("RGB"), np.int16) for p in samples)
    assert np.abs(a - b).max() <= PNG_ATOL
    dit = lens_transformer.load(FIXTURES / "tiny_lens" / "transformer")
    params0 = {f"params/{k}": v for k, v in train_check.host_state(dit.params).items()}
    got, got_it = restore(multi, dit)
    want, want_it = restore(single, dit)
    assert got_it == want_it and int(got["step"]) == int(want["step"]) == STEPS
    assert sorted(got) == sorted(want)
    # AdamW divides each update by the gradient's running RMS, so where a gradient is near zero the f32
    # reduction-order noise of the sharded run (~1e-7 relative) becomes a visible part of the step. Bound the
    # parameters by the step size: within 1% of lr x steps (Adam moves a parameter by at most ~lr a step; a host
    # reading the wrong rows moves them by about that much). Observed: 1.1e-5 = 0.36% (img_mlp.w2), the
    # optimizer moments within 5.6e-6 of their leaf's max |value|.
    lr = TRAIN["optim"]["learning_rate"]
    for k in want:
        if want[k].dtype.kind != "f":
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        elif k.startswith("params/"):
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=0.01 * lr * STEPS, err_msg=k)
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-4 * np.abs(want[k]).max(), err_msg=k)
    moved = max(np.abs(got[k] - params0[k]).max() for k in params0)
    assert moved > 0.5 * lr, moved  # it trained (Adam's first steps move the largest-gradient weights ~lr each)
