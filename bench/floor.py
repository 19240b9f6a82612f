"""The floor: the barest trio relay, the best a trio proxy can do on this machine.

    python -m bench.floor --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT
    python bench/floor.py ...   (how the bench starts it: imports only trio)

It knows nothing of POP3: accept, connect upstream, two pumps per session
(one in the session's own task), TCP_NODELAY on both sockets, 64 KiB reads;
EOF from one side is a shutdown(SHUT_WR) toward the other, and both sockets
close once both directions are done (or either fails).  The sockets are raw
and non-blocking: ``recv_into`` and ``send`` are called directly and trio is
entered only to wait when a call would block, because every trio stream
operation is a checkpoint (a scheduler pass) even when it does not block.
All pumps share one receive buffer: nothing awaits between a ``recv_into``
and its ``send``; only bytes the kernel would not take are copied out.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket

import trio

READ_SIZE = 64 * 1024
#: A pump that never has to wait yields once per this many bytes anyway, so
#: one busy session cannot starve the others (the bench's lock-step
#: clients make every pump wait long before that).
FAIR_BYTES = 1 << 20
_buf = bytearray(READ_SIZE)
_view = memoryview(_buf)


async def pump(src: socket.socket, dst: socket.socket, session: trio.CancelScope) -> None:
    moved = 0
    try:
        while True:
            try:
                n = src.recv_into(_view)
            except BlockingIOError:
                moved = 0
                await trio.lowlevel.wait_readable(src)
                continue
            if not n:
                dst.shutdown(socket.SHUT_WR)
                return
            try:
                sent = dst.send(_view[:n])
            except BlockingIOError:
                sent = 0
            if sent < n:  # the buffer is shared: keep the rest apart while we wait
                rest = memoryview(_buf[sent:n])
                while rest:
                    await trio.lowlevel.wait_writable(dst)
                    with contextlib.suppress(BlockingIOError):
                        rest = rest[dst.send(rest) :]
            moved += n
            if moved >= FAIR_BYTES:
                moved = 0
                await trio.lowlevel.checkpoint()
    except OSError:
        session.cancel()  # a reset or a broken pipe ends both directions


async def session(client: socket.socket, upstream: tuple[str, int]) -> None:
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        for sock in (client, up):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        failed = up.connect_ex(upstream)
        if failed == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(up)
            failed = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if failed:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, up, client, nursery.cancel_scope)
            await pump(client, up, nursery.cancel_scope)
    except OSError:
        pass  # the client left before we could set it up
    finally:
        for sock in (client, up):
            trio.lowlevel.notify_closing(sock)
            sock.close()


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(listen)
    lsock.listen(4096)
    lsock.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                client, _ = lsock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(lsock)
                continue
            except ConnectionAbortedError:
                continue
            nursery.start_soon(session, client, upstream)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--upstream", type=_address, required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    trio.run(serve, args.listen, args.upstream)


if __name__ == "__main__":
    main()
