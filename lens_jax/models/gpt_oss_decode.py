"""GPT-OSS as a causal language model: final norm + LM head, and a jitted KV-cache decoder.

The decoder layers are those of `lens_jax.models.text_encoder` (same attention with sinks, YaRN
RoPE, sliding/full layers, MoE with MXFP4 experts kept packed). On top:

* `logits(params, config, hidden)`: `model.norm` (RMSNorm) then the untied `lm_head`.
* `forward_logits(...)`: one forward over whole sequences without a cache (the reference the
  cached decoder is tested against).
* `generate(...)`: prefill of the prompts, then token-by-token decoding, all in ONE jitted
  program (`lax.while_loop`) that stops when every row has emitted a stop token or after
  `max_new_tokens`.

KV cache: one full-length cache [L, B, S + max_new, kv_heads, head_dim] per k and v. A
sliding-window layer masks keys by POSITION (key visible iff q_pos - window < k_pos <= q_pos
and the key slot holds a token), so a full cache serves both layer kinds and left or right
padding alike: a row's positions are `cumsum(attention_mask) - 1` over its prompt (like
transformers' `generate`) and continue from its prompt length; generated tokens of all rows
share the cache slots S, S+1, ...

Sampling per step: greedy when `temperature` is 0, otherwise softmax(logits / temperature)
restricted to the smallest top-p nucleus (the top token always kept), drawn with
`jax.random.categorical` from `fold_in(key(seed), step)`. Temperature and top-p are traced
arguments (no recompilation per value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from .axes import ACT_HEADS, BATCH, Constrain, constrain
from .nn import dense, rms_norm
from .text_encoder import SLIDING, Params, TextEncoder, TextEncoderConfig, moe, num_layers, rope_inv_freq, route

__all__ = ["CausalLM", "has_lm_head", "logits", "forward_logits", "generate", "prefill", "sample_next"]


def has_lm_head(params: Params) -> bool:
    """Whether `params` hold the final norm and the LM head."""
    return "lm_head" in params and "norm" in params


def logits(params: Params, config: TextEncoderConfig, hidden: jax.Array) -> jax.Array:
    """Final RMSNorm + untied LM head: hidden [..., hidden] -> float32 logits [..., vocab]."""
    x = rms_norm(hidden, params["norm"]["weight"], config.rms_norm_eps)
    kernel = params["lm_head"]["kernel"]
    return jnp.matmul(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- layers with positions


def _rope(config: TextEncoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, S, D/2] (times the YaRN attention scaling) for integer positions [B, S]."""
    inv_freq, scaling = rope_inv_freq(config)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(freqs) * jnp.float32(scaling), jnp.sin(freqs) * jnp.float32(scaling)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves: x [B, S, N, D], cos/sin [B, S, D/2]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _qkv(p: Params, x: jax.Array, cos, sin, config: TextEncoderConfig, sharding):
    b, s, _ = x.shape
    n_kv, d = config.num_key_value_heads, config.head_dim
    heads = (BATCH, None, ACT_HEADS, None)
    q = constrain(dense(x, p["q_proj"]).reshape(b, s, config.num_attention_heads, d), heads, sharding)
    k = constrain(dense(x, p["k_proj"]).reshape(b, s, n_kv, d), heads, sharding)
    v = constrain(dense(x, p["v_proj"]).reshape(b, s, n_kv, d), heads, sharding)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


def _attend(p: Params, q, k, v, mask, config: TextEncoderConfig, dtype) -> jax.Array:
    """q [B, Sq, H, D], k/v [B, Sk, kv, D], mask [B, Sq, Sk] bool -> o_proj output [B, Sq, hidden].

    The same arithmetic as `text_encoder.attention` (finfo.min masking, sink column in the softmax).
    """
    b, sq = q.shape[:2]
    n_kv, groups, d = config.num_key_value_heads, config.num_key_value_groups, config.head_dim
    q = q.reshape(b, sq, n_kv, groups, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * jnp.float32(d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    sinks = p["sinks"].astype(jnp.float32).reshape(1, n_kv, groups, 1, 1)
    m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
    e = jnp.exp(scores - m)
    probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - m))
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).reshape(b, sq, n_kv * groups * d)
    return dense(out.astype(dtype), p["o_proj"])


def _visible(q_pos, k_pos, k_valid, window: int, sliding) -> jax.Array:
    """[B, Sq, Sk] mask: causal by position, keys that hold tokens, and the window on sliding layers."""
    causal = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    in_window = k_pos[:, None, :] > q_pos[:, :, None] - window
    return causal & (in_window | ~sliding)


