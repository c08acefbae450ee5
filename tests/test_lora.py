"""LoRA: the three file formats against the upstream goldens, merged and unmerged; round trips; export.

Tolerances (goldens README, io_lora / io_train fp32-vs-fp64 floor): DiT outputs differ from float64 by
at most 2.05e-5 (max abs), so outputs are held to 2e-4 (~10x); LoRA gradients by at most 3.58e-7
against a family max |value| of 0.0596, so gradients are held to 1e-4 x the family max (~17x).
File round trips and exports are held bit-exact.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lens_jax.lora as lora
import lens_jax.transformer as T
from lens_jax.errors import CheckpointError, InputError, LayoutError, LensError
from lens_jax.weights.dit import convert_dit_weights
from lens_jax.weights.lora_formats import _read_metadata
from lens_jax.weights.safetensors_io import SafetensorsReader

from .conftest import FIXTURES

TINY_DIT = FIXTURES / "tiny_lens" / "transformer"
LORAS = {f: FIXTURES / "loras" / f"lora_{f}.safetensors" for f in ("peft", "kohya", "comfy")}
OUT_ATOL = 2e-4
GOLDEN = {1.0: "output_lora_1", 0.5: "output_lora_0_5"}


@pytest.fixture(scope="module")
def tr():
    return T.load(TINY_DIT)


@pytest.fixture(scope="module")
def io():
    return load_file(FIXTURES / "io_lora.safetensors")


@pytest.fixture(scope="module")
def adapters(tr):
    return {f: lora.load(p, tr.config) for f, p in LORAS.items()}


def _args(io):
    feats = [io[f"text_features_layer{i}"] for i in range(4)]
    return io["hidden_states"], feats, io["text_mask"], io["timestep"], [(1, 3, 5)]


@pytest.mark.parametrize("fmt", sorted(LORAS))
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_lora_files_reproduce_io_lora(tr, io, adapters, fmt, merged):
    base = np.asarray(tr(*_args(io)))
    np.testing.assert_allclose(base, io["output_base"], atol=OUT_ATOL, rtol=0)
    for mult, key in GOLDEN.items():
        out = np.asarray(tr.with_lora(adapters[fmt], mult, merged=merged)(*_args(io)))
        np.testing.assert_allclose(out, io[key], atol=OUT_ATOL, rtol=0)
        # the adapter moves the output far more than the tolerance (7.7 % at 0.5), so this can fail
        assert np.abs(out - base).max() > 100 * OUT_ATOL


def test_merged_kernel_matches_upstream(tr, io, adapters):
    merged = lora.merge(tr.params, adapters["peft"], 1.0)
    sd = T.to_torch_state_dict(merged, tr.config)
    key = "transformer_blocks.1.attn.img_qkv"
    np.testing.assert_allclose(sd[key + ".weight"], io["debug_merged_" + key], atol=1e-6, rtol=0)


def test_formats_encode_the_same_adapter_bit_exact(tr, adapters):
    """peft/kohya load to identical leaves; comfy (alpha = r, B pre-scaled) merges to identical kernels."""
    assert jax.tree.structure(adapters["peft"]) == jax.tree.structure(adapters["kohya"])
    for a, b in zip(jax.tree.leaves(adapters["peft"]), jax.tree.leaves(adapters["kohya"])):
        np.testing.assert_array_equal(a, b)
    m_peft = lora.merge(tr.params, adapters["peft"], 1.0)
    m_comfy = lora.merge(tr.params, adapters["comfy"], 1.0)
    for a, b in zip(jax.tree.leaves(m_peft), jax.tree.leaves(m_comfy)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", sorted(LORAS))
def test_save_load_round_trip_is_bit_exact(tr, adapters, fmt, tmp_path):
    original = load_file(LORAS[fmt])
    # state_dict reproduces the file's names, layouts, dtypes and values
    sd = lora.state_dict(adapters[fmt], format=fmt)
    assert sorted(sd) == sorted(original)
    for k, v in original.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
    # save -> load gives the same adapter, bit for bit (and PEFT metadata as diffusers writes it)
    path = lora.save(adapters[fmt], tmp_path / f"rt_{fmt}.safetensors", format=fmt)
    again = lora.load(path, tr.config)
    assert jax.tree.structure(again) == jax.tree.structure(adapters[fmt])
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(adapters[fmt])):
        np.testing.assert_array_equal(a, b)
    if fmt == "peft":
        ours, theirs = _read_metadata(path), _read_metadata(LORAS[fmt])
        assert json.loads(ours["lora_adapter_metadata"]) == json.loads(theirs["lora_adapter_metadata"])


def test_cross_format_save_merges_identically(tr, adapters, tmp_path):
    want = lora.merge(tr.params, adapters["kohya"], 0.5)
    for fmt in ("peft", "comfy"):
        path = lora.save(adapters["kohya"], tmp_path / f"x_{fmt}.safetensors", format=fmt)
        assert lora.detect_format(load_file(path)) == fmt
        got = lora.merge(tr.params, lora.load(path), 0.5)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)


def test_lora_gradients_match_io_train(tr, adapters):
    """d loss / d adapter through the unmerged path, exported by state_dict, equals upstream's lora_grad."""
    io = load_file(FIXTURES / "io_train.safetensors")
    feats = [io[f"text_features_layer{i}"] for i in range(4)]
    sigma = io["sigma"][:, None, None]
    x_t = (1 - sigma) * io["x0"] + sigma * io["noise"]
    target = io["noise"] - io["x0"]

    def loss_fn(adapter):
        pred = T.apply(tr.params, tr.config, x_t, feats, io["text_mask"], io["sigma"], (4, 6), lora=adapter)
        return jnp.mean((pred - target) ** 2)

    loss, grad = jax.value_and_grad(loss_fn)(adapters["peft"])
    np.testing.assert_allclose(float(loss), float(io["loss_lora"]), rtol=1e-5)
    golden = {k[len("lora_grad."):]: v for k, v in io.items() if k.startswith("lora_grad.")}
    atol = 1e-4 * max(np.abs(v).max() for v in golden.values())
    for fmt, prefix in (("peft", "transformer."), ("comfy", "diffusion_model.")):
        sd = lora.state_dict(grad, format=fmt, gradient=True)
        assert sorted(sd) == sorted(prefix + k for k in golden)
        for k, v in golden.items():
            want = v / 2.0 if fmt == "comfy" and k.endswith("lora_B.weight") else v  # comfy B = B * alpha/r
            np.testing.assert_allclose(sd[prefix + k], want, atol=atol, rtol=0, err_msg=k)


