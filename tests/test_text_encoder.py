"""GPT-OSS text encoder: parity with transformers, the golden tiny checkpoint, bad inputs.

Tolerance: float32 on CPU, both sides; every selected layer must be within
1e-4 * max|reference| (absolute) of transformers / the golden (the goldens README: atol 3e-3 or
1e-4 x max|value|; observed float32-vs-float64 noise of the reference is ~6e-6 x max|value|).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lens_jax.errors import CheckpointError
from lens_jax import text_encoder as te_mod
from lens_jax.models import text_encoder as te_model
from lens_jax.pipelines.prompt import encode_prompts, load_tokenizer, read_txt_offset
from lens_jax.tools.parity import metrics

from .conftest import FIXTURES

try:  # only the parity tests need torch; the golden, layout and bad-input tests run without it
    import torch
except ImportError:
    torch = None
import transformers  # noqa: E402  (a runtime dependency: the tokenizer)

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the transformers reference model)")

REL_TOL = metrics.F32_TOLERANCE["text_encoder"].rel  # 1e-4, shared with `lens-jax parity`
TINY = FIXTURES / "tiny_lens"


def _assert_close(ours, ref, what: str) -> float:
    return metrics.assert_close(ours, ref, rel=REL_TOL, what=what)["max_abs"]


# ----------------------------------------------------------------------------- transformers reference

# name -> (GptOssConfig kwargs, selected layers, config.json edit)
PARITY_CASES = {
    # GQA 2, top-2 of 4, default alternating layer types, YaRN written explicitly (v5 spelling)
    "gqa2_top2_yarn_explicit": (
        dict(hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
        (0, 1, 2), None,
    ),
    # GQA 3, top-3 of 6, head_dim != hidden/heads, custom layer order, no rope entry at all (implied YaRN)
    "gqa3_top3_yarn_implied": (
        dict(hidden_size=48, intermediate_size=32, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
             head_dim=16, num_local_experts=6, num_experts_per_tok=3, sliding_window=5,
             layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"]),
        (3, 1), "drop_rope",
    ),
    # MHA, top-1 of 3, other YaRN values in the v4 spelling (rope_scaling + top-level rope_theta, truncate on)
    "mha_top1_rope_scaling": (
        dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             head_dim=16, num_local_experts=3, num_experts_per_tok=1, sliding_window=3,
             rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                              "original_max_position_embeddings": 64, "truncate": True, "rope_theta": 10000.0}),
        (0,), "v4_spelling",
    ),
}

SEQ = 17  # longer than every sliding window
PAD = 7  # right padding of the second row; longer than the windows, so some padded queries see no valid key


def _init_like_goldens(model, seed: int) -> None:
    """Seeded weights that make every part matter (see the goldens README): sinks N(0,1), biases, clamps hit."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            def normal(std, mean=0.0):
                return mean + std * torch.randn(p.shape, generator=g)

            if name.endswith("sinks") or "embed_tokens" in name:
                p.copy_(normal(1.0))
            elif "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(normal(0.2, 1.0))
            elif name.endswith("gate_up_proj"):  # [E, in, out]
                p.copy_(normal(3.0 / p.shape[1] ** 0.5))
            elif name.endswith("down_proj"):
                p.copy_(normal(1.0 / p.shape[1] ** 0.5))
            elif name.endswith("bias"):
                p.copy_(normal(0.5 if ("router" in name or "gate_up" in name) else 0.2))
            else:  # Linear [out, in]
                boost = 2.0 if any(s in name for s in ("q_proj", "k_proj", "router")) else 1.0
                p.copy_(normal(boost / p.shape[1] ** 0.5))


def _edit_config(folder, edit: str | None) -> None:
    path = folder / "config.json"
    d = json.loads(path.read_text())
    if edit == "drop_rope":
        d.pop("rope_parameters", None)
        d.pop("rope_scaling", None)
    elif edit == "v4_spelling":
        rp = d.pop("rope_parameters")
        d["rope_theta"] = rp.pop("rope_theta")
        d["rope_scaling"] = rp
    path.write_text(json.dumps(d, indent=2))


