"""`lens-jax convert --quantize int8|fp8`: stored leaves, metadata, loading as stored, errors, interruption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lens_jax.tools.convert as cli
import lens_jax.transformer as T
from lens_jax import LensPipeline
from lens_jax.errors import CheckpointError, ConvertedCheckpointError, InputError
from lens_jax.models import quant
from lens_jax.weights import orbax_io

from .conftest import FIXTURES
from .test_convert import assert_same_params

TINY = FIXTURES / "tiny_lens"
ROOT = Path(__file__).parent.parent
_rng = np.random.default_rng(1)
# Prompt embeddings given (the text encoder is not quantised): CFG, 2 steps, decoded to pixels.
CALL = dict(prompt_embeds=[_rng.standard_normal((1, 16, 64)).astype(np.float32) for _ in range(4)],
            prompt_mask=np.arange(16)[None] < 11, height=64, width=80, num_inference_steps=2, guidance_scale=4.0,
            latents=_rng.standard_normal((1, 20, 32)).astype(np.float32), output_type="np")
DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def convert(*args) -> int:
    return cli.main([str(a) for a in args] + ["--no-progress"])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{name: OUT}: the tiny checkpoint in f32 unquantised, --quantize int8 through the `lens-jax` dispatcher,
    --quantize fp8 through `lens_jax.tools.convert.main` (what `python -m convert` runs)."""
    from lens_jax.tools.cli import main as lens_jax_main

    base = tmp_path_factory.mktemp("quantized")
    out = {m: base / m for m in ("plain", "int8", "fp8")}
    assert convert("--src", TINY, "--dst", out["plain"], "--dtype", "f32") == 0
    assert lens_jax_main(["convert", "--src", str(TINY), "--dst", str(out["int8"]), "--dtype", "f32", "--quantize",
                          "int8", "--no-progress"]) == 0
    assert convert("--src", TINY, "--dst", out["fp8"], "--dtype", "f32", "--quantize", "fp8") == 0
    return out


def _dit(out: Path, dtype=jnp.float32, **kw):
    return orbax_io.load_component(out, "transformer", dtype, **kw)[1]


# ----------------------------------------------------------------------------------------------
# what is stored


@pytest.mark.parametrize("mode", quant.MODES)
def test_stored_leaves_are_quantize_params_of_the_float_conversion(outputs, mode):
    stored = _dit(outputs[mode])
    assert_same_params(stored, quant.quantize_params(_dit(outputs["plain"]), mode))  # dtypes, shapes, bits
    # on disk: one entry per block, quantised kernels with their scales, the modulation left in f32
    meta = orbax_io._stored_shapes(outputs[mode] / "transformer" / "params")
    assert meta[("transformer_blocks", "1", "attn", "img_qkv", "kernel")][1] == DTYPES[mode]
    assert meta[("transformer_blocks", "1", "attn", "img_qkv", "kernel_scale")][1] == np.float32
    assert meta[("transformer_blocks", "1", "txt_mlp", "w2", "kernel")][1] == DTYPES[mode]
    assert meta[("transformer_blocks", "1", "img_mod", "kernel")][1] == np.float32
    assert ("transformer_blocks", "0", "img_mod", "kernel_scale") not in meta


@pytest.mark.parametrize("mode", quant.MODES)
def test_bf16_conversion_quantises_the_bf16_weights(tmp_path, mode):
    for name, extra in (("plain", ()), ("q", ("--quantize", mode))):
        assert convert("--src", TINY, "--dst", tmp_path / name, "--components", "transformer", "--dtype", "bf16",
                       *extra) == 0
    stored = _dit(tmp_path / "q", jnp.bfloat16)
    assert stored["transformer_blocks"]["img_mod"]["kernel"].dtype == jnp.bfloat16
    assert_same_params(stored, quant.quantize_params(_dit(tmp_path / "plain", jnp.bfloat16), mode))


