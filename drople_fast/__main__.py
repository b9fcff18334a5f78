"""``python -m drople_fast``: the ``drople-fast`` console script."""
import sys

from .training.cli import main

sys.exit(main())
