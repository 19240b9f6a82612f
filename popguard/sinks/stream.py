"""JSON lines on a stream (standard output by default), from a writer thread."""

from __future__ import annotations

import sys
from typing import TextIO

from popguard.sinks.base import Entry, QueuedSink, jsonable_record, render_json

__all__ = ["StdoutSink"]


class StdoutSink(QueuedSink):
    """One JSON object per line on ``stream`` (``sys.stdout``), unsealed.

    For a container runtime or a log shipper reading popguard's output.  A
    blocked pipe blocks only this sink's thread; its queue absorbs the
    records meanwhile (and counts what it cannot hold).
    """

    def __init__(
        self, stream: TextIO | None = None, *, queue_size: int = 10000, name: str = "stdout"
    ) -> None:
        super().__init__(name, queue_size=queue_size)
        self._stream = stream

    def _deliver(self, entry: Entry) -> None:
        assert entry.event is not None
        if entry.payload is None:
            entry.payload = (render_json(jsonable_record(entry.event)) + "\n").encode("ascii")
        stream = self._stream if self._stream is not None else sys.stdout
        stream.write(entry.payload.decode("ascii"))
        stream.flush()
