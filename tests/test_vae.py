"""FLUX.2 VAE and Lens latent packing vs diffusers.AutoencoderKLFlux2 and the golden tiny checkpoint.

CPU, float32. Bound for VAE outputs: max abs error <= 1e-4 (the goldens README's suggestion,
about 10x its observed float32-vs-float64 distance); packing is exact or float32 rounding.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import lens_jax.vae as V
from lens_jax.errors import CheckpointError
from lens_jax.weights.vae import BFL, DIFFUSERS, convert_vae
from lens_jax.models.vae.layers import single_head_attention
from lens_jax.models.vae.tiling import blend_tiles, tile_starts
from lens_jax.tools.parity.metrics import F32_TOLERANCE, max_abs

FIXTURES = Path(__file__).parent / "fixtures"
TINY_VAE = FIXTURES / "tiny_lens" / "vae"
ATOL = F32_TOLERANCE["vae"].atol  # 1e-4, shared with `lens-jax parity`

torch.set_num_threads(2)


def max_err(a, b) -> float:
    return max_abs(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# diffusers references built in the test


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Make every tensor matter: non-trivial norm affines, biases and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("weight"):
                p.copy_(noise * (p[0].numel() ** -0.5))
            else:
                p.copy_(0.1 * noise)
        model.bn.running_mean.copy_(0.5 * torch.randn(model.bn.running_mean.shape, generator=g))
        model.bn.running_var.copy_(0.3 + 1.7 * torch.rand(model.bn.running_var.shape, generator=g))


CONFIGS = {
    # two levels (2x VAE), one resnet per level, small groups
    "two_levels": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    # three levels, a decoder wider/narrower than the encoder, no quant convs
    "asym_no_quant": dict(block_out_channels=(16, 24, 32), decoder_block_out_channels=(8, 16, 24),
                          layers_per_block=2, norm_num_groups=8, latent_channels=6, use_quant_conv=False,
                          use_post_quant_conv=False, down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3),
    # four levels like FLUX.2, no mid-block attention, 2 groups
    "no_attention": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=2,
                         latent_channels=8, mid_block_add_attention=False),
}
# (image NCHW shape for encode, latent NCHW shape for decode); odd and non-square latent grids
SHAPES = {
    "two_levels": ((2, 3, 14, 22), (2, 4, 7, 11)),
    "asym_no_quant": ((1, 3, 20, 36), (1, 6, 5, 9)),
    "no_attention": ((1, 3, 40, 24), (1, 8, 5, 3)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, diffusers model, our VAE loaded from the model's save_pretrained folder)."""
    from diffusers import AutoencoderKLFlux2

    name = request.param
    torch.manual_seed(0)
    model = AutoencoderKLFlux2(**CONFIGS[name]).eval()
    _randomise(model, seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, safe_serialization=True)
    return name, model, V.load(folder, dtype=jnp.float32)


