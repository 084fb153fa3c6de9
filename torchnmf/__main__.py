"""``python -m torchnmf`` runs the command line (see :mod:`torchnmf.cli`)."""
import sys

from .cli import main

sys.exit(main())
