"""Multi-host for real: two processes on localhost joined by `jax.distributed.initialize` (4 CPU devices
each, gloo collectives) over a (data=2, fsdp=4) mesh spanning both, against one process on one device:
the pipeline, bulk generation (`lens-jax generate --prompts`) and the service (host 0 answers HTTP, host 1
runs `lens-jax serve` and follows). One launch of the two processes (and the reference) runs all three
modes of tests/multihost_worker.py; the tests below check its outputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens_jax.tools.cli import main

from .conftest import FIXTURES

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = Path(__file__).parent.parent
# f32 at "highest" matmul precision: sharding only reorders sums (as in test_sharding.py).
IMAGE_ATOL = 1e-5
# PNGs hold uint8: a float difference within IMAGE_ATOL can still cross a rounding boundary (one level).
PNG_ATOL = 1
PROMPTS = ["a red cube", "a cat", "", "a lighthouse at dusk", "two apples", "a blue bird"]  # the blank line is skipped
TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(work: Path, modes: str) -> dict[str, str]:
    """Run the worker as two joined processes (p0, p1) and as the one-process reference (single), all at
    once; returns each one's output. Every process is killed if any runs past TIMEOUT_S."""
    # XLA's CPU backend optimisations cost more compile time than they save on the tiny model.
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", LENS_JAX_COMPILATION_CACHE="off",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    port = str(free_port())

    def run(*a):
        return subprocess.Popen([sys.executable, str(WORKER), *a, str(work), modes], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = {"p0": run(port, "0"), "p1": run(port, "1"), "single": run("single", "-")}
    logs = {}
    try:
        for name, p in procs.items():
            logs[name] = p.communicate(timeout=TIMEOUT_S)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} failed:\n{logs[name][-4000:]}"
    return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("multihost")
    assert main(["convert", "--src", str(FIXTURES / "tiny_lens"), "--dst", str(work / "converted"), "--dtype", "f32",
                 "--no-progress"]) == 0
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (work / "loras_p0").mkdir()  # a LoRA on host 0 only: the serve mode's follower-only failure
    (work / "loras_p1").mkdir()
    shutil.copy(FIXTURES / "loras" / "lora_peft.safetensors", work / "loras_p0" / "peft.safetensors")
    return work, launch(work, "generate,bulk,serve")


def test_two_processes_generate_the_one_process_image(runs):
    work, logs = runs
    assert "process 0 of 2: 8 devices, mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in logs["p0"]
    assert "process 1 of 2: 8 devices" in logs["p1"]
    multi, one = np.load(work / "p0" / "generate.npy"), np.load(work / "single" / "generate.npy")
    assert multi.shape == one.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(multi, one, rtol=0, atol=IMAGE_ATOL)
    assert np.abs(multi[0] - multi[1]).max() > 1e-3  # two different images, not one broadcast


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def _records(folder: Path) -> dict[str, dict]:
    return {r["file"]: r for meta in folder.glob("metadata*.jsonl")
            for r in map(json.loads, meta.read_text().splitlines())}


def test_bulk_each_host_writes_its_share_of_the_one_process_images(runs):
    work, logs = runs
    hosts = [work / "p0" / "bulk", work / "p1" / "bulk"]
    single = work / "single" / "bulk"
    numbers = [n for n, p in enumerate(PROMPTS, 1) if p]
    names = [f"{n:06d}.png" for n in numbers]
    # Host p writes the lines at index % 2 == p, with its own metadata file; nothing else.
    assert sorted(p.name for p in hosts[0].iterdir()) == sorted(names[0::2] + ["metadata.jsonl"])
    assert sorted(p.name for p in hosts[1].iterdir()) == sorted(names[1::2] + ["metadata.host1.jsonl"])
    assert sorted(p.name for p in single.iterdir()) == sorted(names + ["metadata.jsonl"])
    # Together: the same files, settings (seed = 10 + line number) and images as the one-process run.
    together = {**_records(hosts[0]), **_records(hosts[1])}
    assert together == _records(single)
    assert [together[n]["seed"] for n in names] == [10 + n for n in numbers]
    for k, name in enumerate(names):
        got, want = _pixels(hosts[k % 2] / name), _pixels(single / name)
        assert np.abs(got - want).max() <= PNG_ATOL, name
    assert np.abs(_pixels(hosts[0] / names[0]) - _pixels(hosts[1] / names[1])).max() > 10  # different images
    # First run: each host reports its own share; the rerun (files untouched, checked by the worker) makes none.
    assert "3 new image(s)" in logs["p0"] and "2 new image(s)" in logs["p1"] and "5 new image(s)" in logs["single"]
    for name in ("p0", "p1"):
        rerun = logs[name].split("bulk: rerun", 1)[1].split("== serve", 1)[0]
        assert "0 new image(s)" in rerun
    # One progress bar, on host 0 (tqdm writes "images: ...%" to stderr).
    assert "images: 100%" in logs["p0"] and "images:" not in logs["p1"]


