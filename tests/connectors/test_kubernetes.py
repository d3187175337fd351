"""The kubernetes connector against the Kubernetes API stand-in (tests/standins/k8s_api.py).

One stand-in for the module. Namespaces ``team-a`` and ``team-b`` each have the service
account ``pipeline``; the admin token may issue in both (and in ``ghost``, which does not
exist), not in ``kube-system``. Issued credentials are used through their kubeconfig, read
with a YAML parser and driven with httpx (the official ``kubernetes`` client is not a test
dependency: see the report of the branch that added this file).
"""

from __future__ import annotations

import base64
import secrets
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from connectors.base import (
    IssueRequest,
    NotRenewable,
    ResourceNotSupported,
    ResourceRejected,
    Revocability,
    ServiceConnector,
    TargetError,
    TargetUnreachable,
)
from connectors.kubernetes import (
    LEASE_LABEL,
    KubernetesConnector,
    parse_resource,
    secret_name,
)
from gateway.errors import ValidationFailed
from tests.services.pgcluster import free_port
from tests.standins.k8s_api import ADMIN_USER, KubernetesAPIStandin
from tests.standins.k8s_tokenreview import _self_signed

A, B = "kubernetes-namespace:team-a", "kubernetes-namespace:team-b"


@pytest.fixture(scope="module")
def api() -> Iterator[KubernetesAPIStandin]:
    standin = KubernetesAPIStandin(
        {"team-a": ["pipeline"], "team-b": ["pipeline"], "kube-system": ["pipeline"]},
        admin_namespaces={"team-a", "team-b", "ghost"},
    )
    with standin:
        yield standin


def make(api: KubernetesAPIStandin, token: str | None = None, **config: Any) -> KubernetesConnector:
    config.setdefault("server", api.url)
    config.setdefault("certificate_authority", api.ca_pem.decode())
    config.setdefault("service_account", "pipeline")
    return KubernetesConnector(config, "token", {"token": token or api.admin_token}, name="k8s")


@pytest.fixture
async def conn(api: KubernetesAPIStandin) -> AsyncIterator[KubernetesConnector]:
    c = make(api)
    yield c
    await c.aclose()


def lease(conn: KubernetesConnector, resource: str, ttl: int = 3600) -> IssueRequest:
    lease_id = f"lease_{int(datetime.now().timestamp() * 1000):012x}{secrets.token_hex(8)}"
    return IssueRequest(
        lease_id=lease_id, resource=resource, ttl=timedelta(seconds=ttl),
        expires_at=datetime.now(UTC) + timedelta(seconds=ttl), revoke_state=conn.plan(lease_id, resource),
        timeout_seconds=15,
    )


def kube_client(kubeconfig_text: str) -> tuple[httpx.Client, str]:
    """An httpx client from a kubeconfig (current context: server, CA data, token), and its namespace."""
    doc = yaml.safe_load(kubeconfig_text)
    ctx = next(c["context"] for c in doc["contexts"] if c["name"] == doc["current-context"])
    cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in doc["users"] if u["name"] == ctx["user"])
    tls = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    client = httpx.Client(base_url=cluster["server"], verify=tls, trust_env=False, timeout=10,
                          headers={"Authorization": f"Bearer {user['token']}"})
    return client, ctx["namespace"]


def configmaps(kubeconfig_text: str, namespace: str | None = None) -> httpx.Response:
    client, own = kube_client(kubeconfig_text)
    with client:
        return client.get(f"/api/v1/namespaces/{namespace or own}/configmaps")


def admin(api: KubernetesAPIStandin, token: str | None = None) -> httpx.Client:
    tls = ssl.create_default_context(cadata=api.ca_pem.decode())
    return httpx.Client(base_url=api.url, verify=tls, trust_env=False, timeout=10,
                        headers={"Authorization": f"Bearer {token or api.admin_token}"})


