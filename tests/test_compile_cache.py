"""Compile cache: no host callbacks in the sampler programs, and a second `lens-jax generate` compiles nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from lens_jax import LensPipeline
from lens_jax.parallel import compile_cache
from lens_jax.sampling import sampler as sampler_lib

ROOT = Path(__file__).resolve().parents[1]
# custom_call targets that call back into Python (jax.debug.callback, io_callback, pure_callback).
CALLBACK_MARKERS = ("callback",)


def host_callbacks(stablehlo: str) -> list[str]:
    """The lines of a StableHLO module that call back into the host."""
    return [line.strip() for line in stablehlo.splitlines()
            if "custom_call" in line and any(m in line.lower() for m in CALLBACK_MARKERS)]


def test_detector_sees_a_host_callback():
    def f(x):
        jax.debug.callback(lambda v: None, x)
        return x + 1

    assert host_callbacks(jax.jit(f).lower(jnp.ones(3)).as_text())
    assert not host_callbacks(jax.jit(lambda x: x + 1).lower(jnp.ones(3)).as_text())


def test_sampler_programs_have_no_host_callbacks_with_progress(monkeypatch):
    pipe = LensPipeline.tiny_random(seed=0, dtype="f32", compilation_cache=False)
    seen = {}
    real_run = sampler_lib.run

    def spy(programs, spec, dit_params, vae_params, latents, features, mask, sigmas, timesteps, guidance, start,
            callback=None, **kwargs):
        seen.update(programs=programs, args=(dit_params, vae_params, latents, features, mask, sigmas, timesteps,
                                             guidance, start))
        return real_run(programs, spec, dit_params, vae_params, latents, features, mask, sigmas, timesteps, guidance,
                        start, callback=callback, **kwargs)

    monkeypatch.setattr(sampler_lib, "run", spy)
    steps = []
    pipe("a cube", height=64, width=64, num_inference_steps=2, seed=0, output_type="np",
         callback=lambda i, t, x: steps.append(i))
    assert steps == [0, 1]
    programs = seen["programs"]
    p, v, x, f, m, s, t, g, start = seen["args"]
    lowered = {
        "whole": programs.whole.lower(p, v, x, f, m, s, t, g, start),
        "step": programs.step.lower(p, x, f, m, s, t, g, start, programs.table(p, t)),
        "table": programs.table.lower(p, t),
        "decode": programs.decode.lower(v, x),
    }
    for name, low in lowered.items():
        assert not host_callbacks(low.as_text()), f"{name} program calls back into the host"


def test_resolve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve_cache_dir() is None
    assert compile_cache.resolve_cache_dir(False) is None
    assert compile_cache.resolve_cache_dir(tmp_path) == str(tmp_path)
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path))
    assert compile_cache.resolve_cache_dir() == str(tmp_path)
    monkeypatch.delenv(compile_cache.ENV_VAR)
    assert compile_cache.resolve_cache_dir() == str(compile_cache.default_cache_dir())


# Runs `lens-jax generate` and prints the persistent cache's hit and miss counts.
GENERATE = """
import sys, jax
counts = {"hits": 0, "misses": 0}
def listen(event, **kw):
    if event == "/jax/compilation_cache/cache_hits": counts["hits"] += 1
    if event == "/jax/compilation_cache/cache_misses": counts["misses"] += 1
jax.monitoring.register_event_listener(listen)
from lens_jax.tools.cli import main
rc = main(["generate", "--model", "tiny-random", "--prompt", "a cube", "--height", "64", "--width", "64",
           "--steps", "2", "--seed", "0", "--out", sys.argv[1]])
print("CACHE", counts["hits"], counts["misses"])
sys.exit(rc)
"""


def _generate(tmp_path: Path, cache: Path) -> tuple[int, int]:
    env = dict(os.environ, LENS_JAX_COMPILATION_CACHE=str(cache), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(tmp_path / "out")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CACHE")][-1]
    hits, misses = map(int, line.split()[1:])
    return hits, misses


def test_second_generate_process_compiles_nothing(tmp_path):
    cache = tmp_path / "xla"
    hits, misses = _generate(tmp_path, cache)
    assert misses > 0 and any(cache.iterdir()), "the first run wrote no cache entries"
    hits2, misses2 = _generate(tmp_path, cache)
    assert misses2 == 0, f"the second run compiled {misses2} program(s)"
    assert hits2 == misses
