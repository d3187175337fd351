"""Starting a server process and waiting until it serves: the one copy, imported by the
tests (``tests.gateway.test_cli`` and the suites that start ``credgate serve``) and by
the benchmark (``bench/run.py``, which puts the checkout on ``sys.path``).

Only the standard library and httpx: importable without pytest.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``CREDGATE_*`` setting, plus ``extra``.

    ``credgate serve`` runs one process unless ``extra`` says otherwise (CREDGATE_WORKERS,
    or --workers): the suites that start it observe one process; tests/gateway/test_workers.py
    runs several."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDGATE_")}
    env["CREDGATE_WORKERS"] = "1"
    env.update(extra)
    return env


def _tail(log: Path | None, limit: int = 3000) -> str:
    if log is None:
        return ""
    try:
        return ": " + log.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def wait_until_serving(
    url: str,
    proc: subprocess.Popen,
    timeout: float = 30,
    *,
    log: Path | None = None,
    name: str = "credgate serve",
    interval: float = 0.1,
    ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
) -> None:
    """Poll ``url`` until its answer is ``ready`` (by default: 200). Raises RuntimeError,
    with the tail of ``log`` if given, when ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready(httpx.get(url, timeout=1)):
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}{_tail(log)}")
        time.sleep(interval)
    raise RuntimeError(f"{name} did not answer {url} within {timeout:g}s{_tail(log)}")
