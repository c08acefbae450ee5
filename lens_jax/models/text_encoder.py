"""Lens' text encoder: the GPT-OSS decoder used as a multi-layer feature extractor.

Pure-functional JAX port of `transformers`' `GptOssModel` forward, stopped after the last
selected decoder layer: no final norm, no LM head. Per layer: RMSNorm -> GQA attention with
q/k/v/o biases, learned per-head sinks, YaRN RoPE (rotation over halves) and a sliding or
full causal mask as `layer_types` says -> residual -> RMSNorm -> top-k MoE with the clamped,
interleaved SwiGLU -> residual. Layers run under `lax.scan`, indexing the layer-stacked
parameters in place (no per-call copy of the stack).

Expert weights are either float ([L, E, in, out], transformers' layout) or kept in MXFP4
(`*_blocks`/`*_scales` uint8 as on disk, dequantised inside the jitted forward one expert at a
time), which keeps GPT-OSS-20B at about 13 GB instead of about 42 GB in bfloat16. The decode
(`mxfp4.decode`: integer ops, no table gather) yields the stored [out, in] layout, which the expert
matmuls contract directly: no transposed copy, and the decode is an elementwise producer of the dot.

MoE dispatch (`moe_impl`):
  * "auto" (default): `MOE_DISPATCH`, a table keyed by backend and routed-token count, picks one of
    the three below (`resolve_moe_impl`); measured on CPU, reasoned defaults elsewhere (each row
    says which). Name a dispatch to override it.
  * "grouped": token-expert pairs sorted by expert; a scan over experts runs each
    expert's contiguous rows in fixed-size chunks (a while loop with a data-dependent trip
    count), so the FLOPs follow the routed rows (plus at most one partial chunk per expert),
    each expert's weights are read / dequantised at most once per layer and experts that
    received no token are skipped. Works with plain XLA on every backend.
  * "tiled": grouped, but each MXFP4 expert matrix is decoded a tile of rows at a time (about
    `TILE_BYTES` of floats) right before the matmuls that read it, so no whole expert is
    materialised in float; the default on CPU. Float experts run "grouped".
  * "ragged": the same sorted rows through `jax.lax.ragged_dot`; fast only where XLA lowers
    ragged dots natively (TPU; some GPU stacks). JAX 0.10 on CPU (and by default on GPU)
    expands it to a dense masked product over all experts.
  * "dense": every expert on every token (E/k times the FLOPs); reference and benchmarks only.
  * "gmm": the sorted rows through `mxfp4_gemm.gmm`, a Pallas (Triton) grouped matmul that reads the
    packed MXFP4 codes and scales and decodes each weight tile in registers: decoded experts never
    reach memory and experts without rows are never read. GPU only (CPU runs it in Pallas' interpret
    mode, for tests); opt-in, not in `MOE_DISPATCH` (docs/benchmarks.md, "MXFP4 grouped matmul");
    differentiated as "ragged" (like grouped / tiled). Float experts run "grouped".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import attention as attn_lib
from . import mxfp4, mxfp4_gemm
from .dtypes import resolve_dtype
from .axes import ACT_HEADS, BATCH, EMBED, EXPERT_MLP, EXPERTS, HEADS, KV_HEADS, MLP, VOCAB, Constrain, axes_from_table, constrain
from .nn import dense, rms_norm
from .streaming import LayerStream, scan_layers

Params = dict

SLIDING = "sliding_attention"
FULL = "full_attention"
MOE_FIXED_IMPLS = ("grouped", "tiled", "ragged", "dense")
# Dispatches through a GPU kernel (Pallas): opt-in by name, never iterated by the CPU benchmarks and checks
# that loop over MOE_FIXED_IMPLS (on CPU they run in Pallas' interpret mode: for tests only).
MOE_KERNEL_IMPLS = ("gmm",)
MOE_IMPLS = ("auto", *MOE_FIXED_IMPLS, *MOE_KERNEL_IMPLS)


@dataclass(frozen=True)
class MoeDispatch:
    """One row of the MoE dispatch table: on `backend`, token counts in [min_tokens, max_tokens) use `impl`.

    `measured` says whether the choice rests on a measurement (docs/benchmarks.md, "MoE dispatch")
    or is a default chosen by reasoning, with `why` either way.
    """

    backend: str
    min_tokens: int
    max_tokens: int | None  # None: no upper bound
    impl: str
    measured: bool
    why: str


# `moe_impl="auto"` (the default) reads this table with the backend the program is lowered for and
# the number of tokens routed in one call (batch x sequence). A fixed `moe_impl` overrides it.
MOE_DISPATCH: tuple[MoeDispatch, ...] = (
    MoeDispatch("cpu", 0, None, "tiled", True,
                "measured on CPU at the real GPT-OSS shape (scripts/benchmark_moe.py): grouped was fastest at "
                "64 / 192 / 1024 tokens; tiled (grouped, decoding MXFP4 experts tile by tile next to the "
                "matmuls) beats it at 256 and 1024 tokens, 64 not re-measured (docs/benchmarks.md, MXFP4 "
                "experts on CPU); float experts run the grouped code under either name"),
    MoeDispatch("gpu", 0, 256, "grouped", False,
                "unmeasured (no GPU this session): few tokens touch few experts, and grouped reads and "
                "dequantises only those; dense and ragged dequantise all 32 experts of the layer"),
    MoeDispatch("gpu", 256, 4096, "dense", False,
                "partly measured: an H100 at 1024 tokens (bf16) ran dense 4.9 ms, grouped 6.5 ms, ragged "
                "9.5 ms per layer (earlier session); the range around it is not"),
    MoeDispatch("gpu", 4096, None, "grouped", False,
                "unmeasured: dense does E/k = 8x the routed FLOPs and its scratch grows with tokens x experts"),
    MoeDispatch("tpu", 0, None, "grouped", False,
                "unmeasured (no TPU): ragged_dot lowers natively on TPU, but it (like dense) needs the whole "
                "layer's 32 experts dequantised at once (~1.6 GB bf16 per layer); grouped needs one expert"),
)


def resolve_moe_impl(num_tokens: int, backend: str | None = None, table: Sequence[MoeDispatch] = MOE_DISPATCH) -> str:
    """The MoE dispatch `moe_impl="auto"` uses for `num_tokens` routed tokens on `backend`.

    backend: "cpu", "gpu" or "tpu" (also "cuda" / "rocm"; None: jax.default_backend()). A backend or
    token count with no row falls back to "grouped", which works everywhere.
    """
    backend = backend or jax.default_backend()
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    for row in table:
        if row.backend == backend and row.min_tokens <= num_tokens and (row.max_tokens is None or num_tokens < row.max_tokens):
            return row.impl
    return "grouped"
DEFAULT_SELECTED_LAYERS = (5, 11, 17, 23)

# GptOssConfig's class defaults, applied when config.json has no rope_parameters/rope_scaling.
_GPT_OSS_ROPE_DEFAULTS = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
_GPT_OSS_DEFAULT_THETA = 150000.0


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters in transformers' `rope_parameters` vocabulary ("yarn" or "default")."""

    rope_type: str = "yarn"
    theta: float = _GPT_OSS_DEFAULT_THETA
    factor: float | None = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None


