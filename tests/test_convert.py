"""`python -m convert`: every layout to orbax, round trip through LensPipeline, bad inputs, sharded restore."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lens_jax.tools.convert as cli
from lens_jax.weights import orbax_io
from lens_jax.weights.text_encoder import convert_text_encoder
from lens_jax.weights.dit import convert_transformer
from lens_jax.weights.vae import convert_vae
from lens_jax import LensPipeline

from .conftest import FIXTURES

TINY = FIXTURES / "tiny_lens"
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "module.", "net.")
LATENTS = np.random.default_rng(0).standard_normal((1, 20, 32)).astype(np.float32)
CALL = dict(prompt="A red cube.", negative_prompt="blurry", height=64, width=80, num_inference_steps=2,
            guidance_scale=4.0, latents=LATENTS, output_type="latent")


def convert(*args) -> int:
    return cli.main([str(a) for a in args] + ["--no-progress"])


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_params(ours, ref) -> None:
    a, b = leaves(ours), leaves(ref)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def leftovers(parent: Path) -> list[str]:
    """Anything a conversion left beside its destination (outputs, temporary folders, orbax partials)."""
    return sorted(p.name for p in parent.iterdir() if "convert-" in p.name or p.name.startswith("out"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The whole tiny checkpoint converted in float32, with --verify; (OUT, stderr)."""
    out = tmp_path_factory.mktemp("converted") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "convert", "--src", str(TINY), "--dst", str(out), "--dtype", "f32", "--verify",
         "--no-progress"],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


@pytest.fixture(scope="module")
def reference():
    pipe = LensPipeline.from_pretrained(TINY, dtype=jnp.float32)
    return pipe, pipe(**CALL).latents


# ----------------------------------------------------------------------------------------------
# round trip


