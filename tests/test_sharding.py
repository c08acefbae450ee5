"""Logical-axis sharding: under 8 simulated CPU devices every (data, fsdp, tensor) mesh gives the
single-device DiT output, text features and image, and holds the expected share of each parameter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lens_jax import parallel
from lens_jax.models import text_encoder as te
from lens_jax.models import transformer as dit
from lens_jax.models import vae
from lens_jax.models.axes import EMBED, EXPERT_MLP, EXPERTS, HEADS, MLP

# f32 at "highest" matmul precision: sharded matmuls and all-reduces only reorder sums.
REL_TOL = 1e-5
IMAGE_ATOL = 1e-5

# Expected share of device 0, from the default rules (embed -> fsdp, heads / mlp / experts -> tensor,
# expert_mlp -> tensor, or fsdp on a mesh without tensor): DiT qkv [L, d=96, 3, heads=8, 12], MLP w1
# [L, 96, 256], expert gate_up [L, experts=8, 64, 128] (experts take the tensor axis first, so the MLP
# width stays whole), q_proj [L, 64, 128], MXFP4 gate_up blocks [L, experts=8, 128, 2, 16] (axes
# experts, expert_mlp: no embed axis, so without the fsdp fallback they were whole on every device of a
# 1x8x1 mesh).
EXPECTED = {
    "1x8x1": {"qkv": 1 / 8, "mlp": 1 / 8, "expert": 1 / 8, "q_proj": 1 / 8, "expert_packed": 1 / 8},
    "2x2x2": {"qkv": 1 / 4, "mlp": 1 / 4, "expert": 1 / 4, "q_proj": 1 / 4, "expert_packed": 1 / 2},
    "1x2x4": {"qkv": 1 / 8, "mlp": 1 / 8, "expert": 1 / 8, "q_proj": 1 / 8, "expert_packed": 1 / 4},
    "1x1x8": {"qkv": 1 / 8, "mlp": 1 / 8, "expert": 1 / 8, "q_proj": 1 / 8, "expert_packed": 1 / 8},
    "8x1x1": {"qkv": 1.0, "mlp": 1.0, "expert": 1.0, "q_proj": 1.0, "expert_packed": 1.0},
}


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("sharding_check.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", list(EXPECTED))
def test_every_mesh_matches_one_device(report, mesh):
    r = report[mesh]
    assert r["dit_rel"] <= REL_TOL, r
    assert r["text_rel"] <= REL_TOL, r
    assert r["image_abs"] <= IMAGE_ATOL, r


@pytest.mark.parametrize("mesh", list(EXPECTED))
def test_each_device_holds_its_share(report, mesh):
    got = {k: report[mesh][k] for k in EXPECTED[mesh]}
    assert got == pytest.approx(EXPECTED[mesh]), report[mesh]


def test_packed_experts_split_over_fsdp_match_one_device(report):
    assert report["packed_1x8x1_text_rel"] <= REL_TOL, report


def test_offload_works_on_a_sharded_mesh(report):
    assert report["offload_2x2x2_kinds"] == ["pinned_host"]
    assert report["offload_2x2x2_image_abs"] <= IMAGE_ATOL


def test_qkv_splits_on_head_boundaries(report):
    assert report["1x1x8"]["qkv_spec"] == str(P(None, None, None, "tensor"))
    assert report["2x2x2"]["qkv_spec"] == str(P(None, "fsdp", None, "tensor"))


def test_every_parameter_declares_its_axes():
    d = dit.TransformerConfig()
    axes = dit.param_axes(d)
    assert axes["transformer_blocks"]["attn"]["img_qkv"]["kernel"] == ("layers", EMBED, None, HEADS, None)
    assert axes["transformer_blocks"]["img_mlp"]["w2"]["kernel"] == ("layers", MLP, EMBED)
    t = te.TextEncoderConfig.from_json(Path(__file__).parent / "fixtures" / "tiny_lens" / "text_encoder" / "config.json")
    for packed in (False, True):
        tree = te.param_axes(t, packed=packed)
        assert jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple))
    assert te.param_axes(t)["layers"]["mlp"]["experts"]["down_proj"] == ("layers", EXPERTS, MLP, EMBED)
    v = vae.param_axes(vae.VAEConfig())
    assert all(set(a) <= {None} for a in jax.tree.leaves(v, is_leaf=lambda x: isinstance(x, tuple)))


def test_rules_are_data_a_user_overrides():
    mesh = parallel.make_mesh(1, 1, 1)
    rules = parallel.DEFAULT_RULES.override(experts="fsdp", heads=None)
    assert rules.as_dict()["experts"] == "fsdp" and rules.as_dict()["heads"] is None
    with pytest.raises(ValueError, match="not a mesh axis"):
        parallel.DEFAULT_RULES.override(heads="model")
    # one device: nothing to split
    assert parallel.DEFAULT_RULES.spec(("layers", EMBED, HEADS), (2, 8, 8), mesh) == P()


def test_spec_resolution_skips_indivisible_and_reused_axes():
    devices = np.array(jax.devices() * 8)[:8] if len(jax.devices()) < 8 else np.array(jax.devices()[:8])
    mesh = jax.sharding.Mesh(devices.reshape(1, 2, 4), parallel.rules.MESH_AXES) if len(set(devices.tolist())) == 8 \
        else jax.sharding.AbstractMesh((1, 2, 4), parallel.rules.MESH_AXES)
    rules = parallel.DEFAULT_RULES
    assert rules.spec((EMBED, HEADS), (8, 8), mesh) == P("fsdp", "tensor")
    assert rules.spec((EMBED, HEADS), (8, 6), mesh) == P("fsdp")  # 6 heads: tensor=4 does not divide
    assert rules.spec((EXPERTS, EMBED, MLP), (8, 8, 8), mesh) == P("tensor", "fsdp")  # tensor used once


def test_expert_width_falls_back_to_fsdp_only_on_a_mesh_without_tensor():
    def spec(shape, axes=("layers", EXPERTS, EXPERT_MLP, None, None), dims=(24, 32, 5760, 90, 16), rules=None):
        mesh = jax.sharding.AbstractMesh(shape, parallel.rules.MESH_AXES)
        return (rules or parallel.DEFAULT_RULES).spec(axes, dims, mesh)

    # The real MXFP4 gate_up blocks: expert width over fsdp on an fsdp-only mesh (they were whole on every
    # device); wherever the mesh has a tensor axis, exactly as before (experts on tensor, the width whole).
    assert spec((1, 8, 1)) == P(None, None, "fsdp")
    assert spec((2, 2, 2)) == spec((1, 2, 4)) == spec((1, 1, 8)) == P(None, "tensor")
    old = parallel.DEFAULT_RULES.override(expert_mlp="tensor")
    for mesh in ((2, 2, 2), (1, 2, 4), (1, 1, 8), (1, 2, 3), (8, 1, 1)):
        assert spec(mesh) == spec(mesh, rules=old), mesh
    assert spec((1, 8, 1), dims=(24, 32, 5756, 90, 16)) == P()  # fsdp=8 does not divide the width either
    assert spec((1, 2, 3)) == P(None, None, "tensor")  # tensor=3 splits the width, not the 32 experts
    # A user's override replaces the whole target: None replicates; FirstOf is data a user can write too.
    assert spec((1, 8, 1), rules=parallel.DEFAULT_RULES.override(expert_mlp=None)) == P()
    assert spec((1, 2, 4), rules=parallel.DEFAULT_RULES.override(experts=parallel.FirstOf("data", "fsdp"))) \
        == P(None, "fsdp", "tensor")
    with pytest.raises(ValueError, match="not a mesh axis"):
        parallel.DEFAULT_RULES.override(experts=parallel.FirstOf("tensor", "model"))


def test_mesh_must_use_all_devices():
    with pytest.raises(ValueError, match="must use all"):
        parallel.make_mesh(data=2, fsdp=2, devices=np.array(jax.devices()[:1]))
    assert parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]).axis_names == ("data", "fsdp", "tensor")
