"""The aws connector keeps its boto3 session and clients (issue 15, item 4).

One session and one client per service per connector instance, built on first use
(even when 8 first calls race), reused by every issuance; a change of the connector's
secret or configuration makes the gateway build a new instance whose clients sign with
the new keys (moto names the new user), and the old instance's clients are closed, as
are those of a removed connector. Construction is counted by a spy on the connector's
one factory (``AWSConnector._new_client``) and on ``boto3.session.Session``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from connectors.aws import AWSConfig, AWSConnector, AWSKeysMaterial
from connectors.base import IssueRequest
from tests.connectors.test_aws import TRUST  # moto's account may assume the role
from tests.services.motoserver import MotoServer

pytestmark = pytest.mark.anyio



@dataclass
class Moto:
    server: MotoServer
    role_arn: str
    keys: dict[str, tuple[str, str]]  # IAM user -> (access key id, secret access key)
    arns: dict[str, str]  # IAM user -> its ARN


@pytest.fixture(scope="module")
def moto(moto_server: MotoServer) -> Moto:
    """The session's moto server (tests/conftest.py), with this module's users, role and bucket."""
    iam = moto_server.boto3_client("iam")
    keys, arns = {}, {}
    for user in ("admin-a", "admin-b"):
        arns[user] = iam.create_user(UserName=user)["User"]["Arn"]
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    role = iam.create_role(RoleName="cg-clients", AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]
    moto_server.boto3_client("s3").create_bucket(Bucket="cg-clients")
    return Moto(moto_server, role["Arn"], keys, arns)


@dataclass
class Built:
    """What the spies saw: every client built (by whom, for what, signing with which key id)
    and every session; which clients were closed."""

    clients: list[tuple[AWSConnector, str, str, Any]] = field(default_factory=list)
    sessions: int = 0
    closed: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, conn: AWSConnector) -> list[tuple[str, str]]:
        return [(service, key_id) for c, service, key_id, _ in self.clients if c is conn]


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Built:
    import boto3.session

    seen = Built()
    make = AWSConnector._new_client

    def spy(self: AWSConnector, session: Any, service: str) -> Any:
        client = make(self, session, service)
        close = client.close

        def closing() -> None:
            seen.closed.add(id(client))
            close()

        client.close = closing
        with seen.lock:
            seen.clients.append((self, service, self._material.aws_access_key_id, client))
        return client

    class CountedSession(boto3.session.Session):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with seen.lock:
                seen.sessions += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(AWSConnector, "_new_client", spy)
    monkeypatch.setattr(boto3.session, "Session", CountedSession)
    return seen


def connector(moto: Moto, user: str = "admin-a", **config: Any) -> AWSConnector:
    key_id, secret = moto.keys[user]
    return AWSConnector(
        AWSConfig(endpoint_url=moto.server.endpoint_url, role_arn=moto.role_arn, **config), "iam-role",
        AWSKeysMaterial(aws_access_key_id=key_id, aws_secret_access_key=secret), name="clients",
    )


def lease(conn: AWSConnector) -> IssueRequest:
    lease_id = "lease_" + secrets.token_hex(12)
    return IssueRequest(
        lease_id=lease_id, resource="aws-generic", ttl=timedelta(hours=1),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        revoke_state=conn.plan(lease_id, "aws-generic"), timeout_seconds=15,
    )


def open_pools(client: Any) -> int:
    """HTTP connection pools (one per endpoint) the client's urllib3 manager holds."""
    return len(client._endpoint.http_session._manager.pools)


# -- the connector -------------------------------------------------------------


async def test_racing_first_calls_and_many_issuances_build_one_session_and_one_client_per_service(
    moto: Moto, built: Built
) -> None:
    conn = connector(moto)
    # 8 concurrent first calls race for the client, then 3 more rounds of 8
    issued = []
    for _ in range(4):
        issued += await asyncio.gather(*(conn.issue(lease(conn)) for _ in range(8)))
    assert len({i.credential["aws_access_key_id"] for i in issued}) == 32  # 32 distinct STS credentials
    verified = await conn.verify()  # GetCallerIdentity (sts), then ListBuckets (s3)
    assert verified.ok and verified.identity == moto.arns["admin-a"]
    assert "s3-bucket:cg-clients" in verified.reachable["s3-bucket"]
    assert built.of(conn) == [("sts", moto.keys["admin-a"][0]), ("s3", moto.keys["admin-a"][0])]
    assert built.sessions == 1  # both clients on one session
    await conn.aclose()


async def test_calls_run_on_the_connectors_own_threads(moto: Moto, built: Built) -> None:
    conn = connector(moto)
    threads: set[str] = set()
    conn._client("sts").meta.events.register("before-send.sts.AssumeRole", lambda **_: threads.add(threading.current_thread().name))
    await asyncio.gather(*(conn.issue(lease(conn)) for _ in range(8)))
    assert threads and all(name.startswith("credgate-connector:clients") for name in threads), threads
    await conn.aclose()


