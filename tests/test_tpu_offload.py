"""offload="all" / "text_encoder" compile for TPU (issue 16), caught without a TPU: AOT-compile the tiny
config's streamed sampler and streamed text encoder for one v5e chip and check that the stacked layer
parameters are arguments in host memory, and that the compiled schedule overlaps every layer fetch with
compute (an asynchronous device-side slice with instructions between its start and its done; the host-side
slice that HostStream falls back to is not overlapped); and (on CPU) that the TPU fetch gives the layer.

XLA:TPU refused these programs while the layer was cut out of the host stack by a dynamic slice on its
way to the device (2-D leaves: "Sublane slicing size must be multiple of element packing factor";
>= 3-D: a layout check abort), so a failure here can also be a crash of the test process.
Needs libtpu (the `tpu-aot` extra), like tests/test_tpu_aot.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import numpy as np

from lens_jax.parallel import offload

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'lens-jax[tpu-aot]'; it has wheels for Linux x86-64 only)")


@pytest.fixture(scope="module")
def aot_tpu():
    import aot_tpu

    return aot_tpu


@pytest.fixture(scope="module")
def chip(aot_tpu):
    from lens_jax import parallel

    return parallel.make_mesh(1, 1, 1, devices=aot_tpu.topology_devices("v5e:2x2")[:1])


@pytest.fixture(scope="module")
def configs(aot_tpu):
    return aot_tpu.load_configs("tiny")


def test_tpu_fetch_gives_the_layer_in_device_memory():
    """The TPU branch of HostStream.fetch (host-side slice; one-byte leaves by the device-side slice), run on CPU."""
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=offload.HOST)
    stacked = {"norm": jnp.arange(24, dtype=jnp.bfloat16).reshape(3, 8),
               "experts": {"scales": jnp.arange(60, dtype=jnp.uint8).reshape(3, 4, 5),
                           "kernel": jnp.arange(36, dtype=jnp.float32).reshape(3, 3, 4)}}
    stacked = jax.device_put(stacked, host)
    layer = jax.jit(offload._fetch_sliced_on_host)(stacked, 1)
    assert jax.tree.structure(layer) == jax.tree.structure(stacked)
    for got, want in zip(jax.tree.leaves(layer), jax.tree.leaves(stacked)):
        assert got.sharding.memory_kind == "device" and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[1])


def test_host_stream_for_cpu_arrays_is_the_plain_stream():
    """CPU (and GPU) targets get no layouts: HostStream.for_stack gives today's stream, the same programs."""
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=offload.HOST)
    stacked = jax.device_put({"kernel": jnp.zeros((3, 8, 128)), "bias": jnp.zeros((3, 8))}, host)
    assert offload.HostStream.for_stack(stacked) == offload.HostStream()


@needs_libtpu
def test_host_stream_for_tpu_shardings_names_the_layer_major_leaves(chip):
    host = jax.sharding.NamedSharding(chip, jax.sharding.PartitionSpec(), memory_kind=offload.HOST)
    stacked = {"kernel": jax.ShapeDtypeStruct((4, 256, 512), jnp.bfloat16, sharding=host),
               "bias": jax.ShapeDtypeStruct((4, 512), jnp.bfloat16, sharding=host)}
    stream = offload.HostStream.for_stack(stacked)
    assert [(shape, dtype) for shape, dtype, _, _ in stream.layouts] == [((4, 256, 512), "bfloat16")]
    assert stream.layouts[0][2][0] == 0 and stream.mesh is None  # layer axis major; one device: no shard_map


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _overlapped_fetches(compiled, stacked) -> list[int]:
    """Instructions the TPU schedule puts between the start and the done of each asynchronous fetch from
    host memory in the loops (scripts/probe_offload_schedule.py); asserts each >= 3-D stacked leaf has one
    and that each fetch has some compute to hide behind (0: the copy waits, as the host-side slice did)."""
    from probe_offload_schedule import async_gaps

    gaps = async_gaps(compiled.as_text())
    assert gaps, "no asynchronous fetch from host memory in the compiled loops"
    assert min(g for _, g in gaps) > 0, f"a layer fetch is not overlapped with compute: {gaps}"
    slices = [g for kind, g in gaps if kind == "async dynamic slice"]
    assert len(slices) >= sum(a.ndim >= 3 for a in jax.tree.leaves(stacked)), gaps
    return [g for _, g in gaps]


@pytest.fixture(scope="module")
def streamed_programs(aot_tpu, chip, configs):
    return aot_tpu.compile_sampler(configs, chip, 64, False, 2, 64, 1, offload=True)


@pytest.fixture(scope="module")
def streamed_sampler(streamed_programs):
    return streamed_programs[0]


