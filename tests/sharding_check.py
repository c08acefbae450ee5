"""Run in its own process with 8 simulated CPU devices (see test_sharding.py); prints JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np  # noqa: E402

from lens_jax import sharding as sh  # noqa: E402
from lens_jax.pipeline import LensPipeline  # noqa: E402

TINY = Path(__file__).parent / "fixtures" / "tiny_lens"


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    lat = np.random.default_rng(0).standard_normal((2, 20, 32)).astype(np.float32)
    call = dict(prompt=["A cat.", "A red cube."], negative_prompt="blurry", height=64, width=80,
                num_inference_steps=3, guidance_scale=4.0, latents=lat, output_type="np")
    single = LensPipeline.from_pretrained(TINY, mesh=sh.make_mesh(1, 1, devices=jax.devices()[:1]))
    ref = single(**call).images
    report = {}
    for data, fsdp in ((2, 4), (1, 8), (4, 2)):
        pipe = LensPipeline.from_pretrained(TINY, mesh=sh.make_mesh(data, fsdp))
        out = pipe(**call).images
        kernel = pipe.dit_params["transformer_blocks"]["attn"]["img_qkv"]["kernel"]
        shard_bytes = [s.data.nbytes for s in kernel.addressable_shards]
        dit_bytes = sum(x.nbytes for x in jax.tree.leaves(pipe.dit_params))
        per_device = sum(
            max(s.data.nbytes for s in x.addressable_shards if s.device == jax.devices()[0]) if x.ndim else x.nbytes
            for x in jax.tree.leaves(pipe.dit_params)
        )
        report[f"{data}x{fsdp}"] = {
            "max_abs_diff": float(np.abs(out - ref).max()),
            "kernel_spec": str(kernel.sharding.spec),
            "kernel_shard_fraction": shard_bytes[0] / kernel.nbytes,
            "dit_fraction_on_device0": per_device / dit_bytes,
        }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
