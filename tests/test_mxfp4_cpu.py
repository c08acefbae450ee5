"""The CPU forms of the packed-MoE path: the word-wise MXFP4 code extraction and the "tiled" dispatch.

Exactness of the codes is bit for bit (integers, no tolerance). The tiled dispatch is compared with
the dense one at the MoE suite's cross-dispatch tolerance (2e-6 x max|value|: the same routed
products, float32 summation order only; tests/test_moe.py), with tiles small enough that every
expert matrix is split into several and experts span several row chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.models import mxfp4
from lens_jax.models import text_encoder as T

from .test_mxfp4_decode import packed_experts

CROSS_REL = 2e-6


def test_word_codes_equal_byte_codes_for_every_byte_in_every_position():
    """`_codes_words` (the CPU formula) and `_codes_shift` (every other backend) yield the same codes:
    each of the 256 byte values at each of the 16 positions of a block."""
    values = np.arange(256, dtype=np.uint8)
    blocks = np.stack([np.roll(np.resize(values, 16 * 16), -i).reshape(16, 16) for i in range(16)])  # [16, 16, 16]
    blocks = jnp.asarray(blocks)
    words, shift = jax.jit(lambda b: (mxfp4._codes_words(b), mxfp4._codes_shift(b)))(blocks)
    words, shift = np.asarray(words), np.asarray(shift)
    assert words.dtype == shift.dtype and words.shape == (16, 16, 32)
    np.testing.assert_array_equal(words, shift)
    b = np.asarray(blocks)
    np.testing.assert_array_equal(shift[..., 0::2], b & 0xF)  # low nibble = even element
    np.testing.assert_array_equal(shift[..., 1::2], b >> 4)


@pytest.mark.parametrize("platform,words", [("cpu", True), ("cuda", False), ("tpu", False)])
def test_decode_picks_its_code_formula_by_lowering_platform(platform, words):
    """Only CPU programs read the blocks as uint32 words; GPU / TPU keep the elementwise byte formula."""
    b, s = jnp.zeros((4, 2, 16), jnp.uint8), jnp.full((4, 2), 127, jnp.uint8)
    fn = jax.jit(lambda b, s: mxfp4.decode(b, s, jnp.float32, fast=True))
    text = fn.trace(b, s).lower(lowering_platforms=(platform,)).as_text()
    assert ("tensor<4x2x4xui32>" in text) == words


def test_tile_rows():
    assert T.tile_rows(5760, 2880, 4, 4 << 20) == 360  # 360 x 2880 x 4 B = 3.96 MiB; 384 does not divide 5760
    assert T.tile_rows(2880, 2880, 4, 4 << 20) == 360
    assert T.tile_rows(64, 64, 4, 64 * 64 * 4) == 64
    assert T.tile_rows(64, 64, 4, 1) == 1
    for rows, budget in ((96, 5000), (90, 3000), (7, 10**6)):
        r = T.tile_rows(rows, 32, 4, budget)
        assert rows % r == 0 and (r == 1 or r * 32 * 4 <= budget)
        assert all(rows % q or q * 32 * 4 > budget for q in range(r + 1, rows + 1))


def _layer(seed: int):
    cfg = T.TextEncoderConfig(vocab_size=8, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=8,
                              num_experts_per_tok=2, sliding_window=4, layer_types=(T.SLIDING,))
    rng = np.random.default_rng(seed)
    h = cfg.hidden_size
    packed = packed_experts(rng, cfg)
    t = 24
    x = rng.standard_normal((t, h)).astype(np.float32)
    idx = np.stack([rng.choice([0, 2, 3, 5, 6], 2, replace=False) for _ in range(t)]).astype(np.int32)
    idx[:18, 0] = 3  # expert 3 takes 18+ rows: several chunks of 4; experts 1, 4, 7 get none
    idx[:18, 1] = np.where(idx[:18, 1] == 3, 5, idx[:18, 1])
    w = jax.nn.softmax(jnp.asarray(rng.standard_normal((t, 2)), jnp.float32))
    return cfg, packed, jnp.asarray(x), w, jnp.asarray(idx)


@pytest.mark.parametrize("general", [False, True], ids=["fast-decode", "general-decode"])
def test_tiled_matches_dense_with_many_tiles_and_chunks(monkeypatch, general):
    cfg, packed, x, w, idx = _layer(0)
    if general:  # expert 3's second gate_up tile and expert 5's down weights leave the direct decode's range
        packed["gate_up_proj_scales"][0, 3, 40, 0] = 1
        packed["down_proj_scales"][0, 5, 7, 1] = 255
        packed["down_proj_blocks"][0, 5, 7, 1] = 0x80  # zeros and -0s only, so the block stays finite
    experts = jax.tree.map(jnp.asarray, packed)
    assert bool(mxfp4.fast_decodable(experts["gate_up_proj_scales"][0, 3], jnp.float32)) != general
    # gate_up 128 rows x 64 in -> 4 tiles of 32 rows; down 64 rows x 64 in -> 2 tiles
    monkeypatch.setattr(T, "TILE_BYTES", 32 * 64 * 4)
    assert T.tile_rows(128, 64, 4) == 32 and T.tile_rows(64, 64, 4) == 32
    run = jax.jit(lambda x, e: {impl: T.moe(x, e, 0, w, idx, cfg, impl, chunk)
                                for impl, chunk in (("dense", None), ("tiled", 4), ("tiled", None))})
    outs = {k: np.asarray(v) for k, v in run(x, experts).items()}
    want = outs.pop("dense")
    scale = float(np.abs(want).max())
    assert np.isfinite(want).all() and scale > 0
    for impl, got in outs.items():
        assert float(np.abs(got - want).max()) <= CROSS_REL * scale, impl


def test_tiled_with_float_experts_is_grouped():
    cfg, packed, x, w, idx = _layer(1)
    floats = {k: jnp.asarray(v) for k, v in packed.items() if "bias" in k}
    for name in ("gate_up_proj", "down_proj"):
        floats[name] = jnp.asarray(mxfp4.dequantize_np(packed[f"{name}_blocks"], packed[f"{name}_scales"]).swapaxes(-1, -2))
    run = jax.jit(lambda x: [T.moe(x, floats, 0, w, idx, cfg, impl) for impl in ("tiled", "grouped")])
    tiled, grouped = (np.asarray(o) for o in run(x))
    np.testing.assert_array_equal(tiled, grouped)
