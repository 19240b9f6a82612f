"""Integration: a real ``logrotate -f`` (Debian package ``logrotate``) and SIGHUP.

A child process writes an audit record every few milliseconds through
``AuditLog`` and calls ``reopen()`` on SIGHUP, the way the server does.
logrotate renames the file, creates a new one and signals the child from
``postrotate``.  Afterwards the rotated files and the new one must form one
unbroken chain with every record in it, in order.  Skipped where logrotate
is not installed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from popguard.trail import chain as trail
from tests.ci import needs_tool

LOGROTATE = shutil.which("logrotate") or (
    "/usr/sbin/logrotate" if Path("/usr/sbin/logrotate").exists() else None
)

pytestmark = needs_tool(LOGROTATE, "logrotate (Debian package: logrotate)")

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """\
    import os, signal, sys

    import trio

    from popguard.audit import open_audit_log_from_config
    from popguard.config import AuditConfig
    from popguard.core.records import AuditRecord, Event


    async def main(path: str, pidfile: str) -> None:
        config = AuditConfig(file=path, console=False, fsync="interval")
        log = open_audit_log_from_config(config, instance="rotate-test")
        emitted = 0
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM) as signals:
            with open(pidfile + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pidfile + ".tmp", pidfile)
            async with trio.open_nursery() as nursery:

                async def emit() -> None:
                    nonlocal emitted
                    while True:
                        log.emit(AuditRecord(Event.DELE_MARKED, {"msg": emitted}))
                        emitted += 1
                        await trio.sleep(0.002)

                nursery.start_soon(emit)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.reopen()
                    else:
                        break
                nursery.cancel_scope.cancel()
        log.event("popguard.stopped", emitted=emitted)
        log.close()


    trio.run(main, sys.argv[1], sys.argv[2])
    """
)


def read(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def wait_until(condition: Callable[[], bool], limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def starts_anew(path: Path) -> bool:
    try:
        records = read(path)
    except (FileNotFoundError, AssertionError, ValueError):
        return False
    return (
        len(records) >= 5
        and records[0]["event"] == "audit.chain.start"
        and records[0]["reason"] == "reopen"
    )


def test_logrotate_with_sighup(tmp_path: Path) -> None:
    assert LOGROTATE is not None, "logrotate is required in CI"
    logs = tmp_path / "log"
    logs.mkdir()
    audit = logs / "audit.jsonl"
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    conf = tmp_path / "logrotate.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            {audit} {{
                rotate 5
                nocompress
                missingok
                create 0640
                postrotate
                    /bin/kill -HUP "$(cat {pidfile})"
                endscript
            }}
            """
        )
    )
    conf.chmod(0o644)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, str(script), str(audit), str(pidfile)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(pidfile.exists)
        wait_until(lambda: audit.exists() and len(audit.read_text().splitlines()) >= 20)
        for rotation in range(2):
            result = subprocess.run(
                [LOGROTATE, "-f", "-s", str(tmp_path / "state"), str(conf)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert (logs / f"audit.jsonl.{rotation + 1}").exists()
            wait_until(lambda: starts_anew(audit))
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=15)
        assert child.returncode == 0, stderr
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    files = [logs / "audit.jsonl.2", logs / "audit.jsonl.1", audit]
    contents = [read(path) for path in files]
    for older, newer in itertools.pairwise(contents):
        assert older[-1]["event"] == "audit.chain.rotate"
        assert newer[0]["event"] == "audit.chain.start"
        assert newer[0]["reason"] == "reopen"
        assert newer[0]["prev"] == older[-1]["hash"]
    records = [record for content in contents for record in content]
    # One unbroken chain over the three files ...
    prev, seq = trail.GENESIS, 0
    for record in records:
        assert record["prev"] == prev
        assert record["seq"] == seq + 1
        assert record["hash"] == trail.digest(trail.canonical(record), None)
        prev, seq = record["hash"], record["seq"]
    # ... holding every record the child emitted, in order.
    emitted = [r["msg"] for r in records if r["event"] == "dele.marked"]
    stopped = records[-1]
    assert stopped["event"] == "popguard.stopped"
    assert emitted == list(range(stopped["emitted"]))
