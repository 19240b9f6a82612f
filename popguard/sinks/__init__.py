"""Audit sinks that deliver on their own writer threads.

* :mod:`popguard.sinks.base` -- the bounded queue, the writer thread, retries,
  health, durability tickets (:class:`~popguard.sinks.base.QueuedSink`).
* :mod:`popguard.sinks.file` -- the hash-chained JSON-lines file.
* :mod:`popguard.sinks.stream` -- JSON lines on standard output.
* :mod:`popguard.sinks.syslog` -- RFC 5424 over UDP and TCP.

:class:`popguard.audit.AuditLog` puts them together; see
``docs/audit-delivery.md``.
"""
