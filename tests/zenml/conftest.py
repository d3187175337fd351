"""The ZenML integration's tests run ZenML in a venv of its own, built from
requirements/zenml.lock (ZenML pins FastAPI and SQLAlchemy; the gateway's test venv must not
follow), once per machine, in ``.venv-zenml/`` at the top of the checkout (git ignores it).
It is built again when the lock or pyproject.toml changes. The checkout is installed into it
editable, without dependencies (``pip install --no-deps -e .``), so ZenML imports this tree's
``credgate_zenml`` and ``gateway.client`` and finds credgate's ``zenml.init_hooks`` entry point.

It can't be built (no index, no cache): the tests skip, or fail under
CREDGATE_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import service_missing
from tests.services.waiting import free_port, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "zenml.lock"
VENV = ROOT / ".venv-zenml"
STAMP = VENV / "credgate-zenml-lock.sha256"


def _build(digest: str) -> None:
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=120)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--require-hashes", "--no-deps", "-r", str(LOCK)],
                   check=True, capture_output=True, text=True, timeout=600)
    # This checkout, installed as `pip install credgate` would (no dependencies: the lock has
    # them): its packages, and its zenml.init_hooks entry point, which is how ZenML learns the
    # credgate service connector type.
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300)
    STAMP.write_text(digest)  # last: a half-built venv is built again


@pytest.fixture(scope="session")
def zenml_python() -> Path:
    """The ZenML venv's python (built here if missing or stale)."""
    # Built again when the lock or pyproject (the entry points) changes.
    digest = hashlib.sha256(LOCK.read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    with open(ROOT / ".venv-zenml.building", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one builder at a time (several pytest runs)
        try:
            if not (STAMP.exists() and STAMP.read_text() == digest):
                _build(digest)
        except subprocess.CalledProcessError as exc:
            service_missing("the ZenML venv", f"{exc.cmd[-3:]} failed: {(exc.stderr or '')[-2000:]}")
        except subprocess.TimeoutExpired as exc:
            service_missing("the ZenML venv", f"{exc.cmd[-3:]} timed out")
    return VENV / "bin" / "python"


@contextlib.contextmanager
def zenml_server_process(python: Path, home: Path, env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """A real ZenML server (its FastAPI app under uvicorn) on a free port, configured by
    ``env``; yields its address and its log file, and stops it (SIGTERM) afterwards."""
    port = free_port()
    log = home / "server.log"
    proc = subprocess.Popen(
        [str(python), "-m", "uvicorn", "zenml.zen_server.zen_server_api:app", "--host", "127.0.0.1",
         "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=home)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/v1/info", proc, timeout=60, log=log, name="zenml server")
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