def test_init_merge_unmerge_and_stacking(tr, adapters):
    fresh = lora.init_adapter(tr.params, tr.config, jax.random.key(0), targets=[r"transformer_blocks\.attn\..*", "img_in"],
                              rank=3, alpha=6.0, rank_pattern={r".*img_in": 2})
    assert set(fresh) == {"img_in", "transformer_blocks.attn.img_qkv", "transformer_blocks.attn.txt_qkv",
                          "transformer_blocks.attn.to_out", "transformer_blocks.attn.to_add_out"}
    assert fresh["img_in"].rank == 2 and fresh["transformer_blocks.attn.to_out"]["lora_A"].shape == (2, 32, 3)
    # B = 0: merging a fresh adapter changes nothing
    for a, b in zip(jax.tree.leaves(lora.merge(tr.params, fresh)), jax.tree.leaves(tr.params)):
        np.testing.assert_array_equal(a, b)
    ad = adapters["peft"]
    once = lora.merge(tr.params, ad, 1.0)
    twice = lora.merge_many(tr.params, [(ad, 0.5), (ad, 0.5)])
    back = lora.unmerge(once, ad, 1.0)
    for a, b, c, base in zip(jax.tree.leaves(once), jax.tree.leaves(twice), jax.tree.leaves(back),
                             jax.tree.leaves(tr.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(c, base, atol=1e-6)
    assert not np.array_equal(once["transformer_blocks"]["img_mlp"]["w1"]["kernel"],
                              tr.params["transformer_blocks"]["img_mlp"]["w1"]["kernel"])
    with pytest.raises(InputError, match="no Linear"):
        lora.init_adapter(tr.params, tr.config, targets=["nothing_here"])


def _write(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_bad_lora_files_give_clear_errors(tr, tmp_path):
    peft = load_file(LORAS["peft"])
    meta = _read_metadata(LORAS["peft"])
    # a module the model lacks
    bad = dict(peft)
    bad["transformer.transformer_blocks.0.attn.to_v.lora_A.weight"] = np.zeros((4, 32), np.float32)
    bad["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"] = np.zeros((32, 4), np.float32)
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn\.to_v.*does not have"):
        lora.load(_write(tmp_path, "missing.safetensors", bad, meta))
    # a block the model lacks
    kohya = load_file(LORAS["kohya"])
    deep = {k.replace("blocks_1_", "blocks_7_"): v for k, v in kohya.items()}
    with pytest.raises(CheckpointError, match="block 7.*2 blocks"):
        lora.load(_write(tmp_path, "deep.safetensors", deep), tr.config)
    # rank mismatch between A and B
    key = "transformer.transformer_blocks.1.img_mlp.w2.lora_B.weight"
    bad = dict(peft, **{key: peft[key][:, :3].copy()})
    with pytest.raises(CheckpointError, match=r"rank mismatch for 'transformer_blocks\.1\.img_mlp\.w2'"):
        lora.load(_write(tmp_path, "rank.safetensors", bad, meta))
    # rank in the metadata contradicting the tensors
    wrong = dict(meta, lora_adapter_metadata=meta["lora_adapter_metadata"].replace('"transformer.r": 4', '"transformer.r": 8'))
    with pytest.raises(CheckpointError, match="metadata says r = 8"):
        lora.load(_write(tmp_path, "meta.safetensors", peft, wrong))
    # shapes of another model
    with pytest.raises(CheckpointError, match="img_mlp.w1"):
        big = {k: (np.zeros((4, 48), np.float32) if k.endswith("img_mlp.w1.lora_A.weight") else v) for k, v in peft.items()}
        lora.load(_write(tmp_path, "shape.safetensors", big, meta), tr.config)
    # unknown format
    with pytest.raises(LayoutError, match="unknown LoRA format"):
        lora.load(_write(tmp_path, "odd.safetensors", {"foo.weight": np.zeros(3, np.float32)}))
    with pytest.raises(LensError, match="does not exist"):
        lora.load(tmp_path / "nope.safetensors")
    # an adapter pytree for a module the model lacks
    with pytest.raises(InputError, match="norm_q"):
        tr.with_lora({"transformer_blocks.attn.norm_q": lora.LoraWeights(np.zeros((2, 16, 1)), np.zeros((2, 1, 16)), 1.0)})
    with pytest.raises(InputError, match="unknown LoRA format"):
        lora.state_dict({}, format="safetensors")


@pytest.fixture(scope="module")
def finetuned(tr):
    """The tiny DiT with every parameter moved (a stand-in for a fine-tuned model)."""
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda x: (np.asarray(x) + 0.01 * rng.standard_normal(x.shape)).astype(np.float32), tr.params)


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_diffusers_folder_round_trip(tr, finetuned, tmp_path):
    folder = T.export_diffusers(finetuned, tr.config, tmp_path / "transformer")
    again = T.load(folder)
    assert again.config == tr.config
    _assert_same_tree(again.params, finetuned)
    # names and shapes are exactly the upstream checkpoint's
    upstream = SafetensorsReader([TINY_DIT / "diffusion_pytorch_model.safetensors"])
    exported = SafetensorsReader([folder / "diffusion_pytorch_model.safetensors"])
    assert sorted(exported.keys()) == sorted(upstream.keys())
    assert all(exported.shape(k) == upstream.shape(k) for k in upstream.keys())
    # sharded export (tiny shard limit) loads back the same
    sharded = T.export_diffusers(finetuned, tr.config, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").exists()
    _assert_same_tree(T.load(sharded).params, finetuned)


def test_export_comfy_single_file_round_trip(tr, finetuned, tmp_path):
    path = T.export_comfy(finetuned, tmp_path / "lens_ft.safetensors", tr.config)
    reader = SafetensorsReader([path])
    assert all(k.startswith("model.diffusion_model.") for k in reader.keys())
    back = convert_dit_weights(reader, tr.config, np.float32, source_prefix="model.diffusion_model.")
    _assert_same_tree(back, jax.tree.map(np.asarray, finetuned))


def test_pipeline_load_and_unload_loras(tr):
    from lens_jax import parallel
    from lens_jax.pipelines.text_to_image import LensPipeline
    from lens_jax.sampling.sampler import ShardingTree

    # only the DiT part of a pipeline (what load_lora touches); the full tiny pipeline is tested elsewhere
    pipe = object.__new__(LensPipeline)
    pipe.dit_config, pipe.dit_params = tr.config, tr.params
    pipe._dit_shardings = ShardingTree(parallel.replicated_shardings(tr.params, parallel.make_mesh()))
    base = jax.tree.map(np.asarray, pipe.dit_params)
    pipe.load_lora(LORAS["peft"], 0.5).load_lora(LORAS["kohya"], 0.5)
    assert pipe.loras == [(str(LORAS["peft"]), 0.5), (str(LORAS["kohya"]), 0.5)]
    adapter = lora.load(LORAS["peft"], pipe.dit_config)
    want = lora.merge(base, adapter, 1.0)
    for a, b in zip(jax.tree.leaves(pipe.dit_params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    pipe.unload_loras()
    assert pipe.loras == []
    _assert_same_tree(pipe.dit_params, base)


def test_generate_lora_argument():
    from lens_jax.tools.generate import parse_lora_arg

    assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)


def test_peft_native_layout_with_adapter_config(adapters, tmp_path):
    """PEFT's save_pretrained: base_model.model.{module}.lora_A.weight + adapter_config.json beside it."""
    peft = load_file(LORAS["peft"])
    native = {"base_model.model." + k[len("transformer."):]: v for k, v in peft.items()}
    folder = tmp_path / "native"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    got = lora.load(_write(folder, "adapter_model.safetensors", native))
    assert jax.tree.structure(got) == jax.tree.structure(adapters["peft"])  # alpha 8 from the config
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(adapters["peft"])):
        np.testing.assert_array_equal(a, b)


def test_pipeline_load_lora_keeps_offloaded_blocks_on_host(tr):
    from lens_jax import parallel
    from lens_jax.parallel import offload as offload_lib
    from lens_jax.pipelines.text_to_image import LensPipeline
    from lens_jax.sampling.sampler import ShardingTree

    pipe = object.__new__(LensPipeline)
    pipe.dit_config = tr.config
    shardings = offload_lib.on_host(parallel.replicated_shardings(tr.params, parallel.make_mesh()), "transformer_blocks")
    pipe._dit_shardings = ShardingTree(shardings)
    pipe.dit_params = parallel.put_tree(tr.params, shardings)
    pipe.load_lora(LORAS["comfy"], 1.0)
    kernel = pipe.dit_params["transformer_blocks"]["img_mlp"]["w1"]["kernel"]
    assert kernel.sharding.memory_kind == offload_lib.HOST
    want = lora.merge(tr.params, lora.load(LORAS["comfy"]), 1.0)
    _assert_same_tree(jax.tree.map(np.asarray, pipe.dit_params), jax.tree.map(np.asarray, want))