def _split_layers(params: Params):
    layers = params["layers"]
    dense_layers = {k: v for k, v in layers.items() if k != "mlp"}
    dense_layers["router"] = layers["mlp"]["router"]
    return dense_layers, layers["mlp"]["experts"]


def _mlp(p, x, experts, i, config, moe_impl, moe_chunk):
    b, s, _ = x.shape
    x = x.reshape(b * s, -1)
    weights, idx = route(x, p["router"], config.num_experts_per_tok)
    return moe(x, experts, i, weights, idx, config, moe_impl, moe_chunk).reshape(b, s, -1)


def _run_layers(params: Params, config: TextEncoderConfig, hidden, positions, attend_kv, moe_impl, moe_chunk,
                sharding):
    """Decoder layers under `lax.scan`. `attend_kv(i, k, v, sliding)` -> (keys, values, mask) for layer i
    given this chunk's new k/v. Returns (last hidden [B, S, hidden], new k [L, B, S, kv, D], new v)."""
    n = num_layers(params)
    if n != config.num_hidden_layers:
        raise ValueError(
            f"decoding needs all {config.num_hidden_layers} decoder layers; these parameters hold {n}. Load the "
            "text encoder with causal_lm=True (lens_jax.text_encoder.load(path, causal_lm=True))."
        )
    dense_layers, experts = _split_layers(params)
    is_sliding = jnp.asarray([t == SLIDING for t in config.layer_types])
    cos, sin = _rope(config, positions)
    eps, dtype = config.rms_norm_eps, hidden.dtype

    def layer(h, i):
        p = jax.tree.map(lambda a: a[i], dense_layers)
        x = rms_norm(h, p["input_layernorm"]["weight"], eps)
        q, k, v = _qkv(p["self_attn"], x, cos, sin, config, sharding)
        keys, values, mask = attend_kv(i, k, v, is_sliding[i])
        h = h + _attend(p["self_attn"], q, keys, values, mask, config, dtype)
        x = rms_norm(h, p["post_attention_layernorm"]["weight"], eps)
        h = h + _mlp(p, x, experts, i, config, moe_impl, moe_chunk)
        return constrain(h, (BATCH, None, None), sharding), (k, v)

    h, (ks, vs) = jax.lax.scan(layer, hidden, jnp.arange(n))
    return h, ks, vs


def _embed(params: Params, ids: jax.Array) -> jax.Array:
    embedding = params["embed_tokens"]["embedding"]
    return jnp.take(embedding, ids.astype(jnp.int32), axis=0).astype(embedding.dtype)


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions of the prompt tokens [B, S]: cumsum(mask) - 1, 0 on leading pads (as transformers)."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


@partial(jax.jit, static_argnames=("config", "moe_impl", "moe_chunk", "sharding"))
def forward_logits(params: Params, config: TextEncoderConfig, input_ids: jax.Array, attention_mask: jax.Array,
                   moe_impl: str = "auto", moe_chunk: int | None = None,
                   sharding: Constrain | None = None) -> jax.Array:
    """Logits [B, S, vocab] (float32) of a full forward without a cache (left or right padding)."""
    valid = attention_mask.astype(bool)
    pos = prompt_positions(valid)

    def attend_kv(i, k, v, sliding):
        return k, v, _visible(pos, pos, valid, config.sliding_window, sliding)

    h, _, _ = _run_layers(params, config, _embed(params, input_ids), pos, attend_kv, moe_impl, moe_chunk, sharding)
    return logits(params, config, h)


# ----------------------------------------------------------------------------- sampling


