"""One process of the two-process multi-host test (test_multihost.py); not collected by pytest.

    python tests/multihost_worker.py PORT PROCESS_ID CONVERTED_ROOT OUT.npy   # one of two processes
    python tests/multihost_worker.py single - CONVERTED_ROOT OUT.npy           # the one-process reference

Each of the two processes has 4 simulated CPU devices; `jax.distributed.initialize` joins them
(coordinator 127.0.0.1:PORT) and JAX's CPU backend runs the cross-process collectives through
gloo (`jax_cpu_collectives_implementation`). The converted checkpoint is restored straight into
a (data=2, fsdp=4) mesh spanning both processes, two images are generated, and process 0 writes
them (fetched to every host with `process_allgather`).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np  # noqa: E402


def main(port: str, process_id: str, root: str, out: str) -> None:
    from lens_jax import LensPipeline, parallel

    if port == "single":
        mesh = parallel.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    else:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                   process_id=int(process_id), initialization_timeout=120)
        assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
        mesh = parallel.make_mesh(data=2, fsdp=4)
    pipe = LensPipeline.from_pretrained(root, dtype="f32", mesh=mesh)
    result = pipe("a red cube", height=32, width=32, num_inference_steps=2, guidance_scale=4.0, seed=3,
                  num_images_per_prompt=2, output_type="np")
    if jax.process_index() == 0:
        np.save(out, np.asarray(result.images))
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, "
          f"mesh {dict(mesh.shape)}, images {np.asarray(result.images).shape}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
