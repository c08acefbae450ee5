"""`lens-jax parity` on the tiny golden checkpoint: figures, broken ports, missing libraries.

The DiT reference is tests/parity_reference_dit.py, a PyTorch stand-in written from the model
description (checked here against the goldens' io_dit). Tolerances are the parity tests' own
(lens_jax.tools.parity.metrics.F32_TOLERANCE, read by test_transformer / test_text_encoder /
test_vae / test_pipeline), so the tool and the tests hold the same line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lens_jax.tools.parity import cli as parity_cli
from lens_jax.tools.parity import components as comp
from lens_jax.tools.parity import metrics

from .conftest import FIXTURES
from .test_pipeline import IMAGE_ATOL, LATENT_ATOL, PROMPT
from .test_text_encoder import REL_TOL
from .test_transformer import BLOCK_ATOL, DIT_ATOL
from .test_vae import ATOL as VAE_ATOL

torch = pytest.importorskip("torch")

TINY = FIXTURES / "tiny_lens"
STAND_IN = Path(__file__).parent / "parity_reference_dit.py"
ROOT = Path(__file__).parent.parent


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def io_dit():
    return load_file(FIXTURES / "io_dit.safetensors")


@pytest.fixture(scope="module")
def io_pipe():
    return load_file(FIXTURES / "io_pipeline.safetensors")


def _golden_dit_inputs(io):
    return (io["hidden_states"], [io[f"text_features_layer{i}"] for i in range(4)], io["text_mask"], io["timestep"],
            (3, 5))


def _opts(**kw):
    base = dict(model=TINY, size=(64, 80), prompt=PROMPT, reference_dit=str(STAND_IN))
    return comp.Options(**{**base, **kw})


@pytest.fixture(scope="module")
def full(tmp_path_factory, io_dit, io_pipe):
    """One full run on the goldens' inputs (DiT: io_dit; end to end: io_pipeline's initial latents)."""
    opts = _opts(dit_inputs=_golden_dit_inputs(io_dit), latents=io_pipe["latents_init"])
    folder = tmp_path_factory.mktemp("report")
    lines = []
    report = parity_cli.parity(opts, comp.COMPONENTS, folder,
                               echo=lambda *a, **k: lines.append(" ".join(map(str, a))) if "file" not in k else None)
    return opts, report, folder, "\n".join(lines)


def test_stand_in_reference_reproduces_the_goldens(io_dit):
    from lens_jax.tools.parity import reference as ref_lib

    model = ref_lib.load_dit(ref_lib.find_dit_class(str(STAND_IN)), TINY / "transformer", "f32")
    out, streams = ref_lib.dit_forward(model, *_golden_dit_inputs(io_dit), capture=True)
    metrics.assert_close(ref_lib.to_numpy(out), io_dit["output"], atol=DIT_ATOL, what="stand-in output")
    for i, (img, txt) in enumerate(streams):
        metrics.assert_close(img, io_dit[f"debug_block{i}_img"], atol=BLOCK_ATOL, what=f"stand-in block {i} img")
        metrics.assert_close(txt, io_dit[f"debug_block{i}_txt"], atol=BLOCK_ATOL, what=f"stand-in block {i} txt")


def test_report_files_and_verdicts(full):
    _, report, folder, table = full
    assert {p.name for p in folder.iterdir()} >= {
        "report.json", "summary.md", "errors_text_encoder.png", "errors_transformer.png", "errors_pipeline.png",
        "vae_decode_compare.png", "pipeline_compare.png"}
    saved = json.loads((folder / "report.json").read_text())
    secs = saved["components"]
    assert list(secs) == list(comp.COMPONENTS)
    for name, sec in secs.items():
        assert sec["status"] == "ok" and sec["passed"], name
        assert sec.get("first_jump") is None, name
        assert name in table
    # Same tolerances as the parity tests.
    assert secs["transformer"]["tolerance"] == {"atol": DIT_ATOL}
    assert secs["text_encoder"]["tolerance"] == {"rel": REL_TOL}
    assert secs["vae"]["tolerance"] == {"atol": VAE_ATOL}
    assert secs["pipeline"]["tolerance"] == {"atol": IMAGE_ATOL}
    blocks = [r for r in secs["transformer"]["records"] if "block" in r]
    assert len(blocks) == 2 * 3 * 2 and all(r["bound"] == BLOCK_ATOL for r in blocks)  # blocks x sigmas x streams
    steps = [r for r in secs["pipeline"]["records"] if r["name"].startswith("step")]
    assert len(steps) == 4 and all(r["bound"] == LATENT_ATOL for r in steps)
    md = (folder / "summary.md").read_text()
    assert "| transformer | output @ sigma 0.97 |" in md and "block 1 txt @ sigma 0.031" in md
    assert "pass" in table and "FAIL" not in table


def _agree(report_rec, ours, golden, ref):
    """The report's figure (ours vs reference) and the parity tests' figure (ours vs golden) agree to within
    the reference-vs-golden distance (triangle inequality), and both pass the same bound."""
    golden_fig = metrics.max_abs(ours, golden)
    assert abs(report_rec["max_abs"] - golden_fig) <= metrics.max_abs(ref, golden) + 1e-12
    return golden_fig


def test_report_figures_equal_the_golden_parity_figures(full, io_dit, io_pipe):
    opts, report, _, _ = full
    secs = report["components"]
    # DiT: the report's output figures vs assert_close(ours, io_dit.output).
    ours, ref = opts.arrays["transformer"]
    outputs = [r for r in secs["transformer"]["records"] if r["name"].startswith("output")]
    for k, rec in enumerate(outputs):
        fig = _agree(rec, ours[k], io_dit["output"][k], ref[k])
        assert fig <= DIT_ATOL and rec["max_abs"] <= DIT_ATOL
    # Text encoder: the default prompt is row 0 of io_text_encoder.
    golden = load_file(FIXTURES / "io_text_encoder.safetensors")
    assert secs["text_encoder"]["tokens"] == int(golden["attention_mask"][0].sum())
    ours_l, ref_l = opts.arrays["text_encoder"]
    for i in range(4):
        rec = secs["text_encoder"]["records"][i]
        g = golden[f"selected_layer{i}"][:1]
        fig = _agree(rec, ours_l[i], g, ref_l[i])
        assert fig <= REL_TOL * np.abs(g).max()
    # End to end: every step's latents and the image vs io_pipeline.
    (traj, img), (rtraj, rimg) = opts.arrays["pipeline"]
    for i in range(4):
        rec = secs["pipeline"]["records"][i]
        assert _agree(rec, traj[i], io_pipe[f"step{i}_latents"], rtraj[i]) <= LATENT_ATOL
    assert _agree(secs["pipeline"]["headline"], img, io_pipe["image_np"], rimg) <= IMAGE_ATOL


def test_broken_dit_block_is_caught(monkeypatch, io_dit):
    """Block 1 with its attention (shift, gate) swapped: the report names block 1."""
    from lens_jax.weights import dit as tr_mod  # what the parity tool loads through

    load = tr_mod.load

    def broken_load(*a, **k):
        tr = load(*a, **k)
        mod = tr.params["transformer_blocks"]["img_mod"]
        d = tr.config.inner_dim
        for key in ("kernel", "bias"):
            w = np.array(mod[key])
            w[1, ..., 0:d], w[1, ..., 2 * d:3 * d] = w[1, ..., 2 * d:3 * d].copy(), w[1, ..., 0:d].copy()
            mod[key] = jnp.asarray(w)
        return tr

    monkeypatch.setattr(tr_mod, "load", broken_load)
    sec = comp.run_component("transformer", _opts(dit_inputs=_golden_dit_inputs(io_dit)))
    assert sec["status"] == "ok" and not sec["passed"]
    assert sec["first_jump"]["layer"] == "block 1"
    block0 = [r for r in sec["records"] if r.get("block") == 0]
    assert all(r["passed"] for r in block0)


def test_text_layer_without_rope_is_caught(monkeypatch):
    from lens_jax.models import text_encoder as te_model

    monkeypatch.setattr(te_model, "apply_rope", lambda x, cos, sin: x)
    jax.clear_caches()  # the jitted encoder may hold a trace with RoPE
    try:
        sec = comp.run_component("text_encoder", _opts())
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert sec["status"] == "ok" and not sec["passed"]
    assert sec["first_jump"]["layer"] == "layer 0"
    assert sec["first_jump"]["error_over_bound"] > 10


def test_missing_reference_others_still_run(monkeypatch, tmp_path):
    import diffusers

    monkeypatch.setattr(diffusers, "LensTransformer2DModel", None, raising=False)  # a diffusers without Lens
    report = parity_cli.parity(_opts(reference_dit=None), ("transformer", "pipeline", "vae"), tmp_path, echo=_quiet)
    secs = report["components"]
    for name in ("transformer", "pipeline"):
        assert secs[name]["status"] == "skipped"
        assert "no Lens DiT reference" in secs[name]["message"] and "--reference-dit" in secs[name]["message"]
    assert secs["vae"]["status"] == "ok" and secs["vae"]["passed"]
    bad = comp.run_component("transformer", _opts(reference_dit=str(tmp_path / "nope.py")))
    assert bad["status"] == "skipped" and "nope.py" in bad["message"]
    assert "skipped: no Lens DiT reference" in (tmp_path / "summary.md").read_text()


def test_missing_diffusers_others_still_run(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    report = parity_cli.parity(_opts(), ("text_encoder", "vae"), tmp_path, echo=_quiet)
    secs = report["components"]
    assert secs["vae"]["status"] == "skipped"
    assert secs["vae"]["message"].startswith("diffusers is not installed") and "lens-jax[parity]" in secs["vae"]["message"]
    assert secs["text_encoder"]["status"] == "ok" and secs["text_encoder"]["passed"]


def test_missing_torch_is_one_line_per_component(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lens_jax.tools.cli import main\n"
            f"sys.exit(main(['parity', '--model', {str(TINY)!r}, '--size', '64x80', '--report', {str(tmp_path)!r},"
            f" '--reference-dit', {str(STAND_IN)!r}]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    # nothing can be compared without torch: one line before any work, exit 2, no report
    assert res.returncode == 2, res.stderr
    assert "lens-jax: error: torch is not installed" in res.stderr and "lens-jax[parity]" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "report.json").exists()


def test_a_crashing_component_is_reported_and_the_others_still_run(monkeypatch, tmp_path):
    def boom(opts):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmore detail")

    monkeypatch.setitem(comp.RUNNERS, "vae", boom)
    monkeypatch.setitem(comp.RUNNERS, "text_encoder", lambda opts: {"status": "skipped", "message": "not needed"})
    report = parity_cli.parity(_opts(), ("vae", "text_encoder"), tmp_path, echo=_quiet)
    assert report["components"]["vae"] == {"status": "failed", "message": "RuntimeError: RESOURCE_EXHAUSTED: out of memory"}
    assert report["components"]["text_encoder"]["status"] == "skipped"
    assert "failed: RuntimeError" in (tmp_path / "summary.md").read_text()


def test_bad_arguments_are_one_line(capsys):
    from lens_jax.tools.cli import main

    assert main(["parity", "--model", str(TINY), "--size", "60x80"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert main(["parity", "--model", str(TINY), "--components", "dit"]) == 2
    assert "unknown ['dit']" in capsys.readouterr().err
    assert main(["parity", "--model", str(FIXTURES)]) == 2
    assert "not a Lens checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the metrics library


def test_metrics():
    ref = np.array([[1.0, -2.0], [4.0, 0.5]])
    rec = metrics.compare(ref + 1e-3, ref, "x", tolerance=metrics.Tolerance(atol=2e-3))
    assert rec["max_abs"] == pytest.approx(1e-3) and rec["max_rel"] == pytest.approx(2.5e-4)
    assert rec["passed"] and rec["cosine"] > 0.999999 and rec["ref_scale"] == 4.0
    assert metrics.psnr(ref, ref) == float("inf")
    assert metrics.psnr(np.zeros(4), np.full(4, 0.1), data_range=1.0) == pytest.approx(20.0)
    assert metrics.cosine([1, 0], [0, 1]) == 0.0
    with pytest.raises(AssertionError, match="max abs 0.1 .*cosine"):
        metrics.assert_close(ref + 0.1, ref, atol=1e-3, what="x")
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.max_abs(np.zeros(3), np.zeros(4))
    # the first layer over the bound; the largest growth between neighbours
    assert metrics.first_jump([1e-6, 2e-6, 5e-3, 6e-3], tol=1e-4) == 2
    assert metrics.first_jump([1e-6, 2e-6, 3e-6], tol=1e-4) is None
    assert metrics.first_jump([2e-4, 3e-4, 5e-2], tol=1e-4) == 0
    assert metrics.first_jump([1e-6, float("nan")], tol=1e-4) == 1
    assert metrics.largest_jump([1e-3, 2e-3, 5e-1, 6e-1]) == 2
    assert metrics.tolerance_for("transformer", "f32").atol == DIT_ATOL
    assert metrics.tolerance_for("transformer", "bf16").min_cosine == 0.999
