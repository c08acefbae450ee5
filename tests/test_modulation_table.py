"""Precomputed modulation (issue 11, item 5): the DiT blocks' (shift, scale, gate) for every step, once.

The table must give the same bits as computing the modulation inside every DiT call (float32,
CPU): for one DiT call on the goldens' inputs, for whole images (one-program loop and host-driven
steps), for an int8 DiT whose img_mod/txt_mod live in pinned host memory, and with LoRAs that
target the modulation Linears (merged, and unmerged inside the scan).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lens_jax.transformer as T
from lens_jax import LensPipeline
from lens_jax.models import lora as lora_lib
from lens_jax.models import quant
from lens_jax.models import transformer as M
from lens_jax.sampling import modulation
from lens_jax.sampling import sampler as sampler_lib
from lens_jax.tools.parity.metrics import F32_TOLERANCE, assert_close

from .conftest import FIXTURES

TINY = FIXTURES / "tiny_lens"
CALL = dict(prompt=["A cat.", "A red cube."], negative_prompt="blurry", height=64, width=80,
            num_inference_steps=3, guidance_scale=4.0, output_type="np")
table_fn = jax.jit(M.modulation_table, static_argnames=("config", "dtype"))


@pytest.fixture(scope="module")
def io():
    return load_file(FIXTURES / "io_dit.safetensors")


@pytest.fixture(scope="module")
def tr():
    return T.load(TINY / "transformer")


def _args(tr, io, timestep=None):
    feats = [io[f"text_features_layer{i}"] for i in range(4)]
    t = io["timestep"] if timestep is None else timestep
    return (tr.params, tr.config, io["hidden_states"], feats, io["text_mask"], t, (3, 5), jnp.float32)


def _batch_rows(table):
    """A table made from per-row sigmas [B] -> `apply(modulation=)` rows [L, B, 6d]."""
    return {k: jnp.swapaxes(v, 0, 1) for k, v in table.items()}


def test_table_shape_and_dit_call_are_bit_equal(tr, io):
    want = np.asarray(M.apply(*_args(tr, io)))
    table = table_fn(tr.params, config=tr.config, sigmas=io["timestep"], dtype=jnp.float32)
    c = tr.config
    assert {k: v.shape for k, v in table.items()} == {k: (3, c.num_layers, 6 * c.inner_dim) for k in M.MODULATION_KEYS}
    got = np.asarray(M.apply(*_args(tr, io), modulation=_batch_rows(table)))
    np.testing.assert_array_equal(got, want)
    assert_close(got, io["output"], atol=F32_TOLERANCE["transformer"].atol, what="DiT output with the table")


def test_one_table_serves_every_step(tr, io):
    """A sampler's table: N sigmas, each step's [L, 6d] rows shared by the batch."""
    sigmas = np.linspace(1.0, 0.05, 5).astype(np.float32)
    table = table_fn(tr.params, config=tr.config, sigmas=sigmas, dtype=jnp.float32)
    for i in (0, 2, 4):
        t = np.full((3,), sigmas[i], np.float32)
        np.testing.assert_array_equal(np.asarray(M.apply(*_args(tr, io, t), modulation=M.modulation_rows(table, i))),
                                      np.asarray(M.apply(*_args(tr, io, t))))


def test_bad_rows_are_refused(tr, io):
    with pytest.raises(ValueError, match=r"modulation\['img_mod'\] must be"):
        M.apply(*_args(tr, io), modulation={"img_mod": jnp.zeros((1, 4)), "txt_mod": jnp.zeros((1, 4))})


MOD_TARGETS = (r"transformer_blocks\.(img|txt)_mod",)


def _mod_adapter(params, targets=MOD_TARGETS + (r"transformer_blocks\.attn\.to_out",)):
    """A LoRA on the modulation Linears (and by default one attention Linear) with non-zero B."""
    adapter = lora_lib.init_adapter(params, None, jax.random.key(1), rank=4, targets=list(targets))
    keys = iter(jax.random.split(jax.random.key(2), len(adapter)))
    return {p: dataclasses.replace(w, lora_B=0.05 * jax.random.normal(next(keys), w.lora_B.shape))
            for p, w in adapter.items()}


def test_lora_on_the_modulation_unmerged_and_merged(tr, io):
    adapter = _mod_adapter(tr.params)
    ts = io["timestep"]
    # Unmerged: the adapter is merged layer by layer in the table's scan and in the blocks' scan.
    want = np.asarray(M.apply(*_args(tr, io), lora=adapter, lora_multiplier=0.7))
    table = jax.jit(M.modulation_table, static_argnames=("config", "dtype"))(
        tr.params, config=tr.config, sigmas=ts, dtype=jnp.float32, lora=adapter, lora_multiplier=0.7)
    got = np.asarray(M.apply(*_args(tr, io), lora=adapter, lora_multiplier=0.7, modulation=_batch_rows(table)))
    np.testing.assert_array_equal(got, want)
    plain = np.asarray(M.apply(*_args(tr, io)))
    assert np.abs(got - plain).max() > 1e-3  # the adapter (on img_mod too) changes the output
    # Merged into the kernels first.
    merged = jax.jit(lora_lib.merge)(tr.params, adapter, 0.7)
    args = (merged,) + _args(tr, io)[1:]
    table = table_fn(merged, config=tr.config, sigmas=ts, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(M.apply(*args, modulation=_batch_rows(table))), np.asarray(M.apply(*args)))


# ----------------------------------------------------------------------------- the sampler and the pipeline


def _latents():
    return np.random.default_rng(0).standard_normal((2, 20, 32)).astype(np.float32)


def _without_table(monkeypatch):
    """Make the pipeline build specs that compute the modulation inside every DiT call (today's path)."""
    real = sampler_lib.SamplerSpec
    monkeypatch.setattr(sampler_lib, "SamplerSpec",
                        lambda *a, **k: real(*a, **{**k, "modulation_table": False, "modulation_stream": None}))


def _images(pipe, callback=False, **over):
    return pipe(**{**CALL, **over}, latents=_latents(), callback=(lambda i, t, x: None) if callback else None).images


def _mods_on_device(pipe):
    """The pipeline's DiT with img_mod/txt_mod moved back to device memory (for the per-step path)."""
    blocks = pipe.dit_params["transformer_blocks"]
    moved = {k: jax.tree.map(lambda a: jax.device_put(a, a.sharding.with_memory_kind("device")), blocks[k])
             for k in M.MODULATION_KEYS}
    pipe.dit_params = {**pipe.dit_params, "transformer_blocks": {**blocks, **moved}}
    pipe._dit_shardings = sampler_lib.ShardingTree(jax.tree.map(lambda a: a.sharding, pipe.dit_params))


@pytest.fixture(scope="module")
def f32_pipe():
    return LensPipeline.from_pretrained(TINY, dtype="f32", compilation_cache=False)


def test_pipeline_images_bit_equal_with_and_without_table(f32_pipe, monkeypatch):
    with_table = {cb: _images(f32_pipe, cb) for cb in (False, True)}
    _without_table(monkeypatch)
    want = _images(f32_pipe)
    for cb, got in with_table.items():
        np.testing.assert_array_equal(got, want, err_msg=f"callback={cb}")


@pytest.fixture(scope="module")
def int8_pipe():
    return LensPipeline.from_pretrained(TINY, dtype="f32", quantize="int8", compilation_cache=False)


def _host_arguments(stablehlo: str) -> int:
    main = next(line for line in stablehlo.splitlines() if "func.func public @main" in line)
    return main.count('mhlo.memory_kind = "pinned_host"')


def test_programs_read_the_modulation_from_host_only_for_the_table(int8_pipe):
    pipe = int8_pipe
    spec = sampler_lib.SamplerSpec(pipe.dit_config, pipe.vae_config, (4, 5), 2, True, False, False,
                                   np.dtype("float32"), None, modulation_stream=modulation.stream_for(True))
    programs = sampler_lib.build_programs(spec, pipe.mesh, pipe._dit_shardings, pipe._vae_shardings, 1, 2)
    sigmas = np.linspace(1, 0, 3).astype(np.float32)
    n_mod = len(M.MODULATION_KEYS)  # the two kernels (their biases stay on the device)
    p, v = pipe.dit_params, pipe.vae_params
    f, m = [np.zeros((2, 64, pipe.dit_config.enc_hidden_dim), np.float32)] * 4, np.zeros((2, 64), bool)
    x = np.zeros((1, 20, 32), np.float32)
    whole = programs.whole.lower(p, v, x, f, m, sigmas, sigmas * 1000, np.float32(4.0), np.int32(0))
    assert _host_arguments(whole.as_text()) == n_mod
    table = programs.table.lower(p, sigmas * 1000)
    assert _host_arguments(table.as_text()) == n_mod
    rows = jax.eval_shape(programs.table, p, sigmas * 1000)
    step = programs.step.lower(p, x, f, m, sigmas, sigmas * 1000, np.float32(4.0), np.int32(0),
                               jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), rows))
    # The step program never reads img_mod/txt_mod: jit drops them, so no argument lives in host memory.
    assert _host_arguments(step.as_text()) == 0
    assert modulation.device_bytes(p) < sum(a.nbytes for a in jax.tree.leaves(p))


