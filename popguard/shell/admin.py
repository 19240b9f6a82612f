"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` and the live
sessions (``/sessions``) over HTTP/1.1.

A deliberately tiny server, apart from the POP3 listeners and bound to
loopback by default.  One request per connection, answered with
``Connection: close``; no keep-alive, no request bodies, no chunked encoding.
Robust by construction:

* the request head (request line and headers) is at most
  :data:`MAX_REQUEST_HEAD` octets (414 if the request line alone is longer,
  431 otherwise) and :data:`MAX_HEADERS` lines;
* the whole head must arrive within ``request_timeout`` seconds (2 s; a
  deadline for the head, not for each read: slowloris), else 408; sending
  the answer is bounded by the same timeout;
* at most ``max_connections`` connections at once.  A connection beyond the
  cap is served, and the oldest connection that has not yet sent a complete
  request head is closed to make room (else the oldest one lingering after
  its answer, else the oldest of all): idle or dribbling connections, however
  many, can never keep a health check out.  Memory stays bounded by the cap
  times the head limit;
* malformed requests get 400, a method the path does not take 405 (POST
  only for closing a session, GET and HEAD everywhere else), an HTTP version
  other than 1.0 or 1.1 505, an unknown path 404;
* a failing handler answers 500 and never takes the proxy down.

``/healthz`` says the process is alive (its event loop answers).
``/readyz`` asks a ``ready`` callable for named checks (:class:`Readiness`
makes one: listeners up, upstream reachable, audit sink healthy) and answers
200 when all pass, else 503, with a short JSON body.

``GET /sessions`` lists the live sessions (``?user=ACCOUNT`` keeps one
account's) and ``POST /sessions/ID/close`` ends one without QUIT, so the
server deletes nothing; both ask a :class:`SessionControl` (the proxy, or the
supervisor of ``workers: N``, which asks its workers).  The listener has no
authentication, so a POST must carry :data:`CSRF_HEADER`: a web page in an
operator's browser cannot send that header to another origin without a
CORS preflight, which this listener never grants (OPTIONS gets 405), so it
cannot end sessions cross-site.  Who asked is the connection's peer address;
a supervisor that relays a request names the original requester in
:data:`REQUESTED_BY_HEADER`, and the record keeps both.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Final, Protocol

import trio

from popguard.core.grammar import escape_text
from popguard.metrics import Metrics

__all__ = [
    "CSRF_HEADER",
    "DEFAULT_ADMIN_ADDRESS",
    "MAX_CLOSE_REASON",
    "REQUESTED_BY_HEADER",
    "AdminServer",
    "Readiness",
    "ReadyCheck",
    "SessionControl",
    "admin_request",
    "bounded_text",
    "serve_admin",
]

#: Where the admin listener binds unless told otherwise: loopback only.
DEFAULT_ADMIN_ADDRESS: Final = ("127.0.0.1", 9110)

#: Longest request head (request line, headers, blank line) in octets.
MAX_REQUEST_HEAD: Final = 8192
#: Most header lines in one request.
MAX_HEADERS: Final = 64
#: Seconds a client has to send its whole request head (and to take the answer).
#: Short, because every real client (a scraper, a load balancer's or kubelet's
#: probe) sends its head in one segment at once; 2 s still covers a few TCP
#: retransmissions on a lossy management link.
REQUEST_TIMEOUT: Final = 2.0
#: Connections served at once; beyond it the oldest one without a complete
#: request head is closed (shed) to make room for the newcomer.
MAX_CONNECTIONS: Final = 64
#: Seconds ``/readyz`` waits for the checks before answering 503.
READY_TIMEOUT: Final = 3.0
#: After the answer, how long and how much to drain from the client before
#: closing, so that unread input does not turn the close into an RST.
LINGER_TIMEOUT: Final = 0.5
LINGER_MAX_BYTES: Final = 64 * 1024

#: A POST must carry this header (any value): the cross-site request guard.
CSRF_HEADER: Final = "X-Popguard-Request"
#: Set by a supervisor relaying a close: the address of whoever asked it.
REQUESTED_BY_HEADER: Final = "X-Popguard-Requested-By"
#: Longest close reason kept, in characters (before escaping), like other
#: free text in records; a longer one is cut.
MAX_CLOSE_REASON: Final = 200
#: Longest peer address accepted from :data:`REQUESTED_BY_HEADER`.
_MAX_REQUESTED_BY: Final = 64
#: Seconds and octets an :func:`admin_request` may take (a supervisor asking
#: a worker: a list of 100,000 sessions is some 40 MB of JSON).
ADMIN_REQUEST_TIMEOUT: Final = 10.0
MAX_ADMIN_REPLY: Final = 128 * 1024 * 1024

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]
#: A JSON document (an answer's body).
Document = dict[str, Any]


