"""TPU-only compile failures caught without a TPU: AOT-compile the tiny sampler for a v5e:2x2 topology.

The compiled program must hold the splash attention kernel (a Mosaic TPU custom call, run under
shard_map over the fsdp mesh) and fit the chip. Needs libtpu (the `tpu-aot` extra; .ci/run installs it); the
test is skipped only where libtpu cannot be imported on this platform.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'lens-jax[tpu-aot]'; it has wheels for Linux x86-64 only)",
                allow_module_level=True)

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import aot_tpu  # noqa: E402


def test_tiny_cfg_sampler_compiles_for_tpu_with_splash():
    from lens_jax import parallel

    devices = aot_tpu.topology_devices("v5e:2x2")
    assert len(devices) == 4 and "v5" in devices[0].device_kind.lower()
    mesh = parallel.make_mesh(1, 4, 1, devices=devices)
    compiled = aot_tpu.compile_sampler(aot_tpu.load_configs("tiny"), mesh, 64, True, 2, 64, 4)
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo and "splash" in hlo.lower()
    args, temp, _ = aot_tpu._stats(compiled)
    assert 0 < args + temp < 16