@dataclass(frozen=True)
class TextEncoderConfig:
    """The GPT-OSS fields the encoder needs, read from an HF `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_bias: bool = True
    max_position_embeddings: int = 131072
    rope: RopeConfig = field(default_factory=RopeConfig)
    quant_method: str | None = None
    pad_token_id: int | None = None
    eos_token_id: Any = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers."
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"unsupported layer_types {bad}; expected {SLIDING!r} or {FULL!r}.")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_local_experts "
                f"({self.num_local_experts})]."
            )
        if self.rope.rope_type not in ("yarn", "default"):
            raise ValueError(f"unsupported rope_type {self.rope.rope_type!r}; expected 'yarn' or 'default'.")

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TextEncoderConfig":
        """The config from a transformers GPT-OSS `config.json` dict (`model_type` must be "gpt_oss")."""
        model_type = d.get("model_type")
        if model_type != "gpt_oss":
            raise ValueError(
                f"the text encoder config has model_type {model_type!r}; lens_jax.text_encoder supports only "
                "GPT-OSS ('gpt_oss', e.g. openai/gpt-oss-20b or a Lens text_encoder/ folder)."
            )
        num_layers = int(d.get("num_hidden_layers", 36))
        heads = int(d.get("num_attention_heads", 64))
        hidden = int(d.get("hidden_size", 2880))
        layer_types = d.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
        quant = d.get("quantization_config") or {}
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=int(d.get("vocab_size", 201088)),
            hidden_size=hidden,
            intermediate_size=int(d.get("intermediate_size", 2880)),
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            num_local_experts=int(d.get("num_local_experts", d.get("num_experts", 128))),
            num_experts_per_tok=int(d.get("num_experts_per_tok", d.get("experts_per_token", 4))),
            sliding_window=int(d.get("sliding_window") or 128),
            layer_types=tuple(layer_types),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
            attention_bias=bool(d.get("attention_bias", True)),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            rope=_rope_from_dict(d),
            quant_method=quant.get("quant_method"),
            pad_token_id=d.get("pad_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TextEncoderConfig":
        """The config from a transformers GPT-OSS `config.json` file."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no text encoder config at {p}.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e}).") from None
        return cls.from_dict(d)

    def truncated(self, num_layers: int) -> "TextEncoderConfig":
        """The same model with only its first `num_layers` decoder layers."""
        return replace(self, num_hidden_layers=num_layers, layer_types=self.layer_types[:num_layers])


