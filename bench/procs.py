"""Process plumbing: /proc readers, file-descriptor limits, the popguard subprocess.

Linux only (the figures come from ``/proc``), like the rest of the benchmark.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.target import Target, TlsSpec

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """Something the benchmark needs did not work (a peer, a reply, a process)."""


# -- limits ------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _child_setup() -> None:  # pragma: no cover - runs in the forked child
    """preexec_fn for popguard: many sockets, and die with the benchmark."""
    raise_nofile()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# -- /proc -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    utime: int  # clock ticks
    stime: int
    cutime: int
    cstime: int
    rss_pages: int


def proc_stat(pid: int) -> ProcStat:
    """Fields of /proc/<pid>/stat (the comm field may hold spaces and parens)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    rest = raw[raw.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    return ProcStat(
        pid=pid,
        ppid=int(rest[1]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        cutime=int(rest[13]),
        cstime=int(rest[14]),
        rss_pages=int(rest[21]),
    )


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    st = proc_stat(pid)
    return (st.utime + st.stime) / CLOCK_TICKS


def vm_rss_kib(pid: int) -> int:
    """VmRSS from /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (entries of /proc/<pid>/fd); -1 when unreadable."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _all_stats() -> list[ProcStat]:
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stats.append(proc_stat(int(entry)))
    return stats


def process_tree(root: int) -> list[ProcStat]:
    """``root`` and all its descendants, as a snapshot."""
    stats = _all_stats()
    children: dict[int, list[ProcStat]] = {}
    by_pid = {}
    for st in stats:
        children.setdefault(st.ppid, []).append(st)
        by_pid[st.pid] = st
    if root not in by_pid:
        return []
    tree = [by_pid[root]]
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child.pid)
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process tree so far: live processes plus reaped children.

    A child's time moves to its parent's cutime/cstime when the parent
    reaps it (Dovecot's master reaps its per-session pop3 processes), so
    the sum stays monotonic as sessions come and go.
    """
    ticks = 0
    for st in process_tree(root):
        ticks += st.utime + st.stime + st.cutime + st.cstime
    return ticks / CLOCK_TICKS


def tree_pss_kib(root: int) -> tuple[int, int]:
    """(sum of Pss in KiB, number of processes) over a process tree."""
    total = 0
    count = 0
    for st in process_tree(root):
        try:
            text = Path(f"/proc/{st.pid}/smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
                break
    return total, count


def filesystem_of(path: str | os.PathLike[str]) -> str:
    """'type on device' of the mount holding ``path`` (from /proc/mounts), or '?'."""
    target = os.path.realpath(path)
    best = ("", "?")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "?"
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        device, mount, fstype = fields[0], fields[1].replace("\\040", " "), fields[2]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, f"{fstype} on {device}")
    return best[1]


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- sockets -----------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def probe_greeting(
    address: tuple[str, int], timeout: float = 2.0, tls: TlsSpec | None = None
) -> bytes:
    """Connect (with ``tls``: POP3S), read the greeting line, say QUIT; b"" when
    nothing answers yet."""
    try:
        with Target(*address, tls=tls).connect(timeout=timeout) as sock:
            data = b""
            while not data.endswith(b"\n") and len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"+OK"):
                with contextlib.suppress(OSError):
                    sock.sendall(b"QUIT\r\n")
                    sock.recv(4096)
            return data
    except OSError:
        return b""


# -- popguard ------------------------------------------------------------------


def _reap_leftovers(pids: list[int], timeout: float) -> None:
    """Workers of a stopped popguard still alive after ``timeout``: SIGKILL them.

    Only the pids given (popguard's children, listed before it was stopped),
    and only while each still runs popguard (a recycled pid is left alone).
    """
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _is_popguard(pid)]
        if alive:
            time.sleep(0.1)
    for pid in alive:
        if _is_popguard(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _is_popguard(pid: int) -> bool:
    """``pid`` is a live (not zombie) process running ``-m popguard``."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    return state != "Z" and b"popguard" in cmdline


class PopguardProcess:
    """``python -m popguard serve`` as a separate process, on a free loopback port."""

    host = "127.0.0.1"
    #: What the process is called in errors.
    name = "popguard"

    def __init__(
        self,
        upstream: tuple[str, int],
        log_path: Path,
        *,
        idle_timeout: float = 3600.0,
        audit_file: str | None = None,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 20.0,
        client_tls: TlsSpec | None = None,
        workers: int | None = None,
    ) -> None:
        """``client_tls``: popguard's listener speaks POP3S (``extra_args`` carry
        ``--tls implicit`` and the certificate); the readiness probe and
        :attr:`target` then use TLS, verified with this spec.

        ``workers``: ``--workers N`` (None: no flag, popguard's default).  With
        N > 1 popguard is a supervising parent with N worker children on the
        same listening port; :meth:`start` waits for all of them, and
        :meth:`cpu_seconds` counts the whole process tree."""
        self.upstream = upstream
        self.client_tls = client_tls
        self.log_path = log_path
        self.idle_timeout = idle_timeout
        self.audit_file = audit_file
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.workers = workers
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def target(self) -> Target:
        """Where clients connect: the address, with TLS when the listener is POP3S."""
        return Target(self.host, self.port, self.client_tls)

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BenchError(f"{self.name} is not running")
        return self._proc.pid

    def argv(self) -> list[str]:
        up_host, up_port = self.upstream
        argv = [
            sys.executable,
            "-m",
            "popguard",
            "serve",
            "--listen",
            f"{self.host}:{self.port}",
            "--upstream",
            f"{up_host}:{up_port}",
            "--no-console",
            "--idle-timeout",
            f"{self.idle_timeout:g}",
        ]
        if self.audit_file:
            argv += ["--audit-file", self.audit_file]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        return argv + list(self.extra_args)

    def start(self) -> PopguardProcess:
        if self._proc is not None:
            raise BenchError(f"{self.name} already started")
        for _attempt in range(3):
            self.port = free_port(self.host)
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    self.argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_child_setup,  # the bench process runs no threads
                    start_new_session=True,  # Ctrl-C reaches the bench, which stops us in order
                )
            if self._wait_ready():
                return self
            self.stop()
        raise BenchError(f"{self.name} did not start; its log:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_tail()
                if "Address already in use" in tail:
                    return False  # the port was taken between pick and bind
                raise BenchError(f"{self.name} exited with {proc.returncode}:\n{tail}")
            if probe_greeting(self.address, tls=self.client_tls).startswith(b"+OK"):
                return self._wait_workers(deadline)
            time.sleep(0.05)
        raise BenchError(f"{self.name} gave no greeting within {self.startup_timeout:g} s")

    def _wait_workers(self, deadline: float) -> bool:
        """With ``workers`` > 1: wait until the parent has that many children, then
        until 20 probes in a row are greeted (each from a new source port, so the
        kernel's SO_REUSEPORT hash spreads them over the workers' sockets)."""
        if not self.workers or self.workers <= 1:
            return True
        proc = self._proc
        assert proc is not None
        greeted = 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"popguard exited with {proc.returncode}:\n{self.log_tail()}")
            if len(self.worker_pids()) < self.workers:
                time.sleep(0.05)
                continue
            if probe_greeting(self.address, tls=self.client_tls).startswith(b"+OK"):
                greeted += 1
                if greeted >= 20:
                    return True
            else:
                greeted = 0
                time.sleep(0.05)
        raise BenchError(
            f"popguard did not run {self.workers} greeting workers within "
            f"{self.startup_timeout:g} s (children: {len(self.worker_pids())}); its log:\n"
            + self.log_tail()
        )

    def worker_pids(self) -> list[int]:
        """The pids of popguard's child processes (its workers), as a snapshot."""
        if self._proc is None:
            return []
        return [st.pid for st in process_tree(self._proc.pid) if st.ppid == self._proc.pid]

    def cpu_seconds(self) -> float:
        """CPU used so far: the process alone, or with ``workers`` the whole tree
        (the supervisor, its live workers and any it reaped)."""
        if self.workers is None:
            return cpu_seconds(self.pid)
        return tree_cpu_seconds(self.pid)

    def cpu_by_process(self) -> dict[int, float]:
        """utime + stime (seconds) of each process of popguard's tree, by pid."""
        if self._proc is None:
            return {}
        return {st.pid: (st.utime + st.stime) / CLOCK_TICKS for st in process_tree(self._proc.pid)}

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait (popguard's shutdown grace is 10 s), then SIGKILL."""
        children = self.worker_pids() if self.workers and self.workers > 1 else []
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _reap_leftovers(children, timeout)

    def __enter__(self) -> PopguardProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The floor relay, started by path so that its process imports trio and
#: nothing of the bench or of popguard.
FLOOR_SCRIPT = Path(__file__).resolve().with_name("floor.py")


class FloorProcess(PopguardProcess):
    """``bench/floor.py``, the bare trio relay, as a separate process.

    Started, probed (a greeting relayed from Dovecot), measured (utime +
    stime from ``/proc``) and stopped exactly like popguard.
    """

    name = "floor"

    def __init__(self, upstream: tuple[str, int], log_path: Path) -> None:
        super().__init__(upstream, log_path)

    def argv(self) -> list[str]:
        up_host, up_port = self.upstream
        return [
            sys.executable,
            str(FLOOR_SCRIPT),
            "--listen",
            f"{self.host}:{self.port}",
            "--upstream",
            f"{up_host}:{up_port}",
        ]
