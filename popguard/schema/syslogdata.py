"""Syslog targets as data: facilities, SD-IDs, message sizes (RFC 5424-5426).

What the config file validates a syslog target against, without the sink
itself; :mod:`popguard.sinks.syslog` re-exports these names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

#: RFC 5424 §6.2.1, Table 1 (with the names syslog(3) and rsyslog use).
FACILITIES: Final[dict[str, int]] = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    "ntp": 12,
    "audit": 13,
    "alert": 14,
    "clock": 15,
    "local0": 16,
    "local1": 17,
    "local2": 18,
    "local3": 19,
    "local4": 20,
    "local5": 21,
    "local6": 22,
    "local7": 23,
}

#: 32473 is the enterprise number reserved for documentation (RFC 5612).
DEFAULT_SD_ID: Final = "popguard@32473"
#: RFC 5426 §3.2: IPv4 receivers MUST accept 480 octets.
MIN_MESSAGE: Final = 480
#: RFC 5426 §3.2: receivers SHOULD accept 2048; RFC 5425 §4.3.1: TCP 8192.
DEFAULT_MAX_MESSAGE: Final[Mapping[str, int]] = {"udp": 2048, "tcp": 8192}
#: The largest UDP payload over IPv4.
MAX_UDP_MESSAGE: Final = 65507

_SD_ID = re.compile(r"[!#-<>-?A-\\^-~]{1,32}@[0-9]+(\.[0-9]+)*\Z|[!#-<>-?A-\\^-~]{1,32}\Z")


def valid_sd_id(sd_id: str) -> bool:
    return bool(_SD_ID.match(sd_id))