def sample_next(step_logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]: argmax when temperature <= 0, else top-p sampling."""
    greedy = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        scaled = step_logits / jnp.maximum(temperature, 1e-6)

        def nucleus(x):
            order = jnp.argsort(-x, axis=-1)
            sorted_x = jnp.take_along_axis(x, order, axis=-1)
            probs = jax.nn.softmax(sorted_x, axis=-1)
            # keep a token when the mass strictly before it is below top_p (the top token always stays)
            keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
            keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
            return jnp.where(keep, x, -jnp.inf)

        filtered = jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, scaled)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, lambda _: greedy, None)


# ----------------------------------------------------------------------------- decoding


def prefill(params: Params, config: TextEncoderConfig, input_ids, attention_mask, cache_len: int,
            moe_impl: str = "auto", moe_chunk: int | None = None, sharding: Constrain | None = None):
    """Run the prompts [B, S] once. Returns (logits of each row's last prompt token [B, V],
    k/v caches [L, B, cache_len, kv, D] with slots 0..S-1 filled, slot positions [B, cache_len],
    slot validity [B, cache_len], prompt lengths [B])."""
    b, s = input_ids.shape
    valid = attention_mask.astype(bool)
    pos = prompt_positions(valid)

    def attend_kv(i, k, v, sliding):
        return k, v, _visible(pos, pos, valid, config.sliding_window, sliding)

    h, ks, vs = _run_layers(params, config, _embed(params, input_ids), pos, attend_kv, moe_impl, moe_chunk, sharding)
    last = s - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # last prompt token of each row (either padding side)
    first_logits = logits(params, config, h[jnp.arange(b), last])
    extra = cache_len - s
    pad = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
    k_cache, v_cache = jnp.pad(ks, pad), jnp.pad(vs, pad)
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    slot_pos = jnp.concatenate([pos, jnp.zeros((b, extra), jnp.int32)], axis=1)
    slot_valid = jnp.concatenate([valid, jnp.zeros((b, extra), bool)], axis=1)
    return first_logits, k_cache, v_cache, slot_pos, slot_valid, lengths


def _decode_step(params, config, token, slot, position, k_cache, v_cache, slot_pos, slot_valid, moe_impl, moe_chunk,
                 sharding):
    """One token per row at cache slot `slot` (position [B]) -> (logits [B, V], updated caches/slots)."""
    b = token.shape[0]
    slot_pos = jax.lax.dynamic_update_slice_in_dim(slot_pos, position[:, None], slot, axis=1)
    slot_valid = jax.lax.dynamic_update_slice_in_dim(slot_valid, jnp.ones((b, 1), bool), slot, axis=1)
    q_pos = position[:, None]

    def attend_kv(i, k, v, sliding):
        keys = jax.lax.dynamic_update_slice_in_dim(k_cache[i], k, slot, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(v_cache[i], v, slot, axis=1)
        return keys, values, _visible(q_pos, slot_pos, slot_valid, config.sliding_window, sliding)

    h, ks, vs = _run_layers(params, config, _embed(params, token[:, None]), q_pos, attend_kv, moe_impl, moe_chunk,
                            sharding)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, ks, slot, axis=2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, vs, slot, axis=2)
    return logits(params, config, h[:, 0]), k_cache, v_cache, slot_pos, slot_valid


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "return_logits", "moe_impl", "moe_chunk", "sharding"))
def generate(params: Params, config: TextEncoderConfig, input_ids: jax.Array, attention_mask: jax.Array,
             stop_tokens: jax.Array, pad_token: jax.Array, temperature: jax.Array, top_p: jax.Array, seed: jax.Array,
             max_new_tokens: int, return_logits: bool = False, moe_impl: str = "auto",
             moe_chunk: int | None = None, sharding: Constrain | None = None):
    """Prefill + decode loop in one program.

    input_ids/attention_mask [B, S] (left or right padding); stop_tokens [n] int32 (-1 = unused slot);
    pad_token, temperature, top_p, seed scalars. Returns (tokens [B, max_new_tokens] int32: each
    row's new tokens up to and including its stop token, then `pad_token`; steps run (int32);
    logits [B, max_new_tokens, V] float32 of every step when `return_logits`, else None).
    """
    b, s = input_ids.shape
    cache_len = s + max_new_tokens
    first, k_cache, v_cache, slot_pos, slot_valid, lengths = prefill(
        params, config, input_ids, attention_mask, cache_len, moe_impl, moe_chunk, sharding)
    key = jax.random.key(seed)
    vocab = first.shape[-1]

    def choose(step_logits, t, done):
        tok = sample_next(step_logits, jax.random.fold_in(key, t), temperature, top_p)
        tok = jnp.where(done, pad_token, tok)
        return tok, done | jnp.any(tok[:, None] == stop_tokens[None, :], axis=1)

    tokens = jnp.full((b, max_new_tokens), pad_token, jnp.int32)
    all_logits = jnp.zeros((b, max_new_tokens, vocab), jnp.float32) if return_logits else None
    tok, done = choose(first, 0, jnp.zeros((b,), bool))
    tokens = tokens.at[:, 0].set(tok)
    if return_logits:
        all_logits = all_logits.at[:, 0].set(first)

    def cond(state):
        t, _, done, *_ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, tok, done, tokens, all_logits, k_cache, v_cache, slot_pos, slot_valid = state
        step_logits, k_cache, v_cache, slot_pos, slot_valid = _decode_step(
            params, config, tok, s + t - 1, lengths + t - 1, k_cache, v_cache, slot_pos, slot_valid, moe_impl,
            moe_chunk, sharding)
        tok, done = choose(step_logits, t, done)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], t, axis=1)
        if return_logits:
            all_logits = jax.lax.dynamic_update_slice_in_dim(all_logits, step_logits[:, None], t, axis=1)
        return t + 1, tok, done, tokens, all_logits, k_cache, v_cache, slot_pos, slot_valid

    state = (jnp.int32(1), tok, done, tokens, all_logits, k_cache, v_cache, slot_pos, slot_valid)
    t, _, _, tokens, all_logits, *_ = jax.lax.while_loop(cond, body, state)
    return tokens, t, all_logits


def stop_token_array(stop_tokens: Sequence[int], slots: int = 8) -> jax.Array:
    """Stop ids as int32 [n], padded with -1 (matches no token) to a multiple of `slots` so that
    different stop sets reuse one compiled program."""
    ids = [int(t) for t in stop_tokens]
    n = max(slots, -(-len(ids) // slots) * slots)
    return jnp.asarray(ids + [-1] * (n - len(ids)), jnp.int32)


@dataclass
class CausalLM(TextEncoder):
    """A `TextEncoder` (features as before) that can also `generate` text.

    `lm_loader`: () -> params with every decoder layer, `norm` and `lm_head`; `generate` calls it
    once when `params` lack them (a feature-only load reads just the layers the DiT needs).
    """

    lm_loader: Callable[[], Params] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ causal LM

    def ensure_lm_head(self) -> None:
        """Make `params` hold every decoder layer plus `norm` and `lm_head` (via `lm_loader` if needed)."""
        if has_lm_head(self.params) and num_layers(self.params) == self.config.num_hidden_layers:
            return
        if self.lm_loader is None:
            raise ValueError(
                "this text encoder has no causal-LM head (model.norm.weight + lm_head.weight) or not all decoder "
                "layers; load it from a checkpoint that has them (lens_jax.text_encoder.load(path, causal_lm=True))."
            )
        self.params = self.lm_loader()
        if not has_lm_head(self.params):
            raise ValueError("the checkpoint has no lm_head.weight / model.norm.weight; it cannot generate text.")

    def generate(self, input_ids: ArrayLike, attention_mask: ArrayLike | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
                 return_logits: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Decode new tokens after prompts (one jitted program: prefill, then a KV-cache loop).

        input_ids [B, S] ints, attention_mask [B, S] (1 = token; left or right padding). Greedy
        when `temperature` is 0, else temperature + top-p sampling seeded by `seed`. Stops when
        every row has emitted one of `stop_tokens` (None: the config's `eos_token_id`; `()`:
        never early) or after `max_new_tokens`. Returns np.ndarray [B, T] int32 of the new tokens
        only, T = the steps run; a row that stopped earlier is filled with the pad token after its
        stop token. With `return_logits`, returns (tokens, logits [B, T, vocab] float32).
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(ids.shape)}.")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}.")
        if not mask.any(axis=1).all():
            raise ValueError("every row of attention_mask needs at least one token (1).")
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if not (0.0 < float(top_p) <= 1.0) or float(temperature) < 0.0:
            raise ValueError(f"need temperature >= 0 and top_p in (0, 1]; got {temperature}, {top_p}.")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}).")
        if stop_tokens is None:
            eos = self.config.eos_token_id
            stop_tokens = () if eos is None else (tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),))
        stop = tuple(int(t) for t in stop_tokens)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (stop[0] if stop else 0)
        if getattr(self, "stream", None) is not None:
            raise ValueError("generate does not stream layers from host memory; run the reasoner with offload='none' "
                             "(or the HTTP route).")
        self.ensure_lm_head()
        tokens, steps, logits = generate(
            self.params, self.config, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), stop_token_array(stop),
            jnp.int32(pad), jnp.float32(temperature), jnp.float32(top_p), jnp.uint32(int(seed) % 2**32),
            int(max_new_tokens), bool(return_logits), self.moe_impl, self.moe_chunk, self.sharding,
        )
        n = int(steps)
        tokens = np.asarray(tokens)[:, :n]
        if return_logits:
            return tokens, np.asarray(logits)[:, :n]
        return tokens
