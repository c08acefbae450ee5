"""The Lens denoiser (LensTransformer2DModel): a dual-stream MMDiT, as pure JAX functions.

Parameters are a nested dict whose names follow the PyTorch keys, with Linear weights stored
as `kernel` [in, out] and the per-block tensors stacked on a leading layer axis under
`transformer_blocks` so the blocks run under one `lax.scan` (compile time flat in depth).

    params = lens_jax.transformer.init_params(config, jax.random.key(0))
    v = lens_jax.transformer.apply(params, config, x, feats, mask, sigma, img_shape=(h, w))

`load(path)` reads an upstream `transformer/` folder and returns a callable `LensTransformer`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from functools import partial
from types import MappingProxyType
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike
import numpy as np

from . import lora as lora_lib
from . import attention
from .axes import ACT_HEADS, ACT_MLP, BATCH, EMBED, HEADS, MLP, Constrain, axes_from_table, constrain
from .nn import layer_norm, rms_norm
from .quant import dense, einsum_kernel
from .streaming import LayerStream, scan_layers

__all__ = [
    "TransformerConfig",
    "init_params",
    "apply",
    "rope_tables",
    "rotation_table",
    "rotate_pairs",
    "timestep_embedding",
    "embed_text",
    "block",
    "LensTransformer",
    "param_axes",
    "MODULATION_KEYS",
    "modulation_table",
    "modulation_rows",
]

Params = dict[str, Any]

TIMESTEP_CHANNELS = 256
TIMESTEP_SCALE = 1000.0  # the pipeline passes sigma = t / 1000; the embedding multiplies again
BLOCK_EPS = 1e-6  # block RMSNorms and QK RMSNorms (upstream passes the block eps to both)
TEXT_NORM_EPS = 1e-5  # per-layer txt_norm RMSNorms
NORM_OUT_EPS = 1e-6
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class TransformerConfig:
    """The fields of the upstream `transformer/config.json` that shape the network."""

    patch_size: int = 2
    in_channels: int = 128
    out_channels: int = 32
    num_layers: int = 48
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    enc_hidden_dim: int = 2880
    axes_dims_rope: tuple[int, ...] = (8, 28, 28)
    selected_layer_index: tuple[int, ...] = (5, 11, 17, 23)
    gate_mlp: bool = True
    rms_norm: bool = True
    multi_layer_encoder_feature: bool = True

    def __post_init__(self):
        if not (self.gate_mlp and self.rms_norm and self.multi_layer_encoder_feature):
            raise NotImplementedError(
                "lens-jax implements the published Lens DiT (gate_mlp, rms_norm and "
                "multi_layer_encoder_feature all true); this config turns one of them off."
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}."
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must all be even.")

    @property
    def inner_dim(self) -> int:
        """Model width: heads x head_dim."""
        # Upstream derives it from heads x head_dim and ignores the config's `inner_dim`.
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        """The gated MLP's hidden width (8/3 of the model width, truncated)."""
        return int(self.inner_dim / 3 * 8)

    @property
    def num_text_layers(self) -> int:
        """How many text-encoder layers the DiT reads (one `txt_norm` each)."""
        return len(self.selected_layer_index)

    @property
    def out_dim(self) -> int:
        """Channels of a predicted token: patch^2 x out_channels."""
        return self.patch_size * self.patch_size * self.out_channels

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """From an upstream `transformer/config.json` dict; keys that do not shape the network are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TransformerConfig":
        """`from_dict` of a JSON file."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """The upstream `config.json` dict (with `_class_name` and `inner_dim`), as `export_diffusers` writes it."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(_class_name="LensTransformer2DModel", inner_dim=self.inner_dim)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ----------------------------------------------------------------------------- parameters


