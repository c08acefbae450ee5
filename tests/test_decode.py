"""GPT-OSS decoding (the reasoner's local route) against transformers' greedy `generate`.

Golden: tests/fixtures/io_decode.safetensors (transformers GptOssForCausalLM.generate, eager,
float32, CPU): three prompts of 3, 9 and 17 tokens (9 and 17 longer than the sliding window 4),
12 greedy new tokens each, with the logits of every step. Tolerance: logits within 1e-4 of the
golden's largest |logit| (~4.2), i.e. ~4e-4 absolute; the golden notes the fp32 reference's own
cached-vs-uncached spread at 2.3e-6 relative and a smallest top-1/top-2 margin of 0.0069, so
1e-4 relative also forces the same tokens. All three prompts run as ONE padded batch (one
compile for every test here), right padding and left padding alike.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lens_jax.text_encoder as te_mod
from lens_jax.models import gpt_oss_decode as dec

from .conftest import FIXTURES

TINY = FIXTURES / "tiny_lens"
N_NEW = 12
PAD = 441
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "io_decode.safetensors")


@pytest.fixture(scope="module")
def te():
    # `load(path, dtype)`: feature layers from the sibling DiT config; the head is read on first generate
    return te_mod.load(TINY / "text_encoder", jnp.float32)


def _gen(te, *args, **kwargs):
    """generate with return_logits=True throughout this file: one compiled program for every test."""
    return te.generate(*args, return_logits=True, **kwargs)[0]


def _batch(golden, side: str):
    prompts = [golden[f"case{c}_input_ids"][0] for c in range(3)]
    s = max(len(p) for p in prompts)
    ids = np.full((3, s), PAD, np.int64)
    mask = np.zeros((3, s), np.int64)
    for r, p in enumerate(prompts):
        cols = slice(0, len(p)) if side == "right" else slice(s - len(p), s)
        ids[r, cols], mask[r, cols] = p, 1
    return ids, mask


@pytest.fixture(scope="module")
def decoded(te, golden):
    out = {}
    for side in ("right", "left"):
        ids, mask = _batch(golden, side)
        out[side] = te.generate(ids, mask, max_new_tokens=N_NEW, stop_tokens=(), return_logits=True)
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_greedy_tokens_and_step_logits_match_transformers(decoded, golden, side):
    tokens, logits = decoded[side]
    assert tokens.shape == (3, N_NEW) and logits.shape == (3, N_NEW, 512)
    for c in range(3):
        np.testing.assert_array_equal(tokens[c], golden[f"case{c}_new_tokens"][0], err_msg=f"case {c} ({side})")
        ref = golden[f"case{c}_step_logits"][0]
        err = np.abs(logits[c] - ref).max() / np.abs(ref).max()
        assert err < REL_TOL, f"case {c} ({side}): step logits differ by {err:.2e} of max |logit|"


def test_kv_cache_decode_equals_full_forward_each_step(te, decoded, golden):
    """Row n-1+t of one uncached forward over prompt + new tokens = the cached step t logits."""
    ids, mask = _batch(golden, "right")
    tokens, logits = decoded["right"]
    s = ids.shape[1]
    # the new tokens go after the padded prompt (slots s..), exactly where the cache put them
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    full = np.asarray(dec.forward_logits(te.params, te.config, jnp.asarray(full_ids, jnp.int32),
                                         jnp.asarray(full_mask, bool)))
    for c in range(3):
        n = int(mask[c].sum())
        rows = np.concatenate([full[c, n - 1: n], full[c, s: s + N_NEW - 1]])
        scale = np.abs(logits[c]).max()
        assert np.abs(rows - logits[c]).max() / scale < 1e-5
        ref = golden[f"case{c}_full_forward_logits"][0]
        got = np.concatenate([full[c, :n], full[c, s: s + N_NEW]])
        assert np.abs(got - ref).max() / np.abs(ref).max() < REL_TOL


def test_stop_tokens_end_rows_and_pad_after(te, golden, decoded):
    ids, mask = _batch(golden, "right")
    greedy = decoded["right"][0]
    stop = int(greedy[1, 4])  # row 1 stops at its 5th new token
    out = _gen(te, ids, mask, max_new_tokens=N_NEW, stop_tokens=(stop,))
    assert out.shape[0] == 3
    first = np.argmax(greedy[1] == stop)
    np.testing.assert_array_equal(out[1, : first + 1], greedy[1, : first + 1])
    assert (out[1, first + 1:] == te.config.pad_token_id).all()
    for r in range(3):  # other rows run on unchanged until they stop too, or the cap
        hit = np.flatnonzero(greedy[r] == stop)
        end = hit[0] + 1 if hit.size else N_NEW
        np.testing.assert_array_equal(out[r, :end], greedy[r, :end])
    assert out.shape[1] == max(
        (np.flatnonzero(greedy[r] == stop)[0] + 1 if (greedy[r] == stop).any() else N_NEW) for r in range(3))


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(te, golden, decoded):
    ids, mask = _batch(golden, "right")
    a = _gen(te, ids, mask, max_new_tokens=N_NEW, temperature=0.7, top_p=0.9, seed=3, stop_tokens=())
    b = _gen(te, ids, mask, max_new_tokens=N_NEW, temperature=0.7, top_p=0.9, seed=3, stop_tokens=())
    c = _gen(te, ids, mask, max_new_tokens=N_NEW, temperature=5.0, top_p=1.0, seed=4, stop_tokens=())
    np.testing.assert_array_equal(a, b)
    assert (c != decoded["right"][0]).any()
    # a nucleus of ~0 mass keeps only the top token: sampling reduces to greedy
    g = _gen(te, ids, mask, max_new_tokens=N_NEW, temperature=1.0, top_p=1e-6, seed=5, stop_tokens=())
    np.testing.assert_array_equal(g, decoded["right"][0])


def test_bad_generate_arguments(te):
    with pytest.raises(ValueError, match="top_p"):
        te.generate(np.ones((1, 3), np.int64), max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        te.generate(np.ones((1, 3), np.int64), max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        te.generate(np.ones((1, 3), np.int64), np.zeros((1, 3)), max_new_tokens=2)


def test_feature_load_keeps_only_needed_layers_until_generate():
    te = te_mod.load(TINY / "text_encoder", selected_layers=(1,))
    assert set(te.params) == {"embed_tokens", "layers"} and te_mod.num_layers(te.params) == 2
    full = te_mod.load(TINY / "text_encoder_mxfp4", jnp.float32, causal_lm=True)
    assert full.keep_mxfp4 and {"norm", "lm_head"} <= set(full.params)
    assert full.params["lm_head"]["kernel"].shape == (64, 512)