def test_output_layout_and_manifest(converted):
    out, stderr = converted
    for c in ("transformer", "text_encoder", "vae"):
        assert (out / c / "config.json").read_bytes() == (TINY / c / "config.json").read_bytes()
        assert (out / c / "params" / "_CHECKPOINT_METADATA").is_file()
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(p.name for p in (TINY / "tokenizer").iterdir())
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == json.loads(
        (TINY / "scheduler" / "scheduler_config.json").read_text())
    assert json.loads((out / "model_index.json").read_text())["txt_offset"] == 54
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "lens-jax-orbax" and m["dtype"] == "float32" and m["keep_mxfp4"] is False
    assert {c: e["layout"]["name"] for c, e in m["components"].items()} == {
        "transformer": "diffusers", "text_encoder": "gpt-oss-float", "vae": "diffusers"}
    src = m["components"]["transformer"]["sources"][0]
    weights = TINY / "transformer" / "diffusion_pytorch_model.safetensors"
    assert src["bytes"] == weights.stat().st_size
    assert src["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert m["components"]["text_encoder"]["num_layers"] == 4 and m["components"]["transformer"]["num_layers"] == 2
    assert all(m["versions"][k] for k in ("jax", "orbax-checkpoint", "lens-jax", "numpy"))
    # --verify ran a forward pass of each component and found them identical
    for c in ("transformer", "text_encoder", "vae"):
        assert re.search(rf"verify {c}: max \|converted - source\| = 0 \(ok\)", stderr), stderr
    assert leftovers(out.parent) == ["out"]


def test_round_trip_is_bit_equal_to_the_pytorch_folder(converted, reference):
    out, _ = converted
    ref_pipe, ref_latents = reference
    pipe = LensPipeline.from_pretrained(out, dtype=jnp.float32)
    assert_same_params(pipe.dit_params, ref_pipe.dit_params)
    assert_same_params(pipe.vae_params, ref_pipe.vae_params)
    assert_same_params(pipe.text_encoder.params, ref_pipe.text_encoder.params)
    assert pipe.txt_offset == ref_pipe.txt_offset == 54
    assert pipe.scheduler_config == ref_pipe.scheduler_config
    latents = pipe(**CALL).latents
    np.testing.assert_array_equal(latents, ref_latents)


def test_load_component_checks_keep_mxfp4_and_restores_fewer_layers(converted):
    out, _ = converted
    with pytest.raises(orbax_io.ConvertedCheckpointError, match="converted without --keep-mxfp4"):
        LensPipeline.from_pretrained(out, dtype=jnp.float32, keep_mxfp4=True)
    _, two = orbax_io.load_component(out, "text_encoder", jnp.float32, num_layers=2)
    _, full = convert_text_encoder(TINY / "text_encoder", np.float32)
    assert_same_params(two, {**full, "layers": jax.tree.map(lambda a: a[:2], full["layers"])})


# ----------------------------------------------------------------------------------------------
# every layout converts to the same parameters


def _converted(out: Path, component: str, dtype=jnp.float32):
    return orbax_io.load_component(out, component, dtype)[1]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("prefix", PREFIXES)
def test_prefixed_single_file_dit(tmp_path, prefix):
    tensors = load_file(TINY / "transformer" / "diffusion_pytorch_model.safetensors")
    single = tmp_path / "lens_bf16.safetensors"  # no config.json beside it: the one in --src is used
    save_file({prefix + k: v for k, v in tensors.items()}, single)
    out = tmp_path / "out"
    assert convert("--src", TINY, "--dst", out, "--dtype", "f32", "--components", "transformer",
                   "--transformer", single) == 0
    assert_same_params(_converted(out, "transformer"), convert_transformer(TINY / "transformer", np.float32)[1])
    assert _manifest(out)["components"]["transformer"]["layout"] == {"name": "single-file", "prefix": prefix}
    assert sorted(_manifest(out)["components"]) == ["transformer"]


def test_sharded_index_dit_in_bf16(tmp_path):
    tensors = load_file(TINY / "transformer" / "diffusion_pytorch_model.safetensors")
    folder = tmp_path / "transformer"
    folder.mkdir()
    names = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / fname)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (folder / "config.json").write_bytes((TINY / "transformer" / "config.json").read_bytes())
    out = tmp_path / "out"
    assert convert("--src", TINY, "--dst", out, "--dtype", "bf16", "--components", "transformer",
                   "--transformer", index) == 0
    ours = _converted(out, "transformer", jnp.bfloat16)
    assert_same_params(ours, convert_transformer(folder, jnp.bfloat16)[1])
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ours))
    assert len(_manifest(out)["components"]["transformer"]["sources"]) == 2


