"""Bad input to `lens-jax generate --prompts` and `lens-jax serve` is refused in one line (exit 2)
before anything is loaded, and prompt-file lines are checked like the pipeline's arguments.

Loading is replaced by a sentinel that raises, so a check that came too late (or never) fails here
at once instead of loading a model or starting a server."""

from __future__ import annotations

import json

import pytest

from lens_jax.errors import InputError
from lens_jax.tools import bulk, cli, jobs

DEFAULTS = {"num_inference_steps": 2, "guidance_scale": 4.0}


class Loaded(Exception):
    """Raised by the stand-in loader: the command got past its checks."""


@pytest.fixture
def no_loading(monkeypatch):
    def load(*args, **kwargs):
        raise Loaded(args, kwargs)

    monkeypatch.setattr(bulk, "load_pipeline", load)
    monkeypatch.setattr("lens_jax.parallel.make_mesh", lambda *a, **k: None)


def usage_error(argv, capsys) -> str:
    """Run the CLI; it must exit 2 with one `lens-jax: error:` line and load nothing."""
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("lens-jax: error: "), err
    return err[0]


@pytest.fixture
def prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a cat\na dog\n")
    return str(f)


@pytest.mark.parametrize("extra, words", [
    ([], "no --model given"),
    (["--model", "tiny-random", "--guidance", "nan"], "--guidance must be a finite number"),
    (["--model", "tiny-random", "--steps", "0"], "--steps must be at least 1"),
    (["--model", "tiny-random", "--batch-size", "-2"], "--batch-size must be at least 1"),
    (["--model", "tiny-random", "--out", "A_FILE"], "is a file, not a folder"),
    (["--model", "tiny-random", "--lora", "x.safetensors", "--image", "in.png"], "--image, --lora cannot be combined"),
    (["--model", "tiny-random", "--num-images", "3"], "--num-images cannot be combined with --prompts"),
    (["--model", "tiny-random", "--prompt", "x", "--reasoner"], "--prompt, --reasoner cannot be combined"),
])
def test_bulk_flags_are_checked_before_loading(extra, words, prompts, tmp_path, capsys, no_loading):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    extra = [str(a_file) if x == "A_FILE" else x for x in extra]
    line = usage_error(["generate", "--prompts", prompts, "--out", str(tmp_path / "out"), *extra], capsys)
    assert words in line, line


def test_bulk_with_good_flags_reaches_the_loader_with_its_quantize(prompts, tmp_path, no_loading):
    with pytest.raises(Loaded) as e:
        cli.main(["generate", "--prompts", prompts, "--model", "tiny-random", "--out", str(tmp_path / "o"),
                  "--quantize", "int8"])
    args, kwargs = e.value.args
    assert "int8" in args or kwargs.get("quantize") == "int8"  # --quantize was silently dropped in bulk mode


