"""Scheduler: bit-equal to diffusers' FlowMatchEulerDiscreteScheduler and to the goldens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.numpy import load_file

from lens_jax.sampling.scheduler import SchedulerConfig, compute_empirical_mu, euler_step, schedule

from .conftest import FIXTURES

SCHEDULER_CONFIG = FIXTURES / "tiny_lens" / "scheduler" / "scheduler_config.json"
GOLDEN_PAIRS = [(20, 4), (15, 4), (256, 20), (1024, 50), (4096, 20), (4096, 50), (4300, 28), (4301, 28), (6144, 50), (8100, 4)]


@pytest.fixture(scope="module")
def reference():
    return FlowMatchEulerDiscreteScheduler.from_config(json.loads(SCHEDULER_CONFIG.read_text()))


@pytest.mark.parametrize("seq_len", [1, 16, 256, 1000, 4096, 4300, 4301, 5000, 8100, 8464, 16900])
@pytest.mark.parametrize("steps", [1, 4, 20, 28, 50])
def test_schedule_equals_diffusers(reference, seq_len, steps):
    mu = compute_empirical_mu(seq_len, steps)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas, timesteps = schedule(steps, seq_len, SchedulerConfig.from_json(SCHEDULER_CONFIG))
    np.testing.assert_array_equal(sigmas, reference.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())


@pytest.mark.parametrize("seq_len,steps", GOLDEN_PAIRS)
def test_schedule_equals_golden(seq_len, steps):
    io = load_file(FIXTURES / "io_scheduler.safetensors")
    prefix = f"seq{seq_len}_steps{steps}_"
    sigmas, timesteps = schedule(steps, seq_len)
    np.testing.assert_array_equal(sigmas, io[prefix + "sigmas"])
    np.testing.assert_array_equal(timesteps, io[prefix + "timesteps"])
    assert abs(compute_empirical_mu(seq_len, steps) - float(io[prefix + "mu"][0])) <= 1e-12


def test_mu_branches():
    # seq_len > 4300 ignores the step count; below it, mu depends on it.
    assert compute_empirical_mu(5000, 4) == compute_empirical_mu(5000, 50)
    assert compute_empirical_mu(4096, 4) != compute_empirical_mu(4096, 50)


def test_euler_step_equals_diffusers(reference):
    reference.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=1.3)
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((2, 20, 32)).astype(np.float32), rng.standard_normal((2, 20, 32)).astype(np.float32)
    ref = reference.step(torch.from_numpy(v), reference.timesteps[0], torch.from_numpy(x)).prev_sample.numpy()
    sig = reference.sigmas.numpy()
    np.testing.assert_array_equal(np.asarray(euler_step(x, v, sig[0], sig[1])), ref)


def test_bad_step_count():
    with pytest.raises(ValueError, match="at least 1"):
        schedule(0, 256)