@pytest.mark.parametrize("mode", quant.MODES)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_numpy_and_jax_quantisation_give_the_same_bits(mode, dtype):
    # conversion quantises numpy leaves with numpy, the pipeline device arrays with jax (eager or jitted)
    w = (np.random.default_rng(0).standard_normal((96, 3, 200)) * 0.02).astype(dtype)
    w[:, 1, 7] = 0  # an all-zero output channel (scale 1)
    host = quant.quantize_kernel(w, (0,), mode)
    eager = quant.quantize_kernel(jnp.asarray(w), (0,), mode)
    jitted = jax.jit(quant.quantize_kernel, static_argnums=(1, 2))(jnp.asarray(w), (0,), mode)
    assert isinstance(host[0], np.ndarray) and host[0].dtype == DTYPES[mode]
    for other in (eager, jitted):
        np.testing.assert_array_equal(host[0].view(np.uint8), np.asarray(other[0]).view(np.uint8))
        np.testing.assert_array_equal(host[1], np.asarray(other[1]))


def test_layer_table_matches_the_stacked_table():
    table = quant.layer_table()
    assert len(table) == len(quant.DIT_QUANTISED)
    assert dict(table)[r"attn\.(to_out|to_add_out)"] == (0, 1)
    assert dict(table)[r"(img|txt)_mlp\.(w1|w2|w3)"] == (0,)


# ----------------------------------------------------------------------------------------------
# metadata


def test_manifest_records_the_mode(outputs):
    plain = orbax_io.read_manifest(outputs["plain"])
    assert plain["format_version"] == orbax_io.FORMAT_VERSION == 2 and plain["quantize"] is None
    assert plain["components"]["transformer"]["quantize"] is None
    for mode in quant.MODES:
        m = orbax_io.read_manifest(outputs[mode])
        assert m["format_version"] == orbax_io.QUANTIZED_FORMAT_VERSION == 3
        assert m["quantize"] == m["components"]["transformer"]["quantize"] == mode
        assert orbax_io.stored_quantize(outputs[mode]) == mode
        assert orbax_io.stored_quantize(outputs[mode], mode) == mode
    assert orbax_io.stored_quantize(outputs["plain"], "int8") is None  # quantised after loading


def test_newer_format_is_refused(tmp_path, outputs):
    import shutil

    out = tmp_path / "newer"
    shutil.copytree(outputs["int8"], out)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "format_version": 4}))
    with pytest.raises(ConvertedCheckpointError, match="newer lens-jax"):
        orbax_io.read_manifest(out)


# ----------------------------------------------------------------------------------------------
# loading


@pytest.fixture(scope="module")
def at_load_time(outputs):
    """{mode: (pipe, output)}: the float conversion quantised at load time."""
    got = {}
    for mode in quant.MODES:
        pipe = LensPipeline.from_pretrained(outputs["plain"], dtype=jnp.float32, quantize=mode, compilation_cache=False)
        got[mode] = pipe, pipe(**CALL)
    return got


@pytest.mark.parametrize("mode,asked", [("int8", None), ("fp8", "fp8")])  # None means "as stored"
def test_pipeline_from_quantised_checkpoint_is_bit_equal(outputs, at_load_time, monkeypatch, mode, asked):
    restored = []
    real = orbax_io.load_params

    def spy(path, abstract, *a, **kw):
        restored.append((Path(path).parent.name, abstract))
        return real(path, abstract, *a, **kw)

    monkeypatch.setattr(orbax_io, "load_params", spy)
    pipe = LensPipeline.from_pretrained(outputs[mode], dtype=jnp.float32, quantize=asked, compilation_cache=False)
    assert pipe.quantize == mode
    # the quantised leaves are read as they are: no float copy of those kernels is ever restored
    (abstract,) = [a for name, a in restored if name == "transformer"]
    assert abstract["transformer_blocks"]["attn"]["to_out"]["kernel"].dtype == DTYPES[mode]
    ref_pipe, ref = at_load_time[mode]
    assert_same_params(pipe.dit_params, ref_pipe.dit_params)
    out = pipe(**CALL)
    np.testing.assert_array_equal(out.latents, ref.latents)
    np.testing.assert_array_equal(out.images, ref.images)


def test_another_mode_is_refused(outputs):
    with pytest.raises(ConvertedCheckpointError) as e:
        LensPipeline.from_pretrained(outputs["int8"], dtype=jnp.float32, quantize="fp8")
    msg = str(e.value)
    assert "\n" not in msg and "int8" in msg and "quantize='fp8'" in msg and "--quantize fp8" in msg
    with pytest.raises(ConvertedCheckpointError, match="quantised as fp8"):
        orbax_io.load_component(outputs["fp8"], "transformer", jnp.float32, quantize="int8")
    with pytest.raises(InputError, match="already quantised as int8"):
        quant.quantize_params(_dit(outputs["int8"]), "fp8")


