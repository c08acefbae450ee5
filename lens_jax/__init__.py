"""lens-jax: a pure-functional JAX/Flax port of Microsoft's Lens text-to-image model."""

__version__ = "0.1.0"