def test_int8_keeps_the_modulation_in_host_memory_and_images_unchanged(int8_pipe, monkeypatch):
    pipe = int8_pipe  # runs last: it moves the modulation back to device memory
    blocks = pipe.dit_params["transformer_blocks"]
    kinds = {k: {a.sharding.memory_kind for a in jax.tree.leaves(blocks[k])} for k in blocks}
    assert {blocks[k]["kernel"].sharding.memory_kind for k in M.MODULATION_KEYS} == {"pinned_host"}
    assert kinds["img_mlp"] == kinds["attn"] == {"device"}
    adapter = _mod_adapter(pipe.dit_params, MOD_TARGETS)
    with_table = {cb: _images(pipe, cb) for cb in (False, True)}
    pipe.load_lora(adapter, 0.5)  # a LoRA on img_mod: merged kernels go back to host memory
    assert pipe.dit_params["transformer_blocks"]["img_mod"]["kernel"].sharding.memory_kind == "pinned_host"
    lora_images = _images(pipe)
    _mods_on_device(pipe)
    _without_table(monkeypatch)
    np.testing.assert_array_equal(lora_images, _images(pipe))
    pipe.unload_loras()
    _mods_on_device(pipe)
    want = _images(pipe)
    assert np.abs(lora_images - want).max() > 1e-4
    for cb, got in with_table.items():
        np.testing.assert_array_equal(got, want, err_msg=f"callback={cb}")


def test_auto_offload_sizes_the_quantised_dit_without_its_modulation_kernels():
    from lens_jax.pipelines import components

    dense = components.estimate_bytes(TINY, np.float32)[0]
    int8 = components.estimate_bytes(TINY, np.float32, quantize="int8")[0]
    c = T.TransformerConfig.from_json(TINY / "transformer" / "config.json")
    mod_kernels = 2 * c.num_layers * c.inner_dim * 6 * c.inner_dim * 4  # float32
    quantised = components.tree_bytes(jax.eval_shape(
        lambda: quant.quantize_params(M.init_params(c, jax.random.key(0)), "int8")))
    assert int8 == quantised - mod_kernels < dense
