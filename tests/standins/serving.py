"""How a stand-in is served: its ASGI app by uvicorn on 127.0.0.1, in a daemon thread.

``start()`` binds (the first time on a free port, after a ``stop()`` on the same port again: a
target that went away and came back), returns once uvicorn answers, and raises if it does not
within 10 s. ``stop()`` ends it and waits for the thread.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

HOST = "127.0.0.1"


class Served:
    def __init__(self, app: Any, name: str, *, backlog: int = 128) -> None:
        self.app = app
        self.name = name
        self.port = 0
        self._backlog = backlog
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> int:
        """Serve; the port."""
        if self.running:
            return self.port
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        sock.listen(self._backlog)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False, interface="asgi3")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name=self.name)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name} did not start")
            time.sleep(0.01)
        sock.close()  # uvicorn listens on its own duplicate
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None
