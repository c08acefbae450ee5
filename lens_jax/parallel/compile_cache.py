"""The JAX persistent compilation cache: compiled XLA programs kept on disk so later processes skip compiling.

On by default for `LensPipeline` and the command-line tools; `LENS_JAX_COMPILATION_CACHE=off`
(or a pipeline's `compilation_cache=False`) turns it off, a path moves it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "LENS_JAX_COMPILATION_CACHE"
OFF_VALUES = ("", "0", "off", "none", "false")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lens-jax" / "xla"


def resolve_cache_dir(setting: bool | str | os.PathLike | None = None) -> str | None:
    """The cache folder for a setting: None = the environment (default on), False = off, True = default folder, a path."""
    if setting is False:
        return None
    if setting is None or setting is True:
        env = os.environ.get(ENV_VAR)
        if env is not None and env.strip().lower() in OFF_VALUES:
            return None if setting is None else str(default_cache_dir())
        return env if env and setting is None else str(default_cache_dir())
    return os.fspath(setting)


def enable_compilation_cache(setting: bool | str | os.PathLike | None = None) -> str | None:
    """Point JAX's persistent compilation cache at a folder (see `resolve_cache_dir`); returns it, or None when off.

    Every program is written, however fast it compiled, so that a second process compiles nothing.
    Safe to call again and after JAX has compiled something: the cache is re-initialised when the
    folder changes (JAX decides whether to use a cache once, at its first compile).
    """
    cache = resolve_cache_dir(setting)
    if cache is None:
        return None
    if jax.config.jax_compilation_cache_dir != cache:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", cache)
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache
