"""A private redis-server on loopback, started and stopped by the tests.

Everything it keeps lives under one directory; it listens on a free
loopback port (and a Unix socket there), saves nothing to disk, and can be
stopped, restarted on the same port and socket (its data gone, as after a
crash without persistence), paused (SIGSTOP: a stalled Redis) and resumed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ci import in_ci

REDIS_SERVER = shutil.which("redis-server")
HOST = "127.0.0.1"
#: How long a starting redis-server may take to accept connections.
STARTUP_SECONDS = 10.0


def require_redis_server() -> str:
    """redis-server's path; skip without it (fail in CI)."""
    if REDIS_SERVER is None:
        if in_ci():
            pytest.fail("redis-server is required in CI but not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    return REDIS_SERVER


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerTLS:
    """Files for ``--tls-port``: the server's certificate and key."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class RedisServer:
    def __init__(
        self,
        base: Path,
        *,
        password: str | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        self.executable = require_redis_server()
        self.base = base
        self.port = free_port()
        self.unixsocket = base / "redis.sock"
        self.password = password
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://{HOST}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unixsocket}?db=0"

    def command(self) -> list[str]:
        args = [
            self.executable,
            "--bind", HOST,
            "--dir", str(self.base),
            "--save", "",
            "--appendonly", "no",
            "--unixsocket", str(self.unixsocket),
            "--unixsocketperm", "700",
            "--logfile", str(self.base / "redis.log"),
        ]  # fmt: skip
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert_file),
                "--tls-key-file", str(self.tls.key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.base / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited: {log[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                if self.unixsocket.exists():
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start in time")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        self.resume(process)
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self, process: subprocess.Popen[bytes] | None = None) -> None:
        process = process or self.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