def init_params(config: TransformerConfig, key: jax.Array, dtype: DTypeLike = jnp.float32) -> Params:
    """Random parameters with the checkpoint's structure (kernels ~ N(0, 1/fan_in))."""
    c = config
    d, hd, L = c.inner_dim, c.attention_head_dim, c.num_layers
    keys = iter(jax.random.split(key, 32))

    def linear(fan_in, fan_out, bias=True, layers=None):
        lead = () if layers is None else (layers,)
        p = {"kernel": (jax.random.normal(next(keys), lead + (fan_in, fan_out)) / math.sqrt(fan_in)).astype(dtype)}
        if bias:
            p["bias"] = jnp.zeros(lead + (fan_out,), dtype)
        return p

    def ones(*shape):
        return jnp.ones(shape, dtype)

    heads = c.num_attention_heads

    def fused_qkv():
        # [d, 3, heads, head_dim] (PyTorch: [3 * inner, d]): tensor parallelism splits whole heads.
        kernel = jax.random.normal(next(keys), (L, d, 3, heads, hd)) / math.sqrt(d)
        return {"kernel": kernel.astype(dtype), "bias": jnp.zeros((L, 3, heads, hd), dtype)}

    def attn_out():
        # [heads, head_dim, d] (PyTorch: [d, inner]).
        kernel = jax.random.normal(next(keys), (L, heads, hd, d)) / math.sqrt(d)
        return {"kernel": kernel.astype(dtype), "bias": jnp.zeros((L, d), dtype)}

    blocks = {
        "attn": {
            "img_qkv": fused_qkv(),
            "txt_qkv": fused_qkv(),
            "to_out": attn_out(),
            "to_add_out": attn_out(),
            "norm_q": {"weight": ones(L, hd)},
            "norm_k": {"weight": ones(L, hd)},
            "norm_added_q": {"weight": ones(L, hd)},
            "norm_added_k": {"weight": ones(L, hd)},
        },
        "img_mod": linear(d, 6 * d, layers=L),
        "txt_mod": linear(d, 6 * d, layers=L),
        "img_norm1": {"weight": ones(L, d)},
        "img_norm2": {"weight": ones(L, d)},
        "txt_norm1": {"weight": ones(L, d)},
        "txt_norm2": {"weight": ones(L, d)},
        "img_mlp": {
            "w1": linear(d, c.mlp_hidden_dim, bias=False, layers=L),
            "w2": linear(c.mlp_hidden_dim, d, bias=False, layers=L),
            "w3": linear(d, c.mlp_hidden_dim, bias=False, layers=L),
        },
        "txt_mlp": {
            "w1": linear(d, c.mlp_hidden_dim, bias=False, layers=L),
            "w2": linear(c.mlp_hidden_dim, d, bias=False, layers=L),
            "w3": linear(d, c.mlp_hidden_dim, bias=False, layers=L),
        },
    }
    return {
        "img_in": linear(c.in_channels, d),
        "txt_norm": {"weight": ones(c.num_text_layers, c.enc_hidden_dim)},
        "txt_in": linear(c.num_text_layers * c.enc_hidden_dim, d),
        "time_text_embed": {
            "timestep_embedder": {"linear_1": linear(TIMESTEP_CHANNELS, d), "linear_2": linear(d, d)}
        },
        "transformer_blocks": blocks,
        "norm_out": {"linear": linear(d, 2 * d)},
        "proj_out": linear(d, c.out_dim),
    }


# Logical axes of every parameter (trailing dims; the stacked blocks get "layers" in front).
PARAM_AXES_TABLE: tuple[tuple[str, tuple], ...] = (
    (r"attn\.(img|txt)_qkv\.kernel", (EMBED, None, HEADS, None)),
    (r"attn\.(img|txt)_qkv\.bias", (None, HEADS, None)),
    (r"attn\.(to_out|to_add_out)\.kernel", (HEADS, None, EMBED)),
    (r"(img|txt)_mlp\.(w1|w3)\.kernel", (EMBED, MLP)),
    (r"(img|txt)_mlp\.w2\.kernel", (MLP, EMBED)),
    (r"(img|txt)_mod\.kernel", (EMBED, None)),
    (r"time_text_embed\.timestep_embedder\.linear_2\.kernel", (EMBED, None)),
    (r"(norm_out\.linear|proj_out)\.kernel", (EMBED, None)),
    (r"(img_in|txt_in|time_text_embed\.timestep_embedder\.linear_1)\.kernel", (None, EMBED)),
    (r".*\.bias", (None,)),
    (r"txt_norm\.weight", (None, None)),
    (r".*\.weight", (None,)),
)


