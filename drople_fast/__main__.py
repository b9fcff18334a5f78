"""``python -m drople_fast``: the ``drople-fast`` console script."""
import sys

from .cli import main

sys.exit(main())
