"""popguard's benchmark: popguard against a private Dovecot, each case direct and proxied.

Run ``make bench`` or ``python -m bench`` (``--quick`` for a smoke check,
``--only bulk,pingpong`` for a subset, ``--json FILE`` to keep the figures).
See ``bench/README.md`` for the cases and how to read the ratios.
"""

from __future__ import annotations

from bench.cases import Params
from bench.cli import main, run

__all__ = ["Params", "main", "run"]
