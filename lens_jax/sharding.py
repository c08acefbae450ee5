"""Meshes and sharding, public entry point (re-exported from `lens_jax.parallel`)."""

from .parallel import *  # noqa: F401,F403
from .parallel import __all__  # noqa: F401