async def test_aclose_closes_the_clients_connections_and_a_late_call_is_still_served(moto: Moto, built: Built) -> None:
    conn = connector(moto)
    await conn.issue(lease(conn))
    assert (await conn.verify()).ok
    clients = [c for owner, _, _, c in built.clients if owner is conn]
    assert len(clients) == 2 and all(open_pools(c) == 1 for c in clients)
    await conn.aclose()
    assert built.closed == {id(c) for c in clients}
    assert all(open_pools(c) == 0 for c in clients)
    # a request that fetched this instance just before it was replaced still gets its credential,
    # from the same client: nothing is rebuilt
    late = await conn.issue(lease(conn))
    assert late.credential["aws_access_key_id"]
    assert len(built.of(conn)) == 2 and built.sessions == 1
    await conn.aclose()


# -- through the gateway: the catalog's instances --------------------------------


@pytest.fixture
def store_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@contextlib.asynccontextmanager
async def served(moto: Moto, settings: Any) -> AsyncIterator[tuple[Any, Any]]:
    """A gateway with connector ``sts`` (iam-role on moto's role) drawing on secret local/aws/admin."""
    import httpx

    from gateway.web.app import create_app
    from tests.conftest import ADMIN_TOKEN

    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60,
    ) as c:
        await put_keys(c, moto, "admin-a")
        r = await c.put("/v1/connectors/sts", json=spec(moto))
        assert r.status_code in (200, 201), r.text
        yield app, c


def spec(moto: Moto, **config: Any) -> dict[str, Any]:
    return {"type": "aws", "auth_method": "iam-role", "secret": "local/aws/admin", "resources": ["aws-generic"],
            "config": {"endpoint_url": moto.server.endpoint_url, "role_arn": moto.role_arn, **config}}


async def put_keys(c: Any, moto: Moto, user: str) -> None:
    key_id, secret = moto.keys[user]
    r = await c.put("/v1/secrets/local/aws/admin", json={"data": {"aws_access_key_id": key_id, "aws_secret_access_key": secret}})
    assert r.status_code in (200, 201), r.text


async def issue(c: Any, n: int = 1) -> list[dict[str, Any]]:
    answers = await asyncio.gather(*(
        c.post("/v1/credentials", json={"connector": "sts", "resource": "aws-generic", "ttl_seconds": 900})
        for _ in range(n)
    ))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    return [r.json() for r in answers]


async def identity(c: Any) -> str:
    """Who moto says the connector's keys belong to (GetCallerIdentity, through the gateway)."""
    r = await c.post("/v1/connectors/sts/verify")
    assert r.status_code == 200 and r.json()["ok"], r.text
    return r.json()["identity"]


async def closed_soon(built: Built, clients: list[Any]) -> bool:
    for _ in range(200):  # the catalog closes a dropped instance in a task of its own
        if {id(c) for c in clients} <= built.closed:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_the_gateway_reuses_one_client_and_a_rotated_secret_gets_a_new_one(
    moto: Moto, built: Built, settings_factory
) -> None:
    async with served(moto, settings_factory()) as (app, c):
        await issue(c, 8)  # 8 concurrent first issuances
        for _ in range(3):
            await issue(c, 8)
        assert await identity(c) == moto.arns["admin-a"]
        [first] = {id(owner): owner for owner, *_ in built.clients}.values()
        assert built.of(first) == [("sts", moto.keys["admin-a"][0]), ("s3", moto.keys["admin-a"][0])]
        old_clients = [client for *_, client in built.clients]

        await put_keys(c, moto, "admin-b")  # the connector's secret now holds another user's keys
        await issue(c, 8)
        assert await identity(c) == moto.arns["admin-b"]  # moto sees the new access key
        owners = list({id(owner): owner for owner, *_ in built.clients}.values())
        assert len(owners) == 2 and owners[0] is first
        assert built.of(owners[1]) == [("sts", moto.keys["admin-b"][0]), ("s3", moto.keys["admin-b"][0])]
        assert await closed_soon(built, old_clients)  # the replaced instance's clients
        assert all(open_pools(client) == 0 for client in old_clients)
        assert len(built.clients) == 4  # 40 issuances and 2 verifications: 2 clients per material


async def test_a_config_change_rebuilds_and_removing_the_connector_closes_its_clients(
    moto: Moto, built: Built, settings_factory
) -> None:
    async with served(moto, settings_factory(material_cache_seconds=0)) as (app, c):
        await issue(c, 8)
        await issue(c, 8)  # material read again for every use: equal values keep the instance
        assert [service for _, service, _, _ in built.clients] == ["sts"]
        first = built.clients[0][3]

        r = await c.put("/v1/connectors/sts", json=spec(moto, session_name_prefix="renamed"))
        assert r.status_code == 200, r.text
        [credential] = await issue(c)
        assert [service for _, service, _, _ in built.clients] == ["sts", "sts"]
        assert built.clients[1][0].config.session_name_prefix == "renamed"
        assert credential["lease_id"]
        assert await closed_soon(built, [first])

        second = built.clients[1][3]
        r = await c.delete("/v1/connectors/sts", params={"revoke_leases": "true"})  # expiry-only: marked revoked
        assert r.status_code == 204, r.text
        assert await closed_soon(built, [second])
        assert open_pools(second) == 0
        assert app.state.runtime.catalog._live == {}
