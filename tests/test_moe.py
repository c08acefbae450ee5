"""GPT-OSS MoE dispatch: the per-backend / token-count table, and every dispatch on the goldens.

Tolerances (float32, CPU): each dispatch against the golden tiny checkpoint within the text-encoder
suite's 1e-4 x max|golden| (the goldens README's float32-vs-float64 floor is ~6e-6 x max|value|);
the dispatches against each other within 2e-6 x max|value|: they compute the same routed
products and differ only in float32 summation order (measured <= 5e-7 x max|value|).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lens_jax import text_encoder as te_mod
from lens_jax.models import mxfp4
from lens_jax.models import text_encoder as T
from lens_jax.tools.parity import metrics

from .conftest import FIXTURES

REL_TOL = metrics.F32_TOLERANCE["text_encoder"].rel  # 1e-4
CROSS_REL = 2e-6
PACKED = FIXTURES / "tiny_lens" / "text_encoder_mxfp4"

# (impl, moe_chunk): every dispatch, "auto", and a grouped chunk small enough for several chunks per expert
# ("auto" is the table's pick: tiled on CPU, covered by test_resolve)
VARIANTS = [("grouped", None), ("grouped", 3), ("tiled", None), ("tiled", 3), ("ragged", None), ("dense", None)]


def _experts(cfg, seed: int, packed: bool) -> dict:
    """Random expert weights for one layer, built in numpy (no eager per-op compiles)."""
    rng = np.random.default_rng(seed)
    e, h, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    out = {"gate_up_proj_bias": rng.normal(0, 0.02, (1, e, 2 * inter)), "down_proj_bias": rng.normal(0, 0.02, (1, e, h))}
    for name, fan_in, fan_out in (("gate_up_proj", h, 2 * inter), ("down_proj", inter, h)):
        w = rng.normal(0, fan_in**-0.5, (1, e, fan_in, fan_out))
        if packed:  # stored [out, in]
            out[f"{name}_blocks"], out[f"{name}_scales"] = mxfp4.quantize_np(w.swapaxes(-1, -2))
        else:
            out[name] = w
    return {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else v.dtype) for k, v in out.items()}


# ----------------------------------------------------------------------------- the table


def test_table_covers_every_token_count_once_per_backend():
    for backend in ("cpu", "gpu", "tpu"):
        rows = sorted((r for r in T.MOE_DISPATCH if r.backend == backend), key=lambda r: r.min_tokens)
        assert rows and rows[0].min_tokens == 0 and rows[-1].max_tokens is None, backend
        for a, b in zip(rows, rows[1:]):
            assert a.max_tokens == b.min_tokens, f"{backend}: gap or overlap at {a.max_tokens}"
        for r in rows:
            assert r.impl in T.MOE_FIXED_IMPLS and r.why, r


def test_unmeasured_rows_say_so():
    """Only CPU was measured in this project's MoE benchmark; GPU/TPU rows must not claim it."""
    assert all(r.measured for r in T.MOE_DISPATCH if r.backend == "cpu")
    assert not any(r.measured for r in T.MOE_DISPATCH if r.backend in ("gpu", "tpu"))


@pytest.mark.parametrize("backend,tokens,expected", [
    ("cpu", 1, "tiled"), ("cpu", 64, "tiled"), ("cpu", 1024, "tiled"), ("cpu", 10**6, "tiled"),
    ("gpu", 8, "grouped"), ("cuda", 1024, "dense"), ("rocm", 255, "grouped"), ("gpu", 4096, "grouped"),
    ("tpu", 1024, "grouped"), ("metal", 64, "grouped"),  # no row: the portable fallback
])
def test_resolve(backend, tokens, expected):
    assert T.resolve_moe_impl(tokens, backend) == expected


def test_resolve_reads_a_given_table():
    table = (T.MoeDispatch("cpu", 0, 100, "dense", True, "test"), T.MoeDispatch("cpu", 100, None, "ragged", True, "t"))
    assert [T.resolve_moe_impl(n, "cpu", table) for n in (1, 99, 100, 5000)] == ["dense", "dense", "ragged", "ragged"]


def test_auto_defers_to_the_lowering_platform_only_where_backends_differ():
    """Where the table's backends disagree, "auto" builds a platform_dependent choice (AOT for TPU/GPU on a CPU
    host then holds that platform's entry); where they agree, one dispatch and no switch."""
    cfg = T.TextEncoderConfig(vocab_size=8, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=4, layer_types=(T.SLIDING,))
    experts = _experts(cfg, 0, packed=False)

    def jaxpr(tokens):
        x = jnp.ones((tokens, 32))
        w, idx = jnp.full((tokens, 2), 0.5), jnp.zeros((tokens, 2), jnp.int32)
        return str(jax.make_jaxpr(lambda x: T.moe(x, experts, 0, w, idx, cfg, "auto"))(x))

    differ = [n for n in (16, 512) if len({T.resolve_moe_impl(n, b) for b in ("cpu", "gpu", "tpu")}) > 1]
    same = [n for n in (16, 512) if n not in differ]
    for n in differ:
        assert "platform_index" in jaxpr(n)
    for n in same:
        assert "platform_index" not in jaxpr(n)


def test_unknown_impl_is_refused_before_work():
    with pytest.raises(ValueError, match="moe_impl"):
        te_mod.load(PACKED, selected_layers=(0,), moe_impl="fast")


# ----------------------------------------------------------------------------- every dispatch on the goldens


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "io_text_encoder.safetensors")


