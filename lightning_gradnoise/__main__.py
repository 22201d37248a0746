"""``python -m lightning_gradnoise`` runs the ``gradnoise`` command."""

import sys

from lightning_gradnoise.cli import main

sys.exit(main())
