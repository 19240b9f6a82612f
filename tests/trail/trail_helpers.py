"""Shared builders for the audit-trail tests: realistic records, sealed files."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from popguard.trail.chain import Chain, render, rotate_record, start_record

KEY = b"k3y-material-for-tests-0123456789abcdef"
T0 = datetime.datetime(2026, 11, 26, 8, 0, 0, tzinfo=datetime.UTC)

Renderer = Callable[[dict[str, Any]], str]


def sink_style(record: dict[str, Any]) -> str:
    """How popguard's sinks render today: insertion order, compact, ASCII."""
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str)


def structlog_style(record: dict[str, Any]) -> str:
    """structlog's JSONRenderer: insertion order, default separators."""
    return json.dumps(record)


def stamp(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def session_records(
    n: int, *, seed: int = 1, start: datetime.datetime = T0, step_s: float = 7.0
) -> Iterator[dict[str, Any]]:
    """*n* plausible records: sessions of several users from several clients."""
    rng = random.Random(seed)
    users = ["alice", "bob", "carol@example.com", "dävid"]
    clients = ["192.0.2.10:50000", "198.51.100.7:41000", "[2001:db8::5]:6000", "10.1.2.3:999"]
    when = start
    made = 0
    while made < n:
        session = f"{rng.getrandbits(64):016x}"
        user = rng.choice(users)
        client = rng.choice(clients)
        base = {"schema": 1, "instance": "popguard", "session": session, "client": client}
        script: list[dict[str, Any]] = [
            {"event": "session.opened", "listener": "pop3"},
            {"event": "auth.succeeded", "user": user, "mechanism": "USER"},
        ]
        for msg in range(1, rng.randint(1, 4)):
            script.append(
                {
                    "event": "message.retrieved",
                    "user": user,
                    "command": "RETR",
                    "msg": msg,
                    "uidl": f"uid-{user[:3]}-{msg}",
                    "size": 1000 + msg,
                    "bytes": 1010 + msg,
                }
            )
        script.append(
            {
                "event": "deletions.committed",
                "user": user,
                "messages": [{"msg": 1, "uidl": f"uid-{user[:3]}-1", "size": 1001}],
            }
        )
        script.append({"event": "session.closed", "user": user, "reason": "quit"})
        for body in script:
            if made >= n:
                return
            when += datetime.timedelta(seconds=step_s)
            record = {"timestamp": stamp(when), "level": "info", **base, **body}
            yield {"event": record.pop("event"), **record}
            made += 1


def seal_lines(
    chain: Chain,
    records: Iterator[dict[str, Any]] | list[dict[str, Any]],
    *,
    renderer: Renderer = render,
    start: str | None = "new",
    previous_file: str | None = None,
    rotate_to: str | None = None,
) -> list[str]:
    """Lines of one file: a start record, the sealed records, maybe a rotate."""
    lines = []
    if start is not None:
        lines.append(renderer(start_record(chain, reason=start, previous_file=previous_file)))
    for record in records:
        lines.append(renderer(chain.seal(dict(record))))
    if rotate_to is not None:
        lines.append(renderer(rotate_record(chain, rotate_to)))
    return lines


def write_lines(path: Path, lines: list[str], *, newline_at_end: bool = True) -> Path:
    text = "\n".join(lines) + ("\n" if newline_at_end and lines else "")
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(text.encode("utf-8"))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def rotated_trail(
    directory: Path,
    *,
    key: bytes | None = None,
    sizes: tuple[int, ...] = (20, 20, 20),
    renderer: Renderer = render,
    chain_id: str = "w1",
    gzip_oldest: bool = True,
) -> list[Path]:
    """audit.jsonl.2(.gz), audit.jsonl.1, audit.jsonl: one chain, oldest first."""
    chain = Chain(key=key, chain_id=chain_id)
    count = len(sizes)
    names = [
        f"audit.jsonl.{count - 1 - i}" if i < count - 1 else "audit.jsonl" for i in range(count)
    ]
    if gzip_oldest and count > 1:
        names[0] += ".gz"
    records = session_records(sum(sizes), seed=7)
    paths = []
    for i, size in enumerate(sizes):
        batch = [next(records) for _ in range(size)]
        lines = seal_lines(
            chain,
            batch,
            renderer=renderer,
            start="new" if i == 0 else "rotate",
            previous_file=None if i == 0 else "audit.jsonl",
            rotate_to="audit.jsonl" if i < count - 1 else None,
        )
        paths.append(write_lines(directory / names[i], lines))
    return paths


def read_lines(path: Path) -> list[str]:
    """The lines of a plain file, split on LF only."""
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def key_file(directory: Path, key: bytes = KEY, mode: int = 0o600) -> Path:
    path = directory / "audit.key"
    path.write_bytes(key + b"\n")
    os.chmod(path, mode)
    return path
