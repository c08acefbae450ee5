"""The gather-free MXFP4 decode and the MoE matmuls that contract the stored expert layout.

Exactness: the decode is compared bit for bit with `dequantize_np(...).astype(dtype)` over every
E2M1 code x every E8M0 scale byte (the dequantisation is exact, so no tolerance applies). The MoE
checks are structural (what the traced program contains) plus one numerical check of the general
decode branch at the MoE suite's cross-dispatch tolerance (2e-6 x max|value|, float32 summation
order only; tests/test_moe.py).
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.models import mxfp4
from lens_jax.models import text_encoder as T

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
CROSS_REL = 2e-6


def _every_code_and_scale() -> tuple[np.ndarray, np.ndarray]:
    """blocks [256, 1, 16] and scales [256, 1]: row s holds all 16 codes twice (each code once as a low
    and once as a high nibble) under scale byte s."""
    codes = np.arange(16, dtype=np.uint8)
    blocks = np.zeros((256, 1, 16), np.uint8)
    blocks[:, 0, :8] = codes[0::2] | (codes[1::2] << 4)
    blocks[:, 0, 8:] = codes[1::2] | (codes[0::2] << 4)
    return blocks, np.arange(256, dtype=np.uint8)[:, None]


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize])


@pytest.fixture(scope="module")
def exhaustive():
    blocks, scales = _every_code_and_scale()
    with np.errstate(over="ignore"):  # scale bytes >= 253 overflow to +-inf, in both
        ref = mxfp4.dequantize_np(blocks, scales)
    decode = jax.jit(mxfp4.decode, static_argnums=2, static_argnames="fast")
    return blocks, scales, ref, decode


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_decode_is_bit_equal_for_every_code_and_scale(exhaustive, dtype):
    """Zero / -0 / the half (e == 0), subnormal results (scale bytes 0-1 in float32 / bfloat16, most of
    the range in float16, rounded to nearest even) and overflow to inf, all bit for bit."""
    blocks, scales, ref, decode = exhaustive
    got = np.asarray(decode(jnp.asarray(blocks), jnp.asarray(scales), dtype))
    with np.errstate(over="ignore"):
        want = ref.astype(np.dtype(dtype))
    assert got.dtype == want.dtype and got.shape == (256, 32)
    bad = np.argwhere(_bits(got) != _bits(want))
    assert not len(bad), f"{len(bad)} mismatches, first at (scale byte, element) {tuple(bad[0])}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_fast_decode_is_exact_exactly_on_its_range(exhaustive, dtype):
    blocks, scales, ref, decode = exhaustive
    lo, hi = mxfp4.fast_scale_range(dtype)
    got = np.asarray(decode(jnp.asarray(blocks), jnp.asarray(scales), dtype, fast=True))
    with np.errstate(over="ignore"):
        want = ref.astype(np.dtype(dtype))
    exact = (_bits(got) == _bits(want)).all(axis=1)
    assert exact[lo:hi + 1].all()
    # the range is tight: the byte just outside it on each side is not decoded exactly
    assert not exact[lo - 1] and not exact[hi + 1]
    inside = jnp.asarray([[lo, hi]], jnp.uint8)
    assert bool(mxfp4.fast_decodable(inside, dtype))
    assert not bool(mxfp4.fast_decodable(jnp.asarray([[lo, hi + 1]], jnp.uint8), dtype))


def test_other_float_dtypes_decode_through_float32():
    blocks, scales = _every_code_and_scale()
    blocks, scales = blocks[100:140], scales[100:140]
    got = np.asarray(jax.jit(mxfp4.decode, static_argnums=2)(jnp.asarray(blocks), jnp.asarray(scales), jnp.float8_e4m3fn))
    want = mxfp4.dequantize_np(blocks, scales).astype(jnp.float8_e4m3fn)
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


# ----------------------------------------------------------------------------- the MoE program

CFG = T.TextEncoderConfig(vocab_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=4, layer_types=(T.SLIDING,))
TOKENS = 8


def packed_experts(rng: np.random.Generator, cfg: T.TextEncoderConfig = CFG) -> dict:
    """One layer of MXFP4-packed experts for `cfg` ([1, E, ...] leaves, float32 biases), drawn from `rng`."""
    e, h, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    out = {"gate_up_proj_bias": rng.normal(0, 0.02, (1, e, 2 * inter)).astype(np.float32),
           "down_proj_bias": rng.normal(0, 0.02, (1, e, h)).astype(np.float32)}
    for name, fan_in, fan_out in (("gate_up_proj", h, 2 * inter), ("down_proj", inter, h)):
        w = rng.normal(0, fan_in**-0.5, (1, e, fan_out, fan_in))  # stored [out, in]
        out[f"{name}_blocks"], out[f"{name}_scales"] = mxfp4.quantize_np(w)
    return out


_PRODUCTS = ("dot_general", "ragged_dot_general")  # their results are activations, no longer weights


def _weight_ops(jaxpr, tainted: set) -> tuple[list[str], list[bool]]:
    """Gathers and transposes applied to values computed from the MXFP4 inputs (`tainted` vars of
    `jaxpr`) before they meet a matmul, and which outputs of `jaxpr` carry such values. Follows the
    data through the sub-jaxprs of control flow and calls: a sub-jaxpr's inputs line up with the last
    ones of its equation (cond operands, scan / while carries, call arguments), its outputs with the
    equation's outputs."""
    found = []
    tainted = set(tainted)
    for eqn in jaxpr.eqns:
        hit = [isinstance(v, jax.extend.core.Var) and v in tainted for v in eqn.invars]
        if any(hit) and eqn.primitive.name in ("gather", "transpose"):
            found.append(f"{eqn.primitive.name} -> {eqn.outvars[0].aval.str_short()}")
        subs = [getattr(sub, "jaxpr", sub) for value in eqn.params.values()
                for sub in (value if isinstance(value, (tuple, list)) else (value,))]
        subs = [sub for sub in subs if hasattr(sub, "eqns")]
        if subs:
            out_hit = [False] * len(eqn.outvars)
            for inner in subs:
                n = len(inner.invars)
                sub_found, sub_out = _weight_ops(inner, {v for v, h in zip(inner.invars, hit[len(hit) - n:]) if h})
                found += sub_found
                if len(sub_out) == len(out_hit):
                    out_hit = [a or b for a, b in zip(out_hit, sub_out)]
            tainted.update(v for v, h in zip(eqn.outvars, out_hit) if h)
        elif any(hit) and eqn.primitive.name not in _PRODUCTS:
            tainted.update(eqn.outvars)
    return found, [isinstance(v, jax.extend.core.Var) and v in tainted for v in jaxpr.outvars]


