"""`python -m convert` from a checkout: the same tool as `lens-jax convert` (lens_jax.tools.convert)."""

import sys

from lens_jax.tools.convert import main

if __name__ == "__main__":
    sys.exit(main())
