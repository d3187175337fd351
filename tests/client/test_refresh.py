"""Cached credentials kept fresh in the background (re-issued: static), revoked at close,
and served from the cache while the gateway is down, until they come within the margin."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest

from gateway.client import AsyncClient, Client, GatewayUnreachable
from tests.client.common import CANARY, add_static, lease, start_server
from tests.gateway.test_cli import Server

TTL, MARGIN = 4, 0.5


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    for srv in start_server(tmp_path_factory, "client-refresh"):
        add_static(srv)
        yield srv


def test_a_loop_over_three_lifetimes_never_gets_an_expiring_credential(gw: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: dict[str, float] = {}
    with Client(gw.addr, token=gw.token, margin=MARGIN) as c:
        first = c.credentials("vendor", "default", ttl=TTL)
        end = time.monotonic() + 3.5 * TTL
        while time.monotonic() < end:
            cred = c.credentials("vendor", "default", ttl=TTL)
            assert cred.remaining() > MARGIN, cred  # never within the margin, let alone expired
            assert cred["api_key"] == CANARY
            seen[cred.lease_id] = cred.expires_at.timestamp()
            time.sleep(0.05)
        stats = c.stats
    # the background thread re-issued (static leases are not renewable) before each expiry
    assert len(seen) >= 4 and first.lease_id in seen, len(seen)
    assert stats["reissues"] >= 3 and stats["renewals"] == 0, stats
    # the calls were served from the cache (at most one more issue, should a refresh be slowed
    # past its ~1 s of slack on a loaded machine)
    assert stats["misses"] <= 2, stats
    assert CANARY not in caplog.text


def test_close_revokes_the_leases_it_issued_unless_told_not_to(gw: Server) -> None:
    with Client(gw.addr, token=gw.token, margin=MARGIN) as c:
        a = c.credentials("vendor", "default", ttl=60)
        b = c.credentials("vendor", "other", ttl=60)
        assert lease(gw, a.lease_id)["state"] == "active"
    assert lease(gw, a.lease_id)["state"] == "revoked" and lease(gw, b.lease_id)["state"] == "revoked"
    kept = Client(gw.addr, token=gw.token, margin=MARGIN, revoke_on_close=False)
    k = kept.credentials("vendor", "default", ttl=60)
    kept.close()
    assert lease(gw, k.lease_id)["state"] == "active"


async def test_async_client_refreshes_in_a_task_and_revokes_at_close(gw: Server) -> None:
    seen = set()
    async with AsyncClient(gw.addr, token=gw.token, margin=MARGIN) as c:
        end = time.monotonic() + 3.2 * TTL
        while time.monotonic() < end:
            cred = await c.credentials("vendor", "default", ttl=TTL)
            assert cred.remaining() > MARGIN
            seen.add(cred.lease_id)
            await asyncio.sleep(0.05)
        assert c.stats["reissues"] >= 3 and c.stats["misses"] <= 2
        last = cred
    assert len(seen) >= 4
    assert lease(gw, last.lease_id)["state"] == "revoked"


def test_a_cached_credential_is_served_while_the_gateway_is_down(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for srv in start_server(tmp_path_factory, "client-down"):
        add_static(srv)
        ttl, margin = 4, 1.0
        with Client(srv.addr, token=srv.token, margin=margin, retries=0) as c:
            cred = c.credentials("vendor", "default", ttl=ttl)
            srv.stop()  # the gateway goes away
            served = 0
            while True:
                try:
                    got = c.credentials("vendor", "default", ttl=ttl)
                except GatewayUnreachable as exc:
                    error, failed_at = exc, time.time()
                    break
                assert got.lease_id == cred.lease_id and got.remaining() > margin
                served += 1
                time.sleep(0.05)
                assert time.time() < cred.expires_at.timestamp() + 5, "never failed"
            # the error comes only once nothing valid beyond the margin is left
            assert failed_at >= cred.expires_at.timestamp() - margin - 0.1
            assert served > 20 and error.code == "gateway_unreachable"
        assert "refreshing vendor/default failed" in caplog.text  # the background refresh did try
        assert CANARY not in caplog.text + str(error)
