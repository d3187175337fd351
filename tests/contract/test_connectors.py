"""The ServiceConnector contract: every connector type passes this suite, through the gateway.

Parametrised over every type in the registry (today: ``postgres`` on a
throwaway scram cluster, ``mysql`` on MariaDB, ``redis``, ``aws`` on moto in
server mode, ``azure`` on the Entra + blob stand-in, ``static``, ``vault`` on OpenBao's database engine), each against
its real target or stand-in. For each type:

- a credential is issued, then *used* at the target (static: the material
  comes back intact, through its wrap token);
- renewal works, or answers a clear 409 ``not_renewable``;
- revoking twice succeeds twice, and a revocable credential stops working;
- a resource outside the connector's patterns is refused before any remote
  call (the connector points at a port nothing listens on: any call would be a
  503, not the 403 asked for);
- a target that is down answers 503 ``target_unreachable``, and leaves no lease active;
- a revocable credential whose target is away at revoke time stays ``revoking`` and still
  works, and the reaper revokes it once the target is back;
- a canary planted in the material appears in no response, lease error or log.

A new connector type joins by adding a factory to CASES; the first test fails
if the registry names a type with no case here. The factories take their
targets from the fixtures of tests/connectors/ (imported, not copied).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest

from gateway.plugins.registry import CONNECTOR_TYPES
from tests.conftest import Gateway
from tests.connectors.test_aws import ALLOWED, OTHER
from tests.connectors.test_aws import aws as aws_account  # noqa: F401 - fixture
from tests.connectors.test_gcp import gcp_target  # noqa: F401 - fixture
from tests.connectors.test_azure import entra as azure_entra  # noqa: F401 - fixture
from tests.connectors.test_kubernetes import api as k8s_api  # noqa: F401 - fixture
from tests.connectors.test_mysql import ADMIN_USER, HOST, PORT
from tests.connectors.test_mysql import target as mysql_target  # noqa: F401 - fixture
from tests.connectors.test_postgres import target as pg_target  # noqa: F401 - fixture
from tests.connectors.test_redis import redis_url  # noqa: F401 - fixture
from tests.connectors.test_registry import ecr as ecr_account  # noqa: F401 - fixture
from tests.connectors.test_registry import pki  # noqa: F401 - fixture (the stand-in's PKI)
from tests.connectors.test_registry import registry as registry_v2  # noqa: F401 - fixture
from tests.connectors.test_vault import vault_target  # noqa: F401 - fixture
from tests.services.pgcluster import free_port

SQLITE = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)  # the store is not under test


@dataclass
class Case:
    """One connector type against its target, as the gateway sees it."""

    type: str
    auth_method: str
    material: dict[str, str]  # the secret the connector draws on
    resource: str  # inside the connector's patterns
    outside: str  # well-formed for the type, outside its patterns
    works: Callable[[dict[str, str]], bool]  # use the credential at the target (blocking)
    down: tuple[dict[str, str], dict[str, Any]] | None  # (material, config) aiming at a closed port
    canary: tuple[dict[str, str], dict[str, Any]]  # (material, config) holding CANARY, refused by the target
    config: dict[str, Any] = field(default_factory=dict)
    wrap: bool = False
    enforce: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext  # around canary use


CANARY = "CANARY" + secrets.token_hex(8)


def closed_port() -> int:
    return free_port("127.0.0.1")


def postgres_case(request: pytest.FixtureRequest) -> Case:
    import psycopg

    tgt = request.getfixturevalue("pg_target")

    def works(cred: dict[str, str]) -> bool:
        try:
            with psycopg.connect(cred["dsn"], autocommit=True, connect_timeout=5) as conn:
                return conn.execute("SELECT amount FROM sales.orders").fetchone() == (42,)
        except psycopg.Error:
            return False

    port = closed_port()
    return Case(
        type="postgres", auth_method="password", material={"dsn": tgt.admin_dsn()},
        resource="analytics/sales", outside="analytics/hr", works=works,
        down=({"dsn": f"postgresql://gate_admin:{CANARY}@127.0.0.1:{port}/analytics"}, {"connect_timeout": 2}),
        canary=({"dsn": tgt.admin_dsn(password=CANARY)}, {}),
    )


def mysql_case(request: pytest.FixtureRequest) -> Case:
    import pymysql

    from tests.connectors.test_mysql import ADMIN_PASSWORD

    tgt = request.getfixturevalue("mysql_target")

    def works(cred: dict[str, str]) -> bool:
        try:
            with pymysql.connect(host=HOST, port=PORT, user=cred["username"], password=cred["password"],
                                 database=tgt.db, connect_timeout=3) as conn, conn.cursor() as cur:
                cur.execute("SELECT amount FROM orders")
                return cur.fetchall() == ((42,),)
        except pymysql.err.Error:
            return False

    def material(password: str, port: int = PORT) -> dict[str, str]:
        return {"host": HOST, "port": str(port), "username": ADMIN_USER, "password": password}

    return Case(
        type="mysql", auth_method="password", material=material(ADMIN_PASSWORD), config={"user_host": "127.0.0.1"},
        resource=tgt.db, outside=tgt.sibling, works=works,
        down=(material(CANARY, closed_port()), {"user_host": "127.0.0.1"}),
        canary=(material(CANARY), {"user_host": "127.0.0.1"}),
    )


def redis_case(request: pytest.FixtureRequest) -> Case:
    import redis

    url = request.getfixturevalue("redis_url")
    tag = "cgc" + secrets.token_hex(4)
    admin = redis.Redis.from_url(url, socket_timeout=5)
    admin.set(f"{tag}:flag", "on")
    request.addfinalizer(lambda: (admin.delete(f"{tag}:flag"), admin.close()))

    def works(cred: dict[str, str]) -> bool:
        try:
            with redis.Redis.from_url(cred["url"], socket_timeout=3, retry_on_timeout=False) as client:
                return client.get(f"{tag}:flag") == b"on"
        except redis.RedisError:
            return False

    host_db = url.split("@")[-1].split("//")[-1]
    return Case(
        type="redis", auth_method="password", material={"url": url},
        resource=tag, outside=tag + "x", works=works,
        down=({"url": f"redis://default:{CANARY}@127.0.0.1:{closed_port()}/0"}, {}),
        canary=({"url": f"redis://nobody-{tag}:{quote(CANARY)}@{host_db}"}, {}),
    )


def aws_case(request: pytest.FixtureRequest) -> Case:
    import boto3
    import botocore.exceptions

    account = request.getfixturevalue("aws_account")
    endpoint = account.moto.endpoint_url
    config = {"role_arn": account.role_arn, "endpoint_url": endpoint}

    def works(cred: dict[str, str]) -> bool:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=cred["aws_access_key_id"],
                          aws_secret_access_key=cred["aws_secret_access_key"],
                          aws_session_token=cred["aws_session_token"])
        try:
            return s3.get_object(Bucket=ALLOWED, Key="report.txt")["Body"].read() == f"in {ALLOWED}".encode()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            return False

    @contextlib.contextmanager
    def enforce() -> Iterator[None]:
        account.moto.enable_auth()  # moto accepts any key unless told otherwise
        try:
            yield
        finally:
            account.moto.disable_auth()

    keys = {"aws_access_key_id": account.key_id, "aws_secret_access_key": account.secret}
    return Case(
        type="aws", auth_method="iam-role", material=keys, config=config,
        resource=f"s3-bucket:{ALLOWED}", outside=f"s3-bucket:{OTHER}", works=works,
        down=(keys | {"aws_secret_access_key": CANARY}, config | {"endpoint_url": f"http://127.0.0.1:{closed_port()}"}),
        canary=(keys | {"aws_secret_access_key": CANARY}, config), enforce=enforce,
    )


def gcp_case(request: pytest.FixtureRequest) -> Case:
    from tests.connectors.test_gcp import ALLOWED as GCS_ALLOWED
    from tests.connectors.test_gcp import OTHER as GCS_OTHER
    from tests.connectors.test_gcp import objects

    target = request.getfixturevalue("gcp_target")
    config = target.endpoints()
    unloadable = f"-----BEGIN PRIVATE KEY-----\n{CANARY}\n-----END PRIVATE KEY-----\n"
    return Case(
        type="gcp", auth_method="service-account", material=target.key, config=config,
        resource=f"gcs-bucket:{GCS_ALLOWED}", outside=f"gcs-bucket:{GCS_OTHER}",
        works=lambda cred: objects(target, cred["access_token"], GCS_ALLOWED) == 200,
        down=(target.key | {"token_uri": f"http://127.0.0.1:{closed_port()}/token"}, config),
        canary=(target.key | {"private_key": unloadable}, config),
    )


def azure_case(request: pytest.FixtureRequest) -> Case:
    """service-principal (client secret) against the Entra + blob stand-in: a user-delegation SAS
    for one container, used with azure-storage-blob."""
    from azure.core.exceptions import HttpResponseError
    from azure.storage.blob import ContainerClient

    az = request.getfixturevalue("azure_entra")
    tag = "cgc" + secrets.token_hex(4)
    client_id, secret = az.s.add_secret_app()
    az.s.grant(client_id, "cgcontract", "r")
    az.s.seed("cgcontract", tag, {"report.txt": tag.encode()})
    config = az.config(client_id)

    def works(cred: dict[str, str]) -> bool:
        client = ContainerClient.from_container_url(f"{cred['container_url']}?{cred['sas_token']}",
                                                    connection_verify=az.s.ca_file, retry_total=0)
        try:
            return client.download_blob("report.txt").readall() == tag.encode()
        except HttpResponseError:
            return False

    return Case(
        type="azure", auth_method="service-principal", material={"client_secret": secret}, config=config,
        resource=f"blob-container:cgcontract/{tag}", outside=f"blob-container:cgcontract/{tag}x", works=works,
        down=({"client_secret": CANARY}, config | {"authority": f"127.0.0.1:{closed_port()}"}),
        canary=({"client_secret": CANARY}, config),
    )


def static_case(request: pytest.FixtureRequest) -> Case:
    material = {"api_key": "sk-" + secrets.token_hex(12), "entity": "ml-team"}
    return Case(
        type="static", auth_method="static", material=material, resource="default", outside="other",
        works=lambda cred: cred == material, down=None, canary=({"api_key": CANARY}, {}), wrap=True,
    )


def registry_token_case(request: pytest.FixtureRequest) -> Case:
    """Distribution token auth against the registry v2 stand-in (it verifies every token)."""
    import httpx

    from tests.connectors.test_registry import ISSUER, OTHER, REPO, SERVICE
    from tests.standins.registry_v2 import make_chain

    pki, server = request.getfixturevalue("pki"), request.getfixturevalue("registry_v2")
    config = {"registry_url": server.url, "service": SERVICE, "issuer": ISSUER}

    def works(cred: dict[str, str]) -> bool:
        with httpx.Client(base_url=cred["registry"], timeout=10) as http:
            r = http.get(f"/v2/{REPO}/manifests/v1", headers={"Authorization": f"Bearer {cred['token']}"})
        return r.status_code == 200

    material = {"private_key": pki.key, "certificate_chain": pki.chain}
    _, rogue_key, rogue_chain = make_chain("ec", ca_name="untrusted CA")  # the registry does not trust it
    canary = {"private_key": f"{CANARY}\n{rogue_key}", "certificate_chain": rogue_chain}  # PEM explanatory text
    return Case(
        type="registry", auth_method="token", material=material, config=config,
        resource=f"repository:{REPO}:pull", outside=f"repository:{OTHER}:pull", works=works,
        down=({**material, "private_key": f"{CANARY}\n{pki.key}"},
              config | {"registry_url": f"http://127.0.0.1:{closed_port()}"}),
        canary=(canary, config),
    )


def registry_ecr_case(request: pytest.FixtureRequest) -> Case:
    """ECR on moto. moto serves no registry, so ``works`` checks the docker login's shape
    (user AWS, a password, the account's proxy endpoint): it can't pull with it."""
    acct = request.getfixturevalue("ecr_account")
    repo = acct.repo_arn.split(":repository/")[1]
    config = {"endpoint_url": acct.moto.endpoint_url}
    keys = {"aws_access_key_id": acct.key_id, "aws_secret_access_key": acct.secret}

    def works(cred: dict[str, str]) -> bool:
        return (cred["username"] == "AWS" and bool(cred["password"]) and cred["repository"] == repo
                and cred["proxy_endpoint"] == "https://123456789012.dkr.ecr.us-east-1.amazonaws.com")

    @contextlib.contextmanager
    def enforce() -> Iterator[None]:
        acct.moto.enable_auth()
        try:
            yield
        finally:
            acct.moto.disable_auth()

    return Case(
        type="registry", auth_method="ecr", material=keys, config=config,
        resource=f"ecr-repository:{repo}", outside=f"ecr-repository:{repo.replace('app', 'other')}", works=works,
        down=(keys | {"aws_secret_access_key": CANARY}, {"endpoint_url": f"http://127.0.0.1:{closed_port()}"}),
        canary=(keys | {"aws_secret_access_key": CANARY}, config), enforce=enforce,
    )


def kubernetes_case(request: pytest.FixtureRequest) -> Case:
    from tests.connectors.test_kubernetes import configmaps

    api = request.getfixturevalue("k8s_api")
    config = {"server": api.url, "certificate_authority": api.ca_pem.decode(), "service_account": "pipeline"}

    def works(cred: dict[str, str]) -> bool:
        r = configmaps(cred["kubeconfig"], "team-a")
        return r.status_code == 200 and [i["data"] for i in r.json()["items"]] == [{"namespace": "team-a"}]

    return Case(
        type="kubernetes", auth_method="token", material={"token": api.admin_token}, config=config,
        resource="kubernetes-namespace:team-a", outside="kubernetes-namespace:team-b", works=works,
        down=({"token": CANARY}, config | {"server": f"https://127.0.0.1:{closed_port()}"}),
        canary=({"token": CANARY}, config),
    )


def vault_case(request: pytest.FixtureRequest) -> Case:
    tgt = request.getfixturevalue("vault_target")  # OpenBao's database engine on a scram cluster
    config = tgt.config()
    return Case(
        type="vault", auth_method="token", material={"token": tgt.token}, config=config,
        resource="vault-role:reader", outside="vault-role:writer", works=tgt.works,
        down=({"token": CANARY}, config | {"address": f"http://127.0.0.1:{closed_port()}"}),
        canary=({"token": CANARY}, config),
    )


CASES: dict[str, Callable[[pytest.FixtureRequest], Case]] = {
    "postgres": postgres_case,
    "mysql": mysql_case,
    "redis": redis_case,
    "aws": aws_case,
    "gcp": gcp_case,
    "azure": azure_case,
    "static": static_case,
    "registry": registry_token_case,
    "registry+ecr": registry_ecr_case,  # a second auth method of a type: "<type>+<auth method>"
    "kubernetes": kubernetes_case,
    "vault": vault_case,
}


def test_every_registered_connector_type_runs_the_contract() -> None:
    assert {name.partition("+")[0] for name in CASES} == set(CONNECTOR_TYPES)


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param](request)


async def configure(
    gw: Gateway, case: Case, material: dict[str, str] | None = None, config: dict[str, Any] | None = None
) -> str:
    """Connector ``c-<type>`` on a local secret, allowed ``case.resource`` only."""
    name = f"c-{case.type}"
    r = await gw.client.put(f"/v1/secrets/local/contract/{name}", json={"data": material or case.material})
    assert r.status_code == 200, r.text
    r = await gw.client.put(f"/v1/connectors/{name}", json={
        "type": case.type, "auth_method": case.auth_method, "secret": f"local/contract/{name}",
        "config": case.config if config is None else config, "resources": [case.resource],
    })
    assert r.status_code in (200, 201), r.text
    return name


async def ask(gw: Gateway, case: Case, name: str, resource: str | None = None) -> Any:
    return await gw.client.post(
        "/v1/credentials", json={"connector": name, "resource": resource or case.resource, "wrap": case.wrap}
    )


async def credential_of(gw: Gateway, out: dict[str, Any]) -> dict[str, str]:
    if out["credential"] is not None:
        return out["credential"]
    async with gw.as_token(None) as pipeline:  # only the wrap token
        r = await pipeline.post("/v1/unwrap", json={"wrap_token": out["wrap_token"]})
    assert r.status_code == 200, r.text
    return r.json()["credential"]


@SQLITE
async def test_issue_use_renew_revoke(gateway: Gateway, case: Case) -> None:
    name = await configure(gateway, case)
    r = await ask(gateway, case, name)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["connector_type"] == case.type and out["resource"] == case.resource
    cred = await credential_of(gateway, out)
    assert await asyncio.to_thread(case.works, cred)

    renewed = await gateway.client.post(f"/v1/leases/{out['lease_id']}/renew", json={"ttl_seconds": 900})
    if out["renewable"]:
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["state"] == "active"
        assert await asyncio.to_thread(case.works, cred)
    else:
        assert renewed.status_code == 409 and renewed.json()["error"]["code"] == "not_renewable", renewed.text

    for _ in range(2):  # idempotent: the second revoke is a success too
        revoked = await gateway.client.post(f"/v1/leases/{out['lease_id']}/revoke")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["state"] == "revoked"
    if out["revocability"] == "revocable":
        assert not await asyncio.to_thread(case.works, cred)


@SQLITE
async def test_refusals_outside_patterns_and_target_down(gateway: Gateway, case: Case) -> None:
    # The connector points at a closed port: any call to its target would answer 503.
    material, config = case.down or (case.material, case.config)
    name = await configure(gateway, case, material, config)
    outside = await ask(gateway, case, name, case.outside)
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "resource_not_allowed", outside.text
    leases = (await gateway.client.get("/v1/leases", params={"connector": name})).json()
    assert leases["items"] == []  # refused before anything was recorded or called
    if case.down is None:
        return  # reaches no target: nothing can be down
    down = await ask(gateway, case, name)
    assert down.status_code == 503 and down.json()["error"]["code"] == "target_unreachable", down.text
    assert CANARY not in down.text
    states = [item["state"] for item in (await gateway.client.get("/v1/leases", params={"connector": name})).json()["items"]]
    assert "active" not in states and "pending" not in states, states


@SQLITE
async def test_errors_never_carry_the_material(
    gateway: Gateway, case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    for material, config in filter(None, (case.canary, case.down)):
        name = await configure(gateway, case, material, config)
        with case.enforce():
            texts.append((await gateway.client.post(f"/v1/connectors/{name}/verify")).text)
            r = await ask(gateway, case, name)
            texts.append(r.text)
            texts.append((await gateway.client.post(
                "/v1/credentials", json={"connector": name, "resource": case.resource, "wrap": not case.wrap}
            )).text)
        if case.type != "static":  # the static connector hands the material out: that is its job
            assert r.status_code >= 400, r.text
        texts.append((await gateway.client.get(f"/v1/connectors/{name}")).text)
        texts.append((await gateway.client.get("/v1/leases", params={"connector": name})).text)
        row = await gateway.runtime.catalog.get(name)
        texts.append(repr(row))
        texts.append(repr(await gateway.runtime.catalog.instance(row)))
    texts.append(caplog.text)
    texts.append(json.dumps([r.getMessage() for r in caplog.records]))
    for text in texts:
        assert CANARY not in text and quote(CANARY) not in text


@SQLITE
async def test_revocation_is_retried_when_the_target_returns(gateway: Gateway, case: Case) -> None:
    """A revocable credential whose target is away at revoke time stays ``revoking`` (202, its
    error recorded, never reported revoked) and still works; once the target is back the reaper's
    retry revokes it and it stops working. An expiry-only type has nothing to retry: skipped."""
    from dataclasses import replace

    if case.down is None:
        pytest.skip(f"{case.type} reaches no target")
    name = await configure(gateway, case)
    r = await ask(gateway, case, name)
    assert r.status_code == 200, r.text
    out = r.json()
    if out["revocability"] != "revocable":
        pytest.skip(f"{case.type} credentials are {out['revocability']}: nothing to revoke at the target")
    cred = await credential_of(gateway, out)
    await configure(gateway, case, *case.down)  # the same connector, now aimed at a closed port
    creds = gateway.runtime.credentials
    creds.policy = replace(creds.policy, backoff_base=0.01, backoff_cap=0.05)
    away = await gateway.client.post(f"/v1/leases/{out['lease_id']}/revoke")
    assert away.status_code == 202 and away.json()["state"] == "revoking" and away.json()["last_error"], away.text
    assert CANARY not in away.text
    assert await asyncio.to_thread(case.works, cred)  # not pretended revoked
    await configure(gateway, case)  # the target is back
    await asyncio.sleep(0.1)  # past the (tiny) backoff
    await gateway.runtime.reaper.tick()
    lease = (await gateway.client.get(f"/v1/leases/{out['lease_id']}")).json()
    assert lease["state"] == "revoked", lease
    assert not await asyncio.to_thread(case.works, cred)
