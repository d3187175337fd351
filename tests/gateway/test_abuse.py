"""Abuse: per-principal and per-address rate limits (429 with Retry-After), header size limits."""

from __future__ import annotations

import httpx
import pytest

from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


def client(app, token: str | None, addr: str = "10.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(addr, 12345))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=transport, base_url="http://g", headers=headers)


async def test_one_principal_past_its_limit_gets_429_others_do_not(settings_factory) -> None:
    app = create_app(settings_factory(rate_per_principal=1, burst_per_principal=5, rate_per_address=0))
    async with app.router.lifespan_context(app):
        async with client(app, ADMIN_TOKEN) as admin:
            other = (await admin.post("/v1/admin-keys", json={"name": "other", "role": "auditor"})).json()["token"]
            statuses = [(await admin.get("/v1/backends")).status_code for _ in range(10)]
            assert statuses.count(200) == 4 and statuses[-1] == 429  # 5 tokens, one spent on creating `other`
            r = await admin.get("/v1/backends")
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(r.headers["retry-after"]) <= 1
        async with client(app, other) as auditor:
            for _ in range(5):
                assert (await auditor.get("/v1/backends")).status_code == 200


async def test_per_address_limit_applies_before_authentication(settings_factory) -> None:
    app = create_app(settings_factory(rate_per_address=0.01, burst_per_address=3, rate_per_principal=0))  # no refill during the test
    async with app.router.lifespan_context(app):
        async with client(app, "cgt_wrong", addr="10.9.9.9") as attacker:
            codes = [(await attacker.get("/v1/backends")).status_code for _ in range(6)]
        assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429, 429]
        async with client(app, ADMIN_TOKEN, addr="10.1.1.1") as elsewhere:
            assert (await elsewhere.get("/v1/backends")).status_code == 200
        async with client(app, None, addr="10.9.9.9") as probe:
            assert (await probe.get("/healthz")).status_code == 200  # probes are never limited


async def test_per_action_limit(settings_factory) -> None:
    app = create_app(settings_factory(rate_per_action={"keys:read": [0.5, 2]}, rate_per_address=0))
    async with app.router.lifespan_context(app):
        async with client(app, ADMIN_TOKEN) as admin:
            codes = [(await admin.get("/v1/keys/status")).status_code for _ in range(3)]
            assert codes == [200, 200, 429]
            assert (await admin.get("/v1/backends")).status_code == 200  # other actions unaffected


async def test_huge_headers_get_431(settings_factory) -> None:
    app = create_app(settings_factory())
    async with app.router.lifespan_context(app):
        async with client(app, ADMIN_TOKEN) as admin:
            r = await admin.get("/v1/backends", headers={"X-Padding": "a" * 20000})
            assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"


# --- the client address: X-Forwarded-For only from configured proxies --------------------


async def audited_addresses(app) -> list[str | None]:
    from sqlalchemy import select

    from gateway.store.models import AuditEventRow

    async with app.state.runtime.store.read() as s:
        return list((await s.execute(select(AuditEventRow.client_addr).order_by(AuditEventRow.seq))).scalars())


async def test_x_forwarded_for_is_not_believed_by_default(settings_factory) -> None:
    # One token back per 20 s: the 20 requests can't earn one more however slowly a loaded machine runs them.
    app = create_app(settings_factory(rate_per_address=0.05, burst_per_address=5))
    async with app.router.lifespan_context(app):
        async with client(app, "cgt_wrong", addr="127.0.0.1") as caller:
            codes = [(await caller.get("/v1/backends", headers={"X-Forwarded-For": f"10.0.{i}.1"})).status_code
                     for i in range(20)]
        assert codes.count(401) == 5 and codes.count(429) == 15  # one bucket: the peer's
        assert set(await audited_addresses(app)) == {"127.0.0.1"}


async def test_behind_a_configured_proxy_each_caller_gets_its_own_bucket(settings_factory) -> None:
    app = create_app(settings_factory(rate_per_address=0.05, burst_per_address=5,
                                      trusted_proxies="10.0.0.0/24, 192.168.1.7"))
    async with app.router.lifespan_context(app):
        async with client(app, "cgt_wrong", addr="10.0.0.5") as ingress:
            # 20 callers, 2 requests each: nobody is past their own burst.
            for i in range(20):
                for _ in range(2):
                    r = await ingress.get("/v1/backends", headers={"X-Forwarded-For": f"203.0.113.{i}"})
                    assert r.status_code == 401
            # One caller hammering gets limited, even claiming other addresses to the left:
            # the right-most address the trusted proxies did not write is the caller.
            spoofed = [
                (await ingress.get("/v1/backends", headers={"X-Forwarded-For": f"1.1.1.{i}, 198.51.100.9, 192.168.1.7"})).status_code
                for i in range(8)
            ]
            assert spoofed == [401] * 5 + [429] * 3
        addrs = await audited_addresses(app)
        assert addrs[:40] == [f"203.0.113.{i}" for i in range(20) for _ in range(2)]
        assert set(addrs[40:]) == {"198.51.100.9"}

