"""Concurrent requests share audit commits (group commit) and keep one unbroken chain, on both stores."""

from __future__ import annotations

import asyncio

import pytest

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


async def test_an_append_committing_while_a_checkpoint_reads_the_head_is_not_a_truncation(gateway: Gateway, caplog) -> None:
    """A checkpoint reads the head from a snapshot; an append that commits meanwhile raises
    what this process has recorded past that head. Before the fix that was reported as a
    deleted tail (and no checkpoint was ever written again); it must not be."""
    audit = gateway.runtime.audit
    store = gateway.runtime.store
    assert (await gateway.client.put("/v1/secrets/local/a", json={"data": {"k": "v"}})).status_code == 200
    real_write = store.write
    raced = False

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def racing_write():
        async with real_write() as s:
            real_execute = s.execute

            async def execute(stmt, *args, **kwargs):
                nonlocal raced
                result = await real_execute(stmt, *args, **kwargs)
                if not raced and "audit_events" in str(stmt):
                    raced = True
                    rows = result.all()  # the head as this snapshot saw it
                    # Another request's events commit now, outside this transaction.
                    store.write = real_write
                    await asyncio.wait_for(asyncio.shield(gateway.client.put("/v1/secrets/local/b", json={"data": {"k": "v"}})), 30)

                    class Frozen:
                        def first(self):
                            return rows[0] if rows else None

                    return Frozen()
                return result

            s.execute = execute
            yield s

    if store.dialect == "sqlite":
        pytest.skip("SQLite: the checkpoint's write transaction holds the lock the append needs, so they can't interleave")
    store.write = racing_write
    try:
        assert await audit.checkpoint() is not None
    finally:
        store.write = real_write
    assert raced and audit.truncated == [] and "tail was deleted" not in caplog.text
    assert (await gateway.client.get("/v1/audit/verify")).json()["ok"] is True
