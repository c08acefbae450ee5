"""The MXFP4 grouped matmul kernel (`lens_jax.models.mxfp4_gemm`) and the "gmm" MoE dispatch, on CPU.

The kernel runs in Pallas' interpret mode here (its GPU build is checked by lowering it to Triton for
"cuda", and by scripts/aot_gpu.py's deviceless compile). Tolerances:
- decoded weights: bit-equal to `mxfp4.decode` (read back through one-hot rows: every product is a
  weight times 1, so no rounding enters);
- the kernel against decode-then-matmul in float32: 2e-6 x max|value| (test_moe.py's cross-dispatch bound:
  only float32 summation order differs);
- the dispatch on the tiny golden checkpoint: the text-encoder suite's 5 x the float32-vs-float64 floor
  (`metrics.F32_TOLERANCE["text_encoder"]`, 3.2e-5 x max|golden|), and within 2e-6 x max|value| of "dense".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lens_jax import text_encoder as te_mod
from lens_jax.models import mxfp4, mxfp4_gemm
from lens_jax.models import text_encoder as T
from lens_jax.tools.parity import metrics

from .conftest import FIXTURES
from .test_mxfp4_decode import _every_code_and_scale, packed_experts

CROSS_REL = 2e-6
REL_TOL = metrics.F32_TOLERANCE["text_encoder"].rel
CFG = T.TextEncoderConfig(vocab_size=8, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=6,
                          num_experts_per_tok=2, sliding_window=4, layer_types=(T.SLIDING,))
# rows per expert: empty experts, one below a tile, one spanning several 16-row tiles
SIZES = np.array([5, 0, 37, 1, 0, 13], np.int32)


def _reference(x, blocks, scales, sizes, dtype):
    """Decode-then-matmul in float64 from the decoded (dtype) weights and dtype inputs."""
    w = np.asarray(mxfp4.decode(jnp.asarray(blocks), jnp.asarray(scales), dtype)).astype(np.float64)
    xs = np.asarray(jnp.asarray(x, dtype)).astype(np.float64)
    group = np.repeat(np.arange(len(sizes)), sizes)
    return np.einsum("nk,nok->no", xs, w[group])


@pytest.fixture(scope="module")
def experts():
    return packed_experts(np.random.default_rng(0), CFG)


# several row, column and input tiles (the last row tile reads the last 16 rows, storing only its own);
# one tile taller than all 56 rows (the rows are padded to it)
TILINGS = [mxfp4_gemm.Tiling(block_m=16, block_n=32, block_k=32), mxfp4_gemm.Tiling(block_m=64, block_n=64, block_k=64)]


@pytest.mark.parametrize("fast,tiling", [(True, TILINGS[0]), (False, TILINGS[0]), (True, TILINGS[1])],
                         ids=["fast", "general", "fast-one-tall-tile"])
def test_kernel_equals_decode_then_matmul(experts, fast, tiling):
    rng = np.random.default_rng(1)
    blocks, scales = experts["gate_up_proj_blocks"][0], experts["gate_up_proj_scales"][0]  # [E, 64, 2, 16]
    x = rng.standard_normal((int(SIZES.sum()), CFG.hidden_size)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x: mxfp4_gemm.gmm(x, blocks, scales, jnp.asarray(SIZES), fast=fast,
                                                      tiling=tiling))(x))
    want = _reference(x, blocks, scales, SIZES, jnp.float32)
    scale = float(np.abs(want).max())
    assert got.shape == want.shape and scale > 0
    assert float(np.abs(got - want).max()) <= CROSS_REL * scale


def test_group_offset_addresses_a_layer_of_the_flattened_stack(experts):
    """Two layers flattened to [2 * E, ...]: offset E runs layer 1's experts (a different result than layer 0)."""
    rng = np.random.default_rng(2)
    e = CFG.num_local_experts
    b0, s0 = experts["down_proj_blocks"][0], experts["down_proj_scales"][0]
    b1, s1 = (np.roll(b0, 1, axis=0), s0[::-1].copy())
    stack_b, stack_s = np.concatenate([b0, b1]), np.concatenate([s0, s1])
    x = rng.standard_normal((int(SIZES.sum()), CFG.intermediate_size)).astype(np.float32)
    run = jax.jit(lambda x, off: mxfp4_gemm.gmm(x, stack_b, stack_s, jnp.asarray(SIZES), off))
    for layer, (b, s) in enumerate(((b0, s0), (b1, s1))):
        want = _reference(x, b, s, SIZES, jnp.float32)
        got = np.asarray(run(x, jnp.int32(layer * e)))
        assert float(np.abs(got - want).max()) <= CROSS_REL * float(np.abs(want).max()), layer


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_kernel_decodes_every_code_and_scale_bit_exactly(dtype, fast):
    """One-hot rows read the decoded weights back: y = I @ W^T = W^T exactly (bfloat16 weights fit the
    bfloat16 output; float32 accumulation adds only zeros, so a -0 weight reads back as +0). Scale bytes 2..252: the fast decode's range
    (the general one also covers the rest; scales 0-1 give subnormals that CPU arithmetic flushes, 253+ inf)."""
    blocks, scales = _every_code_and_scale()
    lo, hi = mxfp4.fast_scale_range(dtype)
    blocks, scales = blocks[lo:hi + 1], scales[lo:hi + 1]  # [251, 1, 16]: out 251 -> padded to 256 below
    pad = 256 - blocks.shape[0]
    blocks = np.concatenate([blocks, np.zeros((pad, 1, 16), np.uint8)])[None]
    scales = np.concatenate([scales, np.full((pad, 1), 127, np.uint8)])[None]
    eye = jnp.eye(32, dtype=dtype)
    got = np.asarray(jax.jit(lambda x: mxfp4_gemm.gmm(x, blocks, scales, jnp.asarray([32], jnp.int32), fast=fast))(eye))
    want = np.asarray(mxfp4.decode(jnp.asarray(blocks[0]), jnp.asarray(scales[0]), dtype)).T  # [in, out]
    want = (want.astype(np.float32) + 0.0).astype(want.dtype)  # -0 weights sum to +0 (1 x -0 + 0 x w = +0)
    bits = {2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(bits), want.view(bits))


