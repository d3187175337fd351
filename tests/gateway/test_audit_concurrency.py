"""Concurrent requests share audit commits (group commit) and keep one unbroken chain, on both stores."""

from __future__ import annotations

import asyncio

from tests.conftest import Gateway


async def test_concurrent_requests_share_commits_and_keep_one_chain(gateway: Gateway) -> None:
    results = await asyncio.gather(
        *(gateway.client.put(f"/v1/secrets/local/c/{i}", json={"data": {"k": "v"}}) for i in range(40))
    )
    assert all(r.status_code == 200 for r in results)
    rows = (await gateway.client.get("/v1/audit", params={"limit": 1000})).json()["items"]
    assert [e["seq"] for e in rows] == list(range(1, len(rows) + 1))
    request_ids = {e["request_id"] for e in rows if e["action"] == "secrets:write"}
    assert {r.headers["x-request-id"] for r in results} <= request_ids  # every request has its event
    assert (await gateway.client.get("/v1/audit/verify")).json()["ok"] is True
