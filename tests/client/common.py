"""A real gateway for the client tests: a `credgate serve --dev` process on a free port
(tests/gateway/test_cli.py's Server), with connectors put through its HTTP API."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway.test_cli import Server

CANARY = "CANARY-client-" + secrets.token_hex(4)


def admin(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.addr, headers={"Authorization": f"Bearer {server.token}"}, timeout=30)


def put(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with admin(server) as c:
        r = c.put(path, json=body)
    assert r.status_code in (200, 201), r.text
    return r.json()


def post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with admin(server) as c:
        r = c.post(path, json=body)
    assert r.status_code in (200, 201), r.text
    return r.json()


def lease(server: Server, lease_id: str) -> dict[str, Any]:
    with admin(server) as c:
        r = c.get(f"/v1/leases/{lease_id}")
    assert r.status_code == 200, r.text
    return r.json()


def add_static(server: Server, name: str = "vendor") -> None:
    put(server, f"/v1/secrets/local/client/{name}", {"data": {"api_key": CANARY, "user": "svc"}})
    put(server, f"/v1/connectors/{name}", {"type": "static", "auth_method": "static",
                                           "secret": f"local/client/{name}", "resources": ["default", "other", "*"]})


def start_server(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp(name) / "data")
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
