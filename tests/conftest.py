"""Shared test configuration: float32 everywhere, fixtures folder, small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"

jax.config.update("jax_default_matmul_precision", "highest")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests do not write the user's ~/.cache/lens-jax/xla (the pipeline's default); the cache tests name
# their own folders. (With it on, the deviceless TPU compiles also tried to read entries back.)
os.environ.setdefault("LENS_JAX_COMPILATION_CACHE", "off")


def cosine(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
