"""The reliability catalogue (docs/reliability.md): one test per case of bad input, interrupt,
reproducibility and damaged checkpoint, each asserting the exit code, the one-line message's key
words and that nothing partial is left behind."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lens_jax.errors import CheckpointError, ConvertedCheckpointError, InputError
from lens_jax.pipelines.text_to_image import LensPipeline
from lens_jax.tools.cli import main

from .conftest import FIXTURES

ROOT = Path(__file__).parent.parent
TINY = FIXTURES / "tiny_lens"


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    return env


def _default_sigint() -> None:
    """In the child: Ctrl-C's default action, whatever the test runner inherited (a background job ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".convert-tmp-" in p.name or ".convert-old-" in p.name
            or p.name.endswith(".part")]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as building a pipeline."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(LensPipeline, "tiny_random", classmethod(refuse))
    monkeypatch.setattr(LensPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setenv("LENS_JAX_COMPILATION_CACHE", "off")


# ------------------------------------------------------------------------------------------------
# bad arguments of `lens-jax generate`: exit 2, one line, before any weight is loaded


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--steps", "-3"], ["--steps", "at least 1"]),
    (["--guidance", "-1"], ["--guidance", "finite number >= 0"]),
    (["--guidance", "nan"], ["--guidance", "finite number >= 0"]),
    (["--guidance", "inf"], ["--guidance", "finite number >= 0"]),
    (["--seed", "99999999999999999999"], ["--seed", "2**64 - 1"]),
    (["--seed", "-1"], ["--seed", "2**64 - 1"]),
    (["--seed", str(2**64 - 1), "--num-images", "2"], ["--seed", "seed + 1"]),
    (["--num-images", "0"], ["--num-images", ">= 1"]),
])
def test_generate_bad_number_exits_2_before_loading(tmp_path, capsys, no_loading, argv, words):
    rc = main(["generate", "--model", "tiny-random", "--prompt", "x", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    line = [x for x in err.splitlines() if x.startswith("lens-jax: error:")]
    assert len(line) == 1 and all(w in line[0] for w in words), err
    assert "denoising:" not in err and not (tmp_path / "o").exists()


def test_generate_seed_not_an_integer_is_a_usage_error(tmp_path, capsys, no_loading):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "tiny-random", "--prompt", "x", "--seed", "abc", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid int value: 'abc'" in capsys.readouterr().err


def test_generate_out_is_a_file(tmp_path, capsys, no_loading):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    rc = main(["generate", "--model", "tiny-random", "--prompt", "x", "--out", str(f)])
    assert rc == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert f.read_text() == "not a folder"
    rc = main(["generate", "--model", "tiny-random", "--prompt", "x", "--out", str(f / "sub")])
    assert rc == 2 and "cannot be created" in capsys.readouterr().err


def test_generate_out_read_only_check_uses_access(tmp_path, monkeypatch, capsys, no_loading):
    """A read-only --out parent: the check asks os.access, so it holds for root too (CI runs as root,
    where a chmod-based test could not fail)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    rc = main(["generate", "--model", "tiny-random", "--prompt", "x", "--out", str(tmp_path / "imgs")])
    assert rc == 2 and "not writable" in capsys.readouterr().err


def test_generate_without_model_says_how_to_get_weights(tmp_path, capsys, no_loading):
    rc = main(["generate", "--prompt", "x", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "no --model given" in err and "hf download" in err and "tiny-random" in err
    assert "huggingface-cli" not in err


def test_hub_hints_use_the_installed_cli():
    """`hf` is the command of the installed huggingface_hub; no hint names the removed `huggingface-cli`."""
    import importlib.metadata as md

    scripts = {e.name for e in md.distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    assert "hf" in scripts
    hits = [p for p in (ROOT / "lens_jax").rglob("*.py") if "huggingface-cli" in p.read_text()]
    assert not hits


# ------------------------------------------------------------------------------------------------
# bad arguments of LensPipeline.__call__: InputError before `self` is even used


@pytest.mark.parametrize("kwargs, words", [
    ({"prompt": 5}, ["prompt", "string"]),
    ({"prompt": ["a", 5]}, ["prompt", "holds 5"]),
    ({"prompt": []}, ["prompt", "empty"]),
    ({"prompt": "a", "negative_prompt": 3}, ["negative_prompt", "string"]),
    ({"prompt": "a", "negative_prompt": ["x", "y"]}, ["negative_prompt", "2 entries"]),
    ({"prompt": "a", "seed": 2**64}, ["seed", "2**64 - 1"]),
    ({"prompt": "a", "seed": "abc"}, ["seed", "integer"]),
    ({"prompt": "a", "seed": 1.5}, ["seed", "integer"]),
    ({"prompt": "a", "num_inference_steps": 0}, ["num_inference_steps", "at least 1"]),
    ({"prompt": "a", "num_inference_steps": 2.5}, ["num_inference_steps", "integer"]),
    ({"prompt": "a", "guidance_scale": float("nan")}, ["guidance_scale", "finite"]),
    ({"prompt": "a", "guidance_scale": -0.5}, ["guidance_scale", ">= 0"]),
    ({"prompt": "a", "latents": np.full((1, 4, 4), np.nan)}, ["latents", "NaN"]),
    ({"prompt": "a", "num_images_per_prompt": 0}, ["num_images_per_prompt", ">= 1"]),
])
def test_pipeline_call_refuses_bad_arguments_first(kwargs, words):
    with pytest.raises(InputError) as e:
        LensPipeline.__call__(None, **kwargs)  # no pipeline at all: the checks come before any work
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


# ------------------------------------------------------------------------------------------------
# images: per-image seeds, metadata, permissions, --from-png, bit-exact regeneration


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    old = os.umask(0o022)
    try:
        os.environ["LENS_JAX_COMPILATION_CACHE"] = "off"
        rc = main(["generate", "--model", "tiny-random", "--prompt", "a red fox", "--prompt", "a cat",
                   "--num-images", "2", "--height", "32", "--width", "32", "--steps", "2", "--seed", "41",
                   "--out", str(out / "a")])
        assert rc == 0
        first = sorted((out / "a").glob("*.png"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        rc = main(["generate", "--from-png", str(first[3]), "--out", str(out / "b")])
        assert rc == 0
    finally:
        os.umask(old)
        os.environ.pop("LENS_JAX_COMPILATION_CACHE", None)
    return first, sorted((out / "b").glob("*.png"))


def _meta(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["parameters"])


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_each_image_records_its_own_seed_and_settings(generated):
    first, _ = generated
    metas = [_meta(p) for p in first]
    assert [m["seed"] for m in metas] == [41, 42, 43, 44]
    assert [m["prompt"] for m in metas] == ["a red fox", "a red fox", "a cat", "a cat"]
    from lens_jax import __version__

    m = metas[3]
    assert m["lens_jax_version"] == __version__ and m["dtype"] == "f32" and m["variant"] == "lens"
    assert m["sampler"]["steps"] == 2 and m["sampler"]["scheduler"]["shift"] == 3.0 and "lora" in m
    assert len({_pixels(p).tobytes() for p in first}) == 4


def test_pngs_respect_the_umask_and_no_part_file_remains(generated):
    first, _ = generated
    for p in first:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert not _leftovers(first[0].parent)


def test_from_png_regenerates_image_k_bit_exactly(generated):
    first, again = generated
    assert len(again) == 1
    assert _meta(again[0])["seed"] == 44 and _meta(again[0])["prompt"] == "a cat"
    assert np.array_equal(_pixels(again[0]), _pixels(first[3]))


def test_noise_of_image_k_depends_only_on_its_seed():
    from lens_jax.pipelines.text_to_image import image_noise, seed_key

    import jax

    batch = image_noise(2**40 + 7, (3, 4, 8))
    assert np.array_equal(batch[2], image_noise(2**40 + 9, (1, 4, 8))[0])
    assert not np.array_equal(image_noise(5, (1, 4, 8)), image_noise(2**32 + 5, (1, 4, 8)))  # all 64 bits count
    assert np.array_equal(np.asarray(jax.random.key_data(seed_key(5))),
                          np.asarray(jax.random.key_data(jax.random.key(5))))


def test_from_png_without_metadata(tmp_path, capsys, no_loading):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    rc = main(["generate", "--from-png", str(tmp_path / "plain.png"), "--out", str(tmp_path)])
    assert rc == 2 and "no lens-jax generation metadata" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# interrupts: real signals to real processes


def _wait_for(proc, stream_lines: list, needle: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            return False
        stream_lines.append(line)
        if needle in line:
            return True
    return False


def test_ctrl_c_during_generate_stops_at_a_step_boundary(tmp_path):
    out = tmp_path / "imgs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lens_jax.tools.cli", "generate", "--model", "tiny-random", "--prompt", "x",
         "--height", "32", "--width", "32", "--steps", "5000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(LENS_JAX_COMPILATION_CACHE="off"),
        preexec_fn=_default_sigint,
    )
    lines: list[str] = []
    # tqdm redraws with \r: read characters until the first finished step is shown
    import re

    buf, end = "", time.monotonic() + 240
    while time.monotonic() < end and not re.search(r"\| *[1-9]\d*/5000 \[", buf):
        ch = proc.stderr.read(1)
        if not ch:
            break
        buf += ch
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)
    lines = buf + rest[1]
    assert proc.returncode == 130, lines
    assert time.monotonic() - t0 < 30  # not after the remaining steps
    stopped = re.search(r"lens-jax: interrupted after step (\d+)/5000; no image was written", lines)
    assert stopped and 1 <= int(stopped.group(1)) < 5000, lines
    assert "Traceback" not in lines
    assert not out.exists() or not list(out.iterdir())


def _convert_cmd(dst: Path) -> list[str]:
    return [sys.executable, "-m", "lens_jax.tools.cli", "convert", "--src", str(TINY), "--dst", str(dst),
            "--dtype", "f32", "--no-progress"]


def _interrupt_convert(dst: Path, sig: int, delay: float) -> tuple[int, str]:
    """Start a conversion, send `sig` `delay` seconds after its planning is done (writing starts)."""
    proc = subprocess.Popen(_convert_cmd(dst), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(), preexec_fn=_default_sigint)
    lines: list[str] = []
    ready = _wait_for(proc, lines, "vae: diffusers layout", 240)
    if ready:
        time.sleep(delay)  # a seeded point inside the writing phase
        proc.send_signal(sig)
    err = "".join(lines) + proc.communicate(timeout=240)[1]
    assert ready, err
    return proc.returncode, err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupted_convert_leaves_nothing(tmp_path, sig, capsys):
    """Six conversions at once, each interrupted at its own seeded point of the writing phase."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(13 if sig == "SIGINT" else 17)
    dsts = [tmp_path / f"run{n}" / "out" for n in range(6)]
    for dst in dsts:
        dst.parent.mkdir()
    # Inside the writing phase: a lone tiny conversion writes for ~1.9 s on 2 quiet cores (longer with six
    # at once); later delays let fast runs finish first and the check below fail on a quiet machine.
    delays = [rng.uniform(0.0, 1.5) for _ in dsts]
    with ThreadPoolExecutor(len(dsts)) as pool:
        results = list(pool.map(lambda a: _interrupt_convert(a[0], getattr(signal, sig), a[1]), zip(dsts, delays)))
    interrupted = 0
    for dst, (rc, err) in zip(dsts, results):
        if sig == "SIGINT":
            assert "Traceback" not in err and "Event loop is closed" not in err, err
            if rc == 130:
                interrupted += 1
                assert "interrupted; nothing was written" in err and "temporary folder was removed" in err
                assert not dst.exists()
            else:  # the signal came after the last write: the conversion is complete. A SIGINT landing
                # during interpreter exit (after "wrote ...") ends the process by the signal itself.
                assert rc in (0, -signal.SIGINT) and (dst / "manifest.json").is_file(), (rc, err)
                assert "wrote " in err, err
            assert not _leftovers(dst.parent), _leftovers(dst.parent)
        else:
            assert rc in (-signal.SIGKILL, 0), (rc, err)
            interrupted += rc != 0
            if not (dst / "manifest.json").is_file():
                rc = main(["convert", "--src", str(TINY), "--dst", str(dst), "--dtype", "f32", "--no-progress"])
                capsys.readouterr()
                assert rc == 0 and (dst / "manifest.json").is_file()
                assert not _leftovers(dst.parent), _leftovers(dst.parent)
    assert interrupted >= 3  # most signals landed while writing


def test_convert_leftover_of_a_live_run_is_named_not_removed(tmp_path, capsys):
    from lens_jax.tools import interrupts

    dst = tmp_path / "out"
    live = tmp_path / ".out.convert-tmp-aaaaaaaaaaaa"
    live.mkdir()
    interrupts.mark_owner(live)  # this very process: alive
    interrupts.clean_leftovers(dst, (".convert-tmp-*",), print)
    out = capsys.readouterr().out
    assert live.is_dir() and f"rm -rf {live}" in out


def test_convert_read_only_parent(tmp_path, monkeypatch, capsys):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    rc = main(["convert", "--src", str(TINY), "--dst", str(tmp_path / "out"), "--dtype", "f32"])
    err = capsys.readouterr().err
    assert rc == 2 and "read-only" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# damaged checkpoints: one line naming the component and the fix, at load


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "out"
    assert main(["convert", "--src", str(TINY), "--dst", str(dst), "--dtype", "f32", "--no-progress"]) == 0
    return dst


def _largest_data_file(root: Path, component: str) -> Path:
    return max((p for p in (root / component / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def _bump_layers(root: Path) -> None:
    cfg = json.loads((root / "transformer" / "config.json").read_text())
    cfg["num_layers"] += 1
    (root / "transformer" / "config.json").write_text(json.dumps(cfg))


def _drop_vae_from_manifest(root: Path) -> None:
    m = json.loads((root / "manifest.json").read_text())
    del m["components"]["vae"]
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, words", [
    (lambda r: _truncate(_largest_data_file(r, "transformer")), ["converted transformer", "truncated", "--verify"]),
    (lambda r: _largest_data_file(r, "transformer").unlink(), ["converted transformer", "missing", "--verify"]),
    (lambda r: _truncate(_largest_data_file(r, "text_encoder")), ["converted text_encoder", "truncated"]),
    (lambda r: (r / "vae" / "params" / "state" / "_METADATA").unlink(), ["converted vae", "missing"]),
    (_bump_layers, ["converted transformer", "does not match its config.json", "convert it again"]),
    (_drop_vae_from_manifest, ["no converted vae", "lens-jax convert"]),
], ids=["truncated-dit", "missing-dit-file", "truncated-text-encoder", "missing-metadata", "config-mismatch",
        "manifest-mismatch"])
def test_damaged_converted_checkpoint_one_line(converted, tmp_path, damage, words):
    import jax.numpy as jnp

    from lens_jax.pipelines.components import load_components

    root = tmp_path / "copy"
    shutil.copytree(converted, root)
    damage(root)
    with pytest.raises(ConvertedCheckpointError) as e:
        load_components(root, jnp.float32)  # the text encoder is checked here too, not at the first prompt
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_truncated_text_encoder_file_found_at_load(tmp_path):
    import jax.numpy as jnp

    from lens_jax.pipelines.components import load_components

    root = tmp_path / "lens"
    shutil.copytree(TINY, root)
    _truncate(root / "text_encoder" / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_components(root, jnp.float32)
    assert "text_encoder/model.safetensors" in str(e.value) and "truncated" in str(e.value)


# ------------------------------------------------------------------------------------------------
# quiet by default


def test_no_pytorch_banner_without_torch(tmp_path):
    """With torch unimportable, loading the tokenizer prints nothing (transformers' banner is off)."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # find_spec('torch') is None: transformers sees no torch\n"
        "from lens_jax.pipelines.prompt import load_tokenizer\n"
        f"load_tokenizer({str(TINY / 'tokenizer')!r})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "PyTorch was not found" not in r.stderr and r.stderr.strip() == "", r.stderr