def _diffusers_to_bfl(key: str, levels: int = 4) -> str:
    """FLUX.2 `ae.safetensors` name of a diffusers AutoencoderKLFlux2 key (written here, not taken from convert/)."""
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"encoder.down.{m[1]}.downsample.conv."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1."),
        (r"\.attn_1\.group_norm\.", lambda m: ".attn_1.norm."),
        (r"\.attn_1\.to_([qkv])\.", lambda m: f".attn_1.{m[1]}."),
        (r"\.attn_1\.to_out\.0\.", lambda m: ".attn_1.proj_out."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
        (r"^quant_conv\.", lambda m: "encoder.quant_conv."),
        (r"^post_quant_conv\.", lambda m: "decoder.post_quant_conv."),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def test_bfl_vae_single_file(tmp_path):
    tensors = load_file(TINY / "vae" / "diffusion_pytorch_model.safetensors")
    bfl = {}
    for k, v in tensors.items():
        name = _diffusers_to_bfl(k)
        if ".attn_1." in name and name.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original stores the attention projections as 1x1 convolutions
        bfl[name] = v
    assert {"decoder.up.3.upsample.conv.weight", "encoder.mid.attn_1.proj_out.weight", "encoder.quant_conv.bias",
            "decoder.mid.block_2.conv1.weight", "encoder.norm_out.weight"} <= set(bfl)
    assert not any("_blocks." in k or "resnets" in k for k in bfl)
    ae = tmp_path / "ae.safetensors"
    save_file(bfl, ae)
    out = tmp_path / "out"
    assert convert("--src", TINY, "--dst", out, "--dtype", "f32", "--components", "vae", "--vae", ae) == 0
    assert_same_params(_converted(out, "vae"), convert_vae(TINY / "vae", jnp.float32)[1])
    assert _manifest(out)["components"]["vae"]["layout"]["name"] == "bfl"


def test_diffusers_named_vae_single_file(tmp_path):
    single = tmp_path / "flux2-vae.safetensors"
    single.write_bytes((TINY / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    out = tmp_path / "out"
    assert convert("--src", TINY, "--dst", out, "--dtype", "f32", "--components", "vae", "--vae", single) == 0
    assert_same_params(_converted(out, "vae"), convert_vae(TINY / "vae", jnp.float32)[1])
    assert _manifest(out)["components"]["vae"]["layout"]["name"] == "diffusers"


@pytest.mark.parametrize("keep", [True, False])
def test_mxfp4_text_encoder(tmp_path, keep):
    out = tmp_path / "out"
    flags = ["--keep-mxfp4"] if keep else []
    assert convert("--src", TINY, "--dst", out, "--dtype", "f32", "--components", "text_encoder",
                   "--text-encoder", TINY / "text_encoder_mxfp4", *flags) == 0
    m = _manifest(out)
    assert m["components"]["text_encoder"]["layout"]["name"] == "gpt-oss-mxfp4"
    assert m["components"]["text_encoder"]["keep_mxfp4"] is keep and m["keep_mxfp4"] is keep
    ours = _converted(out, "text_encoder")
    assert_same_params(ours, convert_text_encoder(TINY / "text_encoder_mxfp4", np.float32, keep_mxfp4=keep)[1])
    experts = ours["layers"]["mlp"]["experts"]
    assert ("gate_up_proj_blocks" in experts) is keep
    if keep:
        assert experts["gate_up_proj_blocks"].dtype == jnp.uint8
    # the tokenizer is copied from --src
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (TINY / "tokenizer" / "tokenizer.json").read_bytes()


# ----------------------------------------------------------------------------------------------
# bad input: a clear error, a non-zero exit, nothing written


def _fails(capsys, tmp_path, *args, match: str) -> str:
    out = tmp_path / "out"
    rc = convert("--dst", out, *args)
    err = capsys.readouterr().err
    assert rc != 0, err
    assert re.search(match, err), err
    assert "convert: error: " in err, err
    assert not out.exists() and leftovers(tmp_path) == [], leftovers(tmp_path)
    return err


def _dit_file(tmp_path: Path, edit=None) -> Path:
    tensors = load_file(TINY / "transformer" / "diffusion_pytorch_model.safetensors")
    if edit is not None:
        edit(tensors)
    path = tmp_path / "src" / "lens.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file(tensors, path)
    return path


def test_truncated_safetensors(tmp_path, capsys):
    path = _dit_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _fails(capsys, tmp_path, "--src", TINY, "--components", "transformer", "--transformer", path,
           match=r"truncated.*Re-download")


def test_pickle_checkpoint_is_refused(tmp_path, capsys):
    import pickle

    path = tmp_path / "src" / "diffusion_pytorch_model.bin"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"transformer_blocks.0.attn.img_qkv.weight": [0.0]}))
    _fails(capsys, tmp_path, "--src", TINY, "--components", "transformer", "--transformer", path,
           match=r"pickle checkpoint.*never unpickles")


def test_unknown_layout_lists_the_keys_seen(tmp_path, capsys):
    path = tmp_path / "src" / "mystery.safetensors"
    path.parent.mkdir()
    save_file({"foo.weight": np.zeros((2, 2), np.float32), "bar.bias": np.zeros(2, np.float32)}, path)
    err = _fails(capsys, tmp_path, "--src", TINY, "--components", "transformer", "--transformer", path,
                 match=r"unknown transformer layout .*expected diffusers DiT keys")
    assert "bar.bias" in err and "foo.weight" in err and "model.diffusion_model." in err
    # a VAE passed as the DiT: the message says what it looks like
    _fails(capsys, tmp_path, "--src", TINY, "--components", "transformer",
           "--transformer", TINY / "vae" / "diffusion_pytorch_model.safetensors",
           match=r"unknown transformer layout.*look like a vae checkpoint")
    _fails(capsys, tmp_path, "--src", TINY, "--components", "vae", "--vae", path, match=r"unknown vae layout.*foo\.weight")
    _fails(capsys, tmp_path, "--src", TINY, "--components", "text_encoder", "--text-encoder", TINY / "transformer",
           match=r"no config.json|unknown text encoder layout")