def param_axes(config: TransformerConfig) -> Params:
    """Logical axis names of every parameter leaf (same tree as `init_params`)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return axes_from_table(abstract, PARAM_AXES_TABLE, stacked=("transformer_blocks",))


# ----------------------------------------------------------------------------- embeddings


def _axis_angles(positions: np.ndarray, dim: int) -> np.ndarray:
    """float32 angles pos * theta^(-2k/dim), k < dim/2, computed like upstream (float32 outer product)."""
    inv_freq = (1.0 / np.power(np.float32(ROPE_THETA), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    return np.outer(positions.astype(np.float32), inv_freq.astype(np.float32)).astype(np.float32)


def _centred(n: int) -> np.ndarray:
    return np.arange(-(n - n // 2), n // 2)


def rope_tables(config: TransformerConfig, height: int, width: int, text_len: int) -> dict[str, np.ndarray]:
    """RoPE (cos, sin) tables [tokens, head_dim/2] for the image grid and the text, in float32, and
    `rotation`: the joint [image; text] table [N + S, head_dim/2, 2, 2] the block's `rotate_pairs` reads.

    Three axes (frame, h, w); image positions are centred (scale_rope); text token j sits at
    max(h//2, w//2) + j on every axis. Built once on the host per (height, width, text_len).
    """
    df, dh, dw = config.axes_dims_rope
    hh, ww = np.meshgrid(_centred(height), _centred(width), indexing="ij")
    img = np.concatenate(
        [_axis_angles(np.zeros(height * width), df), _axis_angles(hh.reshape(-1), dh), _axis_angles(ww.reshape(-1), dw)],
        axis=1,
    )
    tpos = max(height // 2, width // 2) + np.arange(text_len)
    txt = np.concatenate([_axis_angles(tpos, df), _axis_angles(tpos, dh), _axis_angles(tpos, dw)], axis=1)
    return {
        "img_cos": np.cos(img), "img_sin": np.sin(img),
        "txt_cos": np.cos(txt), "txt_sin": np.sin(txt),
        "rotation": rotation_table(np.cos(np.concatenate([img, txt])), np.sin(np.concatenate([img, txt]))),
    }


def rotation_table(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """[T, D/2, 2, 2] rotation matrices [[c, -s], [s, c]] from cos/sin [T, D/2] (`rotate_pairs`' table)."""
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2).astype(np.float32)


# How `rotate_pairs` forms a pair's two products and sum, per platform the program is lowered for
# (`lax.platform_dependent`, so a program compiled ahead of time for a GPU on a CPU host gets the GPU
# form; the same arithmetic either way). "sum": a product summed over the pair axis, which XLA:GPU
# fuses with the QK RMSNorm before it into one kernel per q / k (with "slices" it writes the normed q
# and reads it back). "slices" (every other platform): the pair's halves sliced apart, which XLA:CPU
# vectorises (its reduction over a 2-wide axis is ~10x slower).
ROTATE_PAIRS_FORM = MappingProxyType({"cuda": "sum", "rocm": "sum"})
ROTATE_PAIRS_FORMS = ("sum", "slices")


def rotate_pairs(x: jax.Array, rotation: jax.Array, form: str | None = None) -> jax.Array:
    """RoPE: rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] by `rotation` [T, D/2, 2, 2].

    out[2i] = x[2i] c - x[2i+1] s, out[2i+1] = x[2i] s + x[2i+1] c, in float32. `form`: "sum" or
    "slices"; None: `ROTATE_PAIRS_FORM`'s entry for the platform the program is lowered for, else "slices".
    """
    if form is not None and form not in ROTATE_PAIRS_FORMS:
        raise ValueError(f"rotate_pairs form {form!r}: choose 'sum' or 'slices'.")
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 1, 2)
    r = rotation[None, :, None]

    def rotate(form):
        if form == "sum":
            return lambda x32, r: jnp.sum(x32 * r, axis=-1)
        return lambda x32, r: x32[..., 0] * r[..., 0] + x32[..., 1] * r[..., 1]

    if form is None:
        out = jax.lax.platform_dependent(x32, r, **{p: rotate(f) for p, f in ROTATE_PAIRS_FORM.items()},
                                         default=rotate("slices"))
    else:
        out = rotate(form)(x32, r)
    return out.reshape(x.shape).astype(x.dtype)


