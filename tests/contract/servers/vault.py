"""The contract suite's server for the ``vault`` backend: a real OpenBao dev server.

``mount_config(host, port, prefix)`` gives each test its own policy-limited token: a
policy allowing only ``secret/{data,metadata,delete,undelete,destroy}/<prefix>/*`` (plus
OpenBao's ``default`` policy, which has ``sys/capabilities-self`` and token self-lookup/renewal),
and the prefix as the backend's ``path_prefix``.

The KV v2 mount keeps 100 versions per secret (``secret/config max_versions``), as an
operator would configure it: OpenBao's default keeps 10 and prunes older ones, and the
contract writes 24 versions of one secret and reads them all back.
"""

from __future__ import annotations

import threading

from backends.vault import VaultBackend
from tests.services.openbao import OpenBao

_POLICY = """
path "secret/data/{p}/*"     {{ capabilities = ["create", "read", "update", "patch", "delete"] }}
path "secret/metadata/{p}/*" {{ capabilities = ["read", "list", "patch", "delete"] }}
path "secret/delete/{p}/*"   {{ capabilities = ["update"] }}
path "secret/undelete/{p}/*" {{ capabilities = ["update"] }}
path "secret/destroy/{p}/*"  {{ capabilities = ["update"] }}
"""


class Server:
    type = "vault"
    max_value_bytes = VaultBackend.capabilities.max_value_bytes

    def __init__(self) -> None:
        self._bao: OpenBao | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._bao is not None and self._bao.running:
                return
            bao = OpenBao().start()
            bao.client().adapter.post("/v1/secret/config", json={"max_versions": 100})
            self._bao = bao

    def stop(self) -> None:
        with self._lock:
            bao, self._bao = self._bao, None
        if bao is not None:
            bao.stop()

    @property
    def bao(self) -> OpenBao:
        if self._bao is None:
            raise RuntimeError("the OpenBao server is not started")
        return self._bao

    @property
    def address(self) -> tuple[str, int]:
        return self.bao.address

    def mount_config(self, host: str, port: int, prefix: str) -> dict:
        policy = f"credgate-{prefix}"
        self.bao.write_policy(policy, _POLICY.format(p=prefix))
        token = self.bao.create_token([policy, "default"], ttl="2h", renewable=True)
        return {
            "url": f"http://{host}:{port}",
            "mount_point": "secret",
            "path_prefix": prefix,
            "timeout": 5,
            "auth": {"token": {"token": token}},
        }