def test_serve_host0_answers_as_one_process_and_the_follower_stops(runs):
    work, logs = runs
    multi, one = np.load(work / "p0" / "serve.npz"), np.load(work / "single" / "serve.npz")
    assert sorted(multi.files) == sorted(one.files) == ["r0_0", "r0_1", "r1_0"]
    assert multi["r0_0"].shape == (32, 32, 3) and multi["r1_0"].shape == (48, 32, 3)  # two buckets
    for k in multi.files:
        assert np.abs(multi[k].astype(np.int16) - one[k]).max() <= PNG_ATOL, k
    assert np.abs(multi["r0_0"].astype(np.int16) - multi["r0_1"]).max() > 10  # n=2: two images
    assert "host 1 follows host 0's batches" in logs["p1"]
    assert "serve: the follower returned" in logs["p1"]
    assert "serve: 2 answers, host 0 shut down" in logs["p0"]


def test_serve_a_batch_failing_on_the_follower_alone_fails_its_request_and_the_hosts_stay_in_step(runs):
    """Host 1's --lora-dir lacks the LoRA that host 0's holds: host 0 answers that request with host 1's
    error, and the request after it (r1) still equals the one-process answer (checked above), so the hosts
    kept their collectives in step; the follower returned at shutdown."""
    work, logs = runs
    line = next(x for x in logs["p0"].splitlines() if x.startswith("serve: the host-0-only LoRA request"))
    assert "answered 500" in line and "HostFailed" in line, line
    assert "host 1: InputError: unknown LoRA 'peft' (not in this host's --lora-dir)" in line, line
    assert "every host skipped it" in line, line
    multi = np.load(work / "p0" / "serve.npz")
    assert sorted(multi.files) == ["r0_0", "r0_1", "r1_0"]
    assert "serve: the follower returned" in logs["p1"]


def test_broadcast_runner_stop_waits_for_the_batch_in_flight(monkeypatch):
    """Host 0's stop message must not interleave its collectives with a batch still running (the hosts
    would deadlock): `stop` waits for it, goes out once, and later batches are refused. One process:
    the broadcast is recorded instead of sent."""
    import threading

    from lens_jax.tools import jobs as jobs_lib
    from lens_jax.tools.serve import batcher as batcher_lib

    jobs = [jobs_lib.Job("a", 1, 32, 32, 2, 4.0)]
    assert batcher_lib._decode(batcher_lib._broadcast(batcher_lib._encode(jobs))) == jobs  # padded JSON
    assert len(batcher_lib._broadcast(b"null")) == 256 and batcher_lib._decode(batcher_lib._broadcast(b"null")) is None
    events, entered, gate = [], threading.Event(), threading.Event()
    monkeypatch.setattr(batcher_lib, "_broadcast", lambda payload: events.append(batcher_lib._decode(payload)))

    def local(jobs, callback):
        events.append("run")
        entered.set()
        assert gate.wait(30)
        events.append("ran")
        return np.zeros((len(jobs), 32, 32, 3), np.float32)

    runner = batcher_lib.BroadcastRunner(local)
    batch = threading.Thread(target=runner, args=(jobs, None))
    batch.start()
    assert entered.wait(30)
    stop = threading.Thread(target=runner.stop)
    stop.start()
    stop.join(0.5)
    assert stop.is_alive()  # waiting for the batch
    gate.set()
    batch.join(30)
    stop.join(30)
    runner.stop()  # a second stop sends nothing
    assert events == [jobs, "run", "ran", None]
    with pytest.raises(batcher_lib.Cancelled):
        runner(jobs, None)


