"""Reading popguard's audit file from the benchmark: size, flush, what was recorded.

The file sink writes from its own thread, after the proxy has answered the
client, so when a measured run ends some records may still be on their way.
:func:`wait_segment` waits until the part of the file written since a given
offset holds a ``session.closed`` record for every session of the run (the
last record popguard writes for a session), then returns that part.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

_CLOSED = b'"session.closed"'


def size(path: str | Path) -> int:
    """Bytes in the audit file now (0 while it does not exist)."""
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return b""
    # Only whole lines: the writer may be in the middle of one.
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else b""


def wait_segment(
    path: str | Path, offset: int, sessions: int, *, timeout: float = 15.0
) -> tuple[bytes, float]:
    """The whole lines written after ``offset`` once ``sessions`` sessions are closed in them.

    Returns the bytes and the seconds waited; gives up after ``timeout``
    (the caller sees the shortfall in the counts).
    """
    target = Path(path)
    started = time.monotonic()
    deadline = started + timeout
    while True:
        data = _read_from(target, offset)
        if data.count(_CLOSED) >= sessions or time.monotonic() > deadline:
            return data, time.monotonic() - started
        time.sleep(0.005)


def tally(segment: bytes) -> dict[str, Any]:
    """Count the records in a segment of the audit file.

    ``deletions_committed`` counts ``deletions.committed`` records and
    ``deleted_messages`` the messages they list; ``deleted_with_uidl`` those
    named by UIDL (message identity on).  ``bad_lines`` counts lines that are
    not JSON objects (there should be none).
    """
    events: Counter[str] = Counter()
    committed = 0
    deleted = 0
    with_uidl = 0
    bad = 0
    for line in segment.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(record, dict):
            bad += 1
            continue
        event = str(record.get("event"))
        events[event] += 1
        if event == "deletions.committed":
            committed += 1
            messages = record.get("messages") or []
            deleted += len(messages)
            with_uidl += sum(1 for m in messages if isinstance(m, dict) and m.get("uidl"))
    return {
        "records": sum(events.values()),
        "bytes": len(segment),
        "events": dict(events),
        "deletions_committed": committed,
        "deleted_messages": deleted,
        "deleted_with_uidl": with_uidl,
        "bad_lines": bad,
    }
