"""Reading audit trails: plain or gzip'd JSON lines, streamed, oldest first.

Lines are split on ``\\n`` only (never on U+2028 or other separators that
``str.splitlines`` honours) and read with a length limit, so a trail of any
size -- or a hostile line -- needs constant memory.

A line whose JSON repeats a key in any object (``{"user":"mallory",...,
"user":"alice"}``) is never read as a record: JSON readers disagree on
which value counts (Python and most keep the last, others the first), so
such a line could mean one thing to ``verify`` and another to the next tool.
:func:`parse_record` raises :class:`DuplicateKeyError` for it; ``verify``
reports it as ``duplicate_key``, and :func:`iter_records` (``query``,
``report``) skips it and counts it in :attr:`SkipLog.ambiguous`.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import zlib
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

__all__ = [
    "MAX_LINE",
    "DuplicateKeyError",
    "Line",
    "SkipLog",
    "Skipped",
    "TrailReadError",
    "iter_lines",
    "iter_records",
    "open_trail",
    "order_rotated",
    "parse_record",
    "parse_time",
    "record_time",
]

#: A longer line is reported as malformed and skipped, never held in memory.
MAX_LINE: Final = 1 << 20
_GZIP_MAGIC: Final = b"\x1f\x8b"


class TrailReadError(Exception):
    """The file's data cannot be read on (corrupt or truncated gzip stream)."""

    def __init__(self, path: str, line: int, detail: str, *, truncated: bool) -> None:
        super().__init__(f"{path}:{line}: {detail}")
        self.path = path
        self.line = line
        self.detail = detail
        self.truncated = truncated


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a trail file: its bytes without the ``\\n``."""

    number: int
    data: bytes
    #: False for a last line without a newline (or an over-long line).
    newline: bool
    #: Set when the line is longer than :data:`MAX_LINE` (``data`` is empty).
    overlong: bool = False


class ByteLines(Protocol):
    """What the readers need of a file: binary ``readline`` and ``close``."""

    def readline(self, size: int = -1, /) -> bytes: ...
    def close(self) -> None: ...


def open_trail(path: str) -> ByteLines:
    """Open *path* for binary reading, decompressing gzip (by its magic bytes)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_lines(path: str) -> Generator[Line, None, None]:
    """The lines of one file, streamed.

    Raises :class:`TrailReadError` where a gzip stream is corrupt or ends
    early, ``OSError`` for I/O errors.
    """
    number = 0
    f = open_trail(path)
    try:  # closed even when the consumer abandons the generator
        while True:
            try:
                raw = f.readline(MAX_LINE + 1)
            except EOFError as exc:
                raise TrailReadError(
                    path, number + 1, f"compressed data ends early ({exc})", truncated=True
                ) from exc
            except (gzip.BadGzipFile, zlib.error) as exc:
                raise TrailReadError(
                    path, number + 1, f"corrupt compressed data ({exc})", truncated=False
                ) from exc
            if not raw:
                return
            number += 1
            if raw.endswith(b"\n"):
                yield Line(number, raw[:-1], True)
            elif len(raw) > MAX_LINE:
                _skip_rest(f)
                yield Line(number, b"", False, overlong=True)
            else:
                yield Line(number, raw, False)
    finally:
        f.close()


def _skip_rest(f: ByteLines) -> None:
    while True:
        chunk = f.readline(MAX_LINE)
        if not chunk or chunk.endswith(b"\n"):
            return


class DuplicateKeyError(ValueError):
    """A JSON object in the line has the same key twice (after unescaping)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return obj


#: ``json.loads`` that refuses a repeated key in any object, nested ones too.
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_unique_pairs)


def parse_record(data: bytes) -> dict[str, Any]:
    """A line's JSON object; ``ValueError`` (with a short reason) otherwise.

    :class:`DuplicateKeyError` (a ``ValueError``) if any object in it has a
    key twice: such a line is never read first-wins or last-wins.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg}, column {exc.colno}") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


