"""``python -m bridge.outbox``: the same as ``notify outbox`` (Procfile ``outbox:``)."""

import sys

from notify.cli import main

sys.exit(main(["outbox", *sys.argv[1:]]))
