"""Command-line tools on top of the library: `lens-jax generate`, `lens-jax convert`, ..."""
