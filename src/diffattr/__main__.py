"""``python -m diffattr``: the command line, also as torchrun's module (``-m diffattr``)."""

import sys

from diffattr.cli import main

sys.exit(main())
