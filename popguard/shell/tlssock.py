"""TLS on a TCP connection: OpenSSL over memory buffers, one system call per
network read and one per send.

``trio.SSLStream`` drives an ``ssl.SSLObject`` over memory BIOs too, but
through trio's stream machinery: a checkpoint per operation, one record per
receive.  An ``ssl.SSLSocket`` on the non-blocking socket keeps Python out
of the record layer, but OpenSSL without read-ahead (which Python does not
expose) reads each record with two ``read()`` calls, header then body, and
writes each 16 KiB record with a ``write()`` of its own.

:class:`TLSSocketStream` drives an ``ssl.SSLObject`` over two
``ssl.MemoryBIO`` synchronously, on the connection's own non-blocking
socket:

* receiving, one ``recv`` of up to :data:`NETWORK_READ` bytes fills the
  incoming BIO, then ``SSLObject.read`` decrypts record after record with no
  system call until OpenSSL wants more; everything decrypted, up to the size
  asked for, is returned as one chunk (a server writing 4 KiB records costs
  one pass through the relay per network read, not one per record);
* sending, ``SSLObject.write`` encrypts up to :data:`SEND_CHUNK` bytes into
  the outgoing BIO, and one ``send`` hands every record to the kernel; what
  the kernel does not take is kept (:attr:`_out`) and trio is entered only
  then, to wait until the socket is writable.

Like :class:`~popguard.shell.tcp.TCPStream` on the hot path, trio is entered
only to wait, with its public low-level waits (``wait_readable`` /
``wait_writable``): :meth:`~TLSSocketStream.receive_nowait` reads without
trio and :meth:`~TLSSocketStream.wait_receivable` waits, so the relay's
pumps read TLS as they read plain TCP; a read that found the kernel drained
skips the ``recv`` that would fail right after it; ``send_all`` does not
yield when the kernel took every record at once.

Memory stays bounded: the socket is read only when OpenSSL wants more bytes
(the incoming BIO then holds less than one record), so the BIO never holds
more than one network read and a partial record; plaintext is decrypted
only up to the size asked for, and the rest stays encrypted in the BIO; a
send encrypts :data:`SEND_CHUNK` bytes at a time, each sent before the next.

OpenSSL can write while reading (a TLS 1.3 key update, a session ticket; a
TLS 1.2 renegotiation) and read while writing (a renegotiation): every
operation ends by sending what OpenSSL put in the outgoing BIO, in order,
whichever task made it; a receive that leaves bytes unsent waits until the
socket is writable.  Each direction has at most one task (the relay's pumps),
and the two never wait on the same direction of the socket at once: one
parks in trio, the other waits for it to wake (:meth:`_wait`).

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

#: The most ciphertext one ``recv`` moves from the kernel into OpenSSL: a
#: 50 kB reply and its records in one system call.
NETWORK_READ: Final = 256 * 1024

#: The most plaintext encrypted at once by a send: what is encrypted and not
#: yet taken by the kernel stays below this and a few record headers.
SEND_CHUNK: Final = 256 * 1024

#: One buffer for every ``recv``: its bytes are copied into a BIO before
#: anything else runs (everything here is synchronous between awaits).
_NETWORK_BUFFER = bytearray(NETWORK_READ)
_NETWORK_VIEW = memoryview(_NETWORK_BUFFER)

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

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        #: The TCP socket (non-blocking): only ciphertext crosses it.
        self.socket = sock
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        #: Ciphertext OpenSSL produced that the kernel has not taken yet.
        self._out: bytes | memoryview = b""
        self._closed = False
        self._receiving = False
        self._sending = False
        self._handshook = False
        #: close_notify sent (send_eof): no more sends.
        self._eof_sent = False
        #: The peer's close_notify has arrived: every receive returns b"".
        self._eof_received = False
        #: An error found while gathering, reported by the next receive.
        self._deferred: BaseException | None = None
        #: Plaintext decrypted before close_notify was sent (see send_eof),
        #: returned by the next receives.
        self._held = b""
        #: The last ``recv`` took less than it asked for: the kernel was
        #: drained, so the next want-read waits instead of reading again.
        self._drained = False
        #: Why the last receive found nothing: None, nothing (ask OpenSSL);
        #: True, the kernel drained (wait until readable); False, bytes
        #: OpenSSL wrote are still to be sent (wait until writable).
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

        Raises ``BrokenResourceError`` if TLS cannot be set up (the
        connection is then closed).  Bytes given to ``tcp.unread`` are not
        fed to TLS: a caller with such bytes needs ``trio.SSLStream``.
        """
        sock = tcp.detach()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        try:
            tls = context.wrap_bio(
                incoming, outgoing, server_side=server_side, server_hostname=server_hostname
            )
        except (OSError, ValueError) as exc:
            sock.close()
            raise trio.BrokenResourceError(f"TLS setup failed: {exc}") from exc
        return cls(sock, tls, incoming, outgoing)

    # -- what describe() and the audit records read ------------------------
    @property
    def server_side(self) -> bool:
        return self._tls.server_side

    @property
    def server_hostname(self) -> str | None:
        return self._tls.server_hostname

    @property
    def sni(self) -> str | None:
        """The server name the client asked for (server side), or the one sent."""
        if self._tls.server_side:
            return _SNI.get(self._tls)
        return self._tls.server_hostname

    @property
    def context(self) -> ssl.SSLContext:
        return self._tls.context

    def version(self) -> str | None:
        return self._tls.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()

    def selected_alpn_protocol(self) -> str | None:
        return self._tls.selected_alpn_protocol()

    def getpeercert(self, binary_form: bool = False) -> object:
        return self._tls.getpeercert(binary_form)

    def detach_tcp(self) -> TCPStream:
        """The bare TCP connection, for a lingering close (FIN, then read and
        discard what the peer still sends, undecrypted): after a failed
        handshake, or after close_notify.  This stream is closed, the
        connection is not; ciphertext already read into OpenSSL is dropped."""
        self._check_open()
        self._closed = True
        return TCPStream(self.socket)

    # -- the handshake -------------------------------------------------------
    async def do_handshake(self) -> None:
        """Run the TLS handshake; ``BrokenResourceError`` if it fails.

        Bytes the peer sent after its last handshake message stay in the
        incoming BIO, for the first receive.
        """
        self._check_open()
        tls = self._tls
        try:
            while True:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    await self._send_out()  # our flight, before waiting for the peer's
                    if self._fill() is None:
                        await self._wait(readable=True)
                else:
                    break
            await self._send_out()  # our last flight (and TLS 1.3 tickets)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._send_alert()
            raise self._translate(exc) from exc
        self._handshook = True
        await trio.lowlevel.checkpoint()

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

        When the last read found the kernel drained, this returns None at
        once: a relay pump that just relayed a chunk then waits without one
        more failing ``recv``.  Waiting is then at worst one wasted pass,
        never a hang: the wait ends at once if the socket became readable
        meanwhile.
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
        try:
            data = self._decrypt(max_bytes)
            if self._out or self._outgoing.pending:
                self._flush()  # what reading made OpenSSL write (a key update)
        except (OSError, ValueError) as exc:
            self._send_alert()
            raise self._translate(exc) from exc
        if data is None and self._out and not self._sending:
            self._blocked = False  # the bytes must go before anything else
        return data

    def _decrypt(self, max_bytes: int) -> bytes | None:
        """Up to ``max_bytes`` of plaintext from the incoming BIO, reading the
        socket whenever OpenSSL wants more; None if there is none yet.  An
        error after some plaintext is kept for the next receive."""
        tls = self._tls
        incoming = self._incoming
        chunks: list[bytes] = []
        total = 0
        try:
            while total < max_bytes:
                # With nothing buffered, SSL_read could only fail (raising an
                # exception costs more than these checks): read the network.
                if (
                    not incoming.pending
                    and not incoming.eof
                    and not tls.pending()
                    and (self._drained or self._fill() is None)
                ):
                    self._drained = False
                    self._blocked = True
                    break
                want = max_bytes - total
                try:
                    data = tls.read(want if want < MAX_RECORD else MAX_RECORD)
                except ssl.SSLWantReadError:  # a partial record
                    if self._drained or self._fill() is None:
                        self._drained = False
                        self._blocked = True
                        break
                    continue
                if not data:  # close_notify (when none was sent)
                    self._eof_received = True
                    break
                chunks.append(data)
                total += len(data)
        except ssl.SSLZeroReturnError:
            self._eof_received = True  # close_notify, after ours
        except (OSError, ValueError) as exc:
            if not chunks:
                raise
            self._defer(exc)
        if not chunks:
            return b"" if self._eof_received else None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _fill(self) -> int | None:
        """One ``recv`` into the incoming BIO: the bytes read (0 at EOF, which
        OpenSSL is told of), or None if the kernel has nothing."""
        try:
            count = self.socket.recv_into(_NETWORK_BUFFER, NETWORK_READ)
        except BlockingIOError:
            return None
        if count:
            self._incoming.write(_NETWORK_VIEW[:count])
            self._drained = count < NETWORK_READ
        else:
            self._incoming.write_eof()  # OpenSSL tells a truncation from a close
        return count

    async def wait_receivable(self) -> None:
        """Wait until :meth:`receive_nowait` may have something: for the
        socket to be readable, or writable if bytes OpenSSL wrote must go
        first."""
        self._check_open()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        self._receiving = True
        try:
            await self._wait(readable=self._blocked is not False)
        finally:
            self._blocked = None
            self._receiving = False

    # -- sending -------------------------------------------------------------
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        if self._eof_sent:
            raise trio.ClosedResourceError("close_notify was sent")
        self._sending = True
        tls = self._tls
        try:
            with memoryview(data) as view:
                total = len(view)
                done = 0
                while done < total:
                    end = done + SEND_CHUNK if total - done > SEND_CHUNK else total
                    try:
                        tls.write(view[done:end])
                    except ssl.SSLWantReadError:
                        # A TLS 1.2 renegotiation: OpenSSL must read first.
                        await self._send_out()
                        await self._feed()
                        continue
                    done = end
                    await self._send_out()
        except (OSError, ValueError) as exc:
            raise self._translate(exc) from exc
        finally:
            self._sending = False

    async def _feed(self) -> None:
        """Read the socket into the incoming BIO for a send (see send_all);
        the receiving side then asks OpenSSL again before waiting."""
        while self._fill() is None:
            await self._wait(readable=True)
        self._blocked = None

    def _flush(self) -> bool:
        """Send what OpenSSL wrote and the kernel has not taken yet, as far as
        the kernel takes it now; True when nothing is left."""
        out = self._outgoing
        if out.pending:
            data: bytes | memoryview = out.read()
            if self._out:
                data = b"".join((self._out, data))
        else:
            data = self._out
            if not data:
                return True
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            self._out = b""
            return True
        self._out = memoryview(data)[sent:]
        return False

    def _send_alert(self) -> None:
        """After a TLS error: send the alert OpenSSL wrote, if the kernel
        takes it now (the peer then knows why; nothing waits for it)."""
        with contextlib.suppress(OSError):
            self._flush()

    async def _send_out(self) -> None:
        """Send everything OpenSSL wrote, waiting while the kernel is full."""
        while not self._flush():
            await self._wait(readable=False)

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        """Send close_notify; receiving goes on until the peer's close_notify.

        ``unwrap()`` runs ``SSL_shutdown`` twice: the first writes
        close_notify, the second reads, looking for the peer's, and OpenSSL
        fails it if application data comes first (the data is lost).  So the
        complete records already read from the socket are decrypted first and
        kept for the next receives; the socket itself is not read meanwhile,
        so nothing the peer sends later is lost.
        """
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        self._sending = True
        try:
            await self._send_close_notify()
        finally:
            self._sending = False
        await trio.lowlevel.checkpoint()

    def _hold_received(self) -> None:
        """Decrypt the complete records in the incoming BIO into
        :attr:`_held` (see send_eof): at most one network read's worth."""
        if self._deferred is not None or self._eof_received:
            return
        tls = self._tls
        chunks = [self._held]
        try:
            while data := tls.read(MAX_RECORD):
                chunks.append(data)
            self._eof_received = True  # close_notify
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof_received = True
        except (OSError, ValueError) as exc:
            self._defer(exc)
        self._held = b"".join(chunks)

    async def _send_close_notify(self) -> None:
        self._hold_received()
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the peer's has not come yet
        except (OSError, ValueError) as exc:
            raise self._translate(exc) from exc
        else:
            self._eof_received = True  # both close_notify are done
        self._eof_sent = True
        try:
            await self._send_out()
        except OSError as exc:
            raise self._translate(exc) from exc

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
        then the caller simply tries again.
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

    def _defer(self, exc: BaseException) -> None:
        """Keep an error found after some plaintext: the next receive reports it."""
        error = self._translate(exc)
        error.__cause__ = exc
        self._deferred = error

    def _translate(self, exc: BaseException) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("stream was closed")
        if isinstance(exc, ssl.SSLError):
            return trio.BrokenResourceError(f"TLS error: {exc.reason or exc}")
        if isinstance(exc, OSError):
            return trio.BrokenResourceError(f"socket error: {exc.strerror or exc}")
        return trio.BrokenResourceError(str(exc))
