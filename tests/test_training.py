"""Fine-tuning: golden loss/gradient parity, data cache, trainer (overfit, resume, sharding), bad inputs.

Parity tolerances are multiples (5x) of the goldens' fp32-vs-fp64 floor, read from the
`lens_golden` metadata of io_train.safetensors: pred max-abs 1.77e-5, loss 9.4e-7, and per
gradient array the family's worst max|diff| / max|ref| (grad.* 2.09e-5, lora_grad.* 3.75e-5)
times that array's max |ref|. Exactly-zero reference gradients must come out exactly zero.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import lens_jax.transformer as lens_transformer
from lens_jax.training import flow_matching_loss

from .conftest import FIXTURES

FLOOR_MULTIPLE = 5.0


@pytest.fixture(scope="module")
def golden():
    path = FIXTURES / "io_train.safetensors"
    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["lens_golden"])
    return load_file(str(path)), meta


@pytest.fixture(scope="module")
def tiny_dit():
    return lens_transformer.load(FIXTURES / "tiny_lens" / "transformer")


def _inputs(g):
    return (g["x0"], g["noise"], g["sigma"], [g[f"text_features_layer{i}"] for i in range(4)], g["text_mask"],
            [(1, 4, 6)])


def _floor(meta, name, stat="max_abs"):
    return meta["arrays"][name]["observed"]["fp32_vs_fp64_precise"][stat]


def _check_grads(ours: dict, g: dict, meta: dict, prefix: str, family: str):
    rel_floor = meta["observed_by_family"][family]["max_over_arrays_of_max_abs_over_max_ref"]
    refs = {k[len(prefix):]: v for k, v in g.items() if k.startswith(prefix)}
    assert sorted(ours) == sorted(refs)
    for name, ref in refs.items():
        got = np.asarray(ours[name], np.float32)
        assert got.shape == ref.shape, name
        scale = np.abs(ref).max()
        if scale == 0:
            assert np.all(got == 0), f"{name}: reference gradient is exactly zero, ours is not"
            continue
        err = np.abs(got - ref).max()
        assert err <= FLOOR_MULTIPLE * rel_floor * scale, f"{name}: max|diff| {err:.3g} vs max|ref| {scale:.3g}"


def test_golden_loss_pred_and_every_gradient(golden, tiny_dit):
    g, meta = golden
    (loss, pred), grads = jax.value_and_grad(flow_matching_loss, has_aux=True)(
        tiny_dit.params, tiny_dit.config, *_inputs(g))
    assert abs(float(loss) - float(g["loss"])) <= FLOOR_MULTIPLE * _floor(meta, "loss")
    assert np.abs(np.asarray(pred) - g["pred"]).max() <= FLOOR_MULTIPLE * _floor(meta, "pred")
    _check_grads(lens_transformer.to_torch_state_dict(grads, tiny_dit.config), g, meta, "grad.", "grad.*")
