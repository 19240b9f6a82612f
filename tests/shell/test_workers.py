"""popguard.shell.workers: the pieces of ``workers: N`` that need no process."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from popguard.audit import AuditLog
from popguard.cli import build_parser
from popguard.shell.workers import (
    ListenerSockets,
    WorkerRole,
    bind_reuseport,
    cpu_count,
    parse_worker_arg,
    worker_audit_file,
    worker_command,
)
from tests.listsink import ListSink

# --------------------------------------------------------------------------
# worker_audit_file
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "index", "expected"),
    [
        ("/var/log/popguard/audit.jsonl", 2, "/var/log/popguard/audit.w2.jsonl"),
        ("audit.jsonl", 1, "audit.w1.jsonl"),
        ("/var/log/popguard/audit.jsonl", 17, "/var/log/popguard/audit.w17.jsonl"),
        # No extension: the number is appended.
        ("/var/log/popguard/audit", 3, "/var/log/popguard/audit.w3"),
        ("audit", 1, "audit.w1"),
        # A dotfile's leading dot is no extension.
        ("/var/log/.audit", 2, "/var/log/.audit.w2"),
        (".audit", 4, ".audit.w4"),
        # Dots in directories do not count, only the file name's last one.
        ("/srv/pop.guard/log.d/audit", 2, "/srv/pop.guard/log.d/audit.w2"),
        ("/srv/pop.guard/log.d/audit.jsonl", 2, "/srv/pop.guard/log.d/audit.w2.jsonl"),
        ("./audit.jsonl", 5, "./audit.w5.jsonl"),
        ("/var/log/audit.2026.jsonl", 2, "/var/log/audit.2026.w2.jsonl"),
        ("/var/log/.audit.jsonl", 2, "/var/log/.audit.w2.jsonl"),
    ],
)
def test_worker_audit_file(path: str, index: int, expected: str) -> None:
    assert worker_audit_file(path, index) == expected


def test_worker_audit_files_differ_from_the_parents_and_each_other() -> None:
    path = "/var/log/popguard/audit.jsonl"
    names = {worker_audit_file(path, i) for i in range(1, 9)}
    assert len(names) == 8
    assert path not in names
    # A logrotate glob for the parent's file still matches the workers'.
    assert all(name.endswith(".jsonl") for name in names)


# --------------------------------------------------------------------------
# parse_worker_arg
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1/2:5:6", WorkerRole(1, 2, 5, 6)),
        ("2/2:7:3", WorkerRole(2, 2, 7, 3)),
        ("1/1:10:11", WorkerRole(1, 1, 10, 11)),
        ("256/256:9:4", WorkerRole(256, 256, 9, 4)),
        # -1: no such pipe (ready() and watch_parent() then do nothing).
        ("3/4:-1:-1", WorkerRole(3, 4, -1, -1)),
    ],
)
def test_parse_worker_arg(text: str, expected: WorkerRole) -> None:
    assert parse_worker_arg(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1/2",
        "1/2:5",
        "1/2:5:6:7",
        "1:2:5:6",
        "1/2/3:5:6",
        "a/2:5:6",
        "1/b:5:6",
        "1/2:x:6",
        "1/2:5:",
        "/2:5:6",
        "1.0/2:5:6",
    ],
)
def test_parse_worker_arg_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="expected I/N:FD:FD") as info:
        parse_worker_arg(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["0/2:5:6", "3/2:5:6", "1/0:5:6", "-1/2:5:6", "2/1:5:6"])
def test_parse_worker_arg_rejects_an_index_out_of_range(text: str) -> None:
    index, count = text.split(":")[0].split("/")
    with pytest.raises(ValueError, match=f"^worker {index} of {count}$"):
        parse_worker_arg(text)


def test_the_parser_takes_the_internal_worker_options() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--worker",
            "2/3:8:9",
            "--inherit-listener",
            "pop3=5,6",
            "--inherit-listener",
            "pop3s=7",
        ]
    )
    assert args.worker == WorkerRole(2, 3, 8, 9)
    assert args.inherit_listener == [("pop3", (5, 6)), ("pop3s", (7,))]


@pytest.mark.parametrize(
    "argv",
    [
        ["--worker", "0/3:8:9"],
        ["--worker", "2/3:8"],
        ["--inherit-listener", "pop3=five"],
        ["--inherit-listener", "pop3"],
    ],
)
def test_the_parser_rejects_bad_internal_worker_options(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", *argv])
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_worker_command_runs_this_interpreter() -> None:
    command = worker_command(["serve", "--config", "/etc/popguard.yaml", "--workers", "4"])
    assert command[1:3] == ["-m", "popguard"]
    assert command[0] == sys.executable
    assert command[3:] == ["serve", "--config", "/etc/popguard.yaml", "--workers", "4"]


# --------------------------------------------------------------------------
# WorkerRole: ready() and watch_parent()
# --------------------------------------------------------------------------


def test_ready_writes_r_and_closes_the_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        WorkerRole(1, 2, write_end, -1).ready()
        assert os.read(read_end, 10) == b"R"
        assert os.read(read_end, 10) == b""  # the write end was closed: end of file
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(write_end)
    finally:
        os.close(read_end)


def test_ready_survives_a_parent_that_is_gone() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # EPIPE on write (Python ignores SIGPIPE)
    WorkerRole(1, 2, write_end, -1).ready()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(write_end)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


async def test_watch_parent_stops_the_worker_when_the_lifeline_closes(
    pipe: tuple[int, int],
) -> None:
    read_end, write_end = pipe
    sink = ListSink()
    audit = AuditLog([sink], worker=2)
    stopped = trio.Event()
    role = WorkerRole(2, 2, -1, read_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(role.watch_parent, stopped.set, audit)
        await trio.sleep(0.05)
        assert not stopped.is_set(), "stopped while the parent still holds the write end"
        assert sink.named("popguard.worker.orphaned") == []
        os.close(write_end)  # the parent dies, however it died
        with trio.fail_after(5):
            await stopped.wait()
    (orphaned,) = sink.named("popguard.worker.orphaned")
    assert orphaned["level"] == "error"
    assert orphaned["worker"] == 2
    assert "parent" in str(orphaned["reason"])


async def test_watch_parent_without_a_lifeline_returns_at_once() -> None:
    sink = ListSink()
    audit = AuditLog([sink])
    called: list[bool] = []
    with trio.fail_after(1):
        await WorkerRole(1, 2, -1, -1).watch_parent(lambda: called.append(True), audit)
    assert called == []
    assert sink.events == []


# --------------------------------------------------------------------------
# cpu_count
# --------------------------------------------------------------------------


def test_cpu_count_is_at_least_one() -> None:
    count = cpu_count()
    assert isinstance(count, int)
    assert count >= 1
    assert count <= (os.cpu_count() or 1)


def test_cpu_count_follows_the_affinity_mask() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity here")
    assert cpu_count() == len(os.sched_getaffinity(0))


def test_cpu_count_without_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(pid: int) -> set[int]:
        raise OSError(errno.ENOSYS, "no")

    monkeypatch.setattr(os, "sched_getaffinity", fails, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cpu_count() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cpu_count() == 6


# --------------------------------------------------------------------------
# bind_reuseport
# --------------------------------------------------------------------------


@pytest.fixture
def bound() -> Iterator[list[ListenerSockets]]:
    """What a test bound: closed afterwards, whatever happened."""
    opened: list[ListenerSockets] = []
    yield opened
    for sockets in opened:
        sockets.close()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _check_group(sockets: ListenerSockets, workers: int, family: socket.AddressFamily) -> int:
    """Every socket listens with SO_REUSEPORT on one shared port; that port."""
    assert len(sockets.per_worker) == workers
    flat = [sock for per in sockets.per_worker for sock in per]
    assert len(flat) == workers
    assert len({sock.fileno() for sock in flat}) == workers
    ports = {sock.getsockname()[1] for sock in flat}
    assert len(ports) == 1, ports
    (port,) = ports
    assert port != 0
    for sock in flat:
        assert sock.family == family
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    return port


def _accept_on_one(sockets: ListenerSockets, family: socket.AddressFamily, host: str) -> None:
    """A connection to the port is queued on exactly one of the sockets."""
    port = sockets.addresses[0][1]
    flat = [sock for per in sockets.per_worker for sock in per]
    with socket.create_connection((host, port), timeout=5) as client:
        client.sendall(b"hello")
        readable, _, _ = select.select(flat, [], [], 5)
        assert len(readable) == 1, readable
        conn, peer = readable[0].accept()
        with conn:
            assert peer[1] == client.getsockname()[1]
            assert conn.recv(5) == b"hello"
        # Nothing else is waiting anywhere.
        readable, _, _ = select.select(flat, [], [], 0)
        assert readable == []


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_bind_reuseport_shares_one_port(bound: list[ListenerSockets], workers: int) -> None:
    sockets = bind_reuseport("pop3", "127.0.0.1", 0, workers)
    bound.append(sockets)
    assert sockets.name == "pop3"
    port = _check_group(sockets, workers, socket.AF_INET)
    assert sockets.addresses == [("127.0.0.1", port)]
    _accept_on_one(sockets, socket.AF_INET, "127.0.0.1")


def test_bind_reuseport_ipv6(bound: list[ListenerSockets]) -> None:
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    sockets = bind_reuseport("pop3", "::1", 0, 3)
    bound.append(sockets)
    port = _check_group(sockets, 3, socket.AF_INET6)
    assert sockets.addresses == [("::1", port)]
    for sock in (s for per in sockets.per_worker for s in per):
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    _accept_on_one(sockets, socket.AF_INET6, "::1")


def test_bind_reuseport_sockets_are_not_inherited(bound: list[ListenerSockets]) -> None:
    # Only the worker they are meant for gets them (pass_fds), no other child.
    sockets = bind_reuseport("pop3", "127.0.0.1", 0, 2)
    bound.append(sockets)
    assert not any(sock.get_inheritable() for per in sockets.per_worker for sock in per)


def test_bind_reuseport_joins_a_port_given_explicitly(bound: list[ListenerSockets]) -> None:
    first = bind_reuseport("a", "127.0.0.1", 0, 2)
    bound.append(first)
    port = first.addresses[0][1]
    second = bind_reuseport("b", "127.0.0.1", port, 2)
    bound.append(second)
    assert second.addresses == [("127.0.0.1", port)]


def test_bind_error_names_the_address(bound: list[ListenerSockets]) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:") as info:
            bound.append(bind_reuseport("pop3", "127.0.0.1", port, 3))
    assert info.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{port}" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_bind_error_closes_what_was_opened(
    bound: list[ListenerSockets], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second address fails after the first's sockets were bound: none stay open."""
    real_socket = socket.socket
    created: list[socket.socket] = []

    class Recorded(real_socket):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            created.append(self)

    with real_socket() as taken:
        taken.bind(("127.0.0.2", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        # Two addresses for one name: 127.0.0.1 (port 0, free) and 127.0.0.2
        # on the port that is taken.
        infos = [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", taken_port)),
        ]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: infos)
        monkeypatch.setattr(socket, "socket", Recorded)
        with pytest.raises(OSError, match=f"cannot listen on pop.example:{taken_port}") as info:
            bound.append(bind_reuseport("pop3", "pop.example", taken_port, 2))
        monkeypatch.undo()
    assert info.value.errno == errno.EADDRINUSE
    # The two sockets on 127.0.0.1 and the one that failed on 127.0.0.2.
    assert len(created) == 3
    assert [sock.fileno() for sock in created] == [-1, -1, -1]


def test_bind_error_leaves_the_port_free(bound: list[ListenerSockets]) -> None:
    """After a failed bind the port can be bound again without SO_REUSEPORT."""
    ok = bind_reuseport("pop3", "127.0.0.1", 0, 2)
    port = ok.addresses[0][1]
    ok.close()
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", port))  # proves close() released every socket
        plain.listen()
        with pytest.raises(OSError, match="cannot listen on"):
            bound.append(bind_reuseport("pop3", "127.0.0.1", port, 2))
    again = bind_reuseport("pop3", "127.0.0.1", port, 2)
    bound.append(again)
    assert again.addresses == [("127.0.0.1", port)]


def test_bind_unresolvable_host_raises_oserror() -> None:
    with pytest.raises(socket.gaierror):
        bind_reuseport("pop3", "no-such-host.invalid", 0, 2)


# --------------------------------------------------------------------------
# serve --workers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("1", 1), ("2", 2), ("16", 16), ("256", 256)],
)
def test_workers_flag(value: str, expected: object) -> None:
    args = build_parser().parse_args(["serve", "--workers", value])
    assert args.workers == expected
    assert args.worker is None
    assert args.inherit_listener == []


