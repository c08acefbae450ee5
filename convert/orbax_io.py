"""Backward-compatible name: the orbax reader lives in `lens_jax.weights.orbax_io`."""

from lens_jax.weights.orbax_io import *  # noqa: F401,F403
from lens_jax.weights.orbax_io import __all__, load_component  # noqa: F401