@pytest.mark.parametrize("line, words", [
    ({"prompt": "x", "steps": 2.5}, "steps must be an integer"),
    ({"prompt": "x", "steps": "abc"}, "steps must be an integer"),
    ({"prompt": "x", "guidance": -1}, "guidance must be a finite number >= 0"),
    ({"prompt": "x", "guidance": float("nan")}, "guidance must be a finite number >= 0"),
    ({"prompt": "x", "seed": 1.5}, "seed must be an integer"),
    ({"prompt": "x", "seed": True}, "seed must be an integer"),
])
def test_prompt_file_lines_are_checked_like_pipeline_arguments(line, words, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(InputError, match="p.jsonl:2") as e:
        bulk.read_prompt_file(f, {**DEFAULTS, "height": 64, "width": 64})
    assert words in str(e.value)


def test_make_job_keeps_good_values():
    job = jobs.make_job(DEFAULTS, "x", seed=7, height=64, width=32, steps=3, guidance=0)
    assert (job.steps, job.guidance, job.seed, job.height, job.width) == (3, 0.0, 7, 64, 32)
    assert jobs.make_job(DEFAULTS, "x", seed=1, height=64, width=64).bucket.steps == 2


@pytest.mark.parametrize("extra, words", [
    ([], "no --model given"),
    (["--model", "tiny-random", "--port", "70000"], "--port 70000 is not a TCP port"),
    (["--model", "tiny-random", "--port", "-1"], "--port -1 is not a TCP port"),
    (["--model", "tiny-random", "--max-batch", "0"], "--max-batch must be at least 1"),
    (["--model", "tiny-random", "--queue-size", "0"], "--queue-size must be at least 1"),
    (["--model", "tiny-random", "--max-wait-ms", "nan"], "--max-wait-ms must be a finite number"),
    (["--model", "tiny-random", "--timeout", "-1"], "--timeout must be a finite number"),
    (["--model", "tiny-random", "--timeout", "inf"], "--timeout must be a finite number"),
])
def test_serve_flags_are_checked_before_loading(extra, words, capsys, no_loading):
    line = usage_error(["serve", *extra], capsys)
    assert words in line, line


@pytest.mark.parametrize("mult", ["nan", "inf", "-inf"])
def test_lora_multiplier_must_be_finite_before_loading(mult, tmp_path, capsys, monkeypatch):
    from lens_jax.tools import generate

    monkeypatch.setattr(generate, "_load_pipeline", lambda args: (_ for _ in ()).throw(Loaded()))
    f = tmp_path / "style.safetensors"
    f.write_bytes(b"")
    line = usage_error(["generate", "--model", "tiny-random", "--prompt", "x", "--out", str(tmp_path / "o"),
                        "--lora", f"{f}:{mult}"], capsys)
    assert "must be a finite number" in line, line
    assert generate.parse_lora_arg(f"{f}:0.5") == (str(f), 0.5)
    assert generate.parse_lora_arg("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)


def test_pipeline_load_lora_refuses_a_non_finite_multiplier_before_reading():
    from lens_jax.pipelines.text_to_image import LensPipeline

    for bad in (float("nan"), float("inf"), "0.5", None):
        with pytest.raises(InputError, match="finite number"):
            LensPipeline.load_lora(None, "missing.safetensors", bad)  # checked before the file or the pipe is used


@pytest.mark.parametrize("extra, words", [
    (["--report", "A_FILE"], "--report"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
])
def test_parity_flags_are_checked_before_any_component_runs(extra, words, tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from lens_jax.tools.parity import cli as parity_cli

    monkeypatch.setattr(parity_cli, "parity", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    extra = [str(a_file) if x == "A_FILE" else x for x in extra]
    tiny = Path(__file__).parent / "fixtures" / "tiny_lens"
    line = usage_error(["parity", "--model", str(tiny), "--report", str(tmp_path / "r"), *extra], capsys)
    assert words in line, line


def test_bulk_pngs_get_the_umask_permissions_and_leave_no_part_file(tmp_path):
    import os
    import stat

    import numpy as np

    line = bulk.Line(3, jobs.make_job(DEFAULTS, "x", seed=1, height=16, width=16))
    old = os.umask(0o022)
    try:
        path = bulk.write_image(tmp_path, line, np.zeros((16, 16, 3), np.float32), "tiny-random")
    finally:
        os.umask(old)
    assert path.name == "000003.png" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003.png", bulk.METADATA]


def test_mesh_size_that_does_not_divide_the_devices_is_named():
    import jax

    from lens_jax.parallel import make_mesh

    n = jax.device_count()
    for kwargs, name in (({"fsdp": n + 1}, f"fsdp={n + 1}"), ({"data": n + 1}, f"data={n + 1}")):
        with pytest.raises(ValueError, match=f"mesh {name} does not divide the {n} devices") as e:
            make_mesh(**kwargs)
        assert "=0" not in str(e.value)  # was "mesh data=0 x fsdp=3 x tensor=1 must use all 1 devices"
    assert make_mesh(fsdp=n).shape == {"data": 1, "fsdp": n, "tensor": 1}
    assert make_mesh(data=n).shape == {"data": n, "fsdp": 1, "tensor": 1}


def test_no_module_keeps_a_process_wide_cache():
    """'No module-level mutable state': no lru_cache/cache-wrapped function at module level in lens_jax
    (an unbounded one kept a compiled program, and its mesh, per sharding ever loaded)."""
    import functools
    import importlib
    import pkgutil

    import lens_jax

    found = []
    for info in pkgutil.walk_packages(lens_jax.__path__, "lens_jax."):
        module = importlib.import_module(info.name)
        found += [f"{info.name}.{k}" for k, v in vars(module).items()
                  if isinstance(v, functools._lru_cache_wrapper) and getattr(v, "__module__", None) == info.name]
    assert found == [], found


@pytest.mark.parametrize("extra", [["--data", "0"], ["--batch-size", "4"], ["--fsdp", "1", "--tensor", "2"]])
def test_bulk_only_flags_are_refused_without_prompts_file(extra, tmp_path, capsys, monkeypatch):
    from lens_jax.tools import generate

    monkeypatch.setattr(generate, "_load_pipeline", lambda args: (_ for _ in ()).throw(Loaded()))
    line = usage_error(["generate", "--model", "tiny-random", "--prompt", "x", "--out", str(tmp_path / "o"), *extra],
                       capsys)
    assert f"{extra[0]}" in line and "apply to bulk generation only" in line, line


def test_sizes_accept_any_integer_type_and_name_floats():
    import numpy as np

    from lens_jax.sampling.resolution import resolve_size

    assert resolve_size(np.int64(64), np.int32(32)) == (64, 32)  # numpy integers were refused ("try 64")
    assert type(resolve_size(np.int64(64), np.int32(32))[0]) is int
    with pytest.raises(ValueError, match=r"height=32.0 must be an integer, a positive multiple of 16; try 32"):
        resolve_size(32.0, 32)
    with pytest.raises(ValueError, match="must be an integer"):
        resolve_size(True, 32)


def test_a_closed_pipe_ends_quietly():
    """`lens-jax train --print-config | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # every write to the pipe fails with EPIPE
    code = "import sys; from lens_jax.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "train", "--set", "model.source=x", "--print-config"],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
