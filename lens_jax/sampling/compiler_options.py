"""XLA compiler options the sampler's programs compile with, per platform: one table, one opt-out.

Passed to `jax.jit(..., compiler_options=...)` of the sampler's programs only (`build_programs`), so
nothing else in the process changes (no process-wide XLA_FLAGS).

- GPU: cuBLAS GEMMs instead of XLA's Triton GEMM fusions. On the H100 the DiT step took 89.5 ms
  with cuBLAS against 93.9 ms (docs/benchmarks.md, 2026-11-23), and compiled faster (2.9 vs 8.2 s):
  cuBLAS reads most of a block's weights in place from the stacked [layers, ...] parameters, where
  every Triton GEMM fusion takes a copy of its layer's weights first (176 vs 340 MB per block at
  1024²; scripts/aot_gpu.py). `scripts/gpu_runbook.py` times the step and the sampler both ways.

Opt out with `LENS_JAX_XLA_OPTIONS=off` (then XLA's defaults, or the process's XLA_FLAGS, apply).
"""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import InputError

ENV_VAR = "LENS_JAX_XLA_OPTIONS"
OFF_VALUES = ("0", "off", "false", "no", "none")
ON_VALUES = ("", "1", "on", "true", "yes", "default")

# platform (jax.Device.platform, or jax.default_backend()) -> XLA options of the sampler's programs
BY_PLATFORM: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "gpu": MappingProxyType({"xla_gpu_enable_triton_gemm": False}),
})
PLATFORM_NAMES = MappingProxyType({"cuda": "gpu", "rocm": "gpu"})  # device platforms that are "gpu"


def enabled_by_environment() -> bool:
    """Whether `LENS_JAX_XLA_OPTIONS` leaves the table on (unset: on)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in OFF_VALUES:
        return False
    if value in ON_VALUES:
        return True
    raise InputError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: use 'off' to compile the sampler with XLA's default "
                     f"options, or leave it unset.")


def compiler_options(platform: str, enabled: bool | None = None) -> dict[str, Any] | None:
    """The XLA options for sampler programs compiled for `platform` ("gpu", "cuda", "cpu", "tpu", ...), or None.

    `enabled`: None reads `LENS_JAX_XLA_OPTIONS`; False gives None (XLA's defaults)."""
    if enabled is None:
        enabled = enabled_by_environment()
    options = BY_PLATFORM.get(PLATFORM_NAMES.get(platform, platform)) if enabled else None
    return dict(options) if options else None