def _moe_jaxpr(experts: dict, impl: str):
    """(jaxpr of one packed MoE layer, its input vars holding MXFP4 blocks / scales)."""
    x = jnp.ones((TOKENS, CFG.hidden_size), jnp.float32)
    w = jnp.full((TOKENS, 2), 0.5, jnp.float32)
    idx = jnp.tile(jnp.arange(2, dtype=jnp.int32), (TOKENS, 1))
    closed = jax.make_jaxpr(lambda x, e: T.moe(x, e, 0, w, idx, CFG, impl))(x, experts)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(experts)[0]]
    packed = {v for v, p in zip(closed.jaxpr.invars[1:], paths) if "_blocks" in p or "_scales" in p}
    assert len(packed) == 4
    return closed, packed


def _legacy_expert_weight(experts, name, index, dtype):
    """Today's former path, kept here only to prove the check below can fail: LUT gathers, then a
    transposed copy of every expert matrix."""
    lut = jnp.asarray(mxfp4.FP4_VALUES, dtype)
    blocks, scales = experts[f"{name}_blocks"][index], experts[f"{name}_scales"][index]
    vals = jnp.stack([jnp.take(lut, (blocks & 0x0F).astype(jnp.int32)), jnp.take(lut, (blocks >> 4).astype(jnp.int32))], -1)
    vals = vals.reshape(*blocks.shape[:-1], mxfp4.BLOCK) * jnp.ldexp(1.0, scales.astype(jnp.int32) - 127)[..., None]
    return jnp.swapaxes(vals.reshape(*blocks.shape[:-2], -1), -1, -2), False


