"""A lean TCP stream for the relay's hot path.

``trio.SocketStream`` yields to the scheduler on *every* send and receive,
even when the kernel accepted or had the bytes at once.  A POP3 round trip
through the proxy is two receives and two sends, so those yields were most
of popguard's per-command cost (measured: NOOP ping-pong through the proxy
went from 0.45x to 0.6x+ of direct when they were removed).

This stream talks to a stdlib socket directly and uses only trio's public
low-level waits (``wait_readable``/``wait_writable``):

* ``receive_some`` parks until the socket is readable; when data was already
  there it still yields once (``cancel_shielded_checkpoint``), so a pump that
  always finds data can never starve other sessions;
* ``send_all`` does not yield when the kernel takes everything at once; it
  waits only when the socket buffer is full.  Every pump loop receives
  again right after sending, so each loop still yields at least once.

Errors follow the ``trio.abc.Stream`` contract: ``BrokenResourceError`` for
a failed peer, ``ClosedResourceError`` after ``aclose``, and
``BusyResourceError`` for concurrent use of one direction.
"""

from __future__ import annotations

import socket
from typing import Final

import trio

DEFAULT_RECEIVE_SIZE: Final = 65536


class TCPStream(trio.abc.HalfCloseableStream):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._closed = False
        self._receiving = False
        self._sending = False
        #: Bytes read ahead of the session (after a PROXY header), served first.
        self._pushback = b""

    @classmethod
    def adopt(cls, stream: trio.SocketStream) -> TCPStream:
        """Take over the connection of a ``trio.SocketStream``."""
        fd = stream.socket.detach()
        return cls(socket.socket(fileno=fd))

    def unread(self, data: bytes) -> None:
        """Have the next receives return ``data`` first (bytes read too early)."""
        self._pushback = data + self._pushback

    @property
    def pushback(self) -> bool:
        """Whether bytes given to :meth:`unread` are still to be read."""
        return bool(self._pushback)

    def take_pushback(self, size: int) -> bytes:
        """Up to ``size`` of the bytes given to :meth:`unread` (for a caller
        that reads :attr:`socket` itself)."""
        data, self._pushback = self._pushback[:size], self._pushback[size:]
        return data

    def detach(self) -> socket.socket:
        """Hand the socket to a new owner (TLS, :mod:`popguard.shell.tlssock`):
        this stream is closed from now on, the socket is not."""
        self._closed = True
        return self.socket

    async def peek_some(self, max_bytes: int) -> bytes:
        """Like :meth:`receive_some`, but the bytes stay to be read (``MSG_PEEK``);
        :meth:`discard` then takes as many of them as the caller used.

        A PROXY header is read this way, so whatever follows it in the same
        segment stays in the kernel: TLS (:mod:`popguard.shell.tlssock`)
        reads the ClientHello from the socket itself.
        """
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        if self._pushback:
            await trio.lowlevel.checkpoint()
            return self._pushback[:max_bytes]
        self._receiving = True
        sock = self.socket
        try:
            while True:
                try:
                    data = sock.recv(max_bytes, socket.MSG_PEEK)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                await trio.lowlevel.checkpoint()
                return data
        except OSError as exc:
            raise self._translate(exc) from exc
        finally:
            self._receiving = False

    def discard(self, count: int) -> None:
        """Drop the first ``count`` bytes :meth:`peek_some` returned."""
        if self._pushback:
            self._pushback = self._pushback[count:]
            return
        while count > 0:
            try:
                count -= len(self.socket.recv(count)) or count
            except OSError as exc:  # peeked bytes are there: not expected
                raise self._translate(exc) from exc

    def setsockopt(self, level: int, option: int, value: int | bool) -> None:
        self.socket.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int) -> int:
        return self.socket.getsockopt(level, option)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving")
        self._receiving = True
        sock = self.socket
        size = max_bytes or DEFAULT_RECEIVE_SIZE
        if self._pushback:
            data, self._pushback = self._pushback[:size], self._pushback[size:]
            try:
                await trio.lowlevel.checkpoint()
            finally:
                self._receiving = False
            return data
        try:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                pass
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(size)
                except BlockingIOError:
                    continue
        except OSError as exc:
            raise self._translate(exc) from exc
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        self._sending = True
        sock = self.socket
        try:
            with memoryview(data) as view:
                total = len(view)
                sent = 0
                while sent < total:
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
        except OSError as exc:
            raise self._translate(exc) from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        await trio.lowlevel.checkpoint()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._translate(exc) from exc

    def close_now(self) -> None:
        """Close at once, without a checkpoint (what ``aclose`` does, synchronously)."""
        if not self._closed:
            self._closed = True
            if self.socket.fileno() != -1:
                trio.lowlevel.notify_closing(self.socket)
                self.socket.close()

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def _translate(self, exc: OSError) -> Exception:
        if self._closed:
            return trio.ClosedResourceError("stream was closed")
        return trio.BrokenResourceError(f"socket error: {exc.strerror or exc}")
