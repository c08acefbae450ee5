"""Process-wide settings the command-line tools make before JAX starts working."""

from __future__ import annotations

import os

# cuBLAS beats XLA's Triton GEMM fusions on the DiT (H100: 89.5 vs 94.5 ms per CFG step at
# 1024^2, compile 2.9 vs 8.2 s; docs/benchmarks.md). Must be set before jax is imported.
GPU_XLA_FLAG = "--xla_gpu_enable_triton_gemm=false"


def default_xla_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {GPU_XLA_FLAG}".strip()


def enable_compilation_cache(setting=None) -> str | None:
    """`lens_jax.parallel.compile_cache.enable_compilation_cache`, imported late (it imports jax)."""
    from ..parallel.compile_cache import enable_compilation_cache as enable

    return enable(setting)


def quiet_third_party() -> None:
    """Silence third-party messages a lens-jax user cannot act on (a user's own settings win):
    transformers' advisory banners (e.g. "PyTorch was not found": only its tokenizer is used)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


DISTRIBUTED_ENV = "LENS_JAX_DISTRIBUTED"


def init_distributed() -> bool:
    """Join a multi-host JAX job when `LENS_JAX_DISTRIBUTED=1` asks for it (before any JAX computation).

    Calls `jax.distributed.initialize()`: on Cloud TPU, SLURM, Open MPI and Kubernetes JAX finds the
    coordinator and this process's index itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of
    process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID. CPU collectives across processes go through gloo.
    Returns whether this process is part of a multi-process job; a no-op when already initialised.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    if os.environ.get(DISTRIBUTED_ENV, "").strip().lower() in ("", "0", "off", "false", "no"):
        return False
    kwargs = {}
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if os.environ.get(env):
            if not os.environ[env].strip().isdigit():
                from ..errors import InputError

                raise InputError(f"{env}={os.environ[env]!r} must be a non-negative integer.")
            kwargs[key] = int(os.environ[env])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True