def review(api: KubernetesAPIStandin, token: str, audiences: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"token": token}
    if audiences:
        spec["audiences"] = audiences
    with admin(api) as client:
        r = client.post("/apis/authentication.k8s.io/v1/tokenreviews",
                        json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
    assert r.status_code == 201, r.text
    return r.json()["status"]


# -- pure ----------------------------------------------------------------------


def test_shape_and_capabilities() -> None:
    assert KubernetesConnector.revocability is Revocability.REVOCABLE and not KubernetesConnector.renewable
    assert KubernetesConnector.ttl.min == timedelta(seconds=600)  # TokenRequest's minimum
    assert KubernetesConnector.resource_types == ("kubernetes-namespace",)


def test_parse_resource() -> None:
    assert parse_resource("kubernetes-namespace:team-a") == "team-a"
    for bad in ("kubernetes-namespace:Team", "kubernetes-namespace:-a", "kubernetes-namespace:", "namespace:a",
                "kubernetes-namespace:" + "a" * 64, "kubernetes-namespace:a/b"):
        with pytest.raises(ResourceNotSupported):
            parse_resource(bad)


def test_plan_names_the_lease_secret_and_service_account(api: KubernetesAPIStandin) -> None:
    c = make(api, service_accounts={"kubernetes-namespace:team-b": "reader"})
    state = c.plan("lease_019a0b0c0d0eABCDEF0123456789", A)
    assert state == {"namespace": "team-a", "secret": "credgate-lease-0b0c0d0eabcdef0123456789",
                     "service_account": "pipeline"}
    assert c.plan("lease_x", B)["service_account"] == "reader"
    assert secret_name("lease_" + "f" * 40) == "credgate-lease-" + "f" * 24
    assert isinstance(c, ServiceConnector)
    no_default = make(api, service_account=None, service_accounts={"kubernetes-namespace:team-a": "pipeline"})
    with pytest.raises(ResourceNotSupported):
        no_default.plan("lease_x", B)


def test_config_refuses_plain_http_and_a_non_certificate(api: KubernetesAPIStandin) -> None:
    with pytest.raises(ValidationFailed):
        make(api, server=f"http://127.0.0.1:{api.port}")
    with pytest.raises(ValidationFailed):
        make(api, certificate_authority="not a certificate")
    with pytest.raises(ValidationFailed):
        KubernetesConnector({"server": api.url, "certificate_authority": api.ca_pem.decode()}, "token", {})


def test_repr_holds_no_token(api: KubernetesAPIStandin) -> None:
    c = make(api)
    assert api.admin_token not in repr(c) and api.admin_token not in repr(c.__dict__)


async def test_renew_is_refused(conn: KubernetesConnector) -> None:
    with pytest.raises(NotRenewable):
        await conn.renew({"namespace": "team-a", "secret": "credgate-lease-x"}, datetime.now(UTC))


# -- the stand-in checks what it is given -----------------------------------------


def test_standin_refuses_forged_expired_and_wrong_audience_tokens(api: KubernetesAPIStandin) -> None:
    with admin(api) as client:
        sec = client.post("/api/v1/namespaces/team-a/secrets",
                          json={"kind": "Secret", "metadata": {"name": "standin-check"}}).json()
    bound = ("standin-check", sec["metadata"]["uid"])
    good = api.mint("team-a", "pipeline", secret=bound)
    forged = api.mint("team-a", "pipeline", secret=bound, key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    expired = api.mint("team-a", "pipeline", secret=bound, ttl=-120)
    other_aud = api.mint("team-a", "pipeline", secret=bound, audiences=["vault"])
    wrong_uid = api.mint("team-a", "pipeline", secret=("standin-check", "not-the-uid"))
    assert configmaps_with(api, good).status_code == 200
    for token in (forged, expired, other_aud, wrong_uid, "garbage"):
        r = configmaps_with(api, token)
        assert r.status_code == 401 and r.json()["reason"] == "Unauthorized", token
    assert review(api, good)["authenticated"] is True
    for token in (forged, expired, other_aud, wrong_uid):
        assert review(api, token)["authenticated"] is False
    assert review(api, other_aud, ["vault"])["authenticated"] is True
    with admin(api, "not-the-admin-token") as client:
        assert client.get("/api/v1/namespaces").status_code == 401
    with admin(api) as client:  # expirationSeconds under 10 minutes is invalid
        r = client.post("/api/v1/namespaces/team-a/serviceaccounts/pipeline/token",
                        json={"kind": "TokenRequest", "spec": {"expirationSeconds": 599}})
        assert r.status_code == 422 and r.json()["reason"] == "Invalid"
        r = client.post("/api/v1/namespaces/team-a/serviceaccounts/pipeline/token", json={"kind": "TokenRequest", "spec": {
            "boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": "standin-check", "uid": "other"}}})
        assert r.status_code == 409
        client.delete("/api/v1/namespaces/team-a/secrets/standin-check")
    assert configmaps_with(api, good).status_code == 401  # the bound Secret is gone
    assert review(api, good)["authenticated"] is False


def configmaps_with(api: KubernetesAPIStandin, token: str, namespace: str = "team-a") -> httpx.Response:
    with admin(api, token) as client:
        return client.get(f"/api/v1/namespaces/{namespace}/configmaps")


# -- issue, use, revoke ---------------------------------------------------------


async def test_issue_use_in_own_namespace_only_then_revoke(api: KubernetesAPIStandin, conn: KubernetesConnector) -> None:
    req = lease(conn, A, ttl=1200)
    issued = await conn.issue(req)
    cred = issued.credential
    assert set(cred) == {"token", "expiration", "namespace", "service_account", "server", "kubeconfig"}
    assert cred["namespace"] == "team-a" and cred["server"] == api.url
    assert issued.expires_at <= req.expires_at

    # The Secret exists, labelled, and the TokenRequest was bound to it with the TTL.
    name = req.revoke_state["secret"]
    obj = api.secrets[("team-a", name)]
    assert obj["type"] == "Opaque" and obj["metadata"]["labels"][LEASE_LABEL] == name.removeprefix("credgate-lease-")
    spec = api.token_requests[-1]["spec"]
    assert spec["expirationSeconds"] == 1200 and "audiences" not in spec
    assert spec["boundObjectRef"] == {"kind": "Secret", "apiVersion": "v1", "name": name, "uid": obj["metadata"]["uid"]}

    # The kubeconfig works: its own namespace yes, another namespace no.
    ok = configmaps(cred["kubeconfig"])
    assert ok.status_code == 200, ok.text
    assert [i["metadata"]["name"] for i in ok.json()["items"]] == ["settings"]
    assert ok.json()["items"][0]["data"] == {"namespace": "team-a"}
    assert configmaps(cred["kubeconfig"], "team-b").status_code == 403
    assert review(api, cred["token"])["user"]["username"] == "system:serviceaccount:team-a:pipeline"

    await conn.revoke(req.revoke_state)
    assert ("team-a", name) not in api.secrets
    refused = configmaps(cred["kubeconfig"])
    assert refused.status_code == 401
    assert review(api, cred["token"])["authenticated"] is False
    await conn.revoke(req.revoke_state)  # idempotent


async def test_audiences_are_requested_and_bound(api: KubernetesAPIStandin) -> None:
    c = make(api, audiences=["vault", "credgate"])
    try:
        req = lease(c, B)
        cred = (await c.issue(req)).credential
        assert api.token_requests[-1]["spec"]["audiences"] == ["vault", "credgate"]
        assert review(api, cred["token"], ["vault"])["authenticated"] is True
        assert configmaps(cred["kubeconfig"]).status_code == 401  # not an API server audience
        await c.revoke(req.revoke_state)
        assert review(api, cred["token"], ["vault"])["authenticated"] is False
    finally:
        await c.aclose()


async def test_revoke_after_a_crash_between_plan_and_token(api: KubernetesAPIStandin, conn: KubernetesConnector) -> None:
    # Planned, nothing created yet: revoke succeeds and creates nothing.
    req = lease(conn, A)
    await conn.revoke(req.revoke_state)
    name = req.revoke_state["secret"]
    assert ("team-a", name) not in api.secrets
    # The Secret was created and the process died before the TokenRequest.
    with admin(api) as client:
        r = client.post("/api/v1/namespaces/team-a/secrets", json={"kind": "Secret", "type": "Opaque", "metadata": {
            "name": name, "labels": {LEASE_LABEL: name.removeprefix("credgate-lease-")}}})
        assert r.status_code == 201
    await conn.revoke(req.revoke_state)
    assert ("team-a", name) not in api.secrets


async def test_issue_retried_reuses_its_own_secret(api: KubernetesAPIStandin, conn: KubernetesConnector) -> None:
    req = lease(conn, A)
    name = req.revoke_state["secret"]
    with admin(api) as client:
        client.post("/api/v1/namespaces/team-a/secrets", json={"kind": "Secret", "metadata": {
            "name": name, "labels": {LEASE_LABEL: name.removeprefix("credgate-lease-")}}})
    cred = (await conn.issue(req)).credential
    assert configmaps(cred["kubeconfig"]).status_code == 200
    await conn.revoke(req.revoke_state)


async def test_a_foreign_secret_of_the_same_name_is_neither_used_nor_deleted(
    api: KubernetesAPIStandin, conn: KubernetesConnector
) -> None:
    req = lease(conn, A)
    name = req.revoke_state["secret"]
    with admin(api) as client:
        client.post("/api/v1/namespaces/team-a/secrets", json={"kind": "Secret", "metadata": {"name": name}})
    with pytest.raises(TargetError) as err:
        await conn.issue(req)
    assert err.value.code == "credential_exists"
    await conn.revoke(req.revoke_state)
    assert ("team-a", name) in api.secrets  # not ours: left alone
    api.delete_secret("team-a", name)


async def test_missing_service_account_or_namespace_is_rejected_and_leaves_nothing(api: KubernetesAPIStandin) -> None:
    c = make(api, service_account="nobody")
    try:
        before = set(api.secrets)
        with pytest.raises(ResourceRejected) as err:
            await c.issue(lease(c, A))
        assert err.value.reason == "not_found"
        with pytest.raises(ResourceRejected):
            await c.issue(lease(c, "kubernetes-namespace:ghost"))
        assert set(api.secrets) == before
    finally:
        await c.aclose()


async def test_namespace_outside_the_admins_rbac_is_permission_denied(conn: KubernetesConnector) -> None:
    with pytest.raises(TargetError) as err:
        await conn.issue(lease(conn, "kubernetes-namespace:kube-system"))
    assert err.value.code == "target_permission_denied" and "HTTP 403 Forbidden" in err.value.message


async def test_wrong_token_untrusted_ca_and_closed_port(api: KubernetesAPIStandin) -> None:
    canary = "CANARY" + secrets.token_hex(8)
    bad = make(api, token=canary)
    other_ca = _self_signed()[0].decode()
    untrusted = make(api, certificate_authority=other_ca)
    down = make(api, server=f"https://127.0.0.1:{free_port('127.0.0.1')}")
    try:
        with pytest.raises(TargetError) as err:
            await bad.issue(lease(bad, A))
        assert err.value.code == "target_auth_failed" and canary not in str(err.value) and canary not in repr(err.value)
        verification = await bad.verify()
        assert not verification.ok and canary not in verification.message
        with pytest.raises(TargetError) as err:
            await untrusted.issue(lease(untrusted, A))
        assert err.value.code == "target_tls_untrusted" and not isinstance(err.value, TargetUnreachable)
        with pytest.raises(TargetUnreachable):
            await down.issue(lease(down, A))
        assert err.value.__cause__ is None
    finally:
        for c in (bad, untrusted, down):
            await c.aclose()


async def test_verify_and_list(conn: KubernetesConnector) -> None:
    v = await conn.verify()
    assert v.ok and v.identity == ADMIN_USER
    assert v.reachable["kubernetes-namespace"] == [
        "kubernetes-namespace:kube-system", "kubernetes-namespace:team-a", "kubernetes-namespace:team-b"]
    assert await conn.list_resources("kubernetes-namespace") == v.reachable["kubernetes-namespace"]
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("pods")
