"""A TCP proxy the tests put in front of a real server (or a stand-in) to make it fail.

``TcpProxy(("127.0.0.1", port))`` listens on a free port of its own and forwards every
connection to the server, byte for byte (TLS passes through untouched). Its mode decides
what a client sees:

- ``"pass"``: the server, as if connected directly;
- ``"refuse"``: every open connection is cut and new ones are reset at once (a server
  that is down);
- ``"blackhole"``: connections are accepted and read but nothing ever comes back (a
  server that hangs: only the client's own deadline ends the wait).

The proxy runs its own event loop in a daemon thread, so it serves synchronous SDK
clients and the gateway's event loop alike. ``stop()`` closes everything.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self._loop = asyncio.new_event_loop()
        self._conns: set[asyncio.StreamWriter] = set()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        self.address: tuple[str, int] = sock.getsockname()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"tcpproxy-{self.address[1]}", daemon=True)
        self._thread.start()
        self._ready.wait(5)

    @property
    def port(self) -> int:
        return self.address[1]

    def _run(self, sock: socket.socket) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._server = await asyncio.start_server(self._serve, sock=sock)
            self._ready.set()

        self._loop.run_until_complete(main())
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:  # no Nagle/delayed-ACK stall on small requests (asyncio only sets it on IPPROTO_TCP sockets)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.mode == "refuse":
            _reset(writer)
            return
        self._conns.add(writer)
        try:
            if self.mode == "blackhole":
                while await reader.read(65536):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                _reset(writer)
                return
            self._conns.add(up_writer)
            await asyncio.gather(_pump(reader, up_writer, self), _pump(up_reader, writer, self), return_exceptions=True)
            self._conns.discard(up_writer)
        finally:
            self._conns.discard(writer)
            writer.close()

    def set_mode(self, mode: str) -> None:
        """Switch to ``pass``, ``refuse`` or ``blackhole``; the last two cut open connections."""
        if mode not in ("pass", "refuse", "blackhole"):
            raise ValueError(mode)

        def switch() -> None:
            self.mode = mode
            if mode != "pass":
                for w in list(self._conns):
                    _reset(w)
                self._conns.clear()

        self._loop.call_soon_threadsafe(switch)
        # Let the switch land before the caller's next request.
        done = threading.Event()
        self._loop.call_soon_threadsafe(done.set)
        done.wait(5)

    @contextmanager
    def failing(self, mode: str) -> Iterator[None]:
        self.set_mode(mode)
        try:
            yield
        finally:
            self.set_mode("pass")

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for w in list(self._conns):
                _reset(w)
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
            self._thread.join(5)
            if not self._loop.is_running():
                self._loop.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:  # RST, not FIN: what a client sees from a port nobody listens on
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: TcpProxy) -> None:
    try:
        while data := await reader.read(65536):
            if proxy.mode != "pass":
                return
            writer.write(data)
            await writer.drain()
    finally:
        if proxy.mode == "pass":
            try:
                writer.write_eof()
            except (OSError, RuntimeError):
                pass
