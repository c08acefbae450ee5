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
