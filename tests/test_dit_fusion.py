"""The DiT block's fused-friendly formulations (issue 11 item 3) equal the straightforward ones.

`_joint_qkv` concatenates the two streams before the QK RMSNorm and RoPE (per-token norm weights, one
joint rotation table) and `rotate_pairs` has a per-backend form; both must give what norming and
rotating each stream on its own, with the pairs sliced apart, gives. Also the HLO reader's byte count
of a kernel that reads its operand through a slice (scripts/_hlo_kernels.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.models import transformer as T
from lens_jax.models.nn import rms_norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import _hlo_kernels as hk  # noqa: E402

CONFIG = T.TransformerConfig(num_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                             in_channels=8, out_channels=4, enc_hidden_dim=16)
GRID, TEXT = (3, 5), 7


def reference_rope(x, cos, sin):
    """RoPE as upstream writes it: the pairs sliced apart, rotated, stacked back (float32)."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = x32[..., 0], x32[..., 1]
    c, s = cos[None, :, None], sin[None, :, None]
    return jnp.stack([re * c - im * s, re * s + im * c], -1).reshape(x.shape).astype(x.dtype)


def reference_qkv(a, x_img, x_txt, rope):
    """Each stream projected, normed with its own weights and rotated with its own tables, then concatenated."""
    def stream(x, p, nq, nk, cos, sin):
        q, k, v = jnp.einsum("btd,dchk->cbthk", x, p["kernel"].astype(x.dtype)) + p["bias"].astype(x.dtype)[:, None, None]
        return (reference_rope(rms_norm(q, a[nq]["weight"], T.BLOCK_EPS), cos, sin),
                reference_rope(rms_norm(k, a[nk]["weight"], T.BLOCK_EPS), cos, sin), v)

    img = stream(x_img, a["img_qkv"], "norm_q", "norm_k", rope["img_cos"], rope["img_sin"])
    txt = stream(x_txt, a["txt_qkv"], "norm_added_q", "norm_added_k", rope["txt_cos"], rope["txt_sin"])
    return [jnp.concatenate([i, t], 1) for i, t in zip(img, txt)]


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    blocks = T.init_params(CONFIG, jax.random.key(0))["transformer_blocks"]
    a = jax.tree.map(lambda x: x[0], blocks["attn"])
    # distinct, non-trivial norm weights and biases per stream (init gives ones / zeros)
    a = jax.tree.map(lambda x: jnp.asarray(rng.normal(1.0, 0.5, x.shape), jnp.float32), a)
    d = CONFIG.inner_dim
    x_img = jnp.asarray(rng.normal(size=(2, GRID[0] * GRID[1], d)), jnp.float32)
    x_txt = jnp.asarray(rng.normal(size=(2, TEXT, d)), jnp.float32)
    rope = jax.tree.map(jnp.asarray, T.rope_tables(CONFIG, *GRID, TEXT))
    return a, x_img, x_txt, rope


def test_rotation_table_holds_the_cos_sin_tables():
    rope = T.rope_tables(CONFIG, *GRID, TEXT)
    cos = np.concatenate([rope["img_cos"], rope["txt_cos"]])
    sin = np.concatenate([rope["img_sin"], rope["txt_sin"]])
    np.testing.assert_array_equal(rope["rotation"], np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2))
    assert rope["rotation"].shape == (GRID[0] * GRID[1] + TEXT, CONFIG.attention_head_dim // 2, 2, 2)


@pytest.mark.parametrize("form", ["slices", "sum"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotate_pairs_equals_sliced_rope(inputs, form, dtype):
    _, _, _, rope = inputs
    n = rope["rotation"].shape[0]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, n, 2, CONFIG.attention_head_dim)), dtype)
    cos = jnp.concatenate([rope["img_cos"], rope["txt_cos"]])
    sin = jnp.concatenate([rope["img_sin"], rope["txt_sin"]])
    want = np.asarray(reference_rope(x, cos, sin), np.float32)
    got = np.asarray(jax.jit(T.rotate_pairs, static_argnums=2)(x, rope["rotation"], form), np.float32)
    # the same two products and one sum per element: equal up to float32 rounding (then the cast to dtype)
    tol = 4e-7 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    with pytest.raises(ValueError, match="rotate_pairs form"):
        T.rotate_pairs(x, rope["rotation"], "gather")


