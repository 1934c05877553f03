"""`python -m rsa_jax ...` is the `rsa-jax` console script."""

import sys

from rsa_jax.cli import main

sys.exit(main())
