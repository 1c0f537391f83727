"""``python -m gateway [--processes N]``: the same as ``notify gateway`` (Procfile ``gateway:``)."""

import sys

from notify.cli import main

sys.exit(main(["gateway", *sys.argv[1:]]))
