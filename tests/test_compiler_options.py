"""The sampler programs' per-platform XLA options (lens_jax.sampling.compiler_options): GPU only, with an opt-out."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lens_jax import configs, parallel
from lens_jax.errors import InputError
from lens_jax.models import transformer as dit
from lens_jax.models import vae as vae_lib
from lens_jax.sampling import compiler_options as co
from lens_jax.sampling import sampler as sampler_lib


def test_table_gives_gpu_programs_cublas_gemms_and_nothing_elsewhere(monkeypatch):
    monkeypatch.delenv(co.ENV_VAR, raising=False)
    for platform in ("gpu", "cuda", "rocm"):
        assert co.compiler_options(platform) == {"xla_gpu_enable_triton_gemm": False}
    for platform in ("cpu", "tpu", "METAL"):
        assert co.compiler_options(platform) is None
    assert co.compiler_options("gpu", enabled=False) is None
    options = co.compiler_options("gpu")
    options["xla_gpu_enable_triton_gemm"] = True  # a caller's copy: the table stays as it is
    assert co.compiler_options("gpu") == {"xla_gpu_enable_triton_gemm": False}


@pytest.mark.parametrize("value, on", [("off", False), ("0", False), ("FALSE", False), ("", True), ("on", True)])
def test_environment_opt_out(monkeypatch, value, on):
    monkeypatch.setenv(co.ENV_VAR, value)
    assert (co.compiler_options("gpu") is not None) == on
    assert co.compiler_options("gpu", enabled=True) is not None  # an explicit argument wins


def test_environment_value_checked(monkeypatch):
    monkeypatch.setenv(co.ENV_VAR, "cublas")
    with pytest.raises(InputError, match=f"{co.ENV_VAR}='cublas'.*off"):
        co.compiler_options("gpu")


def test_sampler_programs_compile_with_their_platforms_options(monkeypatch):
    """An option XLA does not know makes the compile fail: proof that `build_programs` passes the mesh's row."""
    monkeypatch.delenv(co.ENV_VAR, raising=False)
    monkeypatch.setattr(co, "BY_PLATFORM", {"cpu": {"xla_lens_probe_option": True}})
    dit_config = dit.TransformerConfig.from_dict(configs.load_json("tiny/transformer.json"))
    vae_config = vae_lib.VAEConfig.from_dict(configs.load_json("tiny/vae.json"))
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = jax.eval_shape(lambda: dit.init_params(dit_config, jax.random.key(0)))
    shardings = sampler_lib.ShardingTree(parallel.replicated_shardings(params, mesh))
    spec = sampler_lib.SamplerSpec(dit_config, vae_config, (4, 5), 2, True, False, False, np.dtype("float32"), None)
    timesteps = jax.ShapeDtypeStruct((2,), np.float32)

    def compile_table():
        programs = sampler_lib.build_programs(spec, mesh, shardings, shardings, 1, 2)
        return programs.table.lower(params, timesteps).compile()

    with pytest.raises(Exception, match="xla_lens_probe_option"):
        compile_table()
    monkeypatch.setenv(co.ENV_VAR, "off")
    compile_table()  # the opt-out: XLA's default options
