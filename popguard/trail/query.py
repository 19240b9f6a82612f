"""Find audit records: filters over a streamed trail, JSON-lines or table output.

``popguard audit query FILE... [--user U] [--event E] [--uidl X]
[--digest HEX] [--client ADDR|CIDR] [--session S] [--since ISO]
[--until ISO] [--format json|table]``

Every flag may be repeated: a record matches if it matches any value of each
flag given (OR within a flag, AND across flags).  ``--event`` takes globs
(``'deletions.*'``).  ``--uidl`` matches a record's ``uidl`` and the
``uidl`` of any entry of its ``messages`` list.  ``--digest`` (a message's
SHA-256, as ``message.archived``, ``dele.marked`` and the deletion records
carry it) likewise matches ``digest`` and the entries' ``digest``; given
with ``--uidl``, one message of the record must have both.  Together they
find every record about one message, in any session (``docs/retention.md``).
``--since`` is inclusive, ``--until`` exclusive; a bare date is midnight UTC.

Memory is constant: records stream from the files to the output.  The table
takes its column widths from the first rows.

Query does not verify the chain.  A line with a duplicate key is never
matched or printed (neither its first nor its last value is "the" value:
another reader would take the other); it is counted in
``SkipLog.ambiguous`` and the command exits 1 (see ``reader.iter_records``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final, TextIO

from popguard.trail.chain import CHAIN_FIELDS
from popguard.trail.reader import SkipLog, iter_records, record_time

__all__ = [
    "ClientMatcher",
    "Filter",
    "client_host",
    "message_digests",
    "message_uidls",
    "parse_digest",
    "query",
    "safe_text",
    "write_json",
    "write_table",
]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_host(client: str) -> str:
    """The host part of a ``client`` field: ``[v6]:port`` or ``v4:port``."""
    if client.startswith("["):
        end = client.find("]")
        return client[1:end] if end > 0 else client
    if client.count(":") == 1:
        return client.partition(":")[0]
    return client  # a bare address (IPv6 without brackets, or no port)


def _address(text: str) -> _Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ClientMatcher:
    """``--client``: an address, a CIDR network, or an exact ``host:port``."""

    network: _Network | None = None
    exact: str | None = None

    @classmethod
    def parse(cls, text: str) -> ClientMatcher:
        text = text.strip()
        if "/" in text:
            return cls(network=ipaddress.ip_network(text, strict=False))
        address = _address(text.strip("[]"))
        if address is not None:
            return cls(network=ipaddress.ip_network(address))
        host = client_host(text)
        if host != text and _address(host) is not None:
            return cls(exact=text)  # host:port or [v6]:port
        raise ValueError(f"not an address, CIDR network or host:port: {text!r}")

    def matches(self, client: object) -> bool:
        if not isinstance(client, str):
            return False
        if self.exact is not None:
            return client == self.exact
        address = _address(client_host(client))
        if address is None or self.network is None:
            return False
        if address in self.network:
            return True
        # An IPv4 client seen through an IPv6 socket (::ffff:192.0.2.1).
        mapped = getattr(address, "ipv4_mapped", None)
        return mapped is not None and mapped in self.network


def _message_field(record: Mapping[str, Any], name: str) -> Iterator[str]:
    """The string *name* of the record, and of each entry of its ``messages``."""
    value = record.get(name)
    if isinstance(value, str):
        yield value
    messages = record.get("messages")
    if isinstance(messages, list):
        for item in messages:
            if isinstance(item, dict):
                value = item.get(name)
                if isinstance(value, str):
                    yield value


def message_uidls(record: Mapping[str, Any]) -> Iterator[str]:
    """The UIDLs a record names: ``uidl``, and ``uidl`` in ``messages`` entries."""
    return _message_field(record, "uidl")


def message_digests(record: Mapping[str, Any]) -> Iterator[str]:
    """The message digests a record names, lower-cased: ``digest``, and in ``messages``."""
    return (digest.lower() for digest in _message_field(record, "digest"))


def _message_pairs(record: Mapping[str, Any]) -> Iterator[tuple[object, object]]:
    """(uidl, lower-case digest) of the record itself and of each ``messages`` entry."""
    items = [record]
    messages = record.get("messages")
    if isinstance(messages, list):
        items += [item for item in messages if isinstance(item, dict)]
    for item in items:
        digest = item.get("digest")
        yield item.get("uidl"), digest.lower() if isinstance(digest, str) else None


_DIGEST_HEX: Final = re.compile(r"[0-9a-f]{64}")


def parse_digest(text: str) -> str:
    """``--digest``: a SHA-256 as 64 hex digits, lower-cased (``ValueError`` otherwise)."""
    digest = text.strip().lower()
    if not _DIGEST_HEX.fullmatch(digest):
        raise ValueError(f"not 64 hex digits (a SHA-256): {text!r}")
    return digest


@dataclass(frozen=True, slots=True)
class Filter:
    """What ``query`` keeps.  Empty tuples match everything."""

    users: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    uidls: tuple[str, ...] = ()
    #: Lower-case hex SHA-256s (:func:`parse_digest`).
    digests: tuple[str, ...] = ()
    clients: tuple[ClientMatcher, ...] = ()
    sessions: tuple[str, ...] = ()
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        if self.events:
            event = record.get("event")
            if not isinstance(event, str) or not any(
                fnmatchcase(event, pattern) for pattern in self.events
            ):
                return False
        if self.users and record.get("user") not in self.users:
            return False
        if self.sessions and record.get("session") not in self.sessions:
            return False
        if (self.uidls or self.digests) and not self._names_message(record):
            return False
        if self.clients:
            client = record.get("client")
            if not any(matcher.matches(client) for matcher in self.clients):
                return False
        if self.since is not None or self.until is not None:
            when = record_time(record)
            if when is None:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when >= self.until:
                return False
        return True

    def _names_message(self, record: Mapping[str, Any]) -> bool:
        """``--uidl`` / ``--digest``; with both, one message must have both
        (not one entry the UIDL and another the digest)."""
        if self.uidls and self.digests:
            return any(
                uidl in self.uidls and digest in self.digests
                for uidl, digest in _message_pairs(record)
            )
        if self.uidls:
            return any(uidl in self.uidls for uidl in message_uidls(record))
        return any(digest in self.digests for digest in message_digests(record))


def query(
    paths: Iterable[str], flt: Filter, *, skips: SkipLog | None = None
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``(line, record)`` for every record in *paths* that *flt* keeps, in order.

    Lines that are not records are skipped and counted in *skips*, and so
    are lines with a duplicate key (in ``skips.ambiguous`` too): they are
    never matched on one of their values.  ``OSError`` propagates.
    """
    for _path, _number, data, record in iter_records(paths, skips):
        if flt.matches(record):
            yield data, record


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def safe_text(text: str) -> str:
    """*text* with every non-printable character escaped (no terminal tricks)."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


def write_json(rows: Iterable[tuple[bytes, dict[str, Any]]], out: TextIO) -> int:
    """Each record as its original line (re-encoded as ASCII JSON if it holds
    characters a terminal could act on).  Returns the number written."""
    count = 0
    for data, record in rows:
        text = data.decode("utf-8")
        if not text.isprintable():
            text = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
        out.write(text + "\n")
        count += 1
    return count


COLUMNS: Final = ("timestamp", "event", "user", "client", "session")
#: Fields the table's last column leaves out: the columns, the chain fields
#: and the context that is the same on every record.
_HIDDEN: Final = frozenset({*COLUMNS, *CHAIN_FIELDS, "schema", "instance", "listener"})
_MAX_WIDTH: Final = 40
_PROBE_ROWS: Final = 200


def _value(value: Any) -> str:
    if isinstance(value, str):
        if value and not any(c in value for c in ' "=\\') and value.isprintable():
            return value
        return safe_text(json.dumps(value, ensure_ascii=False))
    return safe_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def compact_rest(record: Mapping[str, Any]) -> str:
    """``key=value ...`` for the fields not in their own column."""
    parts = []
    for key, value in record.items():
        if key in _HIDDEN or (key == "level" and value == "info"):
            continue
        parts.append(f"{safe_text(str(key))}={_value(value)}")
    return " ".join(parts)


def _cells(record: Mapping[str, Any]) -> tuple[str, ...]:
    cells = []
    for column in COLUMNS:
        value = record.get(column)
        cells.append("-" if value is None or value == "" else safe_text(str(value)))
    cells.append(compact_rest(record))
    return tuple(cells)


def write_table(
    rows: Iterable[tuple[bytes, dict[str, Any]]], out: TextIO, *, probe: int = _PROBE_ROWS
) -> int:
    """An aligned table; widths come from the first *probe* rows (then fixed,
    a longer value just pushes its row out).  Returns the number of rows."""
    iterator = iter(rows)
    head: list[tuple[str, ...]] = []
    for _data, record in iterator:
        head.append(_cells(record))
        if len(head) >= probe:
            break
    header = (*(column.upper() for column in COLUMNS), "DETAILS")
    widths = [
        min(_MAX_WIDTH, max([len(header[i]), *(len(row[i]) for row in head)]))
        for i in range(len(COLUMNS))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
        return "  ".join([*padded, cells[-1]]).rstrip()

    out.write(line(header) + "\n")
    for cells in head:
        out.write(line(cells) + "\n")
    count = len(head)
    for _data, record in iterator:
        out.write(line(_cells(record)) + "\n")
        count += 1
    return count