@pytest.mark.parametrize("form", ["slices", "sum"])
def test_joint_qkv_equals_per_stream_qkv(inputs, form, monkeypatch):
    a, x_img, x_txt, rope = inputs
    monkeypatch.setattr(T, "ROTATE_PAIRS_FORM", {"cpu": form})
    got = jax.jit(T._joint_qkv, static_argnums=4)(a, x_img, x_txt, rope["rotation"], None)
    want = jax.jit(reference_qkv)(a, x_img, x_txt, rope)
    for g, w, name in zip(got, want, "qkv"):
        assert g.shape == w.shape == (2, GRID[0] * GRID[1] + TEXT, CONFIG.num_attention_heads, CONFIG.attention_head_dim)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=4e-7 * float(jnp.abs(w).max()),
                                   err_msg=f"{name} ({form})")


def test_rotate_pairs_form_follows_the_lowering_platform(inputs):
    """A program lowered for a GPU holds the pair-axis reduction (fused with the norm by XLA:GPU), for CPU
    and TPU the slices, whatever host lowers it (here a CPU host lowers for all three)."""
    _, _, _, rope = inputs
    x = jax.ShapeDtypeStruct((1, rope["rotation"].shape[0], 1, CONFIG.attention_head_dim), jnp.float32)
    r = jax.ShapeDtypeStruct(rope["rotation"].shape, jnp.float32)
    forms = {p: "stablehlo.reduce" in jax.export.export(jax.jit(T.rotate_pairs), platforms=[p])(x, r).mlir_module()
             for p in ("cuda", "rocm", "cpu", "tpu")}
    assert forms == {"cuda": True, "rocm": True, "cpu": False, "tpu": False}


SLICED_READ = """HloModule m, is_scheduled=true

%fused_q (p0: bf16[8,12], p1: bf16[3,4]) -> bf16[8,4] {
  %p0 = bf16[8,12]{1,0} parameter(0)
  %p1 = bf16[3,4]{1,0} parameter(1)
  %b = bf16[2,4,3,4]{3,2,1,0} bitcast(%p0)
  %bb = bf16[2,4,3,4]{3,2,1,0} broadcast(%p1), dimensions={2,3}
  %add = bf16[2,4,3,4]{3,2,1,0} add(%b, %bb)
  %s = bf16[2,4,1,4]{3,2,1,0} slice(%add), slice={[0:2], [0:4], [0:1], [0:4]}
  ROOT %r = bf16[8,4]{1,0} bitcast(%s)
}

%fused_qk (p0: bf16[8,12]) -> (bf16[2,4,1,4], bf16[2,4,1,4]) {
  %p0 = bf16[8,12]{1,0} parameter(0)
  %b = bf16[2,4,3,4]{3,2,1,0} bitcast(%p0)
  %q = bf16[2,4,1,4]{3,2,1,0} slice(%b), slice={[0:2], [0:4], [0:1], [0:4]}
  %k = bf16[2,4,1,4]{3,2,1,0} slice(%b), slice={[0:2], [0:4], [1:2], [0:4]}
  ROOT %t = (bf16[2,4,1,4], bf16[2,4,1,4]) tuple(%q, %k)
}

ENTRY %main (x: bf16[8,12], w: bf16[3,4]) -> (bf16[8,4], (bf16[2,4,1,4], bf16[2,4,1,4])) {
  %x = bf16[8,12]{1,0} parameter(0)
  %w = bf16[3,4]{1,0} parameter(1)
  %f = bf16[8,4]{1,0} fusion(%x, %w), kind=kLoop, calls=%fused_q
  %g = (bf16[2,4,1,4], bf16[2,4,1,4]) fusion(%x), kind=kLoop, calls=%fused_qk
  ROOT %out = (bf16[8,4], (bf16[2,4,1,4], bf16[2,4,1,4])) tuple(%f, %g)
}
"""


def test_hlo_reader_counts_only_the_sliced_part_read():
    """A kernel reading a third of a [8, 12] GEMM output through bitcast -> add -> slice reads 64 of its 192 bytes."""
    m = hk.parse(SLICED_READ)
    f, g = hk.kernels(m, m.entry)
    assert f.bytes == 8 * 4 * 2 + 8 * 4 * 2 + 4 * 2  # result + the q third of the GEMM output + q's bias row
    assert g.bytes == 2 * (8 * 4 * 2) + 2 * (8 * 4 * 2)  # two slices out, two thirds of the operand in