@dataclass(frozen=True, slots=True)
class Skipped:
    """A line that is not a record (malformed, overlong, unreadable gzip)."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(slots=True)
class SkipLog:
    """How many lines were skipped, and the first few of them."""

    count: int = 0
    samples: list[Skipped] = field(default_factory=list)
    keep: int = 10
    #: Of :attr:`count`, the lines skipped for a duplicate key: lines that
    #: were edited (no writer makes them) and that another JSON reader could
    #: read with different values.
    ambiguous: int = 0

    def add(self, item: Skipped, *, ambiguous: bool = False) -> None:
        self.count += 1
        if ambiguous:
            self.ambiguous += 1
        if len(self.samples) < self.keep:
            self.samples.append(item)


def iter_records(
    paths: Iterable[str], skips: SkipLog | None = None
) -> Iterator[tuple[str, int, bytes, dict[str, Any]]]:
    """``(path, line number, line bytes, record)`` for each record, in order.

    Blank lines are ignored.  Lines that are not JSON objects, and the rest
    of a corrupt gzip file, are skipped and counted in *skips*.  So is a line
    with a duplicate key (also counted in ``skips.ambiguous``): it is never
    read first-wins or last-wins.  Nothing here checks the hash chain.
    ``OSError`` propagates.
    """
    log = skips if skips is not None else SkipLog(keep=0)
    for path in paths:
        try:
            for line in iter_lines(path):
                if line.overlong:
                    log.add(Skipped(path, line.number, "line too long"))
                    continue
                if not line.data.strip():
                    continue
                try:
                    record = parse_record(line.data)
                except DuplicateKeyError as exc:
                    reason = f"{exc}: ambiguous (edited?), not used; run popguard audit verify"
                    log.add(Skipped(path, line.number, reason), ambiguous=True)
                    continue
                except ValueError as exc:
                    log.add(Skipped(path, line.number, str(exc)))
                    continue
                yield path, line.number, line.data, record
        except TrailReadError as exc:
            log.add(Skipped(path, exc.line, exc.detail))


# --------------------------------------------------------------------------
# Rotated file names
# --------------------------------------------------------------------------

_NUMBERED: Final = re.compile(r"^(?P<base>.+)\.(?P<n>\d+)$")
_DATED: Final = re.compile(r"^(?P<base>.+)-(?P<date>\d{4}-?\d{2}-?\d{2}(?:[-_T]?\d+)*)$")


def _rotation_key(path: str) -> tuple[str, int, int, str]:
    name = os.path.normpath(path)
    if name.endswith(".gz"):
        name = name[:-3]
    numbered = _NUMBERED.match(name)
    if numbered:
        return numbered["base"], 0, -int(numbered["n"]), ""
    dated = _DATED.match(name)
    if dated:
        digits = re.sub(r"\D", "", dated["date"])
        return dated["base"], 0, 0, digits
    return name, 1, 0, ""


def order_rotated(paths: Sequence[str]) -> list[str]:
    """*paths* sorted oldest first, logrotate style, grouped by base name.

    ``audit.jsonl.2.gz, audit.jsonl.1, audit.jsonl`` (numbered: higher is
    older) and ``audit.jsonl-20261125.gz, audit.jsonl-20261126, audit.jsonl``
    (``dateext``: earlier is older); the live file (no suffix) comes last.
    Files of different base names (one per writer) are grouped by name.
    Ties keep their given order.
    """
    return sorted(paths, key=_rotation_key)


# --------------------------------------------------------------------------
# Timestamps
# --------------------------------------------------------------------------


def parse_time(text: str) -> datetime.datetime:
    """An ISO 8601 date or time as an aware UTC datetime.

    ``2026-11-26`` is midnight UTC; a time without an offset is UTC;
    ``Z`` and ``+hh:mm`` are honoured.  ``ValueError`` otherwise.
    """
    value = datetime.datetime.fromisoformat(text.strip())
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value.astimezone(datetime.UTC)


def record_time(record: Mapping[str, Any]) -> datetime.datetime | None:
    """The record's ``timestamp`` as UTC, or None if missing or unreadable."""
    stamp = record.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return parse_time(stamp)
    except ValueError:
        return None
