"""``python -m actsteer`` runs the CLI (same as the ``actsteer`` command)."""

import sys

from .hf_integration.cli import main

sys.exit(main())