@pytest.mark.parametrize("impl", T.MOE_FIXED_IMPLS)
def test_packed_moe_has_no_weight_gather_or_transpose(impl, monkeypatch):
    """The packed MoE decodes with integer ops (no table gather over the weights) and contracts the
    stored [out, in] layout (no transposed copy of an expert matrix); and the check catches both."""
    experts = jax.tree.map(jnp.asarray, packed_experts(np.random.default_rng(0)))
    closed, packed = _moe_jaxpr(experts, impl)
    names = {e.primitive.name for e in _all_eqns(closed.jaxpr)}
    assert "bitcast_convert_type" in names and names & {"dot_general", "ragged_dot_general"}
    assert _weight_ops(closed.jaxpr, packed)[0] == []
    monkeypatch.setattr(T, "_expert_weight", lambda ex, n, i, d, fast=False: _legacy_expert_weight(ex, n, i, d))
    closed, packed = _moe_jaxpr(experts, impl)
    legacy = _weight_ops(closed.jaxpr, packed)[0]
    assert any(op.startswith("gather") for op in legacy) and any(op.startswith("transpose") for op in legacy)


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_general_decode_branch_in_the_moe():
    """An expert with scale bytes outside the direct decode's range takes the general decode inside
    every dispatch; all agree with float experts holding `dequantize_np`'s weights."""
    packed = packed_experts(np.random.default_rng(1))
    packed["gate_up_proj_scales"][0, 1, 3, 0] = 1  # expert 1: one block of subnormal (tiny) values
    packed["down_proj_scales"][0, 2, 5, 1] = 255  # expert 2: one block at the top scale byte, holding
    packed["down_proj_blocks"][0, 2, 5, 1] = 0x80  # only zeros and -0s (anything else would be +-inf)
    experts = jax.tree.map(jnp.asarray, packed)
    assert not bool(mxfp4.fast_decodable(experts["gate_up_proj_scales"][0, 1], jnp.float32))
    assert not bool(mxfp4.fast_decodable(experts["down_proj_scales"][0, 2], jnp.float32))
    floats = {k: v for k, v in packed.items() if "bias" in k}
    for name in ("gate_up_proj", "down_proj"):
        floats[name] = mxfp4.dequantize_np(packed[f"{name}_blocks"], packed[f"{name}_scales"]).swapaxes(-1, -2)
    floats = jax.tree.map(jnp.asarray, floats)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((TOKENS, CFG.hidden_size)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.permutation(4)[:2] for _ in range(TOKENS)]).astype(np.int32))
    assert {1, 2} <= set(np.asarray(idx).ravel().tolist())
    w = jax.nn.softmax(jnp.asarray(rng.standard_normal((TOKENS, 2)), jnp.float32))
    every = jax.jit(lambda x, e, f: {"reference": T.moe(x, f, 0, w, idx, CFG, "dense"),
                                      **{impl: T.moe(x, e, 0, w, idx, CFG, impl) for impl in T.MOE_FIXED_IMPLS}})
    outs = {k: np.asarray(v) for k, v in every(x, experts, floats).items()}
    want = outs.pop("reference")
    scale = float(np.abs(want).max())
    assert np.isfinite(want).all() and scale > 0
    for impl, got in outs.items():
        assert float(np.abs(got - want).max()) <= CROSS_REL * scale, impl
