"""The ZenML integration's tests run ZenML in a venv of its own, built from
requirements/zenml.lock (ZenML pins FastAPI and SQLAlchemy; the gateway's test venv must not
follow), once per machine, in ``.venv-zenml/`` at the top of the checkout (git ignores it).
It is built again when the lock changes. The checkout is put on its path by a ``.pth`` file
(what an editable install does, without building anything), so ZenML imports this tree's
``credgate_zenml`` and ``gateway.client``.

It can't be built (no index, no cache): the tests skip, or fail under
CREDGATE_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import service_missing

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
    (site,) = (VENV / "lib").glob("python*/site-packages")
    (site / "credgate-checkout.pth").write_text(f"{ROOT}\n")
    STAMP.write_text(digest)  # last: a half-built venv is built again


@pytest.fixture(scope="session")
def zenml_python() -> Path:
    """The ZenML venv's python (built here if missing or stale)."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()
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
