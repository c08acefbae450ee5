"""Comparison metrics for parity checks (numpy only): one library for `lens-jax parity` and the tests.

    rec = compare(ours, ref, "block 3 img")          # max abs, max rel-to-scale, cosine, PSNR
    assert_close(ours, ref, atol=2e-4, what="DiT output")
    jump = first_jump([r["max_rel"] for r in records], tol=1e-4)

Every figure is computed in float64. "rel-to-scale" divides the max abs error by max|ref| (a
relative error that does not blow up where the reference crosses zero).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "Tolerance",
    "F32_TOLERANCE",
    "BF16_TOLERANCE",
    "TOLERANCE_BASIS",
    "tolerance_for",
    "max_abs",
    "max_rel",
    "cosine",
    "psnr",
    "compare",
    "assert_close",
    "first_jump",
    "largest_jump",
    "passes",
    "tolerance_dict",
]


@dataclass(frozen=True)
class Tolerance:
    """A pass bound: max abs error <= atol + rel * max|ref|, and (when set) cosine >= min_cosine."""

    atol: float = 0.0
    rel: float = 0.0
    min_cosine: float | None = None

    def bound(self, ref_scale: float) -> float:
        return self.atol + self.rel * ref_scale

    def describe(self) -> str:
        parts = []
        if self.atol or self.rel:
            terms = ([f"{self.atol:g}"] if self.atol else []) + ([f"{self.rel:g} x max|ref|"] if self.rel else [])
            parts.append("max abs <= " + " + ".join(terms))
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        return ", ".join(parts) or "none"


# float32 bounds; the project's parity tests read them from here, so the tool and the tests hold
# the same line. Each bound is 5x the goldens' own fp32-vs-fp64 distance (tests/fixtures/GOLDENS_README.md),
# so a bug a few roundings large (a wrong epsilon, a swapped order) fails.
F32_TOLERANCE: dict[str, Tolerance] = {
    "transformer": Tolerance(atol=5 * 1.58e-5),  # DiT output (floor 1.58e-5)
    "transformer_block": Tolerance(atol=1e-4),  # per-block streams (no floor published; ~2x the output's bound)
    "text_encoder": Tolerance(rel=5 * 6.32e-6),  # every hidden state, relative to max|ref| (floor: layer 23)
    "vae": Tolerance(atol=5 * 4.80e-6),  # encode / decode outputs (floor: decoded image)
    "pipeline_latents": Tolerance(atol=5 * 1.39e-5),  # every step's latents (floor: the last step)
    "pipeline_image": Tolerance(atol=5 * 4.11e-6),  # decoded image in [0, 1]
}
# bfloat16: rounding (8 mantissa bits) dominates; the bound is on direction, not on max error.
BF16_TOLERANCE: dict[str, Tolerance] = {
    "transformer": Tolerance(min_cosine=0.999),
    "transformer_block": Tolerance(min_cosine=0.999),
    "text_encoder": Tolerance(min_cosine=0.99),
    "vae": Tolerance(min_cosine=0.999),
    "pipeline_latents": Tolerance(min_cosine=0.99),
    "pipeline_image": Tolerance(min_cosine=0.99),
}

# Why the bounds are what they are, in one sentence per dtype (printed with the verdict).
TOLERANCE_BASIS: dict[str, str] = {
    "f32": "float32 bounds = 5x the float32-vs-float64 distance of the PyTorch reference itself "
           "(the goldens), so an error a few roundings large fails",
    "bf16": "bfloat16 bounds are on direction (cosine): with 8 mantissa bits max abs error says little",
}


def tolerance_for(kind: str, dtype: str) -> Tolerance:
    """The bound for `kind` (a key of F32_TOLERANCE) at compute dtype 'f32' or 'bf16'."""
    table = F32_TOLERANCE if dtype in ("f32", "float32") else BF16_TOLERANCE
    return table[kind]


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def max_abs(ours, ref) -> float:
    """max |ours - ref| (inf when shapes differ or values are not finite)."""
    a, b = _f64(ours), _f64(ref)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: ours {a.shape} vs reference {b.shape}")
    if a.size == 0:
        return 0.0
    d = np.abs(a - b)
    return float(np.max(d)) if np.all(np.isfinite(d)) else math.inf


def max_rel(ours, ref) -> float:
    """max |ours - ref| / max |ref| (the error relative to the reference's scale)."""
    scale = float(np.max(np.abs(_f64(ref)))) if np.size(ref) else 0.0
    err = max_abs(ours, ref)
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def cosine(ours, ref) -> float:
    """Cosine similarity of the flattened arrays (1.0 for two zero arrays)."""
    a, b = _f64(ours).ravel(), _f64(ref).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def psnr(ours, ref, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; data_range defaults to max(ref) - min(ref). inf when equal."""
    a, b = _f64(ours), _f64(ref)
    if data_range is None:
        data_range = float(b.max() - b.min()) if b.size else 1.0
    mse = float(np.mean((a - b) ** 2)) if a.size else 0.0
    if mse == 0:
        return math.inf
    if not math.isfinite(mse) or data_range <= 0:
        return -math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def compare(ours, ref, name: str = "", data_range: float | None = None, tolerance: Tolerance | None = None) -> dict:
    """All figures for one array pair: name, shape, max_abs, max_rel, cosine, psnr, ref_scale (and pass)."""
    ref64 = _f64(ref)
    err = max_abs(ours, ref)
    scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
    rec = {
        "name": name,
        "shape": list(ref64.shape),
        "max_abs": err,
        "max_rel": err / scale if scale > 0 else (0.0 if err == 0 else math.inf),
        "cosine": cosine(ours, ref),
        "psnr": psnr(ours, ref, data_range),
        "ref_scale": scale,
    }
    if tolerance is not None:
        rec["bound"] = tolerance.bound(scale) if (tolerance.atol or tolerance.rel) else None
        rec["passed"] = passes(rec, tolerance)
    return rec


def passes(rec: dict, tolerance: Tolerance) -> bool:
    """Whether a `compare` record is within `tolerance`."""
    ok = True
    if tolerance.atol or tolerance.rel:
        ok &= rec["max_abs"] <= tolerance.bound(rec["ref_scale"])
    if tolerance.min_cosine is not None:
        ok &= rec["cosine"] >= tolerance.min_cosine
    return bool(ok)


def assert_close(ours, ref, atol: float = 0.0, rel: float = 0.0, what: str = "", min_cosine: float | None = None) -> dict:
    """Assert max|ours - ref| <= atol + rel * max|ref| (and cosine >= min_cosine); returns the record.

    The failure message carries every figure, so a failing test says how far off and where.
    """
    ours_np = np.asarray(ours)
    assert ours_np.shape == np.shape(ref), f"{what}: shape {ours_np.shape} != reference {np.shape(ref)}"
    tol = Tolerance(atol=atol, rel=rel, min_cosine=min_cosine)
    rec = compare(ours_np, ref, what, tolerance=tol)
    assert np.all(np.isfinite(ours_np.astype(np.float64))), f"{what}: non-finite values"
    assert rec["passed"], (
        f"{what}: max abs {rec['max_abs']:.3g} (bound {tol.describe()}, max|ref| {rec['ref_scale']:.3g}), "
        f"rel-to-scale {rec['max_rel']:.3g}, cosine {rec['cosine']:.9f}"
    )
    return rec


def first_jump(errors: Sequence[float], tol: float) -> int | None:
    """Index of the first layer whose error leaves the rounding noise (exceeds `tol`), or None.

    Errors compound through a network, so the first layer over the bound is where a port bug
    (or a precision cliff) enters; the layers after it inherit the error.
    """
    for i, e in enumerate(errors):
        if not float(e) <= tol:  # also catches nan
            return i
    return None


def largest_jump(errors: Sequence[float], floor: float = 1e-12) -> int | None:
    """Index of the layer with the largest error growth over its predecessor (None for < 1 layer)."""
    errs = [max(float(e), floor) for e in errors]
    if not errs:
        return None
    ratios = [1.0] + [errs[i] / errs[i - 1] for i in range(1, len(errs))]
    return int(np.argmax(ratios))


def tolerance_dict(tol: Tolerance) -> dict:
    """JSON-ready form of a Tolerance."""
    return {k: v for k, v in asdict(tol).items() if v not in (None, 0.0)}
