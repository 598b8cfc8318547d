"""``python -m hant.tools ...`` runs the ``hant`` command line (for when the script is not on PATH)."""

import sys

from hant.tools.cli import main

sys.exit(main())
