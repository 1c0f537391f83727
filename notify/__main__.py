"""``python -m notify``: the ``notify`` command, for children started with this interpreter."""

import sys

from .cli import main

sys.exit(main())
