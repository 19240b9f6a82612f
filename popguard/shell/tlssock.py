"""TLS on a TCP connection, with OpenSSL's record layer in C.

``trio.SSLStream`` drives an ``ssl.SSLObject`` over memory BIOs: every TLS
record crosses Python twice (kernel to BIO, BIO to plaintext), and each
receive yields one record.  Relaying a 50 kB RETR through TLS on both sides
cost about five times the CPU of plain TCP that way.

:class:`TLSSocketStream` instead wraps the connection's own non-blocking
socket in an ``ssl.SSLSocket``: OpenSSL reads and writes the kernel socket
itself, and Python sees only plaintext.  trio is entered only to wait, with
its public low-level waits (``wait_readable``/``wait_writable``), when
OpenSSL says ``SSLWantReadError``/``SSLWantWriteError``.  It behaves like
:class:`~popguard.shell.tcp.TCPStream` on the hot path:

* ``receive_some`` returns everything OpenSSL can decrypt from what the
  kernel already holds, up to the size asked for, as one chunk (a server
  writing 4 KiB records costs one pass through the relay per network read,
  not one per record); when data was there at once it still yields once;
* :meth:`~TLSSocketStream.receive_nowait` is the same read without trio,
  and :meth:`~TLSSocketStream.wait_receivable` the wait: the relay's pumps
  read TLS as they read plain TCP, entering trio only to wait, and skip the
  read that would fail right after one that drained the kernel;
* ``send_all`` does not yield when the kernel took every record at once.

OpenSSL can need the other direction of the socket (a write that must
first read, as in a renegotiation; a read that must write, as in a TLS 1.3
key update).  Each direction has at most one task (the relay's pumps), and
the two never wait on the same direction of the socket at once: one parks in
trio, the other waits for it to wake (:meth:`_wait`).

Closing: :meth:`send_eof` sends close_notify (RFC 8446 §6.1) and leaves
the receiving side open; :meth:`aclose` sends close_notify, then closes;
:meth:`close_now` closes at once; :meth:`detach_tcp` hands the bare TCP
connection back (the relay's lingering close after close_notify, or after a
failed handshake, reads and discards without decrypting).  A close_notify
from the peer is end of file (``b""``); an EOF without one (a truncation)
is ``BrokenResourceError``, as in ``trio.SSLStream``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import weakref
from typing import Final

import trio

from popguard.shell.tcp import DEFAULT_RECEIVE_SIZE, TCPStream

#: The most plaintext one TLS record holds (RFC 8446 §5.1): what one
#: ``SSL_read`` returns at most.
MAX_RECORD: Final = 16384

#: The most plaintext :meth:`TLSSocketStream.send_eof` keeps for later receives.
HOLD_LIMIT: Final = 256 * 1024

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)

#: The server name (SNI) each server-side connection asked for, recorded by
#: the listener's SNI callback (:func:`popguard.shell.tls.server_context`).
_SNI: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def record_sni(ssl_object: object, name: str) -> None:
    """Remember the server name a client sent (called from an SNI callback)."""
    _SNI[ssl_object] = name


class TLSSocketStream(trio.abc.HalfCloseableStream):
    """A TLS connection over a :class:`TCPStream`'s socket (see the module doc).

    Build it with :meth:`wrap`, then :meth:`do_handshake`.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.socket = sock
        self._closed = False
        self._receiving = False
        self._sending = False
        self._handshook = False
        #: TCP (not a socketpair of the tests): TCP_CORK applies.
        self._corkable = sock.family in (socket.AF_INET, socket.AF_INET6)
        #: close_notify sent (send_eof): no more sends.
        self._eof_sent = False
        #: The peer's close_notify has arrived (after unwrap() completed, the
        #: socket is plaintext: it must not be read again).
        self._eof_received = False
        #: An error found while gathering, reported by the next receive.
        self._deferred: BaseException | None = None
        #: Plaintext decrypted before close_notify was sent (see send_eof),
        #: returned by the next receives.
        self._held = b""
        #: What the last read found: None, nothing (ask OpenSSL); True, the
        #: kernel drained (wait until readable); False, OpenSSL must write
        #: first (wait until writable).
        self._blocked: bool | None = None
        #: Which task waits for the socket in trio, per direction; the other
        #: task, if it needs the same direction, waits for this event.
        self._parked = {False: False, True: False}
        self._woken: dict[bool, trio.Event | None] = {False: None, True: None}

    @classmethod
    def wrap(
        cls,
        tcp: TCPStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> TLSSocketStream:
        """Take over ``tcp``'s socket (``tcp`` is closed, its socket not).

        Raises ``BrokenResourceError`` if the socket cannot be wrapped (the
        connection is then closed).  Bytes given to ``tcp.unread`` are not
        fed to TLS: a caller with such bytes needs ``trio.SSLStream``.
        """
        sock = tcp.detach()
        try:
            wrapped = context.wrap_socket(
                sock,
                server_side=server_side,
                server_hostname=server_hostname,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,
            )
        except (OSError, ValueError) as exc:
            sock.close()  # a no-op if the failure came after it was taken over
            raise trio.BrokenResourceError(f"TLS setup failed: {exc}") from exc
        return cls(wrapped)

    # -- what describe() and the audit records read ------------------------
    @property
    def server_side(self) -> bool:
        return self.socket.server_side

    @property
    def server_hostname(self) -> str | None:
        return self.socket.server_hostname

    @property
    def sni(self) -> str | None:
        """The server name the client asked for (server side), or the one sent."""
        if self.socket.server_side:
            return _SNI.get(self.socket)
        return self.socket.server_hostname

    @property
    def context(self) -> ssl.SSLContext:
        return self.socket.context

    def version(self) -> str | None:
        return self.socket.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self.socket.cipher()

    def selected_alpn_protocol(self) -> str | None:
        return self.socket.selected_alpn_protocol()

    def getpeercert(self, binary_form: bool = False) -> object:
        return self.socket.getpeercert(binary_form)

    def detach_tcp(self) -> TCPStream:
        """The bare TCP connection, for a lingering close (FIN, then read and
        discard what the peer still sends, undecrypted): after a failed
        handshake, or after close_notify.  This stream is closed, the
        connection is not."""
        self._check_open()
        self._closed = True
        return TCPStream(socket.socket(fileno=self.socket.detach()))

    # -- the handshake -------------------------------------------------------
    async def do_handshake(self) -> None:
        """Run the TLS handshake; ``BrokenResourceError`` if it fails."""
        self._check_open()
        sock = self.socket
        while True:
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                await self._wait(readable=True)
            except ssl.SSLWantWriteError:
                await self._wait(readable=False)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise self._translate(exc) from exc
            else:
                self._handshook = True
                await trio.lowlevel.checkpoint()
                return

    # -- receiving -----------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        size = max_bytes or DEFAULT_RECEIVE_SIZE
        data = self.receive_nowait(size)
        if data is None:
            while data is None:
                await self.wait_receivable()
                data = self.receive_nowait(size)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        """What :meth:`receive_some` returns, without entering trio: None when
        nothing can be decrypted yet (await :meth:`wait_receivable`, then call
        again).  It never yields, so a caller that finds data again and again
        must let other tasks run now and then (a checkpoint of its own).

        When the last read found the kernel drained (OpenSSL wanted more
        bytes), this returns None at once: a relay pump that just relayed a
        chunk then waits without one more failing ``SSL_read``.  Waiting is
        then at worst one wasted pass, never a hang: the wait ends at once if
        the socket became readable meanwhile.
        """
        self._check_open()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        if self._held or self._deferred is not None or self._eof_received:
            if self._held:
                held, self._held = self._held[:max_bytes], self._held[max_bytes:]
                return held
            if self._deferred is not None:
                raise self._deferred
            return b""
        if self._blocked is not None:
            return None
        sock = self.socket
        try:
            data = sock.recv(max_bytes if max_bytes < MAX_RECORD else MAX_RECORD)
        except ssl.SSLWantReadError:
            self._blocked = True
            return None
        except ssl.SSLWantWriteError:
            self._blocked = False
            return None
        except ssl.SSLZeroReturnError:
            data = b""  # close_notify
        except (OSError, ValueError) as exc:
            raise self._translate(exc) from exc
        if not data:
            self._eof_received = True
        elif len(data) < max_bytes:
            data = self._gather(data, max_bytes)
        return data

    async def wait_receivable(self) -> None:
        """Wait until :meth:`receive_nowait` may have something: for the
        socket to be readable, or writable if OpenSSL must write first."""
        self._check_open()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        self._receiving = True
        try:
            await self._wait(readable=self._blocked is not False)
        finally:
            self._blocked = None
            self._receiving = False

    def _gather(self, data: bytes, size: int) -> bytes:
        """``data`` and whatever else OpenSSL decrypts without waiting, up to
        ``size``: the rest of the record, then further records the kernel
        already holds, until OpenSSL would have to wait (``pending()`` alone
        would see only the rest of the current record)."""
        sock = self.socket
        chunks = [data]
        total = len(data)
        try:
            while total < size:
                want = size - total
                more = sock.recv(want if want < MAX_RECORD else MAX_RECORD)
                if not more:
                    self._eof_received = True
                    break
                chunks.append(more)
                total += len(more)
        except ssl.SSLWantReadError:
            self._blocked = True
        except ssl.SSLWantWriteError:
            self._blocked = False
        except ssl.SSLZeroReturnError:
            self._eof_received = True  # the next receive reports it
        except (OSError, ValueError) as exc:
            error = self._translate(exc)
            error.__cause__ = exc
            self._deferred = error  # the next receive reports it
        return data if len(chunks) == 1 else b"".join(chunks)

    # -- sending -------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        if self._eof_sent:
            raise trio.ClosedResourceError("close_notify was sent")
        self._sending = True
        sock = self.socket
        # OpenSSL sends each record (16 KiB at most) with a write of its own:
        # corked, the records of one send leave together, as one plain send
        # would (a 50 kB reply otherwise wakes the peer four times).
        cork = self._corkable and len(data) > MAX_RECORD
        try:
            if cork:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            with memoryview(data) as view:
                total = len(view)
                sent = 0
                while sent < total:
                    # OpenSSL writes all or nothing (no partial-write mode);
                    # after a want-write it must be called again with the
                    # same bytes, which it finishes writing.
                    try:
                        sent += sock.send(view[sent:])
                    except ssl.SSLWantWriteError:
                        await self._wait(readable=False)
                    except ssl.SSLWantReadError:
                        await self._wait(readable=True)
        except (OSError, ValueError) as exc:
            raise self._translate(exc) from exc
        finally:
            self._sending = False
            if cork:
                self._uncork()

    def _uncork(self) -> None:
        """Let corked records go (also after an error or a cancelled send,
        so that nothing sent later waits behind them)."""
        with contextlib.suppress(OSError):  # closed or broken: nothing to send
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        """Send close_notify; receiving goes on until the peer's close_notify.

        ``unwrap()`` runs ``SSL_shutdown`` twice: the first sends
        close_notify, the second reads, looking for the peer's, and OpenSSL
        fails it if application data comes first (the data is lost).  So
        what the peer already sent is decrypted first and kept for the next
        receives (unless a receive is in progress; up to :data:`HOLD_LIMIT`).
        Data arriving in between is lost: the next receive then raises
        ``BrokenResourceError``.
        """
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        self._sending = True
        try:
            if not self._receiving:
                self._hold_received()
            await self._send_close_notify()
        finally:
            self._sending = False
        await trio.lowlevel.checkpoint()

    def _hold_received(self) -> None:
        """Decrypt what the kernel holds into :attr:`_held` (see send_eof)."""
        if self._deferred is not None or self._eof_received:
            return
        sock = self.socket
        chunks = [self._held]
        total = len(self._held)
        try:
            while total < HOLD_LIMIT:
                more = sock.recv(MAX_RECORD)
                if not more:
                    self._eof_received = True
                    break
                chunks.append(more)
                total += len(more)
        except _WANT:
            pass
        except ssl.SSLZeroReturnError:
            self._eof_received = True
        except (OSError, ValueError) as exc:
            error = self._translate(exc)
            error.__cause__ = exc
            self._deferred = error
        self._held = b"".join(chunks)

    async def _send_close_notify(self) -> None:
        sock = self.socket
        while True:
            try:
                sock.unwrap()
            except ssl.SSLWantReadError:
                self._eof_sent = True  # sent; the peer's has not come yet
                return
            except ssl.SSLWantWriteError:
                await self._wait(readable=False)
            except ssl.SSLError as exc:
                if exc.reason != "APPLICATION_DATA_AFTER_CLOSE_NOTIFY":
                    raise self._translate(exc) from exc
                # close_notify was sent (and no alert after it); what the peer
                # sent meanwhile was discarded by OpenSSL.
                self._eof_sent = True
                if self._deferred is None and not self._eof_received:
                    error = trio.BrokenResourceError("data received after close_notify was lost")
                    error.__cause__ = exc
                    self._deferred = error
                return
            except (OSError, ValueError) as exc:
                raise self._translate(exc) from exc
            else:
                # Both close_notify are done and the socket is plaintext now.
                self._eof_sent = self._eof_received = True
                return

    # -- closing -------------------------------------------------------------
    def close_now(self) -> None:
        """Close at once, without close_notify and without a checkpoint."""
        if not self._closed:
            self._closed = True
            if self.socket.fileno() != -1:
                trio.lowlevel.notify_closing(self.socket)
                self.socket.close()

    async def aclose(self) -> None:
        """Send close_notify if the connection is up, then close (as
        ``trio.SSLStream`` does, without waiting for the peer's)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._handshook and not self._eof_sent and not self._sending:
                self._sending = True
                try:
                    await self._send_close_notify()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    self._sending = False
        finally:
            self.close_now()
        await trio.lowlevel.checkpoint()

    # -- helpers -------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")

    async def _wait(self, *, readable: bool) -> None:
        """Wait until the socket is readable (or writable).

        If the other task already waits for that in trio, wait for it to
        wake instead (trio allows one waiter per direction of a socket);
        then OpenSSL is simply asked again.
        """
        if self._parked[readable]:
            event = self._woken[readable]
            if event is None:
                event = self._woken[readable] = trio.Event()
            await event.wait()
            return
        self._parked[readable] = True
        try:
            if readable:
                await trio.lowlevel.wait_readable(self.socket)
            else:
                await trio.lowlevel.wait_writable(self.socket)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("stream was closed") from None
        finally:
            self._parked[readable] = False
            event = self._woken[readable]
            if event is not None:
                self._woken[readable] = None
                event.set()

    def _translate(self, exc: BaseException) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("stream was closed")
        if isinstance(exc, ssl.SSLError):
            return trio.BrokenResourceError(f"TLS error: {exc.reason or exc}")
        if isinstance(exc, OSError):
            return trio.BrokenResourceError(f"socket error: {exc.strerror or exc}")
        return trio.BrokenResourceError(str(exc))
