"""The contract suite's server for the ``azure`` backend: the Key Vault + Entra ID stand-in
(:mod:`tests.standins.azure_keyvault`; Azure can't run here), served over HTTPS on a free
port of 127.0.0.1 with a self-signed certificate valid for ``127.0.0.1`` and ``localhost``.

The vault *and* its token endpoint are reached through ``host:port``: ``vault_url`` and
``authority_host`` both name it, so a TCP proxy there (TLS passes through it untouched)
makes the whole service unreachable, token requests included. ``ca_bundle`` is the
stand-in's certificate file; ``verify_challenge_resource`` is off because the vault is not
under ``vault.azure.net``.

Credentials: client-secret auth with the secret *inline* (a ``SecretStr`` in the config,
sealed with the mount's configuration and shown masked). The contract registers the mount
with ``mounts.put`` alone, so it can't first put the secret into another backend for a
``SecretRef``; tests/backends/test_azure.py covers the reference, certificates and workload
identity. The application holds every secret permission.

Each test's ``prefix`` becomes the backend's ``name_prefix`` (``<prefix>-``), and its owner
tag is the mount's name, so tests never see each other's secrets.
"""

from __future__ import annotations

import threading

from backends.azure import AzureKeyVaultBackend
from tests.standins.azure_keyvault import AzureKeyVaultStandIn


class Server:
    type = "azure"
    max_value_bytes = AzureKeyVaultBackend.capabilities.max_value_bytes

    def __init__(self) -> None:
        self._standin: AzureKeyVaultStandIn | None = None
        self._client: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._standin is None:
                self._standin = AzureKeyVaultStandIn()
                self._client = self._standin.add_secret_app()
            self._standin.start()  # idempotent; after a stop, the same port and the same secrets

    def stop(self) -> None:
        with self._lock:
            standin, self._standin = self._standin, None
        if standin is not None:
            standin.stop()

    @property
    def standin(self) -> AzureKeyVaultStandIn:
        if self._standin is None:
            raise RuntimeError("the Key Vault stand-in is not started")
        return self._standin

    @property
    def address(self) -> tuple[str, int]:
        return self.standin.address

    def mount_config(self, host: str, port: int, prefix: str) -> dict:
        assert self._client is not None
        client_id, secret = self._client
        return {
            "vault_url": f"https://{host}:{port}/",
            "name_prefix": f"{prefix}-",
            "authority_host": f"{host}:{port}",
            "ca_bundle": self.standin.ca_file,
            "verify_challenge_resource": False,
            "connection_timeout": 2,
            "read_timeout": 5,
            "retry_total": 1,
            "call_timeout": 15,
            "auth": {
                "method": "client_secret",
                "tenant_id": self.standin.tenant_id,
                "client_id": client_id,
                "secret": secret,
            },
        }