def _rope_from_dict(d: Mapping[str, Any]) -> RopeConfig:
    """Mirror transformers: `rope_parameters` (v5) or `rope_scaling` (v4 spelling, with a top-level
    `rope_theta`); when both are absent GptOssConfig's YaRN defaults apply."""
    rp = d.get("rope_parameters") or d.get("rope_scaling")
    theta = d.get("rope_theta")
    if not rp:
        rp = dict(_GPT_OSS_ROPE_DEFAULTS)
    else:
        rp = dict(rp)
        rp.setdefault("rope_type", rp.get("type", "default"))
        # transformers' yarn code defaults `truncate` to True when the key is missing.
        rp.setdefault("truncate", True)
    theta = rp.get("rope_theta", theta if theta is not None else _GPT_OSS_DEFAULT_THETA)
    factor = rp.get("factor")
    return RopeConfig(
        rope_type=str(rp["rope_type"]),
        theta=float(theta),
        factor=None if factor is None else float(factor),
        beta_fast=float(rp.get("beta_fast") or 32.0),
        beta_slow=float(rp.get("beta_slow") or 1.0),
        original_max_position_embeddings=int(
            rp.get("original_max_position_embeddings") or d.get("initial_context_length") or 4096
        ),
        truncate=bool(rp.get("truncate", True)),
        attention_factor=rp.get("attention_factor"),
        mscale=rp.get("mscale"),
        mscale_all_dim=rp.get("mscale_all_dim"),
    )


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: TextEncoderConfig) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [head_dim/2], attention_scaling), computed like transformers (float32)."""
    r, dim = config.rope, config.head_dim
    f32 = np.float32
    pos_freqs = f32(r.theta) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim))
    if r.rope_type == "default":
        return (f32(1.0) / pos_freqs).astype(f32), 1.0
    factor = r.factor if r.factor is not None else config.max_position_embeddings / r.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if r.attention_factor is not None:
        scaling = float(r.attention_factor)
    elif r.mscale and r.mscale_all_dim:
        scaling = float(mscale(factor, r.mscale) / mscale(factor, r.mscale_all_dim))
    else:
        scaling = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(r.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(r.theta)
        )

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    extrapolation = f32(1.0) / pos_freqs
    interpolation = f32(1.0) / (f32(factor) * pos_freqs)
    extrapolation_factor = f32(1.0) - ramp
    inv_freq = interpolation * (f32(1.0) - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(f32), scaling


def rope_cos_sin(config: TextEncoderConfig, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """float32 cos/sin tables [seq_len, head_dim/2], both multiplied by the attention scaling."""
    inv_freq, scaling = rope_inv_freq(config)
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(freqs) * jnp.float32(scaling), jnp.sin(freqs) * jnp.float32(scaling)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves: x [B, S, N, D], cos/sin [S, D/2]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c = cos[None, :, None, :].astype(x.dtype)
    s = sin[None, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


# ----------------------------------------------------------------------------- params


def _expert_scale_byte(fan_in: int) -> int:
    # E2M1 codes have an RMS of about 3, so this gives expert weights a std near fan_in**-0.5.
    return int(mxfp4.SCALE_BIAS - round(math.log2(3.0 * math.sqrt(fan_in))))


def init_params(config: TextEncoderConfig, key: jax.Array, dtype: Any = jnp.float32, packed: bool = False,
                lm_head: bool = False) -> Params:
    """Random parameters (normal, std 1/sqrt(fan_in); sinks N(0, 1); small biases).

    Norm weights are float32 whatever `dtype` (transformers keeps GPT-OSS norms in float32).
    `packed=True` holds the experts as MXFP4 `*_blocks`/`*_scales` (uint8, on-disk layout).
    `lm_head=True` adds the causal-LM head: `norm.weight` [hidden] and `lm_head.kernel` [hidden, vocab].
    """
    dtype = resolve_dtype(dtype)
    c = config
    L, E, h, inter = c.num_hidden_layers, c.num_local_experts, c.hidden_size, c.intermediate_size
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    keys = iter(jax.random.split(key, 32))

    def normal(shape, std):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def linear(fan_in, fan_out, bias=True):
        p = {"kernel": normal((L, fan_in, fan_out), fan_in**-0.5)}
        if bias:
            p["bias"] = normal((L, fan_out), 0.02)
        return p

    attn_bias = c.attention_bias
    if packed:
        def packed_weight(name, rows, cols):
            b_shape, s_shape = mxfp4.packed_shapes((L, E, rows, cols))
            # random 32-bit words viewed as bytes: no 4x-sized temporary for the ~10 GB of real blocks
            words = jax.random.bits(next(keys), (*b_shape[:-1], b_shape[-1] // 4), jnp.uint32)
            blocks = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(b_shape)
            s = _expert_scale_byte(cols)
            scales = (s - 1 + jax.random.bits(next(keys), s_shape, jnp.uint8) % 3).astype(jnp.uint8)
            return {f"{name}_blocks": blocks, f"{name}_scales": scales}

        experts = {
            **packed_weight("gate_up_proj", 2 * inter, h),
            "gate_up_proj_bias": normal((L, E, 2 * inter), 0.02),
            **packed_weight("down_proj", h, inter),
            "down_proj_bias": normal((L, E, h), 0.02),
        }
    else:
        experts = {
            "gate_up_proj": normal((L, E, h, 2 * inter), h**-0.5),
            "gate_up_proj_bias": normal((L, E, 2 * inter), 0.02),
            "down_proj": normal((L, E, inter, h), inter**-0.5),
            "down_proj_bias": normal((L, E, h), 0.02),
        }
    head = {}
    if lm_head:
        head = {"norm": {"weight": jnp.ones((h,), jnp.float32)},
                "lm_head": {"kernel": normal((h, c.vocab_size), h**-0.5)}}
    return {
        **head,
        "embed_tokens": {"embedding": normal((c.vocab_size, h), 1.0)},
        "layers": {
            "input_layernorm": {"weight": jnp.ones((L, h), jnp.float32)},
            "post_attention_layernorm": {"weight": jnp.ones((L, h), jnp.float32)},
            "self_attn": {
                "q_proj": linear(h, q_dim, attn_bias),
                "k_proj": linear(h, kv_dim, attn_bias),
                "v_proj": linear(h, kv_dim, attn_bias),
                "o_proj": linear(q_dim, h, attn_bias),
                "sinks": normal((L, c.num_attention_heads), 1.0),
            },
            "mlp": {"router": linear(h, E), "experts": experts},
        },
    }


# Logical axes of every parameter (trailing dims; the stacked `layers` get "layers" in front).
PARAM_AXES_TABLE: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens\.embedding", (VOCAB, EMBED)),
    (r"lm_head\.kernel", (EMBED, VOCAB)),
    (r"norm\.weight", (None,)),
    (r"self_attn\.q_proj\.kernel", (EMBED, HEADS)),
    (r"self_attn\.q_proj\.bias", (HEADS,)),
    (r"self_attn\.(k|v)_proj\.kernel", (EMBED, KV_HEADS)),
    (r"self_attn\.(k|v)_proj\.bias", (KV_HEADS,)),
    (r"self_attn\.o_proj\.kernel", (HEADS, EMBED)),
    (r"self_attn\.sinks", (HEADS,)),
    (r"mlp\.router\.kernel", (EMBED, None)),
    (r"mlp\.experts\.gate_up_proj", (EXPERTS, EMBED, MLP)),
    (r"mlp\.experts\.gate_up_proj_bias", (EXPERTS, EXPERT_MLP)),
    (r"mlp\.experts\.down_proj", (EXPERTS, MLP, EMBED)),
    (r"mlp\.experts\.down_proj_bias", (EXPERTS, None)),
    # No EMBED axis to put on fsdp: EXPERT_MLP falls back to fsdp on a mesh without tensor parallelism.
    (r"mlp\.experts\.gate_up_proj_blocks", (EXPERTS, EXPERT_MLP, None, None)),
    (r"mlp\.experts\.gate_up_proj_scales", (EXPERTS, EXPERT_MLP, None)),
    (r"mlp\.experts\.down_proj_blocks", (EXPERTS, EMBED, None, None)),
    (r"mlp\.experts\.down_proj_scales", (EXPERTS, EMBED, None)),
    (r".*", (None,)),  # biases of o_proj / router, norm weights
)


def param_axes(config: TextEncoderConfig, packed: bool = False, params: Params | None = None,
               lm_head: bool = False) -> Params:
    """Logical axis names of every parameter leaf (same tree as `init_params`, or as `params` when given)."""
    if params is None:
        params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), packed=packed, lm_head=lm_head))
    return axes_from_table(params, PARAM_AXES_TABLE, stacked=("layers",))


def is_packed(params: Params) -> bool:
    """Whether the experts are held as MXFP4 blocks/scales."""
    return "gate_up_proj_blocks" in params["layers"]["mlp"]["experts"]


def num_layers(params: Params) -> int:
    """How many decoder layers `params` holds (a load may keep only the ones it needs)."""
    return int(params["layers"]["input_layernorm"]["weight"].shape[0])


# ----------------------------------------------------------------------------- attention


def attention_masks(attention_mask: jax.Array, sliding_window: int) -> tuple[jax.Array, jax.Array]:
    """Boolean [B, S, S] (query, key) masks for full and sliding-window causal attention.

    Key j is visible to query i iff j <= i (and i - window < j for sliding layers) and key j is
    not padding. Padded queries are computed like any other row, as transformers does.
    """
    s = attention_mask.shape[1]
    i = jnp.arange(s)[:, None]
    j = jnp.arange(s)[None, :]
    full = (j <= i)[None] & attention_mask[:, None, :].astype(bool)
    return full, full & (j > i - sliding_window)[None]


def attention(p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
              config: TextEncoderConfig, sharding: Constrain | None = None, *, window: int | None = None,
              impl: str | None = None) -> jax.Array:
    """GQA self-attention with per-head sink logits; x [B, S, hidden].

    mask: either [B, S] bool key padding, with causal attention and the static sliding `window`
    (None: full) run by lens_jax.models.attention (`impl`, None: the backend default), or an
    explicit [B, S, S] (query, key) bool mask, run by the dense reference formula.
    """
    b, s, _ = x.shape
    n_kv, groups, d = config.num_key_value_heads, config.num_key_value_groups, config.head_dim
    heads = (BATCH, None, ACT_HEADS, None)
    q = constrain(dense(x, p["q_proj"]).reshape(b, s, n_kv * groups, d), heads, sharding)
    k = constrain(dense(x, p["k_proj"]).reshape(b, s, n_kv, d), heads, sharding)
    v = constrain(dense(x, p["v_proj"]).reshape(b, s, n_kv, d), heads, sharding)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # A row with no visible key puts all its mass on the sink (zero output), as transformers' eager
    # path does with its finfo(float32).min mask.
    sinks = p["sinks"].astype(jnp.float32)
    if mask.ndim == 3:
        out = attn_lib.reference(q, k, v, mask=mask, sinks=sinks)
    else:
        out = attn_lib.attention(q, k, v, key_mask=mask, causal=True, window=window, sinks=sinks, impl=impl,
                                 sharding=sharding)
    return dense(out.reshape(b, s, n_kv * groups * d).astype(x.dtype), p["o_proj"])


# ----------------------------------------------------------------------------- MoE


def _glu(gate_up: jax.Array, limit: float, alpha: float) -> jax.Array:
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def _expert_weight(experts: Params, name: str, index: tuple, dtype, fast: bool = False) -> tuple[jax.Array, bool]:
    """One expert matrix (or a stack) and whether it is in the stored [..., out, in] layout.

    Float experts come as [..., in, out] (transformers' layout). MXFP4 ones are decoded in the layout
    they are stored in, [..., out, in], and the matmuls contract that directly (`_expert_dot`): no
    transposed copy of the weights, and the decode stays an elementwise producer of the dot.
    `fast`: `mxfp4.decode`'s direct formula, valid where `_fast_decode_ok` holds.
    """
    if name in experts:
        return experts[name][index].astype(dtype), False
    w = mxfp4.decode(experts[f"{name}_blocks"][index], experts[f"{name}_scales"][index], dtype, fast=fast)
    return w, True


def _expert_dot(x: jax.Array, w: jax.Array, stored: bool) -> jax.Array:
    """x [n, in] times one expert weight from `_expert_weight` -> [n, out]."""
    return jax.lax.dot_general(x, w, (((1,), (1 if stored else 0,)), ((), ())))


def _fast_decode_ok(experts: Params, index: tuple, dtype) -> jax.Array | None:
    """Scalar bool: every MXFP4 scale of experts[index] is in the direct decode's range (as in real
    checkpoints); None for float experts."""
    if "gate_up_proj_blocks" not in experts:
        return None
    return (mxfp4.fast_decodable(experts["gate_up_proj_scales"][index], dtype)
            & mxfp4.fast_decodable(experts["down_proj_scales"][index], dtype))


def _with_decode(experts: Params, index: tuple, dtype, fn):
    """fn(fast) for float experts, else a `lax.cond` between fn(True) (`_fast_decode_ok`) and the
    exact general decode fn(False); each branch decodes next to its matmuls."""
    pred = _fast_decode_ok(experts, index, dtype)
    if pred is None:
        return fn(False)
    return jax.lax.cond(pred, lambda: fn(True), lambda: fn(False))


def route(x: jax.Array, router: Params, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k experts per token and their softmax weights over the k chosen logits (float32)."""
    logits = jnp.matmul(x, router["kernel"].astype(x.dtype), preferred_element_type=jnp.float32)
    logits = logits + router["bias"].astype(jnp.float32)
    top_logits, top_idx = jax.lax.top_k(logits, top_k)
    return jax.nn.softmax(top_logits, axis=-1), top_idx