def test_missing_component(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("transformer", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        (src / name).symlink_to(TINY / name)
    _fails(capsys, tmp_path, "--src", src, match=r"missing component vae: .* has no vae/ folder")
    _fails(capsys, tmp_path, "--components", "transformer", match=r"missing component transformer: give --src")
    _fails(capsys, tmp_path, "--src", TINY, "--components", "vae", "--vae", tmp_path / "nope.safetensors",
           match=r"missing component vae: .*nope.safetensors does not exist")
    (src / "tokenizer").unlink()
    _fails(capsys, tmp_path, "--src", src, "--components", "text_encoder", match=r"missing component tokenizer")


def test_shape_mismatch_is_found_before_anything_is_written(tmp_path, capsys):
    def edit(t):  # the last layer, so a converter that checked lazily would have written layer 0 first
        t["transformer_blocks.1.img_mlp.w1.weight"] = t["transformer_blocks.1.img_mlp.w1.weight"][:-1]

    path = _dit_file(tmp_path, edit)
    _fails(capsys, tmp_path, "--src", TINY, "--components", "transformer", "--transformer", path,
           match=r"shape mismatches:\n\s+transformer_blocks\.1\.img_mlp\.w1\.weight: expected \[85, 32\], found \[84, 32\]")


def test_existing_destination(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["--src", TINY, "--dst", out, "--components", "transformer", "--dtype", "f32"]
    assert convert(*args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert convert(*args, "--overwrite") == 2  # not a conversion output: never deleted
    assert "refusing to overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    # a previous conversion is replaced, atomically
    (out / "precious.txt").unlink()
    out.rmdir()
    assert convert(*args) == 0
    assert _manifest(out)["dtype"] == "float32"
    assert convert("--src", TINY, "--dst", out, "--components", "transformer", "--dtype", "bf16") == 2
    assert convert("--src", TINY, "--dst", out, "--components", "transformer", "--dtype", "bf16", "--overwrite") == 0
    assert _manifest(out)["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_nothing(tmp_path, capsys, monkeypatch, error):
    import orbax.checkpoint.experimental.v1 as ocp

    real, calls = ocp.partial.save, []

    def flaky(path, state, **kw):
        calls.append(path)
        if len(calls) == 3:  # the DiT's head and first layer are on disk by now
            raise error("simulated")
        return real(path, state, **kw)

    monkeypatch.setattr(ocp.partial, "save", flaky)
    out = tmp_path / "out"
    args = ("--src", TINY, "--dst", out, "--dtype", "f32")
    if error is KeyboardInterrupt:
        assert convert(*args) == 130
        assert "interrupted; nothing was written" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="simulated"):
            convert(*args)
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_verify_detects_a_differing_source(tmp_path, converted):
    out, _ = converted
    job = cli.plan_transformer(TINY / "transformer", TINY, jnp.float32)
    assert cli.verify(job, out, jnp.float32) == 0.0

    def edit(t):
        t["transformer_blocks.1.attn.to_out.0.weight"] = t["transformer_blocks.1.attn.to_out.0.weight"] * 1.01

    altered = _dit_file(tmp_path, edit)
    job = cli.plan_transformer(altered, TINY, jnp.float32)
    assert cli.verify(job, out, jnp.float32) > 0.0


def test_lens_jax_convert_dispatches_here(tmp_path, capsys):
    from lens_jax.tools.cli import main as lens_jax_main

    assert lens_jax_main(["convert", "--src", str(TINY), "--dst", str(tmp_path / "out"), "--components", "vae",
                          "--dtype", "f32", "--no-progress"]) == 0
    assert _manifest(tmp_path / "out")["components"]["vae"]["layout"]["name"] == "diffusers"


# ----------------------------------------------------------------------------------------------
# sharded restore under 8 simulated CPU devices, without torch (own process)

_SHARDED_CHECK = textwrap.dedent('''
    import json, sys
    sys.modules["torch"] = None  # as if torch were not installed: importing it fails
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from lens_jax.weights import orbax_io
    from lens_jax import parallel as sh
    from lens_jax import LensPipeline

    out, latents_file = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()

    from lens_jax.models import text_encoder as te_model
    from lens_jax.models import transformer as dit_model

    def check(tree, mesh, fsdp):
        if not fsdp:
            want = sh.replicated_shardings(tree, mesh)
        elif "transformer_blocks" in tree:
            want = sh.logical_shardings(tree, dit_model.param_axes(pipe_config(out)), mesh)
        else:
            want = sh.logical_shardings(tree, te_model.param_axes(te_config(out), params=tree), mesh)
        split, n = 0, 0
        for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
            assert leaf.sharding.is_equivalent_to(s, leaf.ndim), (leaf.shape, leaf.sharding, s)
            shard = leaf.addressable_shards[0].data.shape
            split += shard != leaf.shape
            n += 1
        return split, n

    def pipe_config(root):
        return dit_model.TransformerConfig.from_json(f"{root}/transformer/config.json")

    def te_config(root):
        return te_model.TextEncoderConfig.from_json(f"{root}/text_encoder/config.json")

    report = {}
    for data, fsdp in ((2, 4), (1, 8)):
        mesh = sh.make_mesh(data, fsdp)
        # restored straight into the shardings (not placed on one device and moved by the pipeline)
        _, dit = orbax_io.load_component(out, "transformer", "float32", mesh=mesh)
        _, vae = orbax_io.load_component(out, "vae", "float32", mesh=mesh)
        _, te = orbax_io.load_component(out, "text_encoder", "float32", mesh=mesh, num_layers=3)
        kernel = dit["transformer_blocks"]["attn"]["img_qkv"]["kernel"]
        r = {"dit": check(dit, mesh, True), "vae": check(vae, mesh, False), "te": check(te, mesh, True),
             "kernel_spec": str(kernel.sharding.spec), "kernel_shard": list(kernel.addressable_shards[0].data.shape)}
        pipe = LensPipeline.from_pretrained(out, dtype="f32", mesh=mesh)
        r["pipe_dit"] = check(pipe.dit_params, mesh, True)
        r["pipe_te"] = check(pipe.text_encoder.params, mesh, True)
        if (data, fsdp) == (2, 4):
            ref = np.load(latents_file)
            call = json.loads(sys.argv[3])
            got = pipe(**call, latents=np.load(sys.argv[4])).latents
            r["max_abs_diff"] = float(np.abs(got - ref).max())
        report[f"{data}x{fsdp}"] = r
    report["torch_imported"] = sys.modules.get("torch") is not None
    print(json.dumps(report))
''')


def test_sharded_restore_under_8_devices_without_torch(tmp_path, converted, reference):
    out, _ = converted
    _, ref_latents = reference
    np.save(tmp_path / "ref.npy", ref_latents)
    np.save(tmp_path / "latents.npy", LATENTS)
    script = tmp_path / "check.py"
    script.write_text(_SHARDED_CHECK)
    call = {k: v for k, v in CALL.items() if k != "latents"}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "ref.npy"), json.dumps(call), str(tmp_path / "latents.npy")],
        capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["torch_imported"] is False
    for mesh, fsdp in (("2x4", 4), ("1x8", 8)):
        r = report[mesh]
        assert r["dit"][0] > 0 and r["te"][0] > 0, r  # some leaves really are split over the fsdp axis
        assert r["vae"][0] == 0, r  # the VAE is replicated
        assert r["pipe_dit"] == r["dit"] and r["pipe_te"][0] > 0, r
        assert "fsdp" in r["kernel_spec"] and r["kernel_shard"] == [2, 32 // fsdp, 3, 2, 16], r
    assert report["2x4"]["max_abs_diff"] <= 1e-5
