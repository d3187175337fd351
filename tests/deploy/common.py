"""Paths and facts shared by the deploy/ tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
CHART = DEPLOY / "helm" / "credgate"
HEALTHCHECK = DEPLOY / "healthcheck.py"

# The image's user (deploy/Dockerfile), which compose and the chart must run as too.
UID = 10001


def drain_seconds() -> int:
    """How long `credgate serve` lets in-flight requests finish after SIGTERM
    (uvicorn's timeout_graceful_shutdown, GRACEFUL_SECONDS in gateway/cli/server.py; with
    several workers they drain at once): every grace period in deploy/ must be longer."""
    m = re.search(r"GRACEFUL_SECONDS = (\d+)", (ROOT / "gateway" / "cli" / "server.py").read_text())
    assert m, "gateway/cli/server.py no longer sets GRACEFUL_SECONDS: update deploy/ and this test"
    return int(m[1])


def duration_seconds(text: str) -> float:
    """A compose duration ("20s", "1m30s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)
