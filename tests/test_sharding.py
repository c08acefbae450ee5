"""Sharded sampler under 8 simulated CPU devices equals the single-device one (own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lens_jax import sharding as sh


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("sharding_check.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["2x4", "1x8", "4x2"])
def test_sharded_sampler_equals_single_device(report, mesh):
    assert report[mesh]["max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("mesh, fsdp", [("2x4", 4), ("1x8", 8), ("4x2", 2)])
def test_fsdp_shards_dit_parameters(report, mesh, fsdp):
    r = report[mesh]
    assert "fsdp" in r["kernel_spec"]
    assert r["kernel_shard_fraction"] == pytest.approx(1 / fsdp)
    # Small leaves that fsdp does not divide stay replicated, so a device holds a bit over 1/fsdp.
    assert r["dit_fraction_on_device0"] < 1.5 / fsdp


def test_leaf_specs_never_shard_the_layer_axis():
    mesh = sh.make_mesh(1, 1)
    specs = sh._leaf_spec((48, 1536, 4608), 4, stacked=True), sh._leaf_spec((4, 2880), 4, stacked=False)
    assert specs[0] == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert specs[1] == jax.sharding.PartitionSpec(None, "fsdp")
    assert sh._leaf_spec((3, 5), 4, stacked=False) == jax.sharding.PartitionSpec()
    assert mesh.shape == {"data": 1, "fsdp": 1}


def test_mesh_must_use_all_devices():
    with pytest.raises(ValueError, match="must use all"):
        sh.make_mesh(data=2, fsdp=2, devices=np.array(jax.devices()[:1]))
