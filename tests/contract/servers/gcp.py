"""The contract suite's server for the ``gcp`` backend: the Secret Manager STAND-IN
(:mod:`tests.standins.gcp_secretmanager`; GCP can't run here), driven through the real SDK.

Credentials: ``mount_config`` gives the backend a service-account key of its own, inline in
the config as ``service_account_key`` (a ``SecretStr``: the gateway seals it at rest like
every secret config field). That keeps the config a plain JSON-able dict with no set-up in
the gateway; in production a ``service_account_key_ref`` to another backend is preferred
(tests/backends/test_gcp.py covers the ref). Ambient credentials (``GOOGLE_APPLICATION_CREDENTIALS``
set in ``start()``) were not chosen: they would change the environment of every other test in
the worker, and the key's ``token_uri`` must name the proxy's host:port, known only here.

``auth_flow`` is ``"token"``: the key is exchanged at the stand-in's ``/token`` (reached through
host:port like the API, so the proxy in front of it takes the whole service away) for an
access token, and the API verifies that token. The default flow (self-signed JWTs, no token
endpoint) is tested in tests/backends/test_gcp.py.
"""

from __future__ import annotations

import json
import threading

from backends.gcp import GCPSecretManagerBackend
from tests.standins.gcp_secretmanager import GCPSecretManagerStandIn


class Server:
    type = "gcp"
    max_value_bytes = GCPSecretManagerBackend.capabilities.max_value_bytes

    def __init__(self) -> None:
        self._standin: GCPSecretManagerStandIn | None = None
        self._keys: dict[tuple[str, int], str] = {}  # one service-account key per proxy address
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._standin is None:
                self._standin = GCPSecretManagerStandIn()
            self._standin.start()

    def stop(self) -> None:
        with self._lock:
            standin, self._standin = self._standin, None
            self._keys.clear()
        if standin is not None:
            standin.stop()

    @property
    def standin(self) -> GCPSecretManagerStandIn:
        if self._standin is None:
            raise RuntimeError("the GCP Secret Manager stand-in is not started")
        return self._standin

    @property
    def address(self) -> tuple[str, int]:
        return self.standin.address

    def mount_config(self, host: str, port: int, prefix: str) -> dict:
        with self._lock:
            key = self._keys.get((host, port))
            if key is None:
                info = self.standin.add_service_account(token_uri=f"http://{host}:{port}/token")
                key = self._keys[(host, port)] = json.dumps(info)
        return {
            "project": self.standin.project,
            "name_prefix": f"{prefix}-",
            "api_endpoint": f"http://{host}:{port}",
            "service_account_key": key,
            "auth_flow": "token",
            "timeout_seconds": 5,
            "retries": 1,
        }