def timestep_embedding(params: Params, timestep: jax.Array, dtype: DTypeLike) -> jax.Array:
    """Sinusoidal Timesteps(256, flip_sin_to_cos, shift 0, scale 1000) then the 2-layer MLP -> [B, D]."""
    half = TIMESTEP_CHANNELS // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (timestep.astype(jnp.float32)[:, None] * freqs[None, :]) * TIMESTEP_SCALE
    proj = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1).astype(dtype)
    p = params["time_text_embed"]["timestep_embedder"]
    return dense(jax.nn.silu(dense(proj, p["linear_1"])), p["linear_2"])


def embed_text(params: Params, features: Sequence[jax.Array], dtype: DTypeLike) -> jax.Array:
    """Per-layer RMSNorm (eps 1e-5) of each selected encoder layer, concatenated, then txt_in."""
    weights = params["txt_norm"]["weight"]
    if len(features) != weights.shape[0]:
        raise ValueError(f"expected {weights.shape[0]} text-feature layers, got {len(features)}")
    normed = [rms_norm(f.astype(dtype), weights[i], TEXT_NORM_EPS) for i, f in enumerate(features)]
    return dense(jnp.concatenate(normed, axis=-1), params["txt_in"])


# ----------------------------------------------------------------------------- the block


def _modulation(p: Params, temb_act: jax.Array) -> tuple[jax.Array, ...]:
    """SiLU(temb) -> Linear -> 6 chunks: (shift, scale, gate) for attention, then for the MLP.

    `p` is the Linear's dict, or an already computed row of `modulation_table` ([6d] shared by
    the batch, or [B, 6d]), which is split the same way."""
    mod = p if isinstance(p, jax.Array) else dense(temb_act, p)
    return tuple(jnp.expand_dims(c, -2) for c in jnp.split(mod, 6, axis=-1))


