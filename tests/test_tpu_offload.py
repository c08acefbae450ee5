"""offload="all" / "text_encoder" compile for TPU (issue 16), caught without a TPU: AOT-compile the tiny
config's streamed sampler and streamed text encoder for one v5e chip and check that the stacked layer
parameters are arguments in host memory.

XLA:TPU refused these programs while the layer was cut out of the host stack by a dynamic slice on its
way to the device (2-D leaves: "Sublane slicing size must be multiple of element packing factor";
>= 3-D: a layout check abort), so a failure here can also be a crash of the test process.
Needs libtpu (the `tpu-aot` extra), like tests/test_tpu_aot.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'lens-jax[tpu-aot]'; it has wheels for Linux x86-64 only)",
                allow_module_level=True)

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import aot_tpu  # noqa: E402


@pytest.fixture(scope="module")
def chip():
    from lens_jax import parallel

    return parallel.make_mesh(1, 1, 1, devices=aot_tpu.topology_devices("v5e:2x2")[:1])


@pytest.fixture(scope="module")
def configs():
    return aot_tpu.load_configs("tiny")


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_streamed_sampler_compiles_for_tpu_with_blocks_in_host_memory(chip, configs):
    from lens_jax.models import transformer as dit

    compiled = aot_tpu.compile_sampler(configs, chip, 64, False, 2, 64, 1, offload=True)
    blocks = jax.eval_shape(lambda: dit.init_params(configs["dit"], jax.random.key(0), jnp.bfloat16))
    blocks = blocks["transformer_blocks"]
    placed = compiled.input_shardings[0][0]
    assert {s.memory_kind for s in jax.tree.leaves(placed["transformer_blocks"])} == {"pinned_host"}
    assert placed["img_in"]["kernel"].memory_kind == "device"
    mem = compiled.memory_analysis()
    assert mem.host_argument_size_in_bytes >= _bytes(blocks) > 0  # >=: TPU tiles pad small arrays
    assert "HostExecute" in compiled.as_text()  # the layer is sliced out of the stack on the host


def test_streamed_text_encoder_compiles_for_tpu_with_layers_in_host_memory(chip, configs):
    compiled = aot_tpu.compile_text_encoder(configs, chip, 16, 2, offload=True)
    placed = compiled.input_shardings[0][0]
    assert {s.memory_kind for s in jax.tree.leaves(placed["layers"])} == {"pinned_host"}
    assert placed["embed_tokens"]["embedding"].memory_kind == "device"
    mem = compiled.memory_analysis()
    assert mem.host_argument_size_in_bytes > 0