def default_chunk(num_rows: int, num_experts: int) -> int:
    """Rows per expert chunk for the grouped dispatch: about the mean rows per expert."""
    mean = max(1, -(-num_rows // num_experts))
    return int(min(256, max(8, 1 << (mean - 1).bit_length())))


def moe(x: jax.Array, experts: Params, layer: jax.Array, router_weights: jax.Array, router_idx: jax.Array,
        config: TextEncoderConfig, impl: str = "auto", chunk: int | None = None) -> jax.Array:
    """Mixture of experts over tokens x [T, hidden] for decoder layer `layer`.

    `experts` holds all layers ([L, E, ...]); only layer `layer` is read. Returns [T, hidden].
    impl "auto": `MOE_DISPATCH`'s choice for T tokens on the platform the program is lowered for
    (so a program compiled ahead of time for a TPU on a CPU host holds the TPU entry).
    """
    if impl == "auto":
        t = x.shape[0]
        choice = {p: resolve_moe_impl(t, p) for p in ("cpu", "cuda", "rocm", "tpu")}
        if len(set(choice.values())) == 1:
            impl = choice["cpu"]
        else:
            def branch(i):
                return lambda x, w, idx: moe(x, experts, layer, w, idx, config, i, chunk)

            return jax.lax.platform_dependent(x, router_weights, router_idx,
                                              **{p: branch(i) for p, i in choice.items()},
                                              default=branch(resolve_moe_impl(t, "cpu")))
    t, h = x.shape
    k = router_idx.shape[-1]
    n_exp = config.num_local_experts
    act = partial(_glu, limit=config.swiglu_limit, alpha=config.swiglu_alpha)
    dtype = x.dtype
    gu_bias = experts["gate_up_proj_bias"][layer].astype(dtype)  # [E, 2I]
    d_bias = experts["down_proj_bias"][layer].astype(dtype)  # [E, h]

    if impl == "dense":
        def dense_experts(fast):
            w_gu, stored = _expert_weight(experts, "gate_up_proj", (layer,), dtype, fast)
            w_d, _ = _expert_weight(experts, "down_proj", (layer,), dtype, fast)
            mid = act(jnp.einsum("th,efh->etf" if stored else "th,ehf->etf", x, w_gu) + gu_bias[:, None])
            return jnp.einsum("etf,ehf->eth" if stored else "etf,efh->eth", mid, w_d) + d_bias[:, None]

        y = _with_decode(experts, (layer,), dtype, dense_experts)
        combine = jnp.zeros((t, n_exp), jnp.float32).at[jnp.arange(t)[:, None], router_idx].set(router_weights)
        return jnp.einsum("eth,te->th", y.astype(jnp.float32), combine).astype(dtype)

    flat_e = router_idx.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)  # assignment ids sorted by expert
    sorted_e = flat_e[order]
    sizes = jnp.bincount(flat_e, length=n_exp)
    xs = x[order // k]  # [T*k, h]

    def ragged(xs, experts, gu_bias, d_bias, sizes, sorted_e, layer):
        def ragged_experts(fast):
            w_gu, stored = _expert_weight(experts, "gate_up_proj", (layer,), dtype, fast)
            w_d, _ = _expert_weight(experts, "down_proj", (layer,), dtype, fast)
            dims = jax.lax.RaggedDotDimensionNumbers((((1,), (2 if stored else 1,)), ((), ())), [0], [0])
            mid = act(jax.lax.ragged_dot_general(xs, w_gu, sizes, dims) + gu_bias[sorted_e])
            return jax.lax.ragged_dot_general(mid, w_d, sizes, dims) + d_bias[sorted_e]

        return _with_decode(experts, (layer,), dtype, ragged_experts)

    args = (xs, experts, gu_bias, d_bias, sizes, sorted_e, layer)
    chunk = chunk or default_chunk(t * k, n_exp)
    if impl == "ragged":
        ys = ragged(*args)
    elif impl == "gmm" and "gate_up_proj_blocks" in experts:
        if jax.default_backend() == "tpu":
            raise ValueError("moe_impl='gmm' is a GPU kernel (Pallas on Triton) and does not run on TPU; use "
                             "moe_impl='auto' (or 'grouped' / 'ragged') there.")
        ys = _with_gradient_of(ragged, lambda xs, experts, gu_bias, d_bias, sizes, sorted_e, layer: _gmm_experts(
            xs, sizes, sorted_e, experts, layer, gu_bias, d_bias, act), *args)
    elif impl in ("grouped", "gmm") or (impl == "tiled" and "gate_up_proj_blocks" not in experts):  # float: nothing to tile
        ys = _with_gradient_of(ragged, lambda xs, experts, gu_bias, d_bias, sizes, sorted_e, layer: _grouped_experts(
            xs, sizes, experts, layer, gu_bias, d_bias, act, chunk), *args)
    elif impl == "tiled":
        ys = _with_gradient_of(ragged, lambda xs, experts, gu_bias, d_bias, sizes, sorted_e, layer: _tiled_experts(
            xs, sizes, experts, layer, gu_bias, d_bias, act, chunk), *args)
    else:
        raise ValueError(f"unknown moe_impl {impl!r}; choose one of {MOE_IMPLS}.")

    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y = ys[inverse].reshape(t, k, h).astype(jnp.float32)
    return jnp.einsum("tkh,tk->th", y, router_weights).astype(dtype)


def _with_gradient_of(reference, forward, *args):
    """forward(*args), reverse-differentiated as reference(*args): the same function computed another way.

    The grouped and tiled dispatches loop with trip counts that depend on the routing, which JAX
    cannot reverse-differentiate; their gradient is the ragged dispatch's (the same sums in another
    float32 order). Integer arguments (codes, sizes, indices) get zero (float0) cotangents."""
    f = jax.custom_vjp(forward)
    f.defvjp(lambda *a: (forward(*a), a), lambda a, g: jax.vjp(reference, *a)[1](g))
    return f(*args)


def _grouped_experts(xs, sizes, experts, layer, gu_bias, d_bias, act, chunk: int) -> jax.Array:
    """Rows `xs` [N, h] sorted by expert (sizes [E]) -> expert outputs [N, h], chunk by chunk."""
    n, h = xs.shape
    dtype = xs.dtype
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    # `chunk` spare rows at the end so that a chunk never reads or writes past the buffer.
    xs = jnp.concatenate([xs, jnp.zeros((chunk, h), dtype)])

    def run_expert(fast, out, e):
        w_gu, stored = _expert_weight(experts, "gate_up_proj", (layer, e), dtype, fast)
        w_d, _ = _expert_weight(experts, "down_proj", (layer, e), dtype, fast)

        def run_chunk(j, out):
            # The last chunk of expert e spills into rows of later experts (or the spare rows);
            # experts run in ascending order, so those rows are rewritten afterwards: no masking.
            start = starts[e] + j * chunk
            x_c = jax.lax.dynamic_slice_in_dim(xs, start, chunk)
            y = _expert_dot(act(_expert_dot(x_c, w_gu, stored) + gu_bias[e]), w_d, stored) + d_bias[e]
            return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), start, axis=0)

        return jax.lax.fori_loop(0, (sizes[e] + chunk - 1) // chunk, run_chunk, out)

    def skip(out, e):
        return out

    def body(out, e):
        # 0: no rows for this expert; 1: decode exactly (float experts, or MXFP4 scales outside the
        # direct decode's range); 2: the direct decode
        branch = jnp.where(sizes[e] > 0, 1, 0)
        fast = _fast_decode_ok(experts, (layer, e), dtype)
        if fast is not None:
            branch = branch * (1 + fast.astype(jnp.int32))
        return jax.lax.switch(branch, (skip, partial(run_expert, False), partial(run_expert, True)), out, e), None

    out, _ = jax.lax.scan(body, jnp.zeros((n + chunk, h), dtype), jnp.arange(sizes.shape[0]))
    return out[:n]


def _gmm_experts(xs, sizes, sorted_e, experts, layer, gu_bias, d_bias, act) -> jax.Array:
    """Rows `xs` [N, h] sorted by expert (sizes [E], expert of each row `sorted_e`) -> expert outputs [N, h]
    through `mxfp4_gemm.gmm`, which decodes the packed experts inside the matmul kernel. The kernel
    addresses layer `layer` of the flattened [L * E] expert stack itself (no per-layer copy of it)."""
    n_exp = sizes.shape[0]

    def stack(name):
        b, s = experts[f"{name}_blocks"], experts[f"{name}_scales"]
        return b.reshape(-1, *b.shape[2:]), s.reshape(-1, *s.shape[2:])

    offset = jnp.asarray(layer, jnp.int32) * n_exp

    def run(fast):
        mid = act(mxfp4_gemm.gmm(xs, *stack("gate_up_proj"), sizes, offset, fast=fast) + gu_bias[sorted_e])
        return mxfp4_gemm.gmm(mid, *stack("down_proj"), sizes, offset, fast=fast) + d_bias[sorted_e]

    return _with_decode(experts, (layer,), xs.dtype, run)


# Decoded bytes of one weight tile in the "tiled" dispatch. One MoE layer at the real width, 256 tokens,
# CPU time (docs/benchmarks.md, "MXFP4 experts on CPU"): 0.25 MiB tiles 2.3-2.6 s, 1 MiB 1.5 s, 4-8 MiB
# 1.0-1.1 s, 32 MiB 1.1-1.2 s, a whole expert (66 MiB) 1.2-1.3 s: small tiles pay per-dot overhead,
# whole experts leave the cache.
TILE_BYTES = 4 << 20


def tile_rows(rows: int, cols: int, itemsize: int, budget: int | None = None) -> int:
    """Rows per decoded tile of a [rows, cols] weight: the largest divisor of `rows` whose tile fits
    `budget` bytes (default `TILE_BYTES`; at least 1 row)."""
    budget = TILE_BYTES if budget is None else budget
    fits = [r for r in range(1, rows + 1) if rows % r == 0 and r * cols * itemsize <= budget]
    return fits[-1] if fits else 1


def _tiled_experts(xs, sizes, experts, layer, gu_bias, d_bias, act, chunk: int) -> jax.Array:
    """`_grouped_experts` for MXFP4 experts, decoding each expert matrix tile by tile (`tile_rows` output
    rows, about `TILE_BYTES` of floats) right before the matmuls that read it, so the decoded weights
    stay in the core's cache and no whole expert is ever materialised in float.

    Rows `xs` [N, h] sorted by expert (sizes [E]) -> expert outputs [N, h]. Per expert: each gate_up
    tile times every row chunk of the expert fills its rows of a pre-activation buffer; the activation
    runs chunk by chunk; then the down tiles likewise. Every product contracts the whole input
    dimension, like the other dispatches (only float32 summation order inside a dot may differ).

    Activations are kept transposed ([features, rows]) so that every dot is tile [r, in] @ rows [in, c]
    in the layouts XLA:CPU's dot reads without repacking. Experts without rows run no tile; the fast /
    general decode choice is a `lax.cond` on the tile alone (a switch carrying the row buffers made
    XLA copy all of them per expert).
    """
    n, h = xs.shape
    dtype = xs.dtype
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    rows = n + chunk  # spare columns: a chunk never runs past the buffers
    xt = jnp.concatenate([xs, jnp.zeros((chunk, h), dtype)]).T  # [h, rows]
    two_i = experts["gate_up_proj_blocks"].shape[2]
    itemsize = jnp.dtype(dtype).itemsize

    def matmul_tiles(name, e, rows_in, out, bias, n_chunks):
        """out[:, expert rows] = W_e @ rows_in[:, expert rows] + bias, W_e [out, in] decoded tile by tile."""
        blocks, scales = experts[f"{name}_blocks"], experts[f"{name}_scales"]
        n_out, groups = blocks.shape[2], blocks.shape[3]
        r = tile_rows(n_out, groups * mxfp4.BLOCK, itemsize)
        fast = _fast_decode_ok(experts, (layer, e), dtype)

        def tile(t, out):
            b = jax.lax.dynamic_slice(blocks, (layer, e, t * r, 0, 0), (1, 1, r, groups, blocks.shape[4]))[0, 0]
            sc = jax.lax.dynamic_slice(scales, (layer, e, t * r, 0), (1, 1, r, groups))[0, 0]
            one = {f"{name}_blocks": b[None, None], f"{name}_scales": sc[None, None]}
            stored = _expert_weight(one, name, (0, 0), dtype, True)[1]  # static: which operand axis is `in`
            w = jax.lax.cond(fast, lambda: _expert_weight(one, name, (0, 0), dtype, True)[0],
                             lambda: _expert_weight(one, name, (0, 0), dtype, False)[0])
            b_t = jax.lax.dynamic_slice_in_dim(bias, t * r, r)[:, None]

            def run_chunk(j, out):
                # as in `_grouped_experts`: the last chunk spills into later experts' columns, rewritten later
                start = starts[e] + j * chunk
                x_c = jax.lax.dynamic_slice_in_dim(rows_in, start, chunk, axis=1)
                y = jax.lax.dot_general(w, x_c, (((1 if stored else 0,), (0,)), ((), ()))) + b_t
                return jax.lax.dynamic_update_slice(out, y.astype(out.dtype), (t * r, start))

            return jax.lax.fori_loop(0, n_chunks, run_chunk, out)

        return jax.lax.fori_loop(0, jnp.where(n_chunks > 0, n_out // r, 0), tile, out)

    def expert(e, carry):
        out, mid, hidden = carry
        n_chunks = (sizes[e] + chunk - 1) // chunk
        mid = matmul_tiles("gate_up_proj", e, xt, mid, gu_bias[e], n_chunks)

        def act_chunk(j, hidden):
            start = starts[e] + j * chunk
            pre = jax.lax.dynamic_slice_in_dim(mid, start, chunk, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(hidden, act(pre.T).T, start, axis=1)

        hidden = jax.lax.fori_loop(0, n_chunks, act_chunk, hidden)
        return matmul_tiles("down_proj", e, hidden, out, d_bias[e], n_chunks), mid, hidden

    init = (jnp.zeros((h, rows), dtype), jnp.zeros((two_i, rows), dtype), jnp.zeros((two_i // 2, rows), dtype))
    out, _, _ = jax.lax.fori_loop(0, sizes.shape[0], expert, init)
    return out[:, :n].T


# ----------------------------------------------------------------------------- forward


def check_selected_layers(selected_layers: Sequence[int], available: int, total: int | None = None) -> tuple[int, ...]:
    """Validate selected (0-based) decoder layers; returns them as a tuple of ints."""
    total = available if total is None else total
    try:
        sel = tuple(int(i) for i in selected_layers)
    except TypeError:
        raise ValueError(f"selected_layers must be a sequence of ints, got {selected_layers!r}.") from None
    if not sel:
        raise ValueError("selected_layers is empty; select at least one decoder layer.")
    bad = [i for i in sel if not 0 <= i < total]
    if bad:
        raise ValueError(
            f"selected_layers {list(sel)} has out-of-range layer(s) {bad}: the model has {total} decoder layers "
            f"(valid indices 0..{total - 1}, 0-based)."
        )
    if max(sel) >= available:
        raise ValueError(
            f"selected layer {max(sel)} needs {max(sel) + 1} decoder layers but these parameters hold only "
            f"{available}; load with selected_layers covering it."
        )
    return sel


@partial(jax.jit, static_argnames=("config", "selected_layers", "moe_impl", "moe_chunk", "sharding", "stream",
                                   "attention_impl"))
def apply(params: Params, config: TextEncoderConfig, input_ids: jax.Array, attention_mask: jax.Array,
          selected_layers: tuple[int, ...], moe_impl: str = "auto", moe_chunk: int | None = None,
          sharding: Constrain | None = None, stream: LayerStream | None = None,
          attention_impl: str | None = None) -> list[jax.Array]:
    """Hidden states after each selected decoder layer (0-based, no final norm).

    input_ids [B, S] int, attention_mask [B, S] (1/True = token, 0 = right padding). Runs only
    layers 0..max(selected_layers). Returns one [B, S, hidden] array per selected layer, in order,
    in the dtype of the embedding table. `attention_impl`: lens_jax.models.attention's kernel
    (None: the backend default).
    """
    sel = check_selected_layers(selected_layers, num_layers(params), config.num_hidden_layers)
    n_run = max(sel) + 1
    embedding = params["embed_tokens"]["embedding"]
    dtype = embedding.dtype
    b, s = input_ids.shape
    hidden = jnp.take(embedding, input_ids.astype(jnp.int32), axis=0)
    cos, sin = rope_cos_sin(config, s)
    key_mask = attention_mask.astype(bool)
    is_sliding = jnp.asarray([t == SLIDING for t in config.layer_types[:n_run]])
    layers = params["layers"]
    dense_layers = {k: v for k, v in layers.items() if k != "mlp"}
    dense_layers["router"] = layers["mlp"]["router"]
    experts = layers["mlp"]["experts"]
    eps = config.rms_norm_eps

    def layer(h, i):
        p = jax.tree.map(lambda a: a[i], dense_layers)
        x = rms_norm(h, p["input_layernorm"]["weight"], eps)

        def attend(window):  # the window is static for the kernels, so each layer type is one branch
            return lambda: attention(p["self_attn"], x, cos, sin, key_mask, config, sharding, window=window,
                                     impl=attention_impl)

        h = h + jax.lax.cond(is_sliding[i], attend(config.sliding_window), attend(None))
        x = rms_norm(h, p["post_attention_layernorm"]["weight"], eps).reshape(b * s, -1)
        weights, idx = route(x, p["router"], config.num_experts_per_tok)
        h = h + moe(x, experts, i, weights, idx, config, moe_impl, moe_chunk).reshape(b, s, -1)
        h = constrain(h, (BATCH, None, None), sharding)
        return h, h

    if stream is None:
        _, per_layer = jax.lax.scan(layer, hidden.astype(dtype), jnp.arange(n_run))
        return [per_layer[i] for i in sel]

    # Streamed from host memory: each layer's tree (experts included) comes to the device one ahead.
    stacked = {**jax.tree.map(lambda a: a[:n_run], dense_layers), "experts": jax.tree.map(lambda a: a[:n_run], experts)}

    def streamed_layer(carry, p):
        h, i = carry
        x = rms_norm(h, p["input_layernorm"]["weight"], eps)

        def attend(window):
            return lambda: attention(p["self_attn"], x, cos, sin, key_mask, config, sharding, window=window,
                                     impl=attention_impl)

        h = h + jax.lax.cond(is_sliding[i], attend(config.sliding_window), attend(None))
        x = rms_norm(h, p["post_attention_layernorm"]["weight"], eps).reshape(b * s, -1)
        weights, idx = route(x, p["router"], config.num_experts_per_tok)
        one = jax.tree.map(lambda a: a[None], p["experts"])
        h = h + moe(x, one, 0, weights, idx, config, moe_impl, moe_chunk).reshape(b, s, -1)
        h = constrain(h, (BATCH, None, None), sharding)
        return (h, i + 1), h

    _, per_layer = scan_layers(streamed_layer, (hidden.astype(dtype), jnp.int32(0)), stacked, stream)
    return [per_layer[i] for i in sel]


# ----------------------------------------------------------------------------- loading


@dataclass
class TextEncoder:
    """A loaded GPT-OSS feature extractor: `te(input_ids, attention_mask)` -> list of [B, S, hidden].

    `config` is the checkpoint's full config; `params` may hold only the first
    max(selected_layers) + 1 decoder layers (nothing later is ever computed).
    """

    config: TextEncoderConfig
    params: Params
    selected_layers: tuple[int, ...] = DEFAULT_SELECTED_LAYERS
    moe_impl: str = "auto"  # MOE_DISPATCH's choice per backend and token count; or a fixed MOE_FIXED_IMPLS entry
    moe_chunk: int | None = None
    sharding: Any = None  # static activation-sharding rules (lens_jax.parallel.BoundRules) or None
    stream: Any = None  # layers streamed from host memory (lens_jax.parallel.offload) or None

    def __post_init__(self):
        self.selected_layers = check_selected_layers(
            self.selected_layers, num_layers(self.params), self.config.num_hidden_layers
        )
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"unknown moe_impl {self.moe_impl!r}; choose one of {MOE_IMPLS}.")

    @property
    def keep_mxfp4(self) -> bool:
        """True when the experts stay MXFP4-packed on the device."""
        return is_packed(self.params)

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype: that of the embedding table."""
        return self.params["embed_tokens"]["embedding"].dtype

    def __call__(self, input_ids: Any, attention_mask: Any = None) -> list[jax.Array]:
        """input_ids [B, S] integer token ids, attention_mask [B, S] (1 = token, 0 = right padding; default
        all ones) -> one [B, S, hidden] array per selected layer."""
        if not isinstance(input_ids, jax.core.Tracer):  # concrete ids: checked before any work
            ids = np.asarray(input_ids)
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}; tokenize the prompt first.")
            vocab = self.config.vocab_size
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(f"input_ids must lie in [0, {vocab}) (the vocabulary), got values in "
                                 f"[{ids.min()}, {ids.max()}]; use this checkpoint's tokenizer.")
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}.")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}."
            )
        return apply(self.params, self.config, input_ids.astype(jnp.int32), attention_mask.astype(bool),
                     self.selected_layers, self.moe_impl, self.moe_chunk, self.sharding, self.stream)

