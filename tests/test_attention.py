"""lens_jax.models.attention: every path against the dense reference, and the goldens through each.

Tolerances (float32 on CPU): the reference path is held to 2e-6 max abs against a float64 NumPy
formula (inputs ~N(0, 1), outputs |o| <= ~3); the blocked path and splash (Pallas TPU interpret
mode) to 5e-6 max abs against the reference: online softmax only reorders float32 sums, measured
<= 1e-6. Goldens keep the tolerances of their own test files (DiT 2e-4 abs, a 10x margin over the
goldens README's float32-vs-float64 floor; text encoder 1e-4 x max|golden|).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lens_jax import text_encoder as te_mod
from lens_jax import transformer as T
from lens_jax.models import attention as A
from lens_jax.models import text_encoder as te_model

from .conftest import FIXTURES

REF_ATOL = 2e-6
PATH_ATOL = 5e-6

# name: (batch, seq, heads, kv_heads, head_dim, causal, window, sinks, visible keys per row)
CASES = {
    # the DiT: [image; right-padded text] keys, partial and empty text rows, 200 = not a 128 multiple
    "joint_prefix_mask": (3, 200, 4, 4, 32, False, None, False, "joint"),
    # the GPT-OSS encoder: causal, sliding window, sinks, GQA 2, a padded row and an all-padding row
    "causal_window_sinks_gqa": (3, 160, 4, 2, 16, True, 24, True, [160, 37, 0]),
    # full causal layers with sinks and MQA-like grouping
    "causal_sinks_gqa4": (2, 130, 4, 1, 16, True, None, True, [130, 5]),
}


def _inputs(name):
    b, s, h, kh, d, causal, window, sinks, lengths = CASES[name]
    rng = np.random.default_rng(len(name))
    q = rng.standard_normal((b, s, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    if lengths == "joint":  # 150 image keys then 50 text keys: all / 17 / none of the text visible
        lengths = [200, 150 + 17, 150]
    key_mask = np.arange(s)[None] < np.asarray(lengths)[:, None]
    sk = rng.standard_normal(h).astype(np.float32) if sinks else None
    return dict(q=q, k=k, v=v, key_mask=key_mask, sinks=sk), dict(causal=causal, window=window)


def _numpy_reference(q, k, v, key_mask, sinks, causal, window):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(d)
    i, j = np.arange(t)[:, None], np.arange(k.shape[1])[None]
    vis = key_mask[:, None, None, :] & np.ones((t, k.shape[1]), bool)
    if causal:
        vis = vis & (j <= i)
    if window is not None:
        vis = vis & (i - j < window)
    s = np.where(vis, s, -np.inf)
    m = s.max(-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, sinks.astype(np.float64)[None, :, None, None])
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    if sinks is not None:
        den = den + np.exp(sinks.astype(np.float64)[None, :, None, None] - m)
    p = np.divide(e, den, out=np.zeros_like(e), where=den > 0)
    return np.einsum("bhqs,bshd->bqhd", p, v)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    arrays, static = _inputs(request.param)
    ref = jax.jit(lambda q, k, v, m, s: A.attention(q, k, v, key_mask=m, sinks=s, impl="reference", **static))(
        *(arrays[n] for n in ("q", "k", "v", "key_mask", "sinks")))
    return request.param, arrays, static, np.asarray(ref)


def test_reference_matches_float64(case):
    name, a, static, ref = case
    want = _numpy_reference(a["q"], a["k"], a["v"], a["key_mask"], a["sinks"], **static)
    assert np.abs(ref - want).max() <= REF_ATOL, name
    if CASES[name][-1] != "joint" and CASES[name][-1][-1] == 0:
        assert np.abs(ref[-1]).max() == 0.0  # an all-padding row puts all its mass on the sink


@pytest.mark.parametrize("impl,blocks", [("blocked", dict(block_q=64, block_k=48)), ("blocked", {}), ("splash", {})])
def test_path_matches_reference(case, impl, blocks):
    """Small blocks make several query chunks and key blocks, skipped tiles and a ragged last block."""
    name, a, static, ref = case
    fn = jax.jit(lambda q, k, v, m, s: A.attention(q, k, v, key_mask=m, sinks=s, impl=impl, **static, **blocks))
    out = np.asarray(fn(*(a[n] for n in ("q", "k", "v", "key_mask", "sinks"))))
    err = np.abs(out - ref).max()
    assert np.isfinite(out).all() and err <= PATH_ATOL, f"{name} {impl} {blocks}: max abs {err:.2e}"


@pytest.mark.parametrize("heads_outer", [True, False])
def test_blocked_loop_orders_match_reference(case, heads_outer):
    """Both loop orders (CPU: one (batch, key head) pair at a time; accelerators: all pairs per tile), with
    ragged multi-block tiles and with the default tile sizes."""
    name, a, static, ref = case
    for blocks in (dict(block_q=40, block_k=56), {}):
        fn = jax.jit(lambda q, k, v, m, s, blocks=blocks: A.blocked(q, k, v, key_mask=m, sinks=s,
                                                                    heads_outer=heads_outer, **static, **blocks))
        out = np.asarray(fn(*(a[n] for n in ("q", "k", "v", "key_mask", "sinks"))))
        err = np.abs(out - ref).max()
        assert np.isfinite(out).all() and err <= PATH_ATOL, f"{name} heads_outer={heads_outer} {blocks}: {err:.2e}"


def test_cpu_default_tiles():
    assert A._even_block(1152, A.CPU_BLOCK_K) == 1152  # the DiT's 1024 + 128 tokens: one key block
    assert A._even_block(4608, 2048) == 1536 and A._even_block(5000, 2048) == 1672  # even blocks, multiples of 8
    assert A._even_block(7, 2048) == 7


def test_blocked_never_forms_the_score_matrix():
    spec = jax.ShapeDtypeStruct((1, 2048, 2, 32), jnp.float32)
    hlo = jax.jit(lambda q, k, v: A.attention(q, k, v, impl="blocked", block_q=256, block_k=512)).lower(
        spec, spec, spec).as_text()
    assert "256x512xf32" in hlo and "2048x2048" not in hlo
    hlo = jax.jit(lambda q, k, v: A.attention(q, k, v, impl="blocked")).lower(spec, spec, spec).as_text()
    assert "256x2048xf32" in hlo and "2048x2048" not in hlo  # CPU default: 256 queries x one key block


def test_defaults_and_bad_input():
    assert A.default_impl(jnp.float32, backend="cpu") == "blocked"
    assert A.default_impl(jnp.bfloat16, backend="tpu", has_sinks=True) == "splash"
    assert A.default_impl(jnp.bfloat16, backend="gpu") == "cudnn"
    assert A.default_impl(jnp.bfloat16, backend="gpu", head_dim=512) == "blocked"
    x = jnp.zeros((1, 8, 4, 16))
    with pytest.raises(ValueError, match="unknown"):
        A.attention(x, x, x, impl="flash9")
    with pytest.raises(ValueError, match="multiple of key heads"):
        A.attention(x, x[:, :, :3], x[:, :, :3])
    with pytest.raises(ValueError, match="sinks"):
        A.attention(x, x, x, sinks=jnp.zeros(3))


# ----------------------------------------------------------------------------- goldens, path forced


@pytest.mark.parametrize("impl", ["blocked"])
def test_dit_golden_with_path_forced(impl):
    io = load_file(FIXTURES / "io_dit.safetensors")
    tr = T.load(FIXTURES / "tiny_lens" / "transformer")
    tr.attention_impl = impl
    out = tr(io["hidden_states"], [io[f"text_features_layer{i}"] for i in range(4)], io["text_mask"],
             io["timestep"], [(1, 3, 5)])
    np.testing.assert_allclose(np.asarray(out), io["output"], atol=2e-4, rtol=0)


@pytest.mark.parametrize("impl", ["blocked"])
def test_text_encoder_golden_with_path_forced(impl):
    golden = load_file(FIXTURES / "io_text_encoder.safetensors")
    te = te_mod.load(FIXTURES / "tiny_lens" / "text_encoder", selected_layers=(0, 1, 2, 3))
    out = te_model.apply(te.params, te.config, jnp.asarray(golden["input_ids"], jnp.int32),
                         jnp.asarray(golden["attention_mask"], bool), te.selected_layers, attention_impl=impl)
    for i, o in enumerate(out):
        want = golden[f"selected_layer{i}"]
        err = np.abs(np.asarray(o) - want).max()
        assert err <= 1e-4 * np.abs(want).max(), f"layer {i} ({impl}): {err:.2e}"


@pytest.mark.parametrize("impl", ["splash", "blocked"])
def test_gradients_match_reference(impl):
    """The kernels are differentiable (fine-tuning): d/dq,k,v of a loss equals the reference path's."""
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 24, 2, 16)), jnp.float32) for _ in range(3))
    key_mask = jnp.asarray(np.arange(24)[None] < 19)

    def loss(impl, q, k, v):
        return jnp.sum(jnp.sin(A.attention(q, k, v, key_mask=key_mask, impl=impl)))

    want = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=0)
