"""Bulk generation (`lens-jax generate --prompts`): resume after an interruption, per-line seeds, and
the same images on a data-parallel mesh of 8 simulated devices as on one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens_jax.errors import InputError
from lens_jax.pipelines.text_to_image import LensPipeline
from lens_jax.tools import bulk

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red cube on a wooden table", "a cat", "a lighthouse at dusk, oil painting", "two apples",
    "a city skyline in the rain with neon signs reflected in puddles", "a dog", "mountains", "a bowl of soup",
    "an astronaut riding a horse", "a blue bird",
]
BATCH = 4
OPTS = {"height": 64, "width": 64, "steps": 2, "guidance": 4.0}


@pytest.fixture(scope="module")
def pipe():
    return LensPipeline.tiny_random()


def _defaults(pipe):
    return {**pipe.defaults, **OPTS}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def test_prompt_file_formats_and_seeds(tmp_path, pipe):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "seed": 7, "size": "128x64", "negative": "blurry"}\n\n'
                 '{"prompt": "b", "steps": 3, "guidance": 1.0}\n')
    lines = bulk.read_prompt_file(f, _defaults(pipe), base_seed=100)
    assert [ln.number for ln in lines] == [1, 3]
    a, b = (ln.job for ln in lines)
    assert (a.seed, a.height, a.width, a.negative_prompt) == (7, 64, 128, "blurry")
    assert (b.seed, b.steps, b.guidance, b.height) == (103, 3, 1.0, 64)  # base seed + line number
    assert len(bulk.plan(lines, np.zeros(2, bool), 4)) == 2  # two buckets, two batches
    f.write_text('{"prompt": "a", "sed": 1}\n')
    with pytest.raises(InputError, match="p.jsonl:1 has unknown field"):
        bulk.read_prompt_file(f, _defaults(pipe))
    f.write_text('{"prompt": "a", "size": "100x64"}\n')
    with pytest.raises(InputError, match="p.jsonl:1.*multiple of 16"):
        bulk.read_prompt_file(f, _defaults(pipe))


def test_interrupted_run_resumes_to_exactly_the_images_of_each_line_alone(tmp_path, pipe):
    f = _write_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    lines = bulk.read_prompt_file(f, _defaults(pipe), base_seed=5)

    def stop_after(n):
        seen = []

        def on_image(path):
            seen.append(path)
            if len(seen) == n:
                raise KeyboardInterrupt

        return on_image

    with pytest.raises(KeyboardInterrupt):
        bulk.run_bulk(pipe, lines, out, BATCH, "tiny-random", on_image=stop_after(6), progress=False)
    assert len(list(out.glob("*.png"))) == 6
    assert not list(out.glob("*.part"))
    # A PNG without its metadata record (cut between the two writes) is not trusted.
    (out / "000007.png").write_bytes(b"not a png")
    written = bulk.run_bulk(pipe, lines, out, BATCH, "tiny-random", progress=False)
    assert sorted(p.name for p in written) == ["000007.png", "000008.png", "000009.png", "000010.png"]
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(1, 11)]
    records = bulk.read_metadata(out)
    assert sorted(records) == [f"{i:06d}.png" for i in range(1, 11)]
    assert records["000003.png"]["seed"] == 8 and records["000003.png"]["prompt"] == PROMPTS[2]
    # Nothing left to do; a changed line is redone alone.
    assert bulk.run_bulk(pipe, lines, out, BATCH, "tiny-random", progress=False) == []
    changed = bulk.read_prompt_file(_write_prompts(tmp_path / "p2.txt", PROMPTS[:4] + ["a fox"] + PROMPTS[5:]),
                                    _defaults(pipe), base_seed=5)
    assert [p.name for p in bulk.run_bulk(pipe, changed, out, BATCH, "tiny-random", progress=False)] == ["000005.png"]

    # Each image equals its line generated alone (a one-line JSONL with the line's seed).
    for ln in changed:
        alone = tmp_path / f"alone{ln.number}"
        one = tmp_path / f"one{ln.number}.jsonl"
        one.write_text(json.dumps({"prompt": ln.job.prompt, "seed": ln.job.seed}) + "\n")
        [path] = bulk.run_bulk(pipe, bulk.read_prompt_file(one, _defaults(pipe)), alone, BATCH, "tiny-random",
                               progress=False)
        np.testing.assert_array_equal(_pixels(path), _pixels(out / ln.name), err_msg=f"line {ln.number}")


def test_eight_devices_data4_match_one_device(tmp_path, pipe):
    f = _write_prompts(tmp_path / "prompts.txt", PROMPTS[:8])
    one = tmp_path / "one"
    bulk.run_bulk(pipe, bulk.read_prompt_file(f, _defaults(pipe)), one, BATCH, "tiny-random", progress=False)
    eight = tmp_path / "eight"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT),
               LENS_JAX_COMPILATION_CACHE="off", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", "import sys; from lens_jax.tools.cli import main; sys.exit(main())",
           "generate", "--prompts", str(f), "--model", "tiny-random", "--data", "4", "--height", "64", "--width",
           "64", "--steps", "2", "--guidance", "4.0", "--out", str(eight)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(p.name for p in eight.glob("*.png")) and len(names) == 8
    # The mesh shards the weights over fsdp=2, so XLA splits some contractions in two and sums the halves:
    # float32 results move by ~1e-6, which flips the uint8 rounding of a rare pixel. Same images up to that.
    for name in names:
        diff = np.abs(_pixels(eight / name).astype(int) - _pixels(one / name).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, diff.max(), (diff > 0).mean())
    assert bulk.read_metadata(eight) == bulk.read_metadata(one)
