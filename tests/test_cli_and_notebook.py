"""The `lens-jax generate` command on the tiny random model, and the quick-start notebook."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from lens_jax.tools.cli import main

ROOT = Path(__file__).parent.parent


@pytest.fixture
def isolated_compilation_cache(tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv("LENS_JAX_COMPILATION_CACHE", str(tmp_path / "xla-cache"))
    yield tmp_path / "xla-cache"
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)  # the CLI set it process-wide
    compilation_cache.reset_cache()  # JAX keeps the cache it opened until reset


def test_generate_tiny_random_writes_png_with_metadata(tmp_path, capsys, isolated_compilation_cache):
    rc = main(["generate", "--model", "tiny-random", "--prompt", "a red fox", "--height", "64", "--width", "48",
               "--steps", "2", "--seed", "3", "--guidance", "3.5", "--out", str(tmp_path / "out")])
    assert rc == 0
    captured = capsys.readouterr()
    assert "its picture is noise" in captured.err
    files = sorted((tmp_path / "out").glob("*.png"))
    assert len(files) == 1 and files[0].name in captured.out
    assert not list((tmp_path / "out").glob("*.part"))
    with Image.open(files[0]) as im:
        im.load()
        assert im.size == (48, 64) and im.mode == "RGB"
        meta = json.loads(im.text["parameters"])
    assert meta["prompt"] == "a red fox" and meta["seed"] == 3 and meta["steps"] == 2
    assert meta["guidance"] == 3.5 and meta["model"] == "tiny-random"
    assert any(isolated_compilation_cache.iterdir())  # compiled programs kept for the next run


@pytest.mark.parametrize("argv, message", [
    (["--height", "60", "--width", "64"], "multiple of 16"),
    (["--aspect-ratio", "7:5"], "unknown aspect_ratio"),
])
def test_generate_bad_arguments(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("LENS_JAX_COMPILATION_CACHE", "off")
    rc = main(["generate", "--model", "tiny-random", "--prompt", "x", "--out", str(tmp_path), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_quickstart_notebook_runs():
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook did not display an image"
    assert not any(o.get("output_type") == "error" for o in outputs)


def test_gpu_xla_flag_default_respects_the_user(monkeypatch):
    from lens_jax.tools import runtime as cli

    monkeypatch.delenv("LENS_JAX_XLA_OPTIONS", raising=False)
    assert cli.gpu_xla_flags() == ["--xla_gpu_enable_triton_gemm=false"]  # the sampler's table, as flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    cli.default_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=false"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    cli.default_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("LENS_JAX_XLA_OPTIONS", "off")  # the table's opt-out covers the CLI's flags too
    cli.default_xla_flags()
    assert os.environ["XLA_FLAGS"] == ""
