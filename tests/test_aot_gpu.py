"""scripts/aot_gpu.py's CPU-side logic: the GPU-host emulation, the offload placement it applies, its exit
without the CUDA plugin. The GPU compile itself needs the CUDA wheels (docs/aot_gpu.md) and is not run here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import aot_gpu  # noqa: E402
import aot_tpu  # noqa: E402

from lens_jax.models import text_encoder as te  # noqa: E402
from lens_jax.models import transformer as dit  # noqa: E402


def _has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


@pytest.fixture(scope="module")
def configs():
    return aot_tpu.load_configs("tiny")


def test_gpu_host_makes_lens_jax_choose_as_on_a_gpu():
    backend = jax.default_backend()
    with aot_gpu.gpu_host():
        assert jax.default_backend() == "gpu"
        assert dit.default_attention_impl(jnp.bfloat16) == "cudnn"
        assert te.resolve_moe_impl(1024) == te.resolve_moe_impl(1024, "gpu")
    assert jax.default_backend() == backend
    assert dit.default_attention_impl(jnp.bfloat16) == (None if backend != "gpu" else "cudnn")


def test_offload_placement_moves_the_pipelines_host_bytes(configs):
    params = jax.eval_shape(lambda: dit.init_params(configs["dit"], jax.random.key(0), jnp.bfloat16))
    blocks = params["transformer_blocks"]
    gib = aot_gpu.GIB
    assert aot_gpu.dit_host_gib(configs, "none") == 0.0
    assert aot_gpu.dit_host_gib(configs, "all") * gib == aot_gpu._bytes(blocks)
    assert aot_gpu.dit_host_gib(configs, "text_encoder") * gib == aot_gpu._bytes(
        [blocks[k]["kernel"] for k in dit.MODULATION_KEYS])
    total = (aot_gpu._bytes(params)) / gib + aot_gpu._vae_gib(configs)
    for mode in aot_gpu.MODES:
        assert aot_gpu.resident_gib(configs, mode) + aot_gpu.dit_host_gib(configs, mode) == pytest.approx(total)
    assert aot_gpu.text_encoder_host_gib(configs, "none") == 0.0
    assert aot_gpu.text_encoder_host_gib(configs, "all") > 0.0
    # A program whose placement XLA did not keep: the host bytes leave the device column.
    mem = aot_gpu._on_host(aot_gpu.Mem(args=3.0, temp=1.0, host=0.0), 2.0)
    assert (mem.args, mem.temp, mem.host, mem.total) == (1.0, 1.0, 2.0, 2.0)


@pytest.mark.skipif(_has_cuda_plugin(), reason="the CUDA plugin is installed: the GPU target exists")
def test_without_the_cuda_plugin_it_says_what_to_install():
    with pytest.raises(SystemExit, match="jax-cuda12-plugin"):
        aot_gpu.target_device("h100")
