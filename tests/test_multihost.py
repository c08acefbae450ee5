"""Multi-host for real: two processes on localhost joined by `jax.distributed.initialize` (4 CPU
devices each, gloo collectives) restore a converted tiny checkpoint into a (data=2, fsdp=4) mesh
spanning both and generate the same images as one process on one device."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from lens_jax.tools.cli import main

from .conftest import FIXTURES

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = Path(__file__).parent.parent
# f32 at "highest" matmul precision: sharding only reorders sums (as in test_sharding.py).
IMAGE_ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_the_one_process_image(tmp_path):
    root = tmp_path / "converted"
    assert main(["convert", "--src", str(FIXTURES / "tiny_lens"), "--dst", str(root), "--dtype", "f32",
                 "--no-progress"]) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    port = str(_free_port())
    run = lambda *a: subprocess.Popen([sys.executable, str(WORKER), *a], env=env, stdout=subprocess.PIPE,  # noqa: E731
                                      stderr=subprocess.STDOUT, text=True)
    procs = [run(port, str(i), str(root), str(tmp_path / "multi.npy")) for i in (0, 1)]
    single = run("single", "-", str(root), str(tmp_path / "single.npy"))
    logs = [p.communicate(timeout=540)[0] for p in (*procs, single)]
    for p, log in zip((*procs, single), logs):
        assert p.returncode == 0, log[-3000:]
    assert "process 0 of 2: 8 devices, mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in logs[0]
    assert "process 1 of 2: 8 devices" in logs[1]
    multi, one = np.load(tmp_path / "multi.npy"), np.load(tmp_path / "single.npy")
    assert multi.shape == one.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(multi, one, rtol=0, atol=IMAGE_ATOL)
    assert np.abs(multi[0] - multi[1]).max() > 1e-3  # two different images, not one broadcast
