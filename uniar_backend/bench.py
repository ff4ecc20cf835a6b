"""``python -m uniar_backend.bench``: the AR sampler benchmark, which lives in :mod:`uniar_backend.tools.bench`
(this entry point is kept for the commands in the docs)."""

import sys

from .tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
