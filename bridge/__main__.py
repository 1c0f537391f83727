"""``python -m bridge``: the same as ``notify bridge`` (Procfile ``bridge:``)."""

import sys

from notify.cli import main

sys.exit(main(["bridge", *sys.argv[1:]]))
