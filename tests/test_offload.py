"""Offload modes: stacked layers in pinned host memory, streamed to the device one layer ahead.

On CPU, host and device memory are one, but the programs are not: each mode must give the same
images as no offload (bit-exact in f32), and the compiled programs must take the stacked layer
parameters from host memory.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from lens_jax import LensPipeline
from lens_jax import parallel
from lens_jax.errors import InputError
from lens_jax.models import text_encoder as te_model
from lens_jax.parallel import offload
from lens_jax.sampling import sampler as sampler_lib

TINY = Path(__file__).parent / "fixtures" / "tiny_lens"
CALL = dict(prompt=["A cat.", "A red cube."], negative_prompt="blurry", height=64, width=80,
            num_inference_steps=3, guidance_scale=4.0, output_type="np")


def _latents():
    return np.random.default_rng(0).standard_normal((2, 20, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def reference():
    pipe = LensPipeline.from_pretrained(TINY, dtype="f32")
    features, mask = pipe.encode_prompt(CALL["prompt"])
    return {"images": pipe(**CALL, latents=_latents()).images, "features": features, "mask": mask}


@pytest.fixture(scope="module")
def offloaded():
    return {mode: LensPipeline.from_pretrained(TINY, dtype="f32", offload=mode) for mode in ("text_encoder", "all")}


@pytest.mark.parametrize("mode", ["text_encoder", "all"])
def test_offload_gives_the_same_results(reference, offloaded, mode):
    pipe = offloaded[mode]
    # The whole pipeline: the streamed text encoder, and the streamed DiT ("all") or its modulation
    # kernels read from host memory for the per-generation table ("text_encoder").
    np.testing.assert_array_equal(pipe(**CALL, latents=_latents()).images, reference["images"])
    features, mask = pipe.encode_prompt(CALL["prompt"])
    np.testing.assert_array_equal(mask, reference["mask"])
    for got, want in zip(features, reference["features"]):
        np.testing.assert_array_equal(got, want)
    te_kinds = {x.sharding.memory_kind for x in jax.tree.leaves(pipe.text_encoder.params["layers"])}
    assert te_kinds == {"pinned_host"}
    assert pipe.text_encoder.params["embed_tokens"]["embedding"].sharding.memory_kind == "device"
    blocks = pipe.dit_params["transformer_blocks"]
    kinds = {path: x.sharding.memory_kind for path, x in jax.tree_util.tree_leaves_with_path(blocks)}
    on_host = {jax.tree_util.keystr(p) for p, kind in kinds.items() if kind == "pinned_host"}
    if mode == "all":
        assert on_host == {jax.tree_util.keystr(p) for p in kinds}
    else:  # only the img_mod/txt_mod kernels: the sampler reads them once per generation
        assert on_host == {"['img_mod']['kernel']", "['txt_mod']['kernel']"}
    assert pipe.dit_params["img_in"]["kernel"].sharding.memory_kind == "device"


def test_programs_take_stacked_layers_from_host(offloaded):
    pipe = offloaded["all"]
    n_blocks = len(jax.tree.leaves(pipe.dit_params["transformer_blocks"]))
    spec = sampler_lib.SamplerSpec(pipe.dit_config, pipe.vae_config, (4, 5), 2, True, True, False,
                                   np.dtype("float32"), None, None, parallel.HostStream())
    programs = sampler_lib.build_programs(spec, pipe.mesh, pipe._dit_shardings, pipe._vae_shardings, 1, 2)
    sigmas = np.linspace(1, 0, 3).astype(np.float32)
    lowered = programs.whole.lower(pipe.dit_params, pipe.vae_params, np.zeros((1, 20, 32), np.float32),
                                   [np.zeros((2, 64, 64), np.float32)] * 4, np.zeros((2, 64), bool),
                                   sigmas, sigmas * 1000, np.float32(4.0), np.int32(0))
    assert _host_arguments(lowered.as_text()) == n_blocks
    te = pipe.text_encoder
    ids = np.zeros((1, 8), np.int32)
    lowered = te_model.apply.lower(te.params, te.config, ids, np.ones((1, 8), bool), te.selected_layers,
                                   te.moe_impl, te.moe_chunk, te.sharding, te.stream)
    assert _host_arguments(lowered.as_text()) == len(jax.tree.leaves(te.params["layers"]))


def _host_arguments(stablehlo: str) -> int:
    main = next(line for line in stablehlo.splitlines() if "func.func public @main" in line)
    return main.count('mhlo.memory_kind = "pinned_host"')


def test_bad_mode_is_refused_before_loading():
    with pytest.raises(InputError, match="offload='most' is not a mode"):
        LensPipeline.from_pretrained(TINY, offload="most")


def test_auto_picks_the_smallest_offload_that_fits(monkeypatch, capsys):
    gib = 2**30
    for free, want in ((30 * gib, "none"), (12 * gib, "text_encoder"), (6 * gib, "all")):
        monkeypatch.setattr(offload, "free_device_bytes", lambda free=free: free)
        assert offload.choose("auto", 8 * gib, 12 * gib, 2 * gib) == want
        assert f"offload=auto chose {want!r}" in capsys.readouterr().err
    monkeypatch.setattr(offload, "free_device_bytes", lambda: None)
    assert offload.choose("auto", 8 * gib, 12 * gib, 2 * gib) == "none"


def test_vae_tiling_auto_follows_free_memory(monkeypatch):
    monkeypatch.setattr(offload, "free_device_bytes", lambda: 2 * 2**30)
    assert offload.decode_fits(1024 * 1024, 1) and not offload.decode_fits(1440 * 1440, 1)
    monkeypatch.setattr(offload, "free_device_bytes", lambda: None)
    assert offload.decode_fits(2080 * 1040, 4)


def test_auto_sizes_a_quantised_dit_as_quantised():
    from lens_jax.pipelines import components

    dense, te, _, modulation = components.estimate_bytes(TINY, np.float32)
    assert 0 < modulation < dense  # what offload="text_encoder" takes off the device
    for mode in ("int8", "fp8"):
        quantised, te_q, _, modulation_q = components.estimate_bytes(TINY, np.float32, quantize=mode)
        assert te_q == te and modulation_q == 0  # already in host memory
        assert quantised < 0.75 * dense, (mode, quantised, dense)


def test_auto_counts_the_modulation_that_text_encoder_mode_moves_to_host(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(offload, "free_device_bytes", lambda: 9 * gib)  # DiT 8 + 2 does not fit; 8 - 3 + 2 does
    assert offload.choose("auto", 8 * gib, 12 * gib, 2 * gib) == "all"
    assert offload.choose("auto", 8 * gib, 12 * gib, 2 * gib, modulation_bytes=3 * gib) == "text_encoder"
