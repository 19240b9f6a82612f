"""``python -m popguard`` is the ``popguard`` command."""

import sys

from popguard.cli import main

sys.exit(main())
