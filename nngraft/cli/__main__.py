"""``python -m nngraft.cli …`` runs the ``nngraft`` command line."""

import sys

from . import main

sys.exit(main())