def test_workers_flag_defaults_to_the_config() -> None:
    assert build_parser().parse_args(["serve"]).workers is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        # Worded by the config's model of workers: (popguard.schema.config_models).
        ("0", "must be at least 1 (one process at least; or 'auto'), got 0"),
        ("257", "at most 256, got 257"),
        ("-3", "must be at least 1 (one process at least; or 'auto'), got -3"),
        ("abc", "expected one of auto, got 'abc'"),
        ("AUTO", "expected one of auto, got 'AUTO' (did you mean 'auto'?)"),
        ("2.5", "expected one of auto, got '2.5'"),
        ("", "expected one of auto, got ''"),
    ],
)
def test_workers_flag_rejects(value: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", f"--workers={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --workers" in err
    assert message in err


def test_workers_auto_resolves_to_the_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--workers auto`` supervises cpu_count() workers (1 CPU: a single process)."""
    import popguard.cli as cli

    monkeypatch.chdir(tmp_path)  # no ./policies
    seen: list[int] = []

    def fake_supervise(args: object, config: object, workers: int) -> int:
        seen.append(workers)
        return 7

    monkeypatch.setattr(cli, "_supervise", fake_supervise)
    monkeypatch.setattr(cli, "cpu_count", lambda: 3)
    argv = ["serve", "--listen", "127.0.0.1:1110", "--upstream", "127.0.0.1:9", "--no-console"]
    assert cli.main([*argv, "--workers", "auto"]) == 7
    assert seen == [3]
    assert cli.main([*argv, "--workers", "2"]) == 7
    assert seen == [3, 2]
    config = tmp_path / "popguard.yaml"
    config.write_text("workers: 4\n", encoding="utf-8")
    assert cli.main([*argv, "--config", str(config)]) == 7
    assert seen == [3, 2, 4]
    # The flag wins over the file.
    assert cli.main([*argv, "--config", str(config), "--workers", "5"]) == 7
    assert seen == [3, 2, 4, 5]
