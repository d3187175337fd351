"""A moto server (AWS stand-in) in a subprocess on 127.0.0.1.

::

    with MotoServer() as moto:
        s3 = moto.boto3_client("s3")
        s3.create_bucket(Bucket="demo")

The server starts with auth enforcement off (moto's default).  Call
:meth:`MotoServer.enable_auth` to make it check access keys, signatures and
IAM policies, and :meth:`MotoServer.disable_auth` to turn that off again.
This module does not depend on pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import httpx

from .managed import ManagedService
from .pgcluster import free_port

__all__ = ["MotoServer", "TEST_ACCESS_KEY", "TEST_SECRET_KEY", "TEST_REGION"]

TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"
TEST_REGION = "us-east-1"

# Variables that could point boto3/moto at a real account or a proxy.
_SCRUBBED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def _server_command(host: str, port: int) -> list[str]:
    """``moto_server`` next to the interpreter, else ``python -m moto.server``."""
    script = Path(sys.executable).parent / "moto_server"
    if os.access(script, os.X_OK):
        return [str(script), "-H", host, "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


class MotoServer(ManagedService):
    """``moto_server`` as a subprocess on a free port of 127.0.0.1.

    Attributes:
        host: always ``"127.0.0.1"``.
        port: the TCP port (set by :meth:`start`).
        endpoint_url: ``http://127.0.0.1:<port>`` (set by :meth:`start`).
    """

    host = "127.0.0.1"

    def __init__(self, start_timeout: float = 20.0) -> None:
        self.start_timeout = start_timeout
        self.port: int = 0
        self.endpoint_url: str = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.update(
            AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
            AWS_DEFAULT_REGION=TEST_REGION,
            AWS_REGION=TEST_REGION,
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        return env

    def _log_tail(self, limit: int = 4000) -> str:
        if self._log is None:
            return ""
        try:
            self._log.flush()
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-limit:]
        except (OSError, ValueError):
            return ""

    def start(self) -> MotoServer:
        """Start the server and wait until it answers HTTP; returns ``self``."""
        if self._proc is not None:
            raise RuntimeError("MotoServer already started")
        self.port = free_port(self.host)
        self.endpoint_url = f"http://{self.host}:{self.port}"
        self._log = tempfile.TemporaryFile(prefix="credgate-moto-")
        self._guard_exit()
        try:
            self._proc = subprocess.Popen(
                _server_command(self.host, self.port),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"moto_server exited with code {self._proc.returncode}:\n{self._log_tail()}"
                    )
                try:
                    client.get(f"{self.endpoint_url}/moto-api/")
                    return
                except httpx.TransportError as exc:
                    last_error = exc
                    time.sleep(0.05)
        raise RuntimeError(
            f"moto_server did not answer on {self.endpoint_url} within {self.start_timeout:g} s "
            f"({last_error!r}):\n{self._log_tail()}"
        )

    def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        if not self.endpoint_url:
            raise RuntimeError("MotoServer is not started")
        response = httpx.post(f"{self.endpoint_url}{path}", timeout=10.0, trust_env=False, **kwargs)
        response.raise_for_status()
        return response

    def reset(self) -> None:
        """Forget all resources in every service (``POST /moto-api/reset``)."""
        self._post("/moto-api/reset")

    def enable_auth(self, unauthenticated_requests: int = 0) -> None:
        """Enforce IAM auth after ``unauthenticated_requests`` more requests (``POST /moto-api/reset-auth``).

        moto then rejects unknown access keys, bad signatures and requests its
        IAM policies deny.  The body must be sent as ``text/plain``; other
        content types make moto answer 500.
        """
        self._post(
            "/moto-api/reset-auth",
            content=str(int(unauthenticated_requests)).encode(),
            headers={"Content-Type": "text/plain"},
        )

    def disable_auth(self) -> None:
        """Turn auth enforcement off again (moto's default)."""
        self._post("/moto-api/reset-auth", content=b"inf", headers={"Content-Type": "text/plain"})

    def boto3_client(self, service: str, **kwargs: Any) -> Any:
        """A boto3 client for ``service`` against this server.

        Defaults to region ``us-east-1`` and the ``testing``/``testing`` keys;
        any keyword (``region_name``, ``aws_access_key_id``, ``config``...) overrides.
        """
        import boto3

        if not self.endpoint_url:
            raise RuntimeError("MotoServer is not started")
        options: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region_name": TEST_REGION,
            "aws_access_key_id": TEST_ACCESS_KEY,
            "aws_secret_access_key": TEST_SECRET_KEY,
        }
        options.update(kwargs)
        return boto3.session.Session().client(service, **options)

    def stop(self) -> None:
        """Terminate the server (then kill it if it lingers). Idempotent."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            self.port = 0
            self.endpoint_url = ""
            self._release_exit_guard()

    def __repr__(self) -> str:
        state = self.endpoint_url or "stopped"
        return f"<MotoServer {state}>"
