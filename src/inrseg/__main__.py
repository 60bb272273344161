"""``python -m inrseg`` = the ``inrseg`` command."""

import sys

from inrseg.cli import main

sys.exit(main())
