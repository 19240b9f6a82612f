"""Tamper-evident audit trail: hash chains over JSON-lines audit records.

* :mod:`popguard.trail.chain` -- seal records into a chain (the writer side).
* :mod:`popguard.trail.verify` -- check a trail, report the first problem.
* :mod:`popguard.trail.query` -- filter records from a trail.
* :mod:`popguard.trail.report` -- per-user, per-day activity counts.
* :mod:`popguard.trail.html` -- the compliance report, one HTML page.
* :mod:`popguard.trail.cli` -- the ``popguard audit`` subcommands.

Standard library only; every reader streams (constant memory).  See
``docs/audit-integrity.md``.
"""
