"""The conversion tool's checkout entry point (`python -m convert`); the code is `lens_jax.tools.convert`.

Not installed: after `pip install lens-jax` use `lens-jax convert`.
"""
