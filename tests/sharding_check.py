"""Run in its own process with 8 simulated CPU devices (see test_sharding.py); prints JSON.

For each (data, fsdp, tensor) mesh: the DiT output and the text features of tensor-parallel
friendly random configs (every width divisible by 8), and the end-to-end image of the golden
tiny checkpoint, against one device; and the fraction of a qkv, an MLP and an expert tensor
(float, and MXFP4-packed `gate_up_proj_blocks`) that device 0 holds. On the fsdp-only mesh the
packed text encoder's features are checked against one device too (expert width split over fsdp).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np  # noqa: E402

from lens_jax import LensPipeline, parallel  # noqa: E402
from lens_jax.models import text_encoder as te  # noqa: E402
from lens_jax.models import transformer as dit  # noqa: E402

TINY = Path(__file__).parent / "fixtures" / "tiny_lens"
MESHES = ((1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8), (8, 1, 1))

DIT = dit.TransformerConfig(in_channels=32, out_channels=8, num_layers=2, num_attention_heads=8, attention_head_dim=12,
                            enc_hidden_dim=64, axes_dims_rope=(4, 4, 4))  # inner 96, MLP 256
TE = te.TextEncoderConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=8, num_local_experts=8,
                          num_experts_per_tok=2, sliding_window=4, layer_types=("sliding_attention", "full_attention"))


def fraction(x: jax.Array) -> float:
    """The share of `x` that device 0 holds."""
    device0 = jax.devices()[0]
    return sum(s.data.size for s in x.addressable_shards if s.device == device0) / x.size


def place(params, axes, mesh):
    return parallel.put_tree(params, parallel.logical_shardings(params, axes, mesh))


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    dit_params = jax.tree.map(np.asarray, dit.init_params(DIT, jax.random.key(1)))
    te_params = jax.tree.map(np.asarray, te.init_params(TE, jax.random.key(2)))
    te_packed = jax.tree.map(np.asarray, te.init_params(TE, jax.random.key(3), packed=True))
    x = rng.standard_normal((4, 20, 32)).astype(np.float32)
    feats = [rng.standard_normal((4, 7, 64)).astype(np.float32) for _ in range(4)]
    mask = np.arange(7)[None] < np.array([[7], [5], [3], [0]])
    t = np.array([0.9, 0.5, 0.3, 0.1], np.float32)
    ids = rng.integers(0, 512, (4, 8))
    ids_mask = np.arange(8)[None] < np.array([[8], [6], [4], [2]])
    lat = rng.standard_normal((2, 20, 32)).astype(np.float32)
    call = dict(prompt=["A cat.", "A red cube."], negative_prompt="blurry", height=64, width=80,
                num_inference_steps=3, guidance_scale=4.0, latents=lat, output_type="np")

    def run(mesh, constrain: bool):
        bound = parallel.DEFAULT_RULES.bind(mesh) if constrain else None
        p = place(dit_params, dit.param_axes(DIT), mesh)
        out = dit.apply(p, DIT, x, feats, mask, t, (4, 5), None, None, bound)
        q = place(te_params, te.param_axes(TE), mesh)
        text = te.apply(q, TE, ids, ids_mask, (0, 1), "grouped", None, bound)
        pipe = LensPipeline.from_pretrained(TINY, mesh=mesh)
        image = pipe(**call).images
        return p, q, np.asarray(out), [np.asarray(f) for f in text], image

    def run_packed(mesh, constrain: bool):
        bound = parallel.DEFAULT_RULES.bind(mesh) if constrain else None
        q = place(te_packed, te.param_axes(TE, packed=True), mesh)
        return q, [np.asarray(f) for f in te.apply(q, TE, ids, ids_mask, (0, 1), "grouped", None, bound)]

    single = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, _, ref_out, ref_text, ref_image = run(single, False)
    _, ref_packed = run_packed(single, False)
    report = {}
    for data, fsdp, tensor in MESHES:
        mesh = parallel.make_mesh(data, fsdp, tensor)
        p, q, out, text, image = run(mesh, True)
        if (data, fsdp, tensor) == (1, 8, 1):
            packed, packed_text = run_packed(mesh, True)
            report["packed_1x8x1_text_rel"] = max(float(np.abs(a - b).max() / np.abs(b).max())
                                                  for a, b in zip(packed_text, ref_packed))
        else:
            packed = place(te_packed, te.param_axes(TE, packed=True), mesh)
        if (data, fsdp, tensor) == (2, 2, 2):  # offload per device of the mesh: blocks stream from host
            streamed = LensPipeline.from_pretrained(TINY, mesh=mesh, offload="all")
            report["offload_2x2x2_image_abs"] = float(np.abs(streamed(**call).images - ref_image).max())
            report["offload_2x2x2_kinds"] = sorted({x.sharding.memory_kind
                                                    for x in jax.tree.leaves(streamed.dit_params["transformer_blocks"])})
        report[f"{data}x{fsdp}x{tensor}"] = {
            "dit_rel": float(np.abs(out - ref_out).max() / np.abs(ref_out).max()),
            "text_rel": max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(text, ref_text)),
            "image_abs": float(np.abs(image - ref_image).max()),
            "qkv": fraction(p["transformer_blocks"]["attn"]["img_qkv"]["kernel"]),
            "mlp": fraction(p["transformer_blocks"]["img_mlp"]["w1"]["kernel"]),
            "expert": fraction(q["layers"]["mlp"]["experts"]["gate_up_proj"]),
            "expert_packed": fraction(packed["layers"]["mlp"]["experts"]["gate_up_proj_blocks"]),
            "q_proj": fraction(q["layers"]["self_attn"]["q_proj"]["kernel"]),
            "qkv_spec": str(p["transformer_blocks"]["attn"]["img_qkv"]["kernel"].sharding.spec),
        }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
