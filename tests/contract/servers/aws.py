"""The contract suite's server for the ``aws`` backend: moto in server mode (a real HTTP
server that boto3 talks to unchanged), started on a free port of 127.0.0.1.

Credentials: the backend takes keys only as references into another backend
(``keys``), which the contract can't pre-create, or from the ambient chain. So the
config uses ambient credentials, and :meth:`Server.start` puts moto's dummy keys in
this process's environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, plus
``AWS_EC2_METADATA_DISABLED`` so the chain never looks for an instance role), and
:meth:`Server.stop` puts the environment back. moto's auth enforcement stays off
here (any keys work); tests/backends/test_aws.py covers refused and assumed credentials.

Each test's ``prefix`` becomes the backend's ``name_prefix`` (``<prefix>/``), and its
owner tag is the mount's name, so tests never see each other's secrets.
"""

from __future__ import annotations

import os
import threading

from backends.aws import AWSSecretsManagerBackend
from tests.services.motoserver import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, MotoServer

_ENV = {
    "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
    "AWS_EC2_METADATA_DISABLED": "true",
}


class Server:
    type = "aws"
    max_value_bytes = AWSSecretsManagerBackend.capabilities.max_value_bytes

    def __init__(self) -> None:
        self._moto: MotoServer | None = None
        self._saved_env: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._moto is not None and self._moto.running:
                return
            self._moto = MotoServer().start()
            for key, value in _ENV.items():
                self._saved_env.setdefault(key, os.environ.get(key))
                os.environ[key] = value

    def stop(self) -> None:
        with self._lock:
            moto, self._moto = self._moto, None
            saved, self._saved_env = self._saved_env, {}
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if moto is not None:
            moto.stop()

    @property
    def moto(self) -> MotoServer:
        if self._moto is None:
            raise RuntimeError("the moto server is not started")
        return self._moto

    @property
    def address(self) -> tuple[str, int]:
        return (self.moto.host, self.moto.port)

    def mount_config(self, host: str, port: int, prefix: str) -> dict:
        return {
            "region": TEST_REGION,
            "endpoint_url": f"http://{host}:{port}",
            "name_prefix": f"{prefix}/",
            "recovery_window_days": 7,
            "connect_timeout": 2,
            "read_timeout": 5,
            "max_attempts": 2,
            "call_timeout": 15,
        }
