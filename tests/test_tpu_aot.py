"""TPU-only compile failures caught without a TPU: AOT-compile the tiny sampler and the trainer's
train step (LoRA and full) for a v5e:2x2 topology.

The compiled program must hold the splash attention kernel (a Mosaic TPU custom call, run under
shard_map over the fsdp mesh) and fit the chip. Needs libtpu (the `tpu-aot` extra; .ci/run installs it); the
test is skipped only where libtpu cannot be imported on this platform.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import jax
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


def test_tiny_lora_train_step_compiles_for_tpu():
    """The trainer's own step (forward, backward through remat, AdamW) with the trainer's shardings, for v5e:2x2."""
    from lens_jax import parallel

    mesh = parallel.make_mesh(1, 4, 1, devices=aot_tpu.topology_devices("v5e:2x2"))
    # conftest sets matmul precision "highest"; Mosaic rejects that for the splash backward's bf16 dots
    # ("Bad lhs type"), and training runs at the default precision.
    with jax.default_matmul_precision("default"):
        compiled = aot_tpu.compile_train_step(aot_tpu.load_configs("tiny"), mesh, 64, True, 64, 4, rank=4)
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo and "splash" in hlo.lower()  # the kernel forward and its backward
    state = compiled.input_shardings[0][0]
    adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    # LoRA: the adapter and its AdamW moments replicated; the frozen base sharded over fsdp.
    assert adam and all(s.is_fully_replicated for s in jax.tree.leaves(adam[0].mu))
    assert not compiled.input_shardings[0][1]["transformer_blocks"]["img_mlp"]["w1"]["kernel"].is_fully_replicated
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes > 0  # the state is donated, as Trainer's jit declares
    args, temp, _ = aot_tpu._stats(compiled)
    assert 0 < args + temp < 16


def test_full_fine_tune_optimizer_state_is_sharded_like_the_params():
    """AdamW's moments take their parameter's fsdp sharding (left to XLA, optimizer.init's zeros
    came out replicated: the whole float32 optimizer state on every chip)."""
    from lens_jax import parallel

    mesh = parallel.make_mesh(1, 4, 1, devices=aot_tpu.topology_devices("v5e:2x2"))
    with jax.default_matmul_precision("default"):
        compiled = aot_tpu.compile_train_step(aot_tpu.load_configs("tiny"), mesh, 64, False, 64, 4)
    state = compiled.input_shardings[0][0]
    adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
    for moments in (adam.mu, adam.nu):
        assert jax.tree.map(lambda s: s.spec, moments) == jax.tree.map(lambda s: s.spec, state["params"])
    assert not state["params"]["transformer_blocks"]["img_mlp"]["w1"]["kernel"].is_fully_replicated
