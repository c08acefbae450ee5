"""lens-jax: a pure-functional JAX/Flax port of Microsoft's Lens text-to-image model."""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "LensPipeline":
        from .pipelines.text_to_image import LensPipeline

        return LensPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
