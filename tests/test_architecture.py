"""The structure holds: layers only point down (import-linter contracts), and pipelines are reentrant."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lens_jax import LensPipeline

ROOT = Path(__file__).parent.parent
TINY = Path(__file__).parent / "fixtures" / "tiny_lens"


def test_layering_contracts_hold():
    """models -> parallel -> weights -> sampling -> pipelines | training -> tools, no cycles, facades on top."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    proc = subprocess.run([sys.executable, "-c", code, "--config", str(ROOT / ".importlinter"), "--no-cache"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_nothing_is_installed_under_a_generic_name():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["lens_jax*"]


@pytest.fixture(scope="module")
def pipes():
    return LensPipeline.from_pretrained(TINY, dtype="f32"), LensPipeline.from_pretrained(TINY, dtype="f32")


def _run(pipe, height, steps, seen, errors):
    try:
        pipe("A cat.", height=height, width=64, num_inference_steps=steps, guidance_scale=4.0, seed=0,
             output_type="latent", callback=lambda step, t, latents: seen.append((step, latents.shape)))
    except Exception as e:  # pragma: no cover - surfaced by the assertion below
        errors.append(e)


@pytest.mark.parametrize("same_pipeline", [False, True])
def test_two_threads_see_only_their_own_progress(pipes, same_pipeline):
    a, b = pipes if not same_pipeline else (pipes[0], pipes[0])
    seen_a, seen_b, errors = [], [], []
    threads = [threading.Thread(target=_run, args=(a, 64, 3, seen_a, errors)),
               threading.Thread(target=_run, args=(b, 48, 2, seen_b, errors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert seen_a == [(i, (1, 16, 32)) for i in range(3)]
    assert seen_b == [(i, (1, 12, 32)) for i in range(2)]


def test_progress_does_not_change_the_result(pipes):
    pipe = pipes[0]
    call = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.0, seed=1, output_type="latent")
    plain = pipe("A cat.", **call).latents
    steps = []
    with_progress = pipe("A cat.", callback=lambda i, t, x: steps.append(i), **call).latents
    assert steps == [0, 1, 2]
    np.testing.assert_array_equal(plain, with_progress)