def _modulate(x: jax.Array, norm_weight: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return rms_norm(x, norm_weight, BLOCK_EPS) * (1 + scale) + shift


def _attn_out(x: jax.Array, p: Params) -> jax.Array:
    """Attention output [B, T, heads, head_dim] -> Linear(inner -> d) with kernel [heads, head_dim, d]."""
    return einsum_kernel("bthk,hkd->btd", x, p) + p["bias"].astype(x.dtype)


def _gate_mlp(p: Params, x: jax.Array, sharding=None) -> jax.Array:
    hidden = constrain(jax.nn.silu(dense(x, p["w1"])) * dense(x, p["w3"]), (BATCH, None, ACT_MLP), sharding)
    return dense(hidden, p["w2"])


def _joint_qkv(a: Params, x_img: jax.Array, x_txt: jax.Array, rotation: jax.Array, sharding: Constrain | None):
    """q, k, v [B, N + S, heads, head_dim] of the joint [image; text] sequence, q and k normed and rotated.

    Each stream's qkv projection is laid out tokens first ([B, T, 3, heads, head_dim], the GEMM's own
    output order: no transpose); q, k and v are each concatenated over the two streams *before* the
    bias (each token takes its stream's bias and QK-norm weight) and RoPE (one joint rotation table), so
    XLA:GPU writes each of q, k and v in one kernel straight from the GEMM outputs (bias, RMSNorm,
    rotation and concatenation fused; with cuBLAS GEMMs too, which would otherwise take the bias into
    the GEMM as a materialised broadcast). Per element the same operations as norming and rotating
    each stream on its own before concatenating.
    """
    n_img = x_img.shape[1]
    y_img = einsum_kernel("btd,dchk->btchk", x_img, a["img_qkv"])
    y_txt = einsum_kernel("btd,dchk->btchk", x_txt, a["txt_qkv"])
    is_img = (jnp.arange(n_img + y_txt.shape[1]) < n_img)[:, None, None]  # [T, 1, 1]

    def per_token(img_value, txt_value):
        return jnp.where(is_img, img_value, txt_value)

    def part(c):  # c: 0 = q, 1 = k, 2 = v
        joint = jnp.concatenate([y_img[:, :, c], y_txt[:, :, c]], axis=1)
        joint = joint + per_token(a["img_qkv"]["bias"][c], a["txt_qkv"]["bias"][c]).astype(joint.dtype)
        return constrain(joint, (BATCH, None, ACT_HEADS, None), sharding)

    def norm_rotate(x, img_norm, txt_norm):
        return rotate_pairs(rms_norm(x, per_token(a[img_norm]["weight"], a[txt_norm]["weight"]), BLOCK_EPS), rotation)

    return norm_rotate(part(0), "norm_q", "norm_added_q"), norm_rotate(part(1), "norm_k", "norm_added_k"), part(2)


def joint_attention(q, k, v, key_mask: jax.Array, key_lengths: jax.Array, implementation: str | None,
                    sharding: Constrain | None = None):
    """Softmax attention over [image; text] keys. `key_mask` [B, S] (image keys always True).

    The cuDNN path takes per-row visible-key counts instead of a dense mask; that is exact
    because text is right-padded behind the image tokens, so visible keys form a prefix.
    `implementation`: one of lens_jax.models.attention.IMPLS, or None for the backend's default
    (blocked online softmax on CPU, splash on TPU).
    """
    return attention.attention(q, k, v, key_mask=key_mask, key_lengths=key_lengths, impl=implementation,
                               sharding=sharding)


def block(p: Params, config: TransformerConfig, img: jax.Array, txt: jax.Array, temb_act: jax.Array,
          rope: dict[str, jax.Array], key_mask: jax.Array | None, key_lengths: jax.Array | None,
          attention_impl: str | None = None, sharding: Constrain | None = None) -> tuple[jax.Array, jax.Array]:
    """One dual-stream MMDiT block; returns the updated (img, txt) streams.

    `p`: one layer of `params["transformer_blocks"]`; img [B, N, d], txt [B, S, d]; temb_act the SiLU of
    the timestep embedding [B, d]; rope: `rope_tables(...)` (the block reads its joint `rotation`);
    key_mask / key_lengths: which joint keys are visible (see `apply`).
    """
    i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = _modulation(p["img_mod"], temb_act)
    t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = _modulation(p["txt_mod"], temb_act)
    a = p["attn"]
    q, k, v = _joint_qkv(a, _modulate(img, p["img_norm1"]["weight"], i_shift1, i_scale1),
                         _modulate(txt, p["txt_norm1"]["weight"], t_shift1, t_scale1), rope["rotation"], sharding)
    n_img = img.shape[1]
    out = joint_attention(q, k, v, key_mask, key_lengths, attention_impl, sharding)
    img = img + i_gate1 * _attn_out(out[:, :n_img], a["to_out"])
    txt = txt + t_gate1 * _attn_out(out[:, n_img:], a["to_add_out"])
    img = img + i_gate2 * _gate_mlp(p["img_mlp"], _modulate(img, p["img_norm2"]["weight"], i_shift2, i_scale2), sharding)
    txt = txt + t_gate2 * _gate_mlp(p["txt_mlp"], _modulate(txt, p["txt_norm2"]["weight"], t_shift2, t_scale2), sharding)
    return constrain(img, (BATCH, None, None), sharding), constrain(txt, (BATCH, None, None), sharding)


# ----------------------------------------------------------------------------- forward


def default_attention_impl(dtype: DTypeLike) -> str | None:
    """cuDNN flash attention on GPU for half precision; None (lens_jax.models.attention's backend default) elsewhere."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return None


# Rematerialisation policies for the scanned block (training): name -> jax.checkpoint policy.
REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": "dots_with_no_batch_dims_saveable",  # keep matmul outputs, recompute the elementwise ops
    "nothing_saveable": "nothing_saveable",
    "everything_saveable": "everything_saveable",
}


def _remat(fn, remat: str | None):
    if remat is None:
        return fn
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)} or None.")
    name = REMAT_POLICIES[remat]
    policy = None if name is None else getattr(jax.checkpoint_policies, name)
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


@partial(jax.jit, static_argnames=("config", "img_shape", "compute_dtype", "attention_impl", "sharding", "stream",
                                   "remat"))
def apply(
    params: Params,
    config: TransformerConfig,
    hidden_states: jax.Array,
    encoder_hidden_states: Sequence[jax.Array],
    encoder_hidden_states_mask: jax.Array,
    timestep: jax.Array,
    img_shape: tuple[int, int],
    compute_dtype: DTypeLike | None = None,
    attention_impl: str | None = None,
    sharding: Constrain | None = None,
    stream: LayerStream | None = None,
    lora: dict | None = None,
    lora_multiplier: float | jax.Array = 1.0,
    remat: str | None = None,
    modulation: dict | None = None,
) -> jax.Array:
    """DiT forward: velocity [B, h*w, patch^2 * out_channels] for image tokens [B, h*w, in_channels].

    encoder_hidden_states: one [B, S, enc_hidden_dim] array per selected encoder layer;
    encoder_hidden_states_mask: [B, S] bool (True = visible text token); timestep: [B] sigma in
    [0, 1]; img_shape: the static token grid (h, w). `compute_dtype` defaults to the params'
    dtype; `attention_impl` picks lens_jax.models.attention's kernel (None: the backend default).
    `sharding` constrains activations (lens_jax.parallel.BoundRules); `stream` brings the stacked
    blocks from host memory one layer ahead (lens_jax.parallel.offload).
    `remat` (training) wraps the scanned block in `jax.checkpoint` with a policy of REMAT_POLICIES.
    `lora`: an adapter (`lens_jax.models.lora`) applied unmerged at `lora_multiplier`: each block's
    kernels are merged inside the scan body, one layer at a time (differentiable in the adapter).
    `modulation`: the blocks' modulation for this call, `modulation_rows(modulation_table(...), i)`
    ({"img_mod", "txt_mod"}: [L, 6d] shared by the batch, or [L, B, 6d]); the scan then never reads
    the `img_mod`/`txt_mod` kernels (they may stay in host memory). Same values, bit for bit, as
    computing them here from `timestep` when the table was made from the same sigmas.
    """
    top_lora, block_lora = lora_lib.split_stacked(lora_lib.scale_factors(lora or {}, lora_multiplier))
    params = lora_lib.merge_factors(params, top_lora)
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else params["img_in"]["kernel"].dtype
    h, w = img_shape
    if hidden_states.shape[1] != h * w:
        raise ValueError(f"img_shape ({h}, {w}) gives {h * w} tokens but hidden_states has {hidden_states.shape[1]}; "
                         "pass the (h, w) token grid of the latents (image size / 16).")
    text_len = encoder_hidden_states[0].shape[1]
    rope = jax.tree.map(jnp.asarray, rope_tables(config, h, w, text_len))

    img = dense(hidden_states.astype(dtype), params["img_in"])
    txt = embed_text(params, encoder_hidden_states, dtype)
    temb = timestep_embedding(params, timestep, dtype)
    temb_act = jax.nn.silu(temb)

    text_mask = encoder_hidden_states_mask.astype(bool)
    key_mask = jnp.concatenate([jnp.ones((img.shape[0], img.shape[1]), bool), text_mask], axis=1)
    key_lengths = img.shape[1] + jnp.sum(text_mask, axis=1, dtype=jnp.int32)

    def step(carry, xs):
        p = lora_lib.merge_factors(*xs)
        return block(p, config, *carry, temb_act, rope, key_mask, key_lengths, attention_impl, sharding), None

    blocks = params["transformer_blocks"]
    if modulation is not None:  # precomputed rows replace the modulation Linears, which the scan never reads
        blocks = {**{k: v for k, v in blocks.items() if k not in MODULATION_KEYS}, **_check_rows(modulation, config)}
        block_lora = {k: v for k, v in block_lora.items() if k.split(".", 1)[0] not in MODULATION_KEYS}
    (img, _), _ = scan_layers(_remat(step, remat), (img, txt), (blocks, block_lora), stream)

    scale, shift = jnp.split(dense(temb_act, params["norm_out"]["linear"]), 2, axis=-1)  # (scale, shift) order
    img = layer_norm(img, NORM_OUT_EPS) * (1 + scale[:, None]) + shift[:, None]
    return dense(img, params["proj_out"])


# ----------------------------------------------------------------------------- precomputed modulation

# The per-block modulation Linears (d -> 6d per stream): a function of the timestep alone.
MODULATION_KEYS = ("img_mod", "txt_mod")


def modulation_table(params: Params, config: TransformerConfig, sigmas: jax.Array, dtype=None,
                     stream: LayerStream | None = None, lora: dict | None = None, lora_multiplier=1.0) -> dict:
    """Every block's modulation (shift, scale, gate x 2) for every sigma: {"img_mod", "txt_mod"}: [N, L, 6d].

    `sigmas` [N] are what `apply` takes as `timestep`; the values are those `apply` computes inside
    each block (same operations in the same order), so a sampler can compute them once per
    generation and feed `modulation_rows(table, i)` to every step. Reads only the timestep
    embedder and the stacked `img_mod`/`txt_mod` Linears; with `stream` those are brought from
    host memory one layer ahead (`scan_layers`). `lora`/`lora_multiplier`: an unmerged adapter as
    in `apply` (entries on the time embedding or the modulation Linears are merged here).
    """
    top_lora, block_lora = lora_lib.split_stacked(lora_lib.scale_factors(lora or {}, lora_multiplier))
    params = lora_lib.merge_factors(params, {k: v for k, v in top_lora.items() if k.startswith("time_text_embed.")})
    dtype = jnp.dtype(dtype) if dtype is not None else params["img_in"]["kernel"].dtype
    temb_act = jax.nn.silu(timestep_embedding(params, jnp.asarray(sigmas).reshape(-1), dtype))
    rows = _modulation_by_layer(params["transformer_blocks"], temb_act, block_lora, stream)
    return {k: jnp.swapaxes(v, 0, 1) for k, v in rows.items()}


def _modulation_by_layer(blocks: Params, temb_act: jax.Array, block_lora: dict, stream: LayerStream | None) -> dict:
    """{"img_mod", "txt_mod"}: [L, N, 6d] for SiLU(temb) [N, d], one scan over the modulation Linears alone."""
    mods = {k: blocks[k] for k in MODULATION_KEYS}
    mod_lora = {k: v for k, v in block_lora.items() if k.split(".", 1)[0] in MODULATION_KEYS}

    def step(carry, xs):
        p = lora_lib.merge_factors(*xs)
        return carry, {k: dense(temb_act, p[k]) for k in MODULATION_KEYS}

    return scan_layers(step, (), (mods, mod_lora), stream)[1]


def modulation_rows(table: dict, i) -> dict:
    """Step i's rows of a `modulation_table` ({"img_mod", "txt_mod"}: [L, 6d]), for `apply(modulation=)`."""
    return {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in table.items()}


def _check_rows(modulation: dict, config: TransformerConfig) -> dict:
    want = (config.num_layers, 6 * config.inner_dim)
    for k in MODULATION_KEYS:
        shape = getattr(modulation.get(k), "shape", None)
        if shape is None or shape[0] != want[0] or shape[-1] != want[1] or len(shape) not in (2, 3):
            raise ValueError(f"modulation[{k!r}] must be [{want[0]}, ({{B}},) {want[1]}] rows of modulation_table "
                             f"(modulation_rows(table, i)); got {shape}.")
    return {k: modulation[k] for k in MODULATION_KEYS}


# ----------------------------------------------------------------------------- user-facing wrapper


def _check_inputs(config: TransformerConfig, hidden_states, encoder_hidden_states, mask, timestep, img_shapes):
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != config.in_channels:
        raise ValueError(
            f"hidden_states must be [B, h*w, {config.in_channels}] packed latent tokens; got shape {hidden_states.shape}."
        )
    b, n, _ = hidden_states.shape
    if len(img_shapes) != 1 or len(img_shapes[0]) != 3 or img_shapes[0][0] != 1:
        raise ValueError(f"img_shapes must be a list with one (1, h, w) tuple; got {img_shapes!r}.")
    _, h, w = (int(v) for v in img_shapes[0])
    if h * w != n:
        raise ValueError(f"img_shapes (1, {h}, {w}) gives {h * w} tokens but hidden_states has {n}.")
    if len(encoder_hidden_states) != config.num_text_layers:
        raise ValueError(
            f"encoder_hidden_states must hold {config.num_text_layers} per-layer arrays "
            f"(selected_layer_index {config.selected_layer_index}); got {len(encoder_hidden_states)}."
        )
    s = encoder_hidden_states[0].shape[1] if encoder_hidden_states[0].ndim == 3 else None
    for i, f in enumerate(encoder_hidden_states):
        if f.shape != (b, s, config.enc_hidden_dim):
            raise ValueError(
                f"encoder_hidden_states[{i}] must be [B={b}, S, {config.enc_hidden_dim}] like layer 0; got {f.shape}."
            )
    if mask.shape != (b, s):
        raise ValueError(f"encoder_hidden_states_mask must be [B={b}, S={s}]; got {mask.shape}.")
    if timestep.shape != (b,):
        raise ValueError(f"timestep must be [B={b}] sigmas in [0, 1]; got shape {timestep.shape}.")
    return h, w


@dataclass
class LensTransformer:
    """A loaded Lens DiT: `tr(hidden_states, encoder_hidden_states, mask, timestep, img_shapes)`."""

    config: TransformerConfig
    params: Params
    compute_dtype: Any = None
    attention_impl: str | None = None
    lora: dict | None = None  # an unmerged adapter (lens_jax.models.lora), applied at lora_multiplier
    lora_multiplier: float = 1.0

    def with_lora(self, adapter: dict, multiplier: float = 1.0, merged: bool = True) -> "LensTransformer":
        """A transformer with `adapter` applied at `multiplier` (stacks on adapters already applied).

        merged=True folds it into the kernels once (fast inference); merged=False keeps the base
        kernels and merges inside the forward, layer by layer (what training does).
        """
        lora_lib.check_adapter(self.params, adapter)
        lora_lib.check_multiplier(multiplier)
        if merged:
            return replace(self, params=jax.jit(lora_lib.merge)(self.params, adapter, multiplier))
        if self.lora is not None:
            raise ValueError("this transformer already carries an unmerged adapter; merge one of them.")
        return replace(self, lora=adapter, lora_multiplier=multiplier)

    def __call__(self, hidden_states: ArrayLike, encoder_hidden_states: Sequence[ArrayLike],
                 encoder_hidden_states_mask: ArrayLike, timestep: ArrayLike | float,
                 img_shapes: Sequence[tuple[int, int, int]]) -> jax.Array:
        """Velocity [B, h*w, patch^2 * out_channels] for packed latent tokens [B, h*w, in_channels].

        encoder_hidden_states: one [B, S, enc_hidden_dim] array per selected text layer; mask [B, S]
        (True / 1 = token); timestep: sigma in [0, 1], [B] or one for the batch; img_shapes:
        [(1, h, w)], the token grid (diffusers' argument). Inputs are checked first (one ValueError
        naming the argument); the forward is `apply` under jit.
        """
        hidden_states = jnp.asarray(hidden_states)
        feats = [jnp.asarray(f) for f in encoder_hidden_states]
        mask = jnp.asarray(encoder_hidden_states_mask).astype(bool)
        timestep = jnp.atleast_1d(jnp.asarray(timestep, jnp.float32))
        if timestep.shape == (1,) and hidden_states.shape[0] > 1:
            timestep = jnp.broadcast_to(timestep, (hidden_states.shape[0],))
        h, w = _check_inputs(self.config, hidden_states, feats, mask, timestep, img_shapes)
        dtype = self.compute_dtype or self.params["img_in"]["kernel"].dtype
        impl = self.attention_impl if self.attention_impl is not None else default_attention_impl(dtype)
        return apply(self.params, self.config, hidden_states, feats, mask, timestep, (h, w), dtype, impl,
                     lora=self.lora, lora_multiplier=self.lora_multiplier)