@pytest.fixture(scope="module")
def outputs(golden):
    base = te_mod.load(PACKED, selected_layers=(0, 1, 2, 3))
    outs = {}
    for impl, chunk in VARIANTS:
        te = T.TextEncoder(base.config, base.params, base.selected_layers, moe_impl=impl, moe_chunk=chunk)
        outs[(impl, chunk)] = [np.asarray(o) for o in te(golden["input_ids"], golden["attention_mask"])]
    return outs


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{i}-{c}" for i, c in VARIANTS])
def test_dispatch_matches_golden(outputs, golden, variant):
    for i, o in enumerate(outputs[variant]):
        metrics.assert_close(o, golden[f"selected_layer{i}"], rel=REL_TOL, what=f"moe {variant} layer {i}")


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=[f"{i}-{c}" for i, c in VARIANTS[1:]])
def test_dispatches_agree_with_dense(outputs, variant):
    for i, (o, d) in enumerate(zip(outputs[variant], outputs[("dense", None)])):
        scale = float(np.abs(d).max())
        assert float(np.abs(o - d).max()) <= CROSS_REL * scale, f"moe {variant} vs dense, layer {i}"


def test_one_layer_every_dispatch_at_routing_shape():
    """32 experts, top-4, packed, with empty experts and one expert taking many rows: all dispatches agree."""
    cfg = T.TextEncoderConfig(vocab_size=8, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=32,
                              num_experts_per_tok=4, sliding_window=4, layer_types=(T.SLIDING,))
    experts = _experts(cfg, 1, packed=True)
    rng = np.random.default_rng(0)
    t = 40
    x = jnp.asarray(rng.standard_normal((t, 64)), jnp.float32)
    idx = np.stack([rng.choice(np.r_[0:4, 9, 20], 4, replace=False) for _ in range(t)]).astype(np.int32)
    idx[:30, 0] = 7  # 7 is everyone's choice: several chunks of 8 rows
    idx[:30] = np.where(idx[:30, 1:2] == 7, np.roll(idx[:30], 1, axis=1), idx[:30])
    assert all(len(set(r)) == 4 for r in idx)
    w = jax.nn.softmax(jnp.asarray(rng.standard_normal((t, 4)), jnp.float32))
    every = jax.jit(lambda x: {impl: T.moe(x, experts, 0, w, jnp.asarray(idx), cfg, impl) for impl in T.MOE_FIXED_IMPLS})
    outs = {impl: np.asarray(o) for impl, o in every(x).items()}
    scale = float(np.abs(outs["dense"]).max())
    assert scale > 0
    for impl, o in outs.items():
        assert float(np.abs(o - outs["dense"]).max()) <= CROSS_REL * scale, impl


@pytest.mark.parametrize("packed", [False, True], ids=["float", "mxfp4"])
def test_every_dispatch_reverse_differentiates_like_dense(packed):
    """Before: jax.grad through "grouped"/"tiled" (the CPU/GPU/TPU defaults) failed ("Reverse-mode
    differentiation does not work for lax.while_loop ... with dynamic start/stop values"). Gradients
    of the tokens, the routing weights and every float expert leaf agree with the dense dispatch's."""
    cfg = T.TextEncoderConfig(vocab_size=8, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=8,
                              num_experts_per_tok=2, sliding_window=4, layer_types=(T.SLIDING,))
    experts = _experts(cfg, 2, packed=packed)
    floats = {k: v for k, v in experts.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    rng = np.random.default_rng(1)
    t = 24
    x = jnp.asarray(rng.standard_normal((t, 64)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(5, 2, replace=False) for _ in range(t)]).astype(np.int32))  # 3 experts idle
    w = jax.nn.softmax(jnp.asarray(rng.standard_normal((t, 2)), jnp.float32))
    probe = jnp.asarray(rng.standard_normal((t, 64)), jnp.float32)

    def loss(x, w, floats, impl):
        return jnp.sum(T.moe(x, {**experts, **floats}, 0, w, idx, cfg, impl, chunk=4) * probe)

    grads = jax.jit(lambda x, w, f: {impl: jax.grad(loss, argnums=(0, 1, 2))(x, w, f, impl)
                                     for impl in T.MOE_FIXED_IMPLS})(x, w, floats)
    ref = jax.tree.leaves(grads.pop("dense"))
    for impl, g in grads.items():
        for a, b in zip(jax.tree.leaves(g), ref, strict=True):
            scale = float(np.abs(b).max())
            assert scale > 0 and float(np.abs(a - b).max()) <= CROSS_REL * scale, impl


def test_dequantize_is_bit_equal_to_numpy():
    """The in-jit MXFP4 dequantisation equals the numpy one for every code and normal scale (f32 and bf16)."""
    rng = np.random.default_rng(0)
    blocks = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(3, axis=0)
    blocks = np.concatenate([blocks, rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)])
    scales = np.array([[2, 100, 127, 130, 200, 254] * 3][0][:16], np.uint8)[None].repeat(6, axis=0)
    with np.errstate(over="ignore"):  # scale 254 with codes +-6 overflows to +-inf, in both
        ref = mxfp4.dequantize_np(blocks, scales)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = np.asarray(jax.jit(mxfp4.dequantize, static_argnums=2)(blocks, scales, dtype)).astype(np.float32)
        np.testing.assert_array_equal(got, ref.astype(np.dtype(dtype)).astype(np.float32))
        np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))