def test_encode_matches_diffusers(pair):
    name, model, vae = pair
    x = torch.randn(SHAPES[name][0], generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        dist = model.encode(x).latent_dist
    mean, logvar = vae.encode_moments(x.numpy())
    assert mean.shape == dist.mode().shape
    assert max_err(vae.encode(x.numpy()), dist.mode()) <= ATOL
    assert max_err(mean, dist.mean) <= ATOL
    assert max_err(logvar, dist.logvar) <= ATOL


def test_decode_matches_diffusers(pair):
    name, model, vae = pair
    z = torch.randn(SHAPES[name][1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.decode(z).sample
    out = vae.decode(z.numpy())
    assert out.shape == ref.shape
    assert max_err(out, ref) <= ATOL * max(1.0, float(ref.abs().max()) / 3)


def test_encode_odd_image_size_matches_diffusers(pair):
    """Sizes that are not multiples of the VAE factor exercise Downsample2D's (0, 1, 0, 1) padding."""
    name, model, vae = pair
    b, c, h, w = SHAPES[name][0]
    x = torch.randn((1, c, h + 3, w - 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.encode(x).latent_dist.mode()
    out = vae.encode(x.numpy())
    assert out.shape == ref.shape
    assert max_err(out, ref) <= ATOL


def _torch_lens_decode(model, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Lens `_decode` written from SPEC.md in torch, NCHW: tokens -> (c p1 p2) grid -> patchify -> BN^-1 -> unpatchify."""
    b, n, d = tokens.shape
    c = d // 4
    lat = tokens.reshape(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)
    p = lat.reshape(b, c, h, 2, w, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h, w)
    std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
    p = p * std + model.bn.running_mean.view(1, -1, 1, 1)
    lat = p.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)
    return model.decode(lat).sample


def _torch_lens_encode(model, image: torch.Tensor) -> torch.Tensor:
    z = model.encode(image).latent_dist.mode()
    b, c, hh, ww = z.shape
    p = z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, hh // 2, ww // 2)
    std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
    p = (p - model.bn.running_mean.view(1, -1, 1, 1)) / std
    return p.reshape(b, 4 * c, -1).permute(0, 2, 1)


def test_tokens_match_diffusers_with_lens_packing(pair):
    name, model, vae = pair
    f = vae.config.token_factor
    h, w = 3, 5
    tokens = torch.randn((2, h * w, vae.config.token_channels), generator=torch.Generator().manual_seed(4))
    image = torch.randn((2, 3, f * h, f * w), generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    with torch.no_grad():
        ref_img = _torch_lens_decode(model, tokens, h, w)
        ref_tok = _torch_lens_encode(model, image)
    out_img = vae.decode_tokens(tokens.numpy(), h, w)
    out_tok = vae.encode_to_tokens(image.numpy())
    assert out_img.shape == (2, 3, f * h, f * w)
    assert out_tok.shape == (2, h * w, vae.config.token_channels)
    assert max_err(out_img, ref_img) <= ATOL * max(1.0, float(ref_img.abs().max()) / 3)
    assert max_err(out_tok, ref_tok) <= ATOL


# ----------------------------------------------------------------------------------------------
# the golden tiny checkpoint


@pytest.fixture(scope="module")
def tiny():
    return V.load(TINY_VAE, dtype=jnp.float32)


@pytest.fixture(scope="module")
def golden_decode():
    return load_file(FIXTURES / "io_vae_decode.safetensors")


@pytest.fixture(scope="module")
def golden_encode():
    return load_file(FIXTURES / "io_vae_encode.safetensors")


def test_golden_decode_tokens(tiny, golden_decode):
    g = golden_decode
    assert max_err(tiny.decode_tokens(g["latents_packed"], 3, 5), g["image"]) <= ATOL
    # the decoder input alone: packing and de-normalisation, float32 rounding
    z = V.tokens_to_latent(tiny.params, tiny.config, jnp.asarray(g["latents_packed"]), 3, 5)
    assert max_err(jnp.transpose(z, (0, 3, 1, 2)), g["debug_vae_decoder_input"]) <= 1e-6
    assert max_err(tiny.decode(g["debug_vae_decoder_input"]), g["image"]) <= ATOL


def test_golden_encode_to_tokens(tiny, golden_encode):
    g = golden_encode
    assert max_err(tiny.encode_to_tokens(g["image"]), g["latents_packed"]) <= ATOL
    assert max_err(tiny.encode(g["image"]), g["latent_mode"]) <= ATOL
    assert max_err(tiny.encode_moments(g["image"])[1], g["debug_latent_logvar"]) <= ATOL
    # packing and normalisation alone, from the golden latent
    tok = V.latent_to_tokens(tiny.params, tiny.config, jnp.transpose(jnp.asarray(g["latent_mode"]), (0, 2, 3, 1)))
    assert max_err(tok, g["latents_packed"]) <= 1e-6
    # the patchified, BatchNorm-normalised latent before packing [B, 4C, h, w]: 5x its floor 3.01e-6
    z = jnp.transpose(jnp.asarray(g["latent_mode"]), (0, 2, 3, 1))
    normed = V.normalize(V.patchify(z), tiny.params["bn"], tiny.config.batch_norm_eps)
    assert max_err(jnp.transpose(normed, (0, 3, 1, 2)), g["latent_patchified_normalised"]) <= 5 * 3.01e-6


def test_jax_and_numpy_inputs_agree(tiny, golden_decode):
    g = golden_decode
    a = tiny.decode_tokens(g["latents_packed"], 3, 5)
    b = tiny.decode_tokens(jnp.asarray(g["latents_packed"]), 3, 5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pure_functions_inside_jit(tiny, golden_decode):
    """The pipeline calls the NHWC functions inside its own jit."""
    g = golden_decode

    @jax.jit
    def run(params, tokens):
        return V.decode_tokens(params, tiny.config, tokens, 3, 5)

    out = run(tiny.params, jnp.asarray(g["latents_packed"]))
    assert out.shape == (2, 48, 80, 3)
    assert max_err(jnp.transpose(out, (0, 3, 1, 2)), g["image"]) <= ATOL


# ----------------------------------------------------------------------------------------------
# packing


def test_patchify_channel_order_is_c_p1_p2():
    b, hh, ww, c = 2, 6, 10, 3
    z = np.random.default_rng(0).standard_normal((b, hh, ww, c)).astype(np.float32)
    p = np.asarray(V.patchify(jnp.asarray(z)))
    assert p.shape == (b, hh // 2, ww // 2, 4 * c)
    for ci in range(c):
        for p1 in range(2):
            for p2 in range(2):
                np.testing.assert_array_equal(p[..., ci * 4 + p1 * 2 + p2], z[:, p1::2, p2::2, ci])


def test_packing_round_trips_exactly():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 6, 10, 8)).astype(np.float32)
    p = V.patchify(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(V.unpatchify(p)), z)
    tokens = V.pack(p)
    assert tokens.shape == (2, 15, 32)
    np.testing.assert_array_equal(np.asarray(V.unpack(tokens, 3, 5)), np.asarray(p))
    # row-major positions: token y*w + x is patch (y, x)
    np.testing.assert_array_equal(np.asarray(tokens[:, 1 * 5 + 3]), np.asarray(p[:, 1, 3]))


def test_normalisation_round_trip_and_formula():
    rng = np.random.default_rng(2)
    bn = {"running_mean": jnp.asarray(rng.normal(0, 0.5, 32), jnp.float32),
          "running_var": jnp.asarray(rng.uniform(0.3, 2.0, 32), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((2, 15, 32)) * 3, jnp.float32)
    y = V.normalize(x, bn, 1e-4)
    expect = (np.asarray(x, np.float64) - np.asarray(bn["running_mean"], np.float64)) / np.sqrt(
        np.asarray(bn["running_var"], np.float64) + 1e-4)
    np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(V.denormalize(y, bn, 1e-4)), np.asarray(x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_give_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"multiples of 16.*50x64.*48x64"):
        tiny.encode_to_tokens(np.zeros((1, 3, 50, 64), np.float32))
    with pytest.raises(ValueError, match=r"C = 3 channels.*\(1, 4, 48, 64\).*alpha"):
        tiny.encode_to_tokens(np.zeros((1, 4, 48, 64), np.float32))
    with pytest.raises(ValueError, match=r"NCHW.*C = 3"):
        tiny.encode(np.zeros((1, 48, 64, 3), np.float32))  # NHWC by mistake
    with pytest.raises(ValueError, match=r"latent_channels = 8.*\(1, 4, 6, 10\)"):
        tiny.decode(np.zeros((1, 4, 6, 10), np.float32))
    with pytest.raises(ValueError, match=r"15 tokens.*3 x 4 = 12"):
        tiny.decode_tokens(np.zeros((1, 15, 32), np.float32), 3, 4)
    with pytest.raises(ValueError, match=r"\[B, h\*w, 32\].*\(1, 15, 16\)"):
        tiny.decode_tokens(np.zeros((1, 15, 16), np.float32), 3, 5)
    with pytest.raises(ValueError, match=r"\[B, h\*w, 32\]"):
        tiny.decode_tokens(np.zeros((15, 32), np.float32), 3, 5)


# ----------------------------------------------------------------------------------------------
# conversion


def _copy_tiny(tmp_path: Path, edit=None, config_edit=None) -> Path:
    folder = tmp_path / "vae"
    folder.mkdir()
    cfg = json.loads((TINY_VAE / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(TINY_VAE / "diffusion_pytorch_model.safetensors")
    if edit:
        edit(tensors)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_conversion_ignores_num_batches_tracked_only(tmp_path):
    assert "bn.num_batches_tracked" in load_file(TINY_VAE / "diffusion_pytorch_model.safetensors")
    config, params = convert_vae(TINY_VAE)
    assert params["bn"]["running_var"].dtype == np.float32
    assert params["decoder"]["up_blocks"]["3"]["resnets"]["0"]["conv_shortcut"]["kernel"].shape == (1, 1, 32, 16)
    assert params["encoder"]["mid_block"]["attentions"]["0"]["to_out"]["0"]["kernel"].shape == (32, 32)


def test_conversion_missing_key(tmp_path):
    folder = _copy_tiny(tmp_path, edit=lambda t: t.pop("decoder.up_blocks.1.resnets.2.conv2.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys:\s+decoder\.up_blocks\.1\.resnets\.2\.conv2\.weight "
                                              r"\(expected \[32, 32, 3, 3\]\)"):
        V.load(folder)


def test_conversion_unexpected_key(tmp_path):
    folder = _copy_tiny(tmp_path, edit=lambda t: t.update({"decoder.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys:\s+decoder\.extra\.weight \[3\]"):
        V.load(folder)


def test_conversion_wrong_shape(tmp_path):
    def edit(t):
        t["encoder.conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)

    folder = _copy_tiny(tmp_path, edit=edit)
    with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.weight: expected \[16, 3, 3, 3\], found \[16, 3, 5, 5\]"):
        V.load(folder)


def test_conversion_config_mismatch_and_missing_config(tmp_path):
    folder = _copy_tiny(tmp_path, config_edit=lambda c: c.update(latent_channels=4))
    with pytest.raises(CheckpointError, match=r"post_quant_conv\.weight: expected \[4, 4, 1, 1\], found \[8, 8, 1, 1\]"):
        V.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        V.load(folder)


def _diffusers_to_bfl(key: str, levels: int) -> str:
    """Inverse of diffusers' convert_flux2_to_diffusers.py key mapping, written independently of convert/vae.py."""
    subs = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
        (r"^quant_conv\.", "encoder.quant_conv."),
        (r"^post_quant_conv\.", "decoder.post_quant_conv."),
    ]
    for pattern, repl in subs:
        key = re.sub(pattern, repl, key)
    return key


def test_bfl_layout_gives_identical_params(tmp_path):
    tensors = load_file(TINY_VAE / "diffusion_pytorch_model.safetensors")
    bfl = {}
    for k, v in tensors.items():
        nk = _diffusers_to_bfl(k, 4)
        if ".attn_1." in nk and nk.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # BFL stores the attention projections as 1x1 convs
        bfl[nk] = v
    assert "decoder.up.3.upsample.conv.weight" in bfl and "encoder.mid.attn_1.proj_out.weight" in bfl
    path = tmp_path / "ae.safetensors"
    save_file(bfl, path)
    shutil.copy(TINY_VAE / "config.json", tmp_path / "config.json")
    _, ours = convert_vae(path)  # layout detected from the keys
    _, ref = convert_vae(TINY_VAE)
    flat_ours = jax.tree_util.tree_flatten_with_path(ours)[0]
    flat_ref = jax.tree_util.tree_flatten_with_path(ref)[0]
    assert [p for p, _ in flat_ours] == [p for p, _ in flat_ref]
    for (path_, a), (_, b) in zip(flat_ours, flat_ref):
        np.testing.assert_array_equal(a, b, err_msg=str(path_))
    # and a BFL file is not silently read as diffusers
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_vae(path, layout="diffusers")
    assert BFL.marker in bfl and DIFFUSERS.marker in tensors


# ----------------------------------------------------------------------------------------------
# memory: attention chunking and tiled decoding


def test_chunked_attention_is_exact_and_bounded():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 30, 16)), jnp.float32) for _ in range(3))
    full = single_head_attention(q, k, v, chunk=1000)
    s = np.einsum("bqd,bkd->bqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 4.0
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bqk,bkd->bqd", p / p.sum(-1, keepdims=True), np.asarray(v, np.float64))
    assert max_err(full, ref) <= 1e-5
    assert max_err(single_head_attention(q, k, v, chunk=7), full) <= 1e-6  # 30 = 4 chunks + padding
    # the program never forms the N x N score matrix, only chunk x N blocks. (The StableHLO is
    # checked rather than XLA:CPU's memory_analysis, which does not count the buffers inside
    # its YNNPACK fusions.)
    n, chunk = 4096, 256
    spec = jax.ShapeDtypeStruct((1, n, 64), jnp.float32)
    hlo = jax.jit(lambda a, b, c: single_head_attention(a, b, c, chunk=chunk)).lower(spec, spec, spec).as_text()
    assert f"{chunk}x{n}xf32" in hlo and f"{n}x{n}x" not in hlo


def test_tile_blending_is_a_partition_of_unity():
    rng = np.random.default_rng(4)
    hh, ww, t = 40, 56, 16
    ys, xs = tile_starts(hh, t, 6), tile_starts(ww, t, 6)
    assert ys[-1] + t == hh and xs[-1] + t == ww and len(ys) > 2
    image = rng.standard_normal((1, hh, ww, 3)).astype(np.float32)
    tiles = jnp.stack([jnp.asarray(image[:, y:y + t, x:x + t]) for y in ys for x in xs])
    np.testing.assert_allclose(np.asarray(blend_tiles(tiles, ys, xs, (hh, ww), 6)), image, atol=1e-5)


def test_tile_blending_is_a_linear_cross_fade():
    # two tiles side by side sharing 6 columns: constant 0 on the left, constant 1 on the right
    tiles = jnp.stack([jnp.zeros((1, 4, 16, 1)), jnp.ones((1, 4, 16, 1))])
    out = np.asarray(blend_tiles(tiles, [0], [0, 10], (4, 26), 6))[0, 0, :, 0]
    ramp = (np.arange(6) + 0.5) / 6
    np.testing.assert_allclose(out, np.concatenate([np.zeros(10), ramp, np.ones(10)]), atol=1e-6)


def test_tiled_decode(tiny):
    z = np.random.default_rng(5).standard_normal((1, 8, 6, 10)).astype(np.float32)
    full = np.asarray(tiny.decode(z))
    # a tile covering the whole latent is the one-pass decode
    np.testing.assert_array_equal(np.asarray(tiny.decode(z, tiled=V.Tiling(tile=16, overlap=4))), full)
    tiled = np.asarray(tiny.decode(z, tiled=V.Tiling(tile=4, overlap=2)))
    assert tiled.shape == full.shape and np.isfinite(tiled).all()
    # pixels covered only by the first tile are exactly that tile's own decode
    first = np.asarray(tiny.decode(z[:, :, :4, :4]))
    np.testing.assert_allclose(tiled[:, :, :16, :16], first[:, :, :16, :16], atol=1e-6)
    # and the tiles are really separate decodes (GroupNorm statistics per tile), so not the full decode
    assert max_err(tiled, full) > 1e-3


def test_tiled_decode_equals_an_independent_tile_and_blend(tiny):
    """Every pixel of the tiled decode against tiles decoded one by one and cross-faded here in
    float64 (linear ramps over the overlap on edges shared with a neighbour, weights normalised)."""
    z = np.random.default_rng(6).standard_normal((1, 8, 6, 10)).astype(np.float32)
    tile, overlap, f = 4, 2, 8
    tiled = np.asarray(tiny.decode(z, tiled=V.Tiling(tile=tile, overlap=overlap)), np.float64)
    h, w = z.shape[2], z.shape[3]
    ys, xs = [0, 2], [0, 2, 4, 6]  # tiles of 4 with overlap 2 covering 6 x 10, the last ones flush with the edge
    size, ramp = tile * f, overlap * f

    def weights(start, length):
        wt = np.ones(size)
        r = (np.arange(ramp) + 0.5) / ramp
        if start > 0:
            wt[:ramp] = np.minimum(wt[:ramp], r)
        if start + tile < length:
            wt[-ramp:] = np.minimum(wt[-ramp:], r[::-1])
        return wt

    acc = np.zeros_like(tiled)
    norm = np.zeros(tiled.shape[2:])
    for y in ys:
        for x in xs:
            piece = np.asarray(tiny.decode(z[:, :, y:y + tile, x:x + tile]), np.float64)
            wgt = np.outer(weights(y, h), weights(x, w))
            acc[:, :, y * f:(y + tile) * f, x * f:(x + tile) * f] += piece * wgt
            norm[y * f:(y + tile) * f, x * f:(x + tile) * f] += wgt
    assert norm.min() > 0  # every pixel covered
    np.testing.assert_allclose(tiled, acc / norm, rtol=0, atol=1e-5)
