"""``python -m patch_matters_core`` runs the ``patch-matters`` command."""

import sys

from .cli import main

sys.exit(main())