def _inputs(vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, SEQ), dtype=np.int64)
    mask = np.ones((2, SEQ), np.int64)
    mask[1, SEQ - PAD:] = 0
    return ids, mask


def _reference_layers(model, ids, mask) -> list[np.ndarray]:
    """Raw output of every decoder layer (no final norm), captured with forward hooks."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    finally:
        for h in hooks:
            h.remove()
    return [o.numpy() for o in outs]


_BUILT: dict[str, dict] = {}


def _build_case(name: str, tmp_path_factory) -> dict:
    """Build (once per session) a seeded transformers model, save it, and record its layer outputs."""
    if name in _BUILT:
        return _BUILT[name]
    kwargs, selected, edit = PARITY_CASES[name]
    seed = sum(map(ord, name))
    config = transformers.GptOssConfig(vocab_size=96, attn_implementation="eager", **kwargs)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).eval()
    _init_like_goldens(model, seed)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    _edit_config(folder, edit)
    ids, mask = _inputs(config.vocab_size, seed)
    _BUILT[name] = dict(name=name, folder=folder, model=model, selected=selected, ids=ids, mask=mask,
                        ref=_reference_layers(model, ids, mask))
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(PARITY_CASES))
def parity_case(request, tmp_path_factory):
    return _build_case(request.param, tmp_path_factory)


@needs_torch
def test_parity_with_transformers(parity_case):
    c = parity_case
    te = te_mod.load(c["folder"], selected_layers=c["selected"], dtype=jnp.float32)
    assert te_mod.num_layers(te.params) == max(c["selected"]) + 1  # later layers are not even loaded
    out = te(c["ids"], c["mask"])
    assert len(out) == len(c["selected"])
    for layer, o in zip(c["selected"], out):
        assert o.shape == (2, SEQ, te.config.hidden_size) and o.dtype == jnp.float32
        _assert_close(o, c["ref"][layer], f"{c['name']} layer {layer}")


@needs_torch
def test_rope_inv_freq_matches_transformers(parity_case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = te_mod.TextEncoderConfig.from_json(parity_case["folder"] / "config.json")
    hf = parity_case["model"].config
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf)
    inv, scale = te_model.rope_inv_freq(config)
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-12)


@needs_torch
@pytest.mark.parametrize("rope", [
    None,  # GptOssConfig defaults
    {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096},  # truncate missing: True
    {"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 0.5, "original_max_position_embeddings": 256,
     "truncate": False, "attention_factor": 1.1, "rope_theta": 5e5},
    {"rope_type": "default", "rope_theta": 1e4},
])
def test_rope_variants_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.GptOssConfig(head_dim=16, rope_parameters=rope)
    d = hf.to_dict()
    if rope is None:
        d.pop("rope_parameters")
    config = te_mod.TextEncoderConfig.from_dict(d)
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        ref_inv, ref_scale = transformers.models.gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding \
            .compute_default_rope_parameters(hf)
    else:
        ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](hf)
    inv, scale = te_model.rope_inv_freq(config)
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-12)


@needs_torch
@pytest.mark.parametrize("impl,chunk", [("grouped", 3), ("ragged", None), ("dense", None)])
def test_moe_dispatch_variants_agree(tmp_path_factory, impl, chunk):
    """Every MoE dispatch (and a grouped chunk small enough to need several chunks per expert) matches."""
    c = _build_case("gqa2_top2_yarn_explicit", tmp_path_factory)
    te = te_mod.load(c["folder"], selected_layers=(2,), moe_impl=impl, moe_chunk=chunk)
    _assert_close(te(c["ids"], c["mask"])[0], c["ref"][2], f"moe_impl={impl} chunk={chunk}")


def test_padded_query_without_visible_key_gets_sink_only():
    """A query whose sliding window holds only padding: zero attention output, so o_proj bias only."""
    config = te_mod.TextEncoderConfig.from_json(TINY / "text_encoder" / "config.json")
    rng = np.random.default_rng(0)
    h, q_dim, kv_dim = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim

    def linear(n_in, n_out):
        return {"kernel": jnp.asarray(rng.normal(0, n_in**-0.5, (n_in, n_out)), jnp.float32),
                "bias": jnp.asarray(rng.normal(0, 0.2, (n_out,)), jnp.float32)}

    p = {"q_proj": linear(h, q_dim), "k_proj": linear(h, kv_dim), "v_proj": linear(h, kv_dim),
         "o_proj": linear(q_dim, h), "sinks": jnp.asarray(rng.normal(0, 1, (config.num_attention_heads,)), jnp.float32)}
    s = 8
    mask = np.ones((1, s), bool)
    mask[0, 2:] = False
    full, sliding = te_model.attention_masks(jnp.asarray(mask), config.sliding_window)
    assert not bool(sliding[0, 7].any()) and bool(full[0, 7, :2].all())
    x = jnp.asarray(rng.normal(0, 1, (1, s, config.hidden_size)), jnp.float32)
    cos, sin = te_model.rope_cos_sin(config, s)
    out = jax.jit(te_model.attention, static_argnums=5)(p, x, cos, sin, sliding, config)
    np.testing.assert_allclose(np.asarray(out[0, 7]), np.asarray(p["o_proj"]["bias"]), rtol=0, atol=1e-6)
    assert np.isfinite(np.asarray(out)).all()


# ----------------------------------------------------------------------------- golden tiny checkpoint


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "io_text_encoder.safetensors")


@pytest.fixture(scope="module")
def tiny_float():
    return te_mod.load(TINY / "text_encoder", selected_layers=(0, 1, 2, 3))


@pytest.fixture(scope="module")
def tiny_packed():
    return te_mod.load(TINY / "text_encoder_mxfp4", selected_layers=(0, 1, 2, 3))


def test_golden_float_checkpoint(tiny_float, golden):
    assert not tiny_float.keep_mxfp4
    assert set(tiny_float.params) == {"embed_tokens", "layers"}  # model.norm / lm_head ignored
    out = tiny_float(golden["input_ids"], golden["attention_mask"])
    for i, o in enumerate(out):
        _assert_close(o, golden[f"selected_layer{i}"], f"golden float layer {i}")


def test_golden_mxfp4_packed_and_dequantised(tiny_packed, golden):
    assert tiny_packed.keep_mxfp4
    experts = tiny_packed.params["layers"]["mlp"]["experts"]
    assert experts["gate_up_proj_blocks"].dtype == jnp.uint8
    packed = tiny_packed(golden["input_ids"], golden["attention_mask"])
    deq = te_mod.load(TINY / "text_encoder_mxfp4", selected_layers=(0, 1, 2, 3), keep_mxfp4=False)
    assert deq.params["layers"]["mlp"]["experts"]["gate_up_proj"].dtype == jnp.float32
    dequantised = deq(golden["input_ids"], golden["attention_mask"])
    for i, (p, d) in enumerate(zip(packed, dequantised)):
        _assert_close(p, golden[f"selected_layer{i}"], f"golden mxfp4 packed layer {i}")
        _assert_close(d, golden[f"selected_layer{i}"], f"golden mxfp4 dequantised layer {i}")
        np.testing.assert_allclose(np.asarray(p), np.asarray(d), rtol=0, atol=1e-5)


def test_golden_rope_tables(golden):
    config = te_mod.TextEncoderConfig.from_json(TINY / "text_encoder" / "config.json")
    inv, scale = te_model.rope_inv_freq(config)
    np.testing.assert_allclose(inv, golden["yarn_inv_freq"], rtol=1e-6)
    assert scale == pytest.approx(0.1 * np.log(32) + 1, rel=1e-12)
    cos, sin = te_model.rope_cos_sin(config, golden["input_ids"].shape[1])
    np.testing.assert_allclose(np.asarray(cos), golden["debug_rope_cos"][0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), golden["debug_rope_sin"][0], atol=1e-5)


def test_golden_pipeline_features(tiny_float):
    """prompt -> template -> tokens -> encoder -> offset slice reproduces the pipeline golden (cond row)."""
    g = load_file(FIXTURES / "io_pipeline.safetensors")
    with safe_open(FIXTURES / "io_pipeline.safetensors", "np") as f:
        call = json.loads(f.metadata()["lens_golden"])["call"]
    offset = read_txt_offset(TINY)
    assert offset == call["txt_offset"] == 54
    res = encode_prompts(tiny_float, load_tokenizer(TINY / "tokenizer"), call["prompt"], txt_offset=offset,
                         max_sequence_length=call["max_sequence_length"])
    np.testing.assert_array_equal(res.tokens.input_ids, g["pos_input_ids"])
    np.testing.assert_array_equal(res.tokens.attention_mask, g["pos_attention_mask"])
    n = res.mask.shape[1]
    np.testing.assert_array_equal(np.asarray(res.mask[0]), g["dit_text_mask"][0, :n])
    assert not g["dit_text_mask"][0, n:].any()
    for i, f in enumerate(res.features):
        _assert_close(f[0], g[f"dit_text_features_layer{i}"][0, :n], f"pipeline features layer {i}")


# ----------------------------------------------------------------------------- bad input


def test_out_of_range_selected_layers():
    for bad in [(0, 4), (-1,), ()]:
        with pytest.raises(ValueError, match="selected_layers"):
            te_mod.load(TINY / "text_encoder", selected_layers=bad)


def test_selected_layer_beyond_loaded_params(tiny_float):
    short = te_mod.load(TINY / "text_encoder", selected_layers=(1,))
    with pytest.raises(ValueError, match="hold only 2"):
        te_mod.TextEncoder(short.config, short.params, (3,))


def test_not_gpt_oss_config(tmp_path):
    folder = tmp_path / "te"
    shutil.copytree(TINY / "text_encoder", folder)
    d = json.loads((folder / "config.json").read_text())
    d["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="model_type 'llama'.*gpt_oss"):
        te_mod.load(folder, selected_layers=(0,))


def test_keep_mxfp4_needs_mxfp4_checkpoint():
    with pytest.raises(ValueError, match="keep_mxfp4 needs an MXFP4 checkpoint"):
        te_mod.load(TINY / "text_encoder", selected_layers=(0,), keep_mxfp4=True)


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_bad_checkpoint_keys(tmp_path, damage):
    folder = tmp_path / "te"
    folder.mkdir()
    shutil.copy(TINY / "text_encoder" / "config.json", folder / "config.json")
    tensors = load_file(TINY / "text_encoder" / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight"
    if damage == "missing":
        del tensors[key]
    elif damage == "extra":
        key = "model.layers.0.mlp.shared_expert.weight"
        tensors[key] = np.zeros((4, 4), np.float32)
    else:
        tensors[key] = tensors[key][:, :-1].copy()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        te_mod.load(folder, selected_layers=(0, 1))


def test_mxfp4_dequantised_conversion_is_bit_equal_to_the_float_checkpoint():
    """The float golden folder holds exactly transformers' dequantisation of the MXFP4 one."""
    from lens_jax.weights.text_encoder import convert_text_encoder

    _, deq = convert_text_encoder(TINY / "text_encoder_mxfp4", np.float32, keep_mxfp4=False)
    _, ref = convert_text_encoder(TINY / "text_encoder", np.float32)
    equal = jax.tree.map(lambda a, b: a.dtype == b.dtype and bool(np.array_equal(a, b)), deq, ref)
    assert all(jax.tree.leaves(equal))