@needs_libtpu
def test_streamed_sampler_decodes_in_a_program_of_its_own(streamed_programs):
    """With the DiT in host memory the VAE decode is its own program after the loop
    (`SamplerSpec.decode_apart`): XLA:TPU gave the decode twice its temporaries inside the loop's program."""
    loop, decode = streamed_programs
    assert len(loop.output_shardings) == 3 and loop.output_shardings[1] is None  # (latents, no image, trajectory)
    assert decode.memory_analysis().host_argument_size_in_bytes == 0
    spatial = re.compile(r"dim_labels=\w*01\w*_01io")  # a 2-D convolution (TPU writes dots as convolutions too)
    assert not spatial.search(loop.as_text()) and spatial.search(decode.as_text())


@needs_libtpu
def test_streamed_sampler_compiles_for_tpu_with_blocks_in_host_memory(streamed_sampler, configs):
    from lens_jax.models import transformer as dit

    compiled = streamed_sampler
    blocks = jax.eval_shape(lambda: dit.init_params(configs["dit"], jax.random.key(0), jnp.bfloat16))
    blocks = blocks["transformer_blocks"]
    placed = compiled.input_shardings[0][0]
    assert {s.memory_kind for s in jax.tree.leaves(placed["transformer_blocks"])} == {"pinned_host"}
    assert placed["img_in"]["kernel"].memory_kind == "device"
    mem = compiled.memory_analysis()
    assert mem.host_argument_size_in_bytes >= _bytes(blocks) > 0  # >=: TPU tiles pad small arrays


@needs_libtpu
def test_streamed_sampler_overlaps_each_layer_fetch_with_compute_on_tpu(streamed_sampler, configs):
    """Every layer fetch of the tiny streamed sampler (Turbo, one v5e chip) is an asynchronous device-side
    slice with compute scheduled between its start and its done; no host computation slices a layer."""
    from lens_jax.models import transformer as dit

    blocks = jax.eval_shape(lambda: dit.init_params(configs["dit"], jax.random.key(0), jnp.bfloat16))
    _overlapped_fetches(streamed_sampler, blocks["transformer_blocks"])
    assert "HostExecute" not in streamed_sampler.as_text()


@needs_libtpu
def test_streamed_text_encoder_compiles_for_tpu_with_layers_in_host_memory(aot_tpu, chip, configs):
    compiled = aot_tpu.compile_text_encoder(configs, chip, 16, 2, offload=True)
    placed = compiled.input_shardings[0][0]
    assert {s.memory_kind for s in jax.tree.leaves(placed["layers"])} == {"pinned_host"}
    assert placed["embed_tokens"]["embedding"].memory_kind == "device"
    mem = compiled.memory_analysis()
    assert mem.host_argument_size_in_bytes > 0
    # every layer fetch overlapped, the MXFP4 one-byte blocks and scales included
    from lens_jax.models import text_encoder as te

    config = configs["te"].truncated(max(configs["dit"].selected_layer_index) + 1)
    layers = jax.eval_shape(lambda: te.init_params(config, jax.random.key(0), jnp.bfloat16, packed=True))["layers"]
    assert any(a.dtype == jnp.uint8 and a.ndim >= 3 for a in jax.tree.leaves(layers))
    _overlapped_fetches(compiled, layers)
    text = compiled.as_text()
    assert "HostExecute" not in text and re.search(r"%dynamic-slice-start\S* = \(\(u8\[", text)


@needs_libtpu
def test_streamed_text_encoder_overlaps_its_fetches_on_an_fsdp_mesh(aot_tpu, configs):
    """On a v5e-8 mesh (fsdp=8) each device's shard is sliced (the slice runs under shard_map: constrained
    on the global array, the partitioned slice lost the shard's layout and XLA:TPU aborted, "Inconsistent
    layout DS"). The tiny widths leave some shard layouts not layer-major: those keep the host slice."""
    from lens_jax import parallel

    mesh = parallel.make_mesh(1, 8, 1, devices=aot_tpu.topology_devices("v5e-8"))
    compiled = aot_tpu.compile_text_encoder(configs, mesh, 16, 2, offload=True)
    from probe_offload_schedule import async_gaps

    gaps = async_gaps(compiled.as_text())
    assert sum(kind == "async dynamic slice" for kind, _ in gaps) >= 8 and min(g for _, g in gaps) > 0, gaps


@needs_libtpu
def test_one_byte_stacks_stream_on_tpu(chip):
    """MXFP4 scales (uint8 [layers, experts, rows, blocks]): sliced on the host, libtpu gives the host
    computation another tiling than the host array ("async-start expects the async shape ... to match")."""
    from lens_jax.models import streaming

    host = jax.sharding.NamedSharding(chip, jax.sharding.PartitionSpec(), memory_kind=offload.HOST)
    scales = jax.ShapeDtypeStruct((4, 32, 576, 90), jnp.uint8, sharding=host)

    def run(stacked):
        total, _ = streaming.scan_layers(lambda c, p: (c + jnp.sum(p, dtype=jnp.int32), None), jnp.int32(0),
                                         stacked, offload.HostStream())
        return total

    compiled = jax.jit(run).lower(scales).compile()
    assert compiled.memory_analysis().host_argument_size_in_bytes >= scales.size
