"""`python -m hiera_jax.predict`: the inference command line, `hiera_jax.inference.cli`.

Imported, this name is that module itself (not a copy), so `hiera_jax.predict.main` is
`hiera_jax.inference.cli.main`.
"""

import sys

from hiera_jax.inference import cli

if __name__ == "__main__":
    sys.exit(cli.main())
else:
    sys.modules[__name__] = cli