def test_readers_that_cannot_take_a_quantised_checkpoint_say_so(outputs, capsys):
    from lens_jax.models import transformer as dit_model
    from lens_jax.tools.cli import main as lens_jax_main

    for path in (outputs["int8"], outputs["int8"] / "transformer"):
        with pytest.raises(CheckpointError, match="DiT quantised int8.*from_pretrained"):
            T.load(path)
    assert lens_jax_main(["parity", "--model", str(outputs["int8"])]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DiT quantised int8" in err and "converted from" in err
    with pytest.raises(CheckpointError, match=r"quantised \(int8\); PyTorch export needs float weights"):
        T.export_comfy(_dit(outputs["int8"]), outputs["int8"].parent / "never.safetensors")
    assert not (outputs["int8"].parent / "never.safetensors").exists()
    # the orbax reader, asked for float kernels where int8 ones are stored, refuses instead of reading them unscaled
    config = dit_model.TransformerConfig.from_json(outputs["int8"] / "transformer" / "config.json")
    abstract = jax.eval_shape(lambda: dit_model.init_params(config, jax.random.key(0), jnp.float32))
    with pytest.raises(ConvertedCheckpointError, match="stores quantised kernels"):
        orbax_io.load_params(outputs["int8"] / "transformer" / "params", abstract, stacked_key="transformer_blocks")


# ----------------------------------------------------------------------------------------------
# conversion errors and interruption


def test_verify_compares_with_the_source_quantised_in_memory(tmp_path, outputs):
    job = cli.plan_transformer(TINY / "transformer", TINY, jnp.float32)
    job.quantize = "int8"
    assert cli.verify(job, outputs["int8"], jnp.float32) == 0.0


def test_quantize_without_the_transformer_is_refused(tmp_path, capsys):
    assert convert("--src", TINY, "--dst", tmp_path / "out", "--components", "vae", "--quantize", "int8") == 2
    assert "add transformer to --components" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interrupted_quantised_conversion_leaves_nothing(tmp_path, capsys, monkeypatch):
    import orbax.checkpoint.experimental.v1 as ocp

    real, pieces = ocp.partial.save, []

    def flaky(path, state, **kw):
        pieces.append(state)
        if len(pieces) == 3:  # the DiT's head and its first quantised block are on disk by now
            raise KeyboardInterrupt
        return real(path, state, **kw)

    monkeypatch.setattr(ocp.partial, "save", flaky)
    assert convert("--src", TINY, "--dst", tmp_path / "out", "--dtype", "f32", "--quantize", "int8") == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert pieces[1]["transformer_blocks"]["0"]["attn"]["img_qkv"]["kernel"].dtype == np.int8
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# sharded restore under 8 simulated CPU devices (own process)

_SHARDED = textwrap.dedent('''
    import json, sys
    import jax
    from lens_jax import parallel
    from lens_jax.models import quant, transformer as dit
    from lens_jax.weights import orbax_io

    out = sys.argv[1]
    mesh = parallel.make_mesh(1, 8)
    config, params = orbax_io.load_component(out, "transformer", "float32", mesh=mesh)
    want = parallel.logical_shardings(params, quant.quantized_axes(dit.param_axes(config), params), mesh)
    split = 0
    for leaf, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert leaf.sharding.is_equivalent_to(s, leaf.ndim), (leaf.shape, leaf.sharding, s)
        split += leaf.addressable_shards[0].data.shape != leaf.shape
    k = params["transformer_blocks"]["img_mlp"]["w1"]
    print(json.dumps({"split": split, "dtype": str(k["kernel"].dtype),
                      "kernel": list(k["kernel"].addressable_shards[0].data.shape), "full": list(k["kernel"].shape)}))
''')


def test_sharded_restore_of_a_quantised_checkpoint(tmp_path, outputs):
    script = tmp_path / "check.py"
    script.write_text(_SHARDED)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), str(outputs["int8"])], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["dtype"] == "int8" and report["split"] > 0
    assert report["kernel"] != report["full"]
