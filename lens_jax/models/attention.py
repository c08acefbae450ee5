"""One softmax-attention entry point for every network, with one kernel per backend.

`attention(q, k, v, ...)` computes, for queries q [B, T, H, D] and keys/values k, v [B, S, KH, D]
(grouped-query when KH < H: query head h reads key head h // (H // KH)),

    out[b, i, h] = sum_j p_ij v[b, j, h // G],  p_ij = exp(s_ij) / (sum_j' exp(s_ij') + exp(sink_h))

with s_ij = scale * q_i . k_j over the keys j visible to query i: `key_mask[b, j]` (padding), and,
when asked, j <= i (`causal`) and i - j < `window` (sliding window). The sink term is present only
when `sinks` [H] is given (GPT-OSS' learned per-head sink logit, dropped after the softmax). A
query with no visible key returns zeros.

Implementations (`impl`), chosen by `default_impl` per backend when None:
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention` with per-row visible-key
  counts (GPU, half precision, no sinks, head_dim <= 256, visible keys must form a prefix).
- "splash": Pallas splash attention (TPU; on other backends it runs in Pallas' TPU interpret mode,
  which is for tests only). Static causal/local masks, padding through segment ids, sinks natively.
- "blocked": flash-style online softmax in plain JAX: queries in chunks, keys in blocks scanned with
  running (max, sum, accumulator) in float32; never forms the [T, S] scores (unless one key block
  covers all keys, which is then a query-chunked exact softmax). CPU default and the fallback.
- "reference": the dense textbook formula (materialises [B, H, T, S]); the parity reference.
- "xla": `jax.nn.dot_product_attention`'s XLA path with a dense mask (the DiT's pre-dispatch path).
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("reference", "blocked", "splash", "cudnn", "xla")

# A finite "minus infinity" for masked logits and the initial running max: exp(NEG - finite) is 0
# and NEG - NEG is 0, so nothing turns into NaN when a whole block or row is masked.
NEG = -1e30

# Tile sizes of the blocked path, by loop order (docs/attention.md, docs/benchmarks.md).
# "batched": every (batch, head) pair in each tile, [B, KH, G, bq, bk] (accelerators, where one
# big tile is one kernel launch). "heads_outer" (CPU): a lax.map over (batch, key head) pairs, so a
# tile is [G, bq, bk] and stays near the core (256 x 1152 float32 = 1.2 MB for the DiT);
# the batched order's tiles (48 x 256 x 512 float32 = 25 MB for the DiT) did not, and ran 2x
# slower than torch's SDPA, the heads-outer order 0.4x.
BLOCK_Q = 256
BLOCK_K = 512
CPU_BLOCK_Q = 256
CPU_BLOCK_K = 2048  # the largest key block; longer key sequences are split into equal blocks
CPU_BLOCK_K_CAUSAL = 128  # causal / sliding-window keys: small blocks, so empty tiles are skipped
DEFAULT = "default"  # block sizes chosen by loop order


def default_impl(dtype, *, has_sinks: bool = False, head_dim: int = 128, backend: str | None = None) -> str:
    """The implementation `attention` uses when `impl` is None, for this backend and problem.

    GPU: cuDNN for bf16/fp16 without sinks and head_dim <= 256 (cuDNN's limits), else "reference"
    for sinks (the GPT-OSS encoder's short sequences, as before this module) and "blocked" for the rest.
    TPU: splash. Everything else (CPU): blocked.
    """
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        if half and not has_sinks and head_dim <= 256:
            return "cudnn"
        return "reference" if has_sinks else "blocked"
    return "blocked"


def _check(q, k, v, key_mask, sinks, impl):
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; use one of {IMPLS} or None for the backend default.")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention wants q [B, T, H, D] and k = v [B, S, KH, D]; got {q.shape}, {k.shape}, {v.shape}.")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key heads ({k.shape[2]}).")
    if key_mask is not None and key_mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(f"key_mask must be [B, S] = {(k.shape[0], k.shape[1])}; got {key_mask.shape}.")
    if sinks is not None and sinks.shape != (q.shape[2],):
        raise ValueError(f"sinks must hold one logit per query head, shape {(q.shape[2],)}; got {sinks.shape}.")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
              key_lengths: jax.Array | None = None, causal: bool = False, window: int | None = None,
              sinks: jax.Array | None = None, scale: float | None = None, impl: str | None = None,
              block_q: int | str = DEFAULT, block_k: int | str | None = DEFAULT, sharding=None) -> jax.Array:
    """Masked (grouped-query) softmax attention, [B, T, H, D] x [B, S, KH, D] -> [B, T, H, D].

    key_mask [B, S] bool: visible keys (None: all). key_lengths [B]: the same mask as visible-key
    counts, for the cuDNN path (derived from key_mask when missing; exact only if visible keys form
    a prefix, as in the DiT's [image; right-padded text] sequence). causal / window (static) add
    j <= i and i - j < window. sinks [H]: per-head extra logits. scale defaults to 1/sqrt(D).
    block_q / block_k size the blocked path's query chunks and key blocks (block_k None: one
    block holding every key; DEFAULT: by the path's loop order, see `blocked`). sharding: the models' activation constraints (BoundRules); the
    splash kernel, which XLA cannot partition, then runs under shard_map over its batch/head axes.

    With impl None off GPU, the platform the program is lowered for picks the kernel (splash for
    TPU, blocked otherwise), so a TPU program compiled ahead of time on a CPU host is the one a
    TPU host would build.
    """
    auto = impl is None and jax.default_backend() != "gpu"
    impl = impl or default_impl(q.dtype, has_sinks=sinks is not None, head_dim=q.shape[-1])
    _check(q, k, v, key_mask, sinks, impl)
    if auto:
        kw = dict(key_mask=key_mask, causal=causal, window=window, sinks=sinks, scale=scale)
        return jax.lax.platform_dependent(
            q, k, v,
            tpu=lambda q, k, v: attention(q, k, v, impl="splash", sharding=sharding, **kw),
            default=lambda q, k, v: attention(q, k, v, impl="blocked", block_q=block_q, block_k=block_k, **kw))
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if window is not None and window >= max(q.shape[1], k.shape[1]) and causal:
        window = None
    if impl == "cudnn":
        if sinks is not None or window is not None:
            raise ValueError("the cudnn attention path has no sinks or sliding windows; use impl='blocked'.")
        if key_lengths is None and key_mask is not None:
            key_lengths = jnp.sum(key_mask, axis=1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=key_lengths,
                                            implementation="cudnn")
    if impl == "xla":
        if sinks is not None:
            raise ValueError("the xla attention path has no sinks; use impl='blocked' or 'reference'.")
        mask = _dense_mask(key_mask, q.shape[1], k.shape[1], causal, window, k.shape[0])
        return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask[:, None], implementation="xla")
    if impl == "reference":
        return reference(q, k, v, mask=_dense_mask(key_mask, q.shape[1], k.shape[1], causal, window, k.shape[0]),
                         sinks=sinks, scale=scale)
    if impl == "splash":
        return splash(q, k, v, key_mask=key_mask, causal=causal, window=window, sinks=sinks, scale=scale,
                      sharding=sharding)
    return blocked(q, k, v, key_mask=key_mask, causal=causal, window=window, sinks=sinks, scale=scale,
                   block_q=block_q, block_k=block_k)


def _dense_mask(key_mask, t: int, s: int, causal: bool, window: int | None, batch: int) -> jax.Array:
    """[B, T, S] bool visibility."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(s)[None, :]
    m = jnp.ones((t, s), bool)
    if causal:
        m = m & (j <= i)
    if window is not None:
        m = m & (i - j < window)
    km = jnp.ones((batch, s), bool) if key_mask is None else key_mask.astype(bool)
    return m[None] & km[:, None, :]


# ----------------------------------------------------------------------------- reference


def reference(q, k, v, *, mask: jax.Array | None = None, sinks: jax.Array | None = None,
              scale: float | None = None) -> jax.Array:
    """Dense attention with an explicit [B, T, S] bool mask; float32 softmax.

    Masked logits are finfo(float32).min as in transformers' eager path: a row with no visible key
    puts its mass on the sink (zero output), or is zeroed when there is no sink.
    """
    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qg = q.reshape(b, t, kh, g, d)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        sk = sinks.astype(jnp.float32).reshape(1, kh, g, 1, 1)
        m = jnp.maximum(m, sk)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sk - m)
    probs = e / denom
    if mask is not None and sinks is None:
        probs = jnp.where(jnp.any(mask, -1)[:, None, None, :, None], probs, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------- blocked (pure JAX)


def _pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _even_block(n: int, largest: int) -> int:
    """The smallest block (a multiple of 8) that splits n into as few blocks of <= `largest` as possible."""
    per_block = -(-n // -(-n // largest))  # ceil(n / ceil(n / largest))
    return min(n, -(-per_block // 8) * 8)


def blocked(q, k, v, *, key_mask=None, causal: bool = False, window: int | None = None, sinks=None,
            scale: float | None = None, block_q: int | str = DEFAULT, block_k: int | str | None = DEFAULT,
            heads_outer: bool | None = None) -> jax.Array:
    """Online-softmax attention: lax.map over query chunks, lax.scan over key blocks.

    Per (query chunk, key block) it forms a float32 score tile, updates the running max m,
    normaliser l and float32 accumulator, and skips (lax.cond) tiles that the causal / window
    structure or the padding (last visible key) leaves empty. Sinks enter as the initial state
    (m = sink, l = 1, acc = 0), which is exactly an extra logit with a zero value.

    heads_outer (None: on the CPU backend) runs one (batch row, key head) pair at a time under a
    lax.map, so each tile is [G, bq, bk] and stays in cache; otherwise tiles hold every pair,
    [B, KH, G, bq, bk]. DEFAULT block sizes: heads-outer CPU_BLOCK_Q queries against key blocks
    of CPU_BLOCK_K_CAUSAL with causal / window masks (tiles past the diagonal or the window are
    skipped), else of at most CPU_BLOCK_K split evenly (one block for the DiT's lengths); the
    batched order BLOCK_Q x BLOCK_K.
    """
    b, t, h, d = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = h // kh
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if heads_outer is None:
        heads_outer = jax.default_backend() == "cpu"
    if block_q == DEFAULT:
        block_q = CPU_BLOCK_Q if heads_outer else BLOCK_Q
    if block_k == DEFAULT:
        if not heads_outer:
            block_k = BLOCK_K
        else:
            block_k = CPU_BLOCK_K_CAUSAL if causal or window is not None else _even_block(s_len, CPU_BLOCK_K)
    if heads_outer and b * kh > 1:
        return _heads_outer(q, k, v, key_mask, causal, window, sinks, scale, block_q, block_k)
    bq = min(block_q, t)
    bk = s_len if block_k is None else min(block_k, s_len)
    nq, nk = -(-t // bq), -(-s_len // bk)
    key_mask = jnp.ones((b, s_len), bool) if key_mask is None else key_mask.astype(bool)

    # [nq, B, KH, G, bq, D] and [nk, B, KH, bk, D]; the scale is folded into q once.
    qs = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kh, g, d)
    qs = _pad_to(qs, 1, nq * bq).reshape(b, nq, bq, kh, g, d).transpose(1, 0, 3, 4, 2, 5)
    ks = _pad_to(k, 1, nk * bk).reshape(b, nk, bk, kh, d).transpose(1, 0, 3, 2, 4)
    vs = _pad_to(v, 1, nk * bk).reshape(b, nk, bk, kh, d).transpose(1, 0, 3, 2, 4)
    km = _pad_to(key_mask, 1, nk * bk, False).reshape(b, nk, bk).transpose(1, 0, 2)
    last_key = jnp.max(jnp.where(key_mask, jnp.arange(s_len)[None], -1))  # beyond it every block is empty

    if sinks is not None:
        m0 = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kh, g, 1), (b, kh, g, bq))
        l0 = jnp.ones((b, kh, g, bq), jnp.float32)
    else:
        m0 = jnp.full((b, kh, g, bq), NEG, jnp.float32)
        l0 = jnp.zeros((b, kh, g, bq), jnp.float32)
    acc0 = jnp.zeros((b, kh, g, bq, d), jnp.float32)

    def one_chunk(args):
        qi, qc = args
        q_pos = qi * bq + jnp.arange(bq)

        def tile(carry, kv):
            m, l, acc = carry
            ki, kc, vc, kmc = kv
            k_pos = ki * bk + jnp.arange(bk)
            visible = kmc[:, None, None, None, :]  # [B, 1, 1, 1, bk]
            structural = None
            if causal:
                structural = k_pos[None, :] <= q_pos[:, None]
            if window is not None:
                w = q_pos[:, None] - k_pos[None, :] < window
                structural = w if structural is None else structural & w
            if structural is not None:
                visible = visible & structural[None, None, None]
            sc = jnp.einsum("bkgqd,bksd->bkgqs", qc, kc, preferred_element_type=jnp.float32)
            sc = jnp.where(visible, sc, NEG)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            # Masked logits are NEG, so exp(NEG - m_new) is 0 once a row has seen a visible key (or
            # has a sink); until then they count as 1s that the first visible key rescales away
            # (alpha = 0), and a row that never sees one is zeroed at the end.
            p = jnp.exp(sc - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            l_new = alpha * l + jnp.sum(p, axis=-1)
            acc_new = alpha[..., None] * acc + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vc.dtype), vc,
                                                          preferred_element_type=jnp.float32)
            return m_new, l_new, acc_new

        def step(carry, kv):
            ki = kv[0]
            k_lo, k_hi = ki * bk, ki * bk + bk - 1
            live = k_lo <= last_key
            if causal:
                live = live & (k_lo <= qi * bq + bq - 1)
            if window is not None:
                live = live & (k_hi > qi * bq - window)
            return jax.lax.cond(live, tile, lambda c, _: c, carry, kv), None

        (m, l, acc), _ = jax.lax.scan(step, (m0, l0, acc0), (jnp.arange(nk), ks, vs, km))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        return jnp.where((m > NEG / 2)[..., None], out, 0.0)  # no visible key and no sink: zeros

    if nq == 1:
        out = one_chunk((jnp.int32(0), qs[0]))[None]
    else:
        out = jax.lax.map(one_chunk, (jnp.arange(nq), qs))
    # [nq, B, KH, G, bq, D] -> [B, T, H, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, h, d)[:, :t]
    return out.astype(q.dtype)


def _heads_outer(q, k, v, key_mask, causal, window, sinks, scale, block_q, block_k) -> jax.Array:
    """`blocked` for one (batch row, key head) pair at a time, under lax.map: [B*KH] problems of
    G query heads against one key head, each with its own padding mask and sinks."""
    b, t, h, d = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g, n = h // kh, b * kh
    qn = q.reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(n, 1, t, g, d)
    kn, vn = (x.transpose(0, 2, 1, 3).reshape(n, 1, s_len, 1, d) for x in (k, v))
    mask = jnp.ones((b, s_len), bool) if key_mask is None else key_mask.astype(bool)
    mn = jnp.repeat(mask, kh, axis=0)[:, None]  # [N, 1, S]
    sn = jnp.zeros((n, g), jnp.float32) if sinks is None else jnp.tile(sinks.astype(jnp.float32).reshape(kh, g), (b, 1))
    kw = dict(causal=causal, window=window, scale=scale, block_q=block_q, block_k=block_k, heads_outer=False)

    def one(args):
        qx, kx, vx, mx, sx = args
        return blocked(qx, kx, vx, key_mask=mx, sinks=None if sinks is None else sx, **kw)

    out = jax.lax.map(one, (qn, kn, vn, mn, sn))  # [N, 1, T, G, D]
    return out.reshape(b, kh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


# ----------------------------------------------------------------------------- splash (Pallas, TPU)


def _splash_block(n: int) -> int:
    for blk in (512, 256, 128):
        if n % blk == 0:
            return blk
    raise AssertionError(n)


def splash(q, k, v, *, key_mask=None, causal: bool = False, window: int | None = None, sinks=None,
           scale: float | None = None, interpret: bool | None = None, sharding=None) -> jax.Array:
    """Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention), vmapped over batch.

    Sequences are padded to a multiple of 128; padded and masked keys get kv segment id 1 while
    every query has segment id 0, so they are invisible. The causal / sliding structure is the
    kernel's static mask (fully-masked tiles are skipped); sinks are the kernel's own `sinks`
    argument, which starts each row's running max at the sink logit, exactly an extra logit with
    a zero value. `interpret` None: compiled with Mosaic when lowered for TPU, Pallas' TPU
    interpret mode otherwise (tests). With `sharding` (BoundRules) the kernel runs per shard under
    shard_map: batch over the activations' batch axes, heads over the tensor axis (kept whole when
    the key heads do not split like the query heads).
    """
    key_mask = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask.astype(bool)
    kw = dict(causal=causal, window=window, scale=scale)
    if sharding is not None:
        return _shard_mapped(lambda q, k, v, m, s: splash(q, k, v, key_mask=m, sinks=s, interpret=interpret, **kw),
                             sharding, q, k, v, key_mask, sinks)
    if interpret is None:
        return jax.lax.platform_dependent(
            q, k, v, key_mask,
            tpu=lambda q, k, v, m: _splash(q, k, v, m, sinks, interpret=False, **kw),
            default=lambda q, k, v, m: _splash(q, k, v, m, sinks, interpret=True, **kw))
    return _splash(q, k, v, key_mask, sinks, interpret=interpret, **kw)


def _shard_mapped(fn, sharding, q, k, v, key_mask, sinks):
    from jax.sharding import PartitionSpec as P

    from .axes import ACT_HEADS, BATCH

    q_spec = sharding.sharding((BATCH, None, ACT_HEADS, None), q.shape).spec
    k_spec = sharding.sharding((BATCH, None, ACT_HEADS, None), k.shape).spec
    q_spec, k_spec = (tuple(x) + (None,) * (4 - len(x)) for x in (q_spec, k_spec))
    if q_spec[2] != k_spec[2]:
        q_spec, k_spec = q_spec[:2] + (None, None), k_spec[:2] + (None, None)
    mask_spec = P(q_spec[0], None)
    if sinks is None:
        return jax.shard_map(lambda q, k, v, m: fn(q, k, v, m, None), mesh=sharding.mesh,
                             in_specs=(P(*q_spec), P(*k_spec), P(*k_spec), mask_spec), out_specs=P(*q_spec),
                             check_vma=False)(q, k, v, key_mask)
    return jax.shard_map(fn, mesh=sharding.mesh,
                         in_specs=(P(*q_spec), P(*k_spec), P(*k_spec), mask_spec, P(q_spec[2])),
                         out_specs=P(*q_spec), check_vma=False)(q, k, v, key_mask, sinks)


def _splash(q, k, v, key_mask, sinks, *, causal: bool, window: int | None, scale: float | None,
            interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    tp, sp = -(-t // 128) * 128, -(-s_len // 128) * 128
    if window is not None:
        base = sm.LocalMask((tp, sp), window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        base = sm.CausalMask((tp, sp))
    else:
        base = sm.FullMask((tp, sp))
    mask = sm.MultiHeadMask([base] * h)
    bq, bkv = _splash_block(tp), _splash_block(sp)
    # Backward block sizes too: the kernel is then differentiable (LoRA / full fine-tuning on TPU, and
    # gradients of programs whose CPU lowering still traces this branch under platform_dependent).
    blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)

    kv_seg = jnp.where(_pad_to(key_mask, 1, sp, False), 0, 1).astype(jnp.int32)
    q_seg = jnp.zeros((b, tp), jnp.int32)
    qh = _pad_to((q * jnp.asarray(scale, q.dtype)), 1, tp).transpose(0, 2, 1, 3)  # [B, H, T, D]
    kt = _pad_to(k, 1, sp).transpose(0, 2, 1, 3)
    vt = _pad_to(v, 1, sp).transpose(0, 2, 1, 3)
    sink = None if sinks is None else sinks.astype(jnp.float32)

    def one(qb, kb, vb, qsb, kvsb):
        return kernel(qb, kb, vb, segment_ids=sk.SegmentIds(q=qsb, kv=kvsb), sinks=sink)

    # Mosaic rejects a float32-precision contraction of bf16 operands, which a process-wide
    # jax_default_matmul_precision="highest" would ask for; half-precision inputs take the default.
    precision = "highest" if q.dtype == jnp.float32 else "default"
    with jax.default_matmul_precision(precision):
        out = jax.vmap(one)(qh, kt, vt, q_seg, kv_seg)  # [B, H, Tp, D]
    # A row whose keys are all masked (no sink) averages masked values in the kernel; zero it.
    if sinks is None:
        any_visible = _row_has_visible_key(key_mask, t, causal, window)
        out = jnp.where(any_visible[:, None, :, None], out[:, :, :t], 0.0)
    else:
        out = out[:, :, :t]
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _row_has_visible_key(key_mask, t: int, causal: bool, window: int | None) -> jax.Array:
    """[B, T]: whether query i sees at least one key (without forming [T, S])."""
    s_len = key_mask.shape[1]
    idx = jnp.where(key_mask, jnp.arange(s_len)[None], -1)
    i = jnp.arange(t)[None]
    if causal:  # the latest visible key at or before i
        cand = jax.lax.cummax(idx, axis=1)[:, jnp.minimum(jnp.arange(t), s_len - 1)]
    else:  # the latest visible key anywhere
        cand = jnp.broadcast_to(jnp.max(idx, axis=1, keepdims=True), (key_mask.shape[0], t))
    ok = cand >= 0
    if window is not None:
        ok = ok & (i - cand < window)
    return ok


__all__ = ["attention", "default_impl", "reference", "blocked", "splash", "IMPLS", "BLOCK_Q", "BLOCK_K", "CPU_BLOCK_Q",
           "CPU_BLOCK_K", "CPU_BLOCK_K_CAUSAL", "DEFAULT"]