class SessionControl(Protocol):
    """What ``/sessions`` asks: the proxy (one process) or the supervisor."""

    async def list_sessions(self, user: str | None) -> tuple[int, Document]:
        """(status, ``{"sessions": [...], ...}``), ``user``: one account's only."""
        ...

    async def close_session(
        self, session_id: str, *, requested_by: str, relayed_by: str | None, reason: str | None
    ) -> tuple[int, Document]:
        """End one session without QUIT: (200, what it was) or (404, an error)."""
        ...


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)\Z")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")
_TARGET = re.compile(r"/[\x21-\x7e]*\Z")

#: ``/sessions/ID/close``; a session id is 16 hex digits (docs/audit.md).
_CLOSE_PATH = re.compile(r"/sessions/([^/]*)/close\Z")
_SESSION_ID = re.compile(r"[0-9a-f]{16}\Z")
_SESSIONS_PATH: Final = "/sessions"
_READ_METHODS: Final = ("GET", "HEAD")
_ALLOW_READ: Final = "GET, HEAD"
_ALLOW_CLOSE: Final = "POST"

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TEXT: Final = "text/plain; charset=utf-8"
_JSON: Final = "application/json"


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Request:
    __slots__ = ("headers", "method", "path", "peer", "query")

    def __init__(
        self, method: str, path: str, headers: dict[str, str], query: str = "", peer: str = ""
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        #: The query string (after ``?``), undecoded.
        self.query = query
        #: The connection's peer, ``host:port`` (``[host]:port`` for IPv6).
        self.peer = peer

    def parameter(self, name: str) -> str | None:
        """The query parameter ``name`` (its first value), decoded; None if absent."""
        values = urllib.parse.parse_qs(self.query, keep_blank_values=True).get(name)
        return values[0] if values else None


#: What a route answers: status, body, content type, extra header fields.
_Answer = tuple[int, bytes, str, Sequence[tuple[str, str]]]


def parse_head(head: bytes) -> _Request:
    """Parse a request head (without its final blank line).  Raises _BadRequest."""
    text = head.decode("latin-1")
    lines = text.split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    request_line = lines[0]
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise _BadRequest(400, "malformed method")
    match = _VERSION.match(version)
    if match is None:
        raise _BadRequest(400, "malformed HTTP version")
    if match.group(1) != "1":
        raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are served")
    if len(lines) - 1 > MAX_HEADERS:
        raise _BadRequest(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    hosts = 0
    for line in lines[1:]:
        if not line:
            raise _BadRequest(400, "empty header line")
        if line[0] in " \t":
            raise _BadRequest(400, "obsolete line folding")  # RFC 9112 §5.2
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            raise _BadRequest(400, "malformed header field")  # RFC 9112 §5.1: no space
        value = value.strip(" \t")
        if not _FIELD_VALUE.match(value):
            raise _BadRequest(400, "control character in a header field")
        key = name.lower()
        if key == "host":
            hosts += 1
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if (match.group(2) != "0" and hosts != 1) or hosts > 1:
        raise _BadRequest(400, "HTTP/1.1 needs exactly one Host header")  # RFC 9112 §3.2
    if method not in ("GET", "HEAD", "POST"):
        raise _BadRequest(405, "only GET and HEAD (and POST to close a session)")
    if target == "*" or not _TARGET.match(target):
        raise _BadRequest(400, "malformed request target")
    path, _, query = target.split("#", 1)[0].partition("?")
    return _Request(method, path, headers, query)


class Readiness:
    """The checks behind ``/readyz``: listeners up, upstream reachable, audit healthy.

    The upstream is probed with a plain TCP connect (closed at once) of at
    most ``probe_timeout`` seconds; the result is kept ``cache_seconds``, and
    concurrent scrapes share one probe, so scrapes never hammer the server.
    Every check that raises counts as failed.
    """

    def __init__(
        self,
        *,
        listeners_up: Callable[[], bool],
        audit_healthy: Callable[[], bool],
        upstream: tuple[str, int] | None = None,
        probe_timeout: float = 2.0,
        cache_seconds: float = 5.0,
        connect: Callable[[str, int], Awaitable[trio.abc.Stream]] | None = None,
        shared_state_healthy: Callable[[], bool] | None = None,
    ) -> None:
        self._listeners_up = listeners_up
        #: The shared-state store answers (``shared_state:``; None: not used).
        self._shared_state_healthy = shared_state_healthy
        self._audit_healthy = audit_healthy
        self._upstream = upstream
        self._probe_timeout = probe_timeout
        self._cache_seconds = cache_seconds
        self._connect = connect if connect is not None else _open_tcp
        self._lock = trio.Lock()
        self._cached: tuple[float, bool] | None = None
        #: Upstream probes made so far (for tests and diagnostics).
        self.probes = 0

    async def __call__(self) -> dict[str, bool]:
        checks = {
            "listeners": _safely(self._listeners_up),
            "upstream": await self.upstream_reachable(),
            "audit": _safely(self._audit_healthy),
        }
        if self._shared_state_healthy is not None:
            checks["shared_state"] = _safely(self._shared_state_healthy)
        return checks

    async def upstream_reachable(self) -> bool:
        if self._upstream is None:
            return True
        async with self._lock:
            now = trio.current_time()
            cached = self._cached
            if cached is not None and now - cached[0] < self._cache_seconds:
                return cached[1]
            ok = await self._probe(*self._upstream)
            self._cached = (trio.current_time(), ok)
            return ok

    async def _probe(self, host: str, port: int) -> bool:
        self.probes += 1
        stream: trio.abc.Stream | None = None
        try:
            with trio.move_on_after(self._probe_timeout):
                stream = await self._connect(host, port)
        except (OSError, trio.BrokenResourceError):
            return False
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)
        return stream is not None


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


def _safely(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        return False


# What a connection is doing, in the order connections are shed at the cap.
_AWAITING_HEAD: Final = 0  # no valid request head yet (idle, slowloris, bad request)
_LINGERING: Final = 1  # answered; draining the client's input before closing
_SERVING: Final = 2  # a valid request: routing it, or sending the answer


class _Slot:
    """One admitted connection: its phase, and how to shed it."""

    __slots__ = ("phase", "scope")

    def __init__(self) -> None:
        self.phase = _AWAITING_HEAD
        self.scope = trio.CancelScope()


class AdminServer:
    """Serves ``/metrics``, ``/healthz``, ``/readyz`` and ``/sessions`` on its own listeners.

    ``metrics`` None: ``/metrics`` comes from ``scrape`` (a supervisor: the
    workers' scrapes merged), or is 404.  ``sessions`` None: ``/sessions`` is
    404.
    """

    def __init__(
        self,
        metrics: Metrics | None,
        ready: ReadyCheck,
        *,
        sessions: SessionControl | None = None,
        scrape: Callable[[str | None], Awaitable[tuple[bytes, str]]] | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        ready_timeout: float = READY_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_head: int = MAX_REQUEST_HEAD,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.metrics = metrics
        self.ready = ready
        self.sessions = sessions
        self.scrape = scrape
        self.request_timeout = request_timeout
        self.ready_timeout = ready_timeout
        self.max_connections = max_connections
        self.max_head = max_head
        self.listeners: list[trio.SocketListener] = []
        #: The bound (host, port) of each listener, once open (port 0 resolved).
        self.bound: list[tuple[str, int]] = []
        #: The admitted connections, oldest first (dicts keep insertion order).
        self._slots: dict[_Slot, None] = {}
        #: Connections that ended in an unexpected error (a popguard bug).
        self.errors = 0
        #: Connections closed to make room for a newer one (at the cap).
        self.shed = 0

    @property
    def connections(self) -> int:
        """Connections admitted and not yet finished or shed."""
        return len(self._slots)

    async def open(self, address: tuple[str, int] = DEFAULT_ADMIN_ADDRESS) -> list[tuple[str, int]]:
        """Bind the admin address (port 0 is resolved).  Raises OSError."""
        host, port = address
        try:
            self.listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(
                exc.errno, f"cannot listen on {where} (admin): {exc.strerror or exc}"
            ) from exc
        self.bound = [
            (str(sockname[0]), int(sockname[1]))
            for sockname in (listener.socket.getsockname() for listener in self.listeners)
        ]
        return self.bound

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; :meth:`open` first (or it binds the default)."""
        if not self.listeners:
            await self.open()
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_listeners, self.handle, self.listeners))
            task_status.started(self.bound)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """One connection: one request, one answer, close."""
        # No checkpoint between counting and admitting: concurrent newcomers
        # each see the registry as the others left it.
        while len(self._slots) >= self.max_connections:
            self._shed_one()
        slot = _Slot()
        self._slots[slot] = None
        try:
            with slot.scope:
                await self._serve_one(stream, slot)
        except Exception:
            self.errors += 1  # an admin connection must never take anything else down
        finally:
            self._slots.pop(slot, None)
            await trio.aclose_forcefully(stream)

    def _shed_one(self) -> None:
        """Make room: close the oldest connection in the cheapest phase to lose.

        First one still without a valid request head (an idle or slowloris
        connection: a real client sends its head at once), else one already
        answered and only lingering, else the oldest of all.  The newcomer is
        always served, so a flood of idle connections cannot keep a health
        check out; a flooder can only push out its own older connections.
        """
        victim = min(self._slots, key=lambda slot: slot.phase)  # the oldest of the lowest phase
        del self._slots[victim]
        victim.scope.cancel()  # its task closes the socket at its next checkpoint
        self.shed += 1

    async def _serve_one(self, stream: trio.abc.Stream, slot: _Slot) -> None:
        head: bytes | None = None
        status_error: _BadRequest | None = None
        with trio.move_on_after(self.request_timeout) as scope:
            try:
                head = await self._read_head(stream)
            except _BadRequest as exc:
                status_error = exc
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
        if scope.cancelled_caught:
            await self._answer(stream, slot, 408, b"request timeout\n", _TEXT, head_only=False)
            return
        if status_error is not None:
            body = status_error.message.encode("ascii", "replace") + b"\n"
            await self._answer(stream, slot, status_error.status, body, _TEXT, head_only=False)
            return
        if head is None:
            return  # the client closed before a complete request
        try:
            request = parse_head(head)
        except _BadRequest as exc:
            allow = [("Allow", _ALLOW_READ)] if exc.status == 405 else []
            body = exc.message.encode("ascii", "replace") + b"\n"
            await self._answer(stream, slot, exc.status, body, _TEXT, head_only=False, extra=allow)
            return
        request.peer = _peer_of(stream)
        slot.phase = _SERVING
        extra: Sequence[tuple[str, str]] = ()
        try:
            status, body, content_type, extra = await self._route(request)
        except Exception:
            status, body, content_type = 500, b"internal error\n", _TEXT
        head_only = request.method == "HEAD"
        await self._answer(
            stream, slot, status, body, content_type, head_only=head_only, extra=extra
        )

    async def _read_head(self, stream: trio.abc.Stream) -> bytes | None:
        """The request head without its blank line; None on EOF before it."""
        buffer = bytearray()
        scanned = 0
        limit = self.max_head
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return None
            buffer += data
            # A head ends at an empty line (CRLF CRLF, or bare LF LF).
            start = max(scanned - 3, 0)
            ends = [
                (end, len(terminator))
                for terminator in (b"\r\n\r\n", b"\n\n")
                if (end := buffer.find(terminator, start)) != -1
            ]
            if ends:
                end, size = min(ends)
                if end + size <= limit:
                    return bytes(buffer[:end])
            scanned = len(buffer)
            if len(buffer) >= limit:
                if b"\n" not in buffer[:limit]:
                    raise _BadRequest(414, "request line too long")
                raise _BadRequest(431, f"request head longer than {limit} octets")

    async def _route(self, request: _Request) -> _Answer:
        path = request.path
        close = _CLOSE_PATH.match(path)
        if close is not None and self.sessions is not None:
            if request.method != "POST":
                return 405, b"only POST closes a session\n", _TEXT, [("Allow", _ALLOW_CLOSE)]
            return await self._close(request, close.group(1))
        if request.method not in _READ_METHODS:
            return 405, b"only GET and HEAD\n", _TEXT, [("Allow", _ALLOW_READ)]
        if path == "/metrics" and self.metrics is not None:
            body, content_type = self.metrics.exposition(request.headers.get("accept"))
            return 200, body, content_type, ()
        if path == "/metrics" and self.scrape is not None:
            body, content_type = await self.scrape(request.headers.get("accept"))
            return 200, body, content_type, ()
        if path == "/healthz":
            return 200, b"ok\n", _TEXT, ()
        if path == "/readyz":
            return await self._readyz()
        if path == _SESSIONS_PATH and self.sessions is not None:
            status, document = await self.sessions.list_sessions(request.parameter("user"))
            return _json(status, document)
        if path == "/":
            paths = ["/metrics"] if self.metrics is not None or self.scrape else []
            paths += ["/healthz", "/readyz"]
            if self.sessions is not None:
                paths += [_SESSIONS_PATH, "POST /sessions/ID/close"]
            return 200, f"popguard admin: {' '.join(paths)}\n".encode(), _TEXT, ()
        return 404, b"not found\n", _TEXT, ()

    async def _close(self, request: _Request, session_id: str) -> _Answer:
        """``POST /sessions/ID/close[?reason=TEXT]``: end a session without QUIT."""
        assert self.sessions is not None
        if not request.headers.get(CSRF_HEADER.lower()):
            return _json(403, {"error": f"a POST needs the {CSRF_HEADER} header"})
        if not _SESSION_ID.match(session_id):
            return _json(404, {"error": "no such session", "id": bounded_text(session_id, 64)})
        relayed = request.headers.get(REQUESTED_BY_HEADER.lower())
        requested_by, relayed_by = request.peer, None
        if relayed:
            requested_by = bounded_text(relayed, _MAX_REQUESTED_BY)
            relayed_by = request.peer
        reason = request.parameter("reason")
        status, document = await self.sessions.close_session(
            session_id,
            requested_by=requested_by,
            relayed_by=relayed_by,
            reason=bounded_text(reason, MAX_CLOSE_REASON) if reason else None,
        )
        return _json(status, document)

    async def _readyz(self) -> _Answer:
        checks: dict[str, bool] = {}
        with trio.move_on_after(self.ready_timeout) as scope:
            checks = await self.ready()
        if scope.cancelled_caught:
            checks = {"checks_timed_out": False}
        ok = bool(checks) and all(checks.values())
        return _json(
            200 if ok else 503, {"status": "ready" if ok else "not ready", "checks": checks}
        )

    async def _answer(
        self,
        stream: trio.abc.Stream,
        slot: _Slot,
        status: int,
        body: bytes,
        content_type: str,
        *,
        head_only: bool,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in extra),
        ]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not head_only:
            data += body
        with trio.move_on_after(self.request_timeout):
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            slot.phase = _LINGERING
            await _linger(stream)


def _json(status: int, document: Mapping[str, Any]) -> _Answer:
    return status, json.dumps(document, sort_keys=True).encode() + b"\n", _JSON, ()


def bounded_text(text: str, limit: int) -> str:
    """Free text from a request made safe for a record: cut to ``limit``
    characters, control characters escaped (CWE-117), as peers' text is."""
    return escape_text(text[:limit].encode("utf-8", "surrogatepass"))


def _peer_of(stream: trio.abc.Stream) -> str:
    """The admin client's address, ``host:port`` (``[host]:port``); "unknown"
    for a stream that is not a socket (tests on memory streams)."""
    if not isinstance(stream, trio.SocketStream):
        return "unknown"
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), int(address[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address) or "unknown"


async def admin_request(
    address: tuple[str, int],
    method: str,
    target: str,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request to an admin listener: (status, body).

    How a supervisor asks its workers: one request per connection, read to
    the end (the listener answers with ``Connection: close``), at most
    :data:`MAX_ADMIN_REPLY` octets within :data:`ADMIN_REQUEST_TIMEOUT`
    seconds.  Raises OSError (also for a timeout or a malformed answer).
    """
    host, port = address
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    fields = {"Host": authority, "Connection": "close", CSRF_HEADER: "1", **(headers or {})}
    head = f"{method} {target} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields.items()) + "\r\n"
    received = bytearray()
    with trio.move_on_after(ADMIN_REQUEST_TIMEOUT) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(head.encode("latin-1"))
                while data := await stream.receive_some(65536):
                    received += data
                    if len(received) > MAX_ADMIN_REPLY:
                        raise OSError(f"answer longer than {MAX_ADMIN_REPLY} octets")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise OSError(f"connection lost: {exc}") from exc
    if scope.cancelled_caught:
        raise OSError(f"no answer within {ADMIN_REQUEST_TIMEOUT:g} s")
    status_line, _, rest = bytes(received).partition(b"\r\n")
    _, separator, body = rest.partition(b"\r\n\r\n")
    parts = status_line.split(b" ", 2)
    if not separator or len(parts) < 2 or not parts[1].isdigit():
        raise OSError("malformed answer")
    return int(parts[1]), body


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then drain briefly, so the answer is not destroyed by an RST."""
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    with trio.move_on_after(LINGER_TIMEOUT):
        try:
            await stream.send_eof()
            drained = 0
            while drained < LINGER_MAX_BYTES:
                data = await stream.receive_some(4096)
                if not data:
                    return
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            return
        except OSError:
            return


async def serve_admin(
    address: tuple[str, int],
    metrics: Metrics | None,
    ready: ReadyCheck,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind ``address`` and serve the admin endpoints until cancelled.

    ``task_status.started`` gets the bound ``(host, port)`` list.  To see a
    bind error as a plain ``OSError`` (not inside a nursery's exception
    group), use :class:`AdminServer` and ``await server.open(address)`` first.
    """
    server = AdminServer(
        metrics, ready, request_timeout=request_timeout, max_connections=max_connections
    )
    await server.open(address)
    await server.run(task_status=task_status)
