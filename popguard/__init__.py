"""popguard: a transparent POP3 proxy and audit gateway.

The package is split the way h11 and mitmproxy split a protocol:

* ``popguard.core`` is sans-I/O: wire grammar, the RFC 1939 session state
  machine and audit records as plain data.  It never imports trio, socket,
  ssl or time.
* ``popguard.shell`` is the thin trio layer: listeners, upstream connects,
  the byte pumps, timeouts, signals and shutdown.
"""

__version__ = "0.1.0"