def test_run_in_step_agrees_on_each_phase_and_skips_a_batch_another_host_could_not_prepare(monkeypatch):
    """One process, the all-gathers replaced: what `run_in_step` does with each combination of outcomes."""
    from lens_jax.errors import InputError
    from lens_jax.tools import jobs as jobs_lib
    from lens_jax.tools.serve import batcher as batcher_lib

    jobs = [jobs_lib.Job("a", 1, 32, 32, 2, 4.0)]

    class Local:
        def __init__(self, fail_prepare=False):
            self.fail_prepare, self.calls = fail_prepare, []

        def prepare(self, jobs):
            self.calls.append("prepare")
            if self.fail_prepare:
                raise InputError("unknown LoRA 'x' (not in this host's --lora-dir).")
            return "adapters"

        def execute(self, jobs, prepared, callback):
            self.calls.append(("execute", prepared))
            return np.ones((len(jobs), 2, 2, 3), np.float32)

    def others(failures):  # {phase number: {host: line}} from the other hosts, and this host's own outcome
        phases = iter(failures)

        def agree(error):
            mine = {} if error is None else {0: batcher_lib._error_line(error)}
            return {**mine, **next(phases)}
        return agree

    # Every host fine: both phases agreed, the images come back.
    local = Local()
    monkeypatch.setattr(batcher_lib, "_agree", others([{}, {}]))
    assert batcher_lib.run_in_step(local, lambda: jobs, None).shape == (1, 2, 2, 3)
    assert local.calls == ["prepare", ("execute", "adapters")]
    # Host 1 could not prepare: this host skips the computation and reports host 1's line.
    local = Local()
    monkeypatch.setattr(batcher_lib, "_agree", others([{1: "InputError: unknown LoRA 'x'"}]))
    with pytest.raises(batcher_lib.HostFailed, match=r"host 1: InputError: unknown LoRA 'x'\); every host skipped"):
        batcher_lib.run_in_step(local, lambda: jobs, None)
    assert local.calls == ["prepare"]
    # This host could not prepare (or decode the batch): its own error, after agreeing (no computation).
    local = Local(fail_prepare=True)
    monkeypatch.setattr(batcher_lib, "_agree", others([{}]))
    with pytest.raises(InputError, match="unknown LoRA 'x'"):
        batcher_lib.run_in_step(local, lambda: jobs, None)
    assert local.calls == ["prepare"]
    monkeypatch.setattr(batcher_lib, "_agree", others([{}]))
    with pytest.raises(ValueError, match="bad payload"):
        batcher_lib.run_in_step(Local(), lambda: (_ for _ in ()).throw(ValueError("bad payload")), None)
    # Host 1 failed the computation after its collectives: dropped everywhere, named on host 0.
    local = Local()
    monkeypatch.setattr(batcher_lib, "_agree", others([{}, {1: "RuntimeError: disk full"}]))
    with pytest.raises(batcher_lib.HostFailed, match="host 1: RuntimeError: disk full.*every host dropped it"):
        batcher_lib.run_in_step(local, lambda: jobs, None)
    assert local.calls == ["prepare", ("execute", "adapters")]


def test_agree_in_one_process_needs_no_collective():
    from lens_jax.tools.serve import batcher as batcher_lib

    assert batcher_lib._agree(None) == {}
    assert batcher_lib._agree(KeyError("k")) == {0: "KeyError: 'k'"}
    assert batcher_lib._error_line(RuntimeError("")) == "RuntimeError"


def test_init_distributed_only_when_asked(monkeypatch):
    from lens_jax.errors import InputError
    from lens_jax.tools.runtime import init_distributed

    monkeypatch.delenv("LENS_JAX_DISTRIBUTED", raising=False)
    assert init_distributed() is False
    monkeypatch.setenv("LENS_JAX_DISTRIBUTED", "1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(InputError, match="JAX_NUM_PROCESSES='two' must be"):
        init_distributed()