def test_bad_shapes_are_refused_with_one_line(experts):
    b, s = experts["gate_up_proj_blocks"][0], experts["gate_up_proj_scales"][0]
    sizes = jnp.asarray([2, 0, 0, 0, 0, 0], jnp.int32)
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4_gemm.gmm(jnp.ones((2, 48)), b, s, sizes)
    with pytest.raises(ValueError, match="not MXFP4 experts"):
        mxfp4_gemm.gmm(jnp.ones((2, 64)), b.reshape(6, 64, 32), s, sizes)
    odd = np.zeros((1, 24, 2, 16), np.uint8)  # 24 output rows: no 16-column tile
    with pytest.raises(ValueError, match="not a multiple of 16"):
        mxfp4_gemm.gmm(jnp.ones((2, 64)), odd, odd[..., 0], jnp.asarray([2], jnp.int32))
    for err in (ValueError,):
        with pytest.raises(err) as info:
            mxfp4_gemm.gmm(jnp.ones((2, 64)), b, s, sizes, tiling=mxfp4_gemm.Tiling(16, 48, 32))
        assert "\n" not in str(info.value)


def test_kernel_lowers_to_triton_for_gpu(experts):
    """The GPU build: Pallas lowers the kernel to a Triton custom call (no CUDA needed to lower)."""
    b, s = experts["gate_up_proj_blocks"][0], experts["gate_up_proj_scales"][0]
    x = jax.ShapeDtypeStruct((int(SIZES.sum()), CFG.hidden_size), jnp.bfloat16)
    text = jax.jit(lambda x: mxfp4_gemm.gmm(x, b, s, jnp.asarray(SIZES), fast=True)).trace(x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "mxfp4_gmm" in text
    # the codes reach the kernel as 16-bit words: Pallas indexes a 2-4 GiB array with 32-bit element offsets,
    # which byte elements of GPT-OSS-20B's 24-layer down_proj stack (3.2 GB) would overflow
    assert f"tensor<{len(SIZES)}x{2 * CFG.intermediate_size}x16xui16>" in text


def test_dispatch_decodes_only_inside_the_kernel(experts):
    """In the "gmm" MoE program no matmul and no bit assembly of weights happens outside the Pallas kernel."""
    x = jnp.ones((8, CFG.hidden_size))
    w, idx = jnp.full((8, 2), 0.5), jnp.asarray(np.arange(16).reshape(8, 2) % 6, jnp.int32)
    jaxpr = jax.make_jaxpr(lambda x: T.moe(x, jax.tree.map(jnp.asarray, experts), 0, w, idx, CFG, "gmm"))(x)
    found: list[str] = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append("pallas_call")
                continue
            name = eqn.primitive.name
            if name == "bitcast_convert_type" and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
                name = "bit assembly to float"  # the decode (the uint8 -> uint16 word view is not)
            found.append(name)
            for v in eqn.params.values():
                for j in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(j, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr.jaxpr)
    # gate_up and down x the fast / general decode branches x the platform branches (interpret on CPU, Triton)
    assert found.count("pallas_call") == 8
    assert not {"ragged_dot_general", "bit assembly to float"} & set(found)
    assert found.count("dot_general") == 1  # the combine over the top-k router weights (einsum "tkh,tk->th")


# ----------------------------------------------------------------------------- the dispatch on the goldens


@pytest.fixture(scope="module")
def golden_outputs():
    golden = load_file(FIXTURES / "io_text_encoder.safetensors")
    base = te_mod.load(FIXTURES / "tiny_lens" / "text_encoder_mxfp4", selected_layers=(0, 1, 2, 3))
    outs = {}
    for impl in ("gmm", "dense"):
        te = T.TextEncoder(base.config, base.params, base.selected_layers, moe_impl=impl)
        outs[impl] = [np.asarray(o) for o in te(golden["input_ids"], golden["attention_mask"])]
    return golden, outs


def test_gmm_dispatch_matches_golden_and_dense(golden_outputs):
    golden, outs = golden_outputs
    for i, (o, d) in enumerate(zip(outs["gmm"], outs["dense"])):
        metrics.assert_close(o, golden[f"selected_layer{i}"], rel=REL_TOL, what=f"moe gmm layer {i}")
        assert float(np.abs(o - d).max()) <= CROSS_REL * float(np.abs(d).max()), f"gmm vs dense, layer {i}"


def test_gmm_dispatch_reverse_differentiates_like_dense(experts):
    """The kernel has no autodiff rule; the dispatch takes the ragged dispatch's gradient (as grouped /
    tiled do): gradients of the tokens, the routing weights and the biases agree with dense's."""
    rng = np.random.default_rng(3)
    t = 12
    e = {k: jnp.asarray(v) for k, v in experts.items()}
    floats = {k: v for k, v in e.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    x = jnp.asarray(rng.standard_normal((t, CFG.hidden_size)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(4, 2, replace=False) for _ in range(t)]).astype(np.int32))  # 2 idle
    w = jax.nn.softmax(jnp.asarray(rng.standard_normal((t, 2)), jnp.float32))
    probe = jnp.asarray(rng.standard_normal((t, CFG.hidden_size)), jnp.float32)

    def loss(x, w, floats, impl):
        return jnp.sum(T.moe(x, {**e, **floats}, 0, w, idx, CFG, impl) * probe)

    grads = jax.jit(lambda x, w, f: {impl: jax.grad(loss, argnums=(0, 1, 2))(x, w, f, impl)
                                     for impl in ("gmm", "dense")})(x, w, floats)
    for a, b in zip(jax.tree.leaves(grads["gmm"]), jax.tree.leaves(grads["dense"]), strict=True):
        scale = float(np.abs(b).max())
        assert scale > 0 and float(np.abs(a - b).max()) <= CROSS_REL * scale


def test_gmm_is_opt_in():
    assert "gmm" in T.MOE_IMPLS and "gmm" not in T.MOE_FIXED_IMPLS
    assert all(r.impl != "gmm" for r in T.MOE_DISPATCH)


def test_tiles_partition_the_rows_by_group():
    """Each row is written by exactly one tile, of its own group (tiles run concurrently on a GPU, so the
    kernel's masked store must not reach another tile's rows; interpret mode runs them in order and
    would hide an overlap)."""
    bm = 16
    num_tiles = -(-int(SIZES.sum()) // bm) + len(SIZES)
    group, start, end = (np.asarray(a) for a in mxfp4_gemm.tile_bounds(jnp.asarray(SIZES), bm, num_tiles))
    owner = np.full(int(SIZES.sum()), -1)
    row_group = np.repeat(np.arange(len(SIZES)), SIZES)
    for g, s, e in zip(group, start, end):
        assert 0 <= e - s <= bm
        assert (owner[s:e] == -1).all(), "two tiles write the same rows"
        assert (row_group[s:e] == g).all(), "a tile writes another group's rows"
        owner[s:e] = g
    assert (owner >= 0).all()
    assert int((end > start).sum()) == int(sum(-(-n // bm) for n in SIZES))  # empty groups get no tile


# ----------------------------------------------------------------------------- reading the GPU program


_PALLAS_HLO = """HloModule m

%index_math (p0: s32[64]) -> s32[64] {
  %p0 = s32[64]{0} parameter(0)
  %c = s32[64]{0} constant({...})
  ROOT %s = s32[64]{0} shift-right-logical(%p0, %c)
}

ENTRY %main (x: bf16[256,64], b: u8[4,128,32], s: u8[4,128,2], g: s32[64]) -> bf16[256,128] {
  %x = bf16[256,64]{1,0} parameter(0)
  %b = u8[4,128,32]{2,1,0} parameter(1)
  %s = u8[4,128,2]{2,1,0} parameter(2)
  %g = s32[64]{0} parameter(3)
  %t = s32[64]{0} fusion(%g), kind=kLoop, calls=%index_math
  ROOT %k = bf16[256,128]{1,0} custom-call(%t, %x, %b, %s), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={s32[64]{0}, bf16[256,64]{1,0}, u8[4,128,32]{2,1,0}, u8[4,128,2]{2,1,0}}, api_version=API_VERSION_TYPED_FFI, backend_config={name = "mxfp4_gmm", num_warps = 4 : i32}
}
"""


def test_fusion_check_reads_a_pallas_kernel_on_packed_codes_as_fused():
    """scripts/check_mxfp4_fusion.py: a Triton custom call taking the u8 codes decodes inside the kernel; a
    shift on int32 indices (routing arithmetic) is not decode work; without u8 operands, no verdict of fusion."""
    import sys

    sys.path.insert(0, str(FIXTURES.parents[1] / "scripts"))
    import _hlo_kernels as hk
    from check_mxfp4_fusion import analyse

    r = analyse(_PALLAS_HLO)
    assert r["fused"] and r["fused_in"] == ["pallas mxfp4_gmm"] and r["decode_outside_gemm"] == []
    no_codes = _PALLAS_HLO.replace("u8[", "bf16[")  # a Pallas kernel on float weights: nothing decoded
    assert not analyse(no_codes)["fused"]
    module = hk.parse(_PALLAS_HLO)
    kinds = {k.name: k.kind for k in hk.kernels(module, module.entry)}
    assert kinds["k"] == "pallas"


def test_gmm_on_tpu_is_refused_with_one_line(experts, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    x, w, idx = jnp.ones((4, CFG.hidden_size)), jnp.full((4, 2), 0.5), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="GPU kernel") as info:
        jax.make_jaxpr(lambda x: T.moe(x, jax.tree.map(jnp.asarray, experts), 0, w, idx, CFG, "gmm"))(x)
    assert "\n" not in str(info.value)
