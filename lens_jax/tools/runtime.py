"""Process-wide settings the command-line tools make before JAX starts working."""

from __future__ import annotations

import os

def gpu_xla_flags() -> list[str]:
    """The sampler's GPU compiler options (`lens_jax.sampling.compiler_options`, the one table) as XLA flags;
    none when `LENS_JAX_XLA_OPTIONS=off`."""
    from ..sampling.compiler_options import compiler_options

    options = compiler_options("gpu") or {}
    return [f"--{name}={str(value).lower() if isinstance(value, bool) else value}" for name, value in options.items()]


def default_xla_flags() -> None:
    """Add `gpu_xla_flags()` to XLA_FLAGS, so every program of a command (the text encoder too, not only
    the sampler's) compiles with them; a flag the user already set wins. Call before JAX starts a backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in gpu_xla_flags() if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


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
