"""The gcp connector against tests/standins/gcp_auth.py (Google's token services and a sliver of GCS).

The stand-in verifies every credential it is handed (JWT-bearer signatures against the
registered key, bearer tokens it issued, tokenCreator bindings, the federation JWT through the
issuer's discovery and JWKS, access boundaries), so a credential the connector got wrong fails
here. The first tests drive the stand-in with google-auth alone (the vendor client), so the
stand-in is held to the wire format google-auth speaks; the rest drive the connector and then
*use* what it issued with google-auth's ``AuthorizedSession``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from connectors.base import (
    IssueRequest,
    ResourceNotSupported,
    Revocability,
    ServiceConnector,
    TargetError,
    TargetUnreachable,
)
from connectors.gcp import GCPConnector, GCPServiceAccountKey, access_boundary, parse_resource
from gateway.errors import NotRenewable, ValidationFailed
from tests.services.pgcluster import free_port
from tests.services.workload_issuer import WorkloadIssuer
from tests.standins.gcp_auth import CLOUD_PLATFORM, GCPAuthStandIn, make_service_account_key

PROJECT = "credgate-test"
ALLOWED, OTHER = "cg-gcs-allowed", "cg-gcs-other"
POOL, PROVIDER_ID = "credgate-pool", "credgate-oidc"
TARGET = f"pipelines@{PROJECT}.iam.gserviceaccount.com"


@dataclass
class Target:
    gcp: GCPAuthStandIn
    issuer: WorkloadIssuer
    key: dict[str, str]  # the broker account's key file: tokenCreator on TARGET
    provider: str  # the pool provider's resource name, trusting ``issuer``
    strict_provider: str  # the same issuer, with an attribute condition: a ``run`` claim is required

    def endpoints(self) -> dict[str, str]:
        e = self.gcp.endpoint
        return {"iam_endpoint": e, "sts_endpoint": e, "storage_endpoint": e}


@pytest.fixture(scope="module")
def gcp_target() -> Iterator[Target]:
    gcp = GCPAuthStandIn(PROJECT).start()
    issuer = WorkloadIssuer().start()
    try:
        key = gcp.add_service_account(f"broker@{PROJECT}.iam.gserviceaccount.com")
        gcp.add_service_account(TARGET)
        gcp.grant_token_creator(TARGET, f"serviceAccount:{key['client_email']}")
        gcp.grant_token_creator(TARGET, gcp.pool_principal_set(POOL))
        for bucket in (ALLOWED, OTHER):
            gcp.add_bucket(bucket, {"report.txt": f"in {bucket}".encode()})
        provider = gcp.add_provider(POOL, PROVIDER_ID, issuer.issuer)
        strict = gcp.add_provider(POOL, "credgate-strict", issuer.issuer, condition=lambda claims: "run" in claims)
        yield Target(gcp, issuer, key, provider, strict)
    finally:
        issuer.stop()
        gcp.stop()


def connector(t: Target, auth: str = "service-account", key: dict[str, str] | None = None, **config: Any) -> GCPConnector:
    cfg = t.endpoints() | config
    if auth in ("impersonation", "web-identity"):
        cfg.setdefault("target_service_account", TARGET)
    if auth == "web-identity":
        cfg.setdefault("workload_identity_provider", t.provider)
        cfg.setdefault("project_id", PROJECT)
    material: dict[str, str] = {} if auth == "web-identity" else (key or t.key)
    conn = GCPConnector(cfg, auth, material, name="gcp-test")
    if auth == "web-identity":
        conn.identity = t.issuer
    return conn


def request(resource: str, ttl: timedelta = timedelta(minutes=15), principal: str = "credgate/run:RUN1",
            run_id: str | None = "RUN1") -> IssueRequest:
    now = datetime.now(UTC)
    return IssueRequest(lease_id="lease" + secrets.token_hex(6), resource=resource, ttl=ttl, expires_at=now + ttl,
                        revoke_state={}, timeout_seconds=20, principal=principal, run_id=run_id)


def objects(t: Target, token: str, bucket: str) -> int:
    """List ``bucket`` with google-auth's AuthorizedSession: the HTTP status."""
    from google.auth.transport.requests import AuthorizedSession
    from google.oauth2.credentials import Credentials

    with AuthorizedSession(Credentials(token), refresh_status_codes=()) as session:
        return session.get(f"{t.gcp.endpoint}/storage/v1/b/{bucket}/o", timeout=10).status_code


# --- the stand-in, driven by google-auth alone ----------------------------------------------


def _sa_credentials(key: dict[str, str]) -> Any:
    from google.oauth2 import service_account

    return service_account.Credentials.from_service_account_info(key, scopes=[CLOUD_PLATFORM])


def test_standin_grants_google_auths_jwt_bearer_and_refuses_a_wrong_signature(gcp_target: Target) -> None:
    from google.auth.exceptions import RefreshError
    from google.auth.transport.requests import Request

    creds = _sa_credentials(gcp_target.key)
    creds.refresh(Request())
    assert creds.token and gcp_target.gcp.token_info(creds.token).principal == f"serviceAccount:{gcp_target.key['client_email']}"
    assert objects(gcp_target, creds.token, ALLOWED) == 200

    forged, _ = make_service_account_key(gcp_target.key["client_email"], PROJECT, gcp_target.gcp.token_uri)
    forged["private_key_id"] = gcp_target.key["private_key_id"]  # the registered kid, another private key
    with pytest.raises(RefreshError) as info:
        _sa_credentials(forged).refresh(Request())
    assert "invalid_grant" in str(info.value)
    assert objects(gcp_target, "ya29.not-issued-here", ALLOWED) == 401


@pytest.mark.parametrize("change", [
    {"aud": "https://elsewhere.example/token"}, {"exp_in": -600}, {"exp_in": 7200}, {"scope": ""},
    {"sub": "someone@example.com"}, {"iss": f"nobody@{PROJECT}.iam.gserviceaccount.com"},
])
def test_standin_checks_every_claim_of_the_assertion(gcp_target: Target, change: dict[str, Any]) -> None:
    """Assertions signed with the account's real key, each with one claim wrong: all refused."""
    import time

    import httpx
    from google.auth import crypt
    from google.auth import jwt as gjwt

    signer = crypt.RSASigner.from_service_account_info(gcp_target.key)
    now = int(time.time())
    claims = {"iss": gcp_target.key["client_email"], "aud": "https://oauth2.googleapis.com/token",
              "scope": CLOUD_PLATFORM, "iat": now, "exp": now + 3600}
    good = gjwt.encode(signer, claims).decode()
    exp_in = change.pop("exp_in", None)
    bad_claims = claims | change | ({"exp": now + exp_in} if exp_in is not None else {})
    bad = gjwt.encode(signer, bad_claims).decode()
    grant = "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert httpx.post(gcp_target.gcp.token_uri, data={"grant_type": grant, "assertion": good}).status_code == 200
    r = httpx.post(gcp_target.gcp.token_uri, data={"grant_type": grant, "assertion": bad})
    assert r.status_code == 400 and r.json()["error"] in ("invalid_grant", "invalid_scope", "unauthorized_client")


def test_standin_iam_checks_the_caller_and_the_lifetime(gcp_target: Target) -> None:
    import httpx
    from google.auth.transport.requests import Request

    creds = _sa_credentials(gcp_target.key)
    creds.refresh(Request())
    url = f"{gcp_target.gcp.endpoint}/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken"

    def call(bearer: str, lifetime: str) -> httpx.Response:
        return httpx.post(url, headers={"Authorization": f"Bearer {bearer}"},
                          json={"scope": [CLOUD_PLATFORM], "lifetime": lifetime})

    ok = call(creds.token, "300s")
    assert ok.status_code == 200 and gcp_target.gcp.token_info(ok.json()["accessToken"]).principal == f"serviceAccount:{TARGET}"
    assert call(creds.token, "7200s").status_code == 400  # above the hour
    assert call("ya29.forged", "300s").status_code == 401
    lone = _sa_credentials(gcp_target.gcp.add_service_account())
    lone.refresh(Request())
    assert call(lone.token, "300s").status_code == 403  # no tokenCreator binding on TARGET


def test_standin_downscopes_what_google_auths_sts_client_sends(gcp_target: Target) -> None:
    from google.auth import downscoped
    from google.auth.transport.requests import Request
    from google.oauth2 import sts

    creds = _sa_credentials(gcp_target.key)
    creds.refresh(Request())
    boundary = downscoped.CredentialAccessBoundary([downscoped.AccessBoundaryRule(
        f"//storage.googleapis.com/projects/_/buckets/{ALLOWED}", ["inRole:roles/storage.objectViewer"])])
    assert boundary.to_json() == access_boundary(ALLOWED)  # the connector's boundary is google-auth's
    out = sts.Client(f"{gcp_target.gcp.endpoint}/v1/token").exchange_token(
        request=Request(), grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
        subject_token=creds.token, subject_token_type="urn:ietf:params:oauth:token-type:access_token",
        requested_token_type="urn:ietf:params:oauth:token-type:access_token", additional_options=boundary.to_json(),
    )
    token = out["access_token"]
    assert objects(gcp_target, token, ALLOWED) == 200
    assert objects(gcp_target, token, OTHER) == 403
    assert objects(gcp_target, creds.token, OTHER) == 200  # the source token was not narrowed


# --- pure -------------------------------------------------------------------------------------


def test_resources_and_plan(gcp_target: Target) -> None:
    conn = connector(gcp_target)
    assert isinstance(conn, ServiceConnector)
    assert conn.revocability is Revocability.EXPIRY_ONLY and not conn.renewable
    assert parse_resource(f"gcs-bucket:{ALLOWED}") == ("gcs-bucket", ALLOWED)
    assert conn.validate_resource(f"gcp-project:{PROJECT}") == "gcp-project"
    for bad in ("gcs-bucket:Upper", "gcs-bucket:goog-x", "gcs-bucket:1.2.3.4", "gcp-project:9starts-digit",
                "s3-bucket:x", "gcs-bucket:a..b"):
        with pytest.raises(ResourceNotSupported):
            conn.validate_resource(bad)
    assert conn.plan("L1", f"gcs-bucket:{ALLOWED}") == {
        "auth_method": "service-account", "identity": gcp_target.key["client_email"], "downscoped": True}


def test_config_and_material_checks(gcp_target: Target) -> None:
    with pytest.raises(ValidationFailed):
        connector(gcp_target, "impersonation", target_service_account=None)
    with pytest.raises(ValidationFailed):
        GCPConnector(gcp_target.endpoints() | {"target_service_account": TARGET}, "web-identity", {})
    with pytest.raises(ValidationFailed):
        connector(gcp_target, target_service_account=TARGET)  # service-account takes no target
    whole = GCPServiceAccountKey.model_validate({"key_json": json.dumps(gcp_target.key)})
    assert whole.client_email == gcp_target.key["client_email"]
    assert whole.private_key.get_secret_value() == gcp_target.key["private_key"]
    with pytest.raises(ValidationFailed) as info:
        GCPConnector(gcp_target.endpoints(), "service-account", {"key_json": "{not json " + "SECRETVALUE"})
    assert "SECRETVALUE" not in str(info.value)


# --- issuing -----------------------------------------------------------------------------------


async def test_service_account_token_for_a_project(gcp_target: Target) -> None:
    conn = connector(gcp_target)
    try:
        issued = await conn.issue(request(f"gcp-project:{PROJECT}", timedelta(hours=1)))
    finally:
        await conn.aclose()
    cred = issued.credential
    assert cred["project_id"] == PROJECT and cred["service_account"] == gcp_target.key["client_email"]
    info = gcp_target.gcp.token_info(cred["access_token"])
    assert info.principal == f"serviceAccount:{gcp_target.key['client_email']}" and info.boundary is None
    assert objects(gcp_target, cred["access_token"], OTHER) == 200
    assert issued.expires_at <= datetime.now(UTC) + timedelta(hours=1)


async def test_service_account_key_json_material_works_the_same(gcp_target: Target) -> None:
    conn = connector(gcp_target, key={"key_json": json.dumps(gcp_target.key)})
    try:
        cred = (await conn.issue(request(f"gcs-bucket:{ALLOWED}"))).credential
    finally:
        await conn.aclose()
    assert objects(gcp_target, cred["access_token"], ALLOWED) == 200


async def test_bucket_token_is_downscoped_to_the_bucket(gcp_target: Target) -> None:
    conn = connector(gcp_target)
    try:
        issued = await conn.issue(request(f"gcs-bucket:{ALLOWED}"))
    finally:
        await conn.aclose()
    token = issued.credential["access_token"]
    assert issued.credential["bucket"] == ALLOWED and issued.credential["role"] == "roles/storage.objectViewer"
    assert objects(gcp_target, token, ALLOWED) == 200
    assert objects(gcp_target, token, OTHER) == 403
    info = gcp_target.gcp.token_info(token)
    assert set(info.boundary) == {ALLOWED}
    # A downscoped token can't mint others: generateAccessToken refuses it.
    import httpx

    r = httpx.post(f"{gcp_target.gcp.endpoint}/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken",
                   headers={"Authorization": f"Bearer {token}"}, json={"scope": [CLOUD_PLATFORM]})
    assert r.status_code == 403


async def test_impersonation_honours_the_lease_lifetime(gcp_target: Target) -> None:
    conn = connector(gcp_target, "impersonation")
    tokens_before = gcp_target.gcp.calls.get("token", 0)
    try:
        issued = await conn.issue(request(f"gcs-bucket:{ALLOWED}", timedelta(minutes=10)))
        second = await conn.issue(request(f"gcp-project:{PROJECT}", timedelta(minutes=20)))
    finally:
        await conn.aclose()
    assert gcp_target.gcp.lifetimes[-2:] == [600, 1200]
    assert gcp_target.gcp.calls["token"] == tokens_before + 1  # the source token was reused
    assert issued.expires_at <= datetime.now(UTC) + timedelta(minutes=10)
    assert datetime.fromisoformat(issued.credential["expiry"]) <= datetime.now(UTC) + timedelta(minutes=10)
    assert gcp_target.gcp.token_info(issued.credential["access_token"]).principal == f"serviceAccount:{TARGET}"
    assert gcp_target.gcp.token_info(second.credential["access_token"]).principal == f"serviceAccount:{TARGET}"
    assert objects(gcp_target, issued.credential["access_token"], ALLOWED) == 200
    assert objects(gcp_target, issued.credential["access_token"], OTHER) == 403


async def test_impersonation_without_token_creator_is_denied(gcp_target: Target) -> None:
    lone = gcp_target.gcp.add_service_account()  # holds no binding on TARGET
    conn = connector(gcp_target, "impersonation", key=lone)
    try:
        with pytest.raises(TargetError) as info:
            await conn.issue(request(f"gcp-project:{PROJECT}"))
    finally:
        await conn.aclose()
    assert info.value.code == "target_permission_denied"


async def test_web_identity_federates_the_principal_and_run(gcp_target: Target) -> None:
    conn = connector(gcp_target, "web-identity")
    try:
        issued = await conn.issue(request(f"gcs-bucket:{ALLOWED}", timedelta(minutes=10)))
    finally:
        await conn.aclose()
    claims = gcp_target.gcp.accepted_claims[-1]
    assert claims["sub"] == "credgate/run:RUN1" and claims["run"] == "RUN1"
    assert claims["aud"] == "https:" + gcp_target.provider and claims["iss"] == gcp_target.issuer.issuer
    assert gcp_target.gcp.lifetimes[-1] == 600
    token = issued.credential["access_token"]
    assert gcp_target.gcp.token_info(token).principal == f"serviceAccount:{TARGET}"
    assert objects(gcp_target, token, ALLOWED) == 200 and objects(gcp_target, token, OTHER) == 403


async def test_web_identity_refuses_a_token_the_issuer_did_not_sign(gcp_target: Target) -> None:
    conn = connector(gcp_target, "web-identity")
    gcp_target.issuer.rogue = True
    try:
        with pytest.raises(TargetError) as info:
            await conn.issue(request(f"gcp-project:{PROJECT}"))
    finally:
        gcp_target.issuer.rogue = False
        await conn.aclose()
    assert info.value.code == "target_auth_failed"
    assert gcp_target.gcp.rejected[-1] == "invalid_grant: Invalid JWT signature."


async def test_web_identity_checks_audience_subject_length_and_condition(gcp_target: Target) -> None:
    wrong_aud = connector(gcp_target, "web-identity", web_identity_audience="https://elsewhere.example")
    strict = connector(gcp_target, "web-identity", workload_identity_provider=gcp_target.strict_provider)
    plain = connector(gcp_target, "web-identity")
    try:
        with pytest.raises(TargetError):
            await wrong_aud.issue(request(f"gcp-project:{PROJECT}"))
        assert "audience" in gcp_target.gcp.rejected[-1]
        with pytest.raises(TargetError):
            await plain.issue(request(f"gcp-project:{PROJECT}", principal="credgate/run:" + "x" * 120))
        assert "127 bytes" in gcp_target.gcp.rejected[-1]
        with pytest.raises(TargetError):  # no run claim: the attribute condition refuses
            await strict.issue(request(f"gcp-project:{PROJECT}", principal="credgate/admin_key:ops", run_id=None))
        assert "attribute condition" in gcp_target.gcp.rejected[-1]
        ok = await strict.issue(request(f"gcp-project:{PROJECT}"))
        assert gcp_target.gcp.token_info(ok.credential["access_token"]).principal == f"serviceAccount:{TARGET}"
        assert not (await strict.verify()).ok  # verify's subject is connector:NAME, with no run
    finally:
        for c in (wrong_aud, strict, plain):
            await c.aclose()


async def test_web_identity_with_a_configured_audience(gcp_target: Target) -> None:
    provider = gcp_target.gcp.add_provider(POOL, "credgate-custom-aud", gcp_target.issuer.issuer,
                                           audiences=["credgate-gcp"])
    default_aud = connector(gcp_target, "web-identity", workload_identity_provider=provider)
    custom = connector(gcp_target, "web-identity", workload_identity_provider=provider,
                       web_identity_audience="credgate-gcp")
    try:
        with pytest.raises(TargetError):  # the provider no longer accepts its own name as audience
            await default_aud.issue(request(f"gcp-project:{PROJECT}"))
        issued = await custom.issue(request(f"gcp-project:{PROJECT}"))
    finally:
        await default_aud.aclose()
        await custom.aclose()
    assert gcp_target.gcp.accepted_claims[-1]["aud"] == "credgate-gcp"
    assert gcp_target.gcp.token_info(issued.credential["access_token"]).principal == f"serviceAccount:{TARGET}"


async def test_web_identity_without_an_issuer_is_a_clear_error(gcp_target: Target) -> None:
    conn = connector(gcp_target, "web-identity")
    conn.identity = None
    with pytest.raises(TargetError) as info:
        await conn.issue(request(f"gcp-project:{PROJECT}"))
    assert info.value.code == "oidc_issuer_unconfigured"


# --- verify, list, renew, revoke ------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["service-account", "impersonation", "web-identity"])
async def test_verify_reports_the_identity(gcp_target: Target, auth: str) -> None:
    conn = connector(gcp_target, auth, project_id=PROJECT)
    try:
        v = await conn.verify()
        buckets = await conn.list_resources("gcs-bucket")
    finally:
        await conn.aclose()
    assert v.ok, v.message
    assert v.identity == (gcp_target.key["client_email"] if auth == "service-account" else TARGET)
    assert v.reachable == {"gcp-project": [f"gcp-project:{PROJECT}"]}
    assert {f"gcs-bucket:{ALLOWED}", f"gcs-bucket:{OTHER}"} <= set(buckets)
    assert await conn.list_resources("gcp-project") == [f"gcp-project:{PROJECT}"]
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("s3-bucket")


async def test_renew_is_refused_and_revoke_is_a_no_op(gcp_target: Target) -> None:
    conn = connector(gcp_target)
    with pytest.raises(NotRenewable):
        await conn.renew({}, datetime.now(UTC) + timedelta(minutes=5))
    assert await conn.revoke({}) is None


# --- failures and secrecy ------------------------------------------------------------------------


async def test_an_unreachable_token_endpoint_is_a_503(gcp_target: Target) -> None:
    conn = connector(gcp_target, token_uri=f"http://127.0.0.1:{free_port('127.0.0.1')}/token")
    try:
        with pytest.raises(TargetUnreachable):
            await conn.issue(request(f"gcp-project:{PROJECT}"))
        assert not (await conn.verify()).ok
    finally:
        await conn.aclose()
    down = connector(gcp_target, "impersonation", iam_endpoint=f"http://127.0.0.1:{free_port('127.0.0.1')}")
    try:
        with pytest.raises(TargetUnreachable):
            await down.issue(request(f"gcp-project:{PROJECT}"))
    finally:
        await down.aclose()


async def test_a_refused_or_unloadable_key_never_shows_its_secret(gcp_target: Target) -> None:
    canary = "CANARY" + secrets.token_hex(8)
    unregistered, _ = make_service_account_key(gcp_target.key["client_email"], PROJECT, gcp_target.gcp.token_uri)
    unloadable = gcp_target.key | {"private_key": f"-----BEGIN PRIVATE KEY-----\n{canary}\n-----END PRIVATE KEY-----\n"}
    for key, secret in ((unregistered, unregistered["private_key"]), (unloadable, canary)):
        conn = connector(gcp_target, key=key)
        try:
            with pytest.raises(TargetError) as info:
                await conn.issue(request(f"gcp-project:{PROJECT}"))
            v = await conn.verify()
        finally:
            await conn.aclose()
        assert info.value.code == "target_auth_failed"
        shown = " ".join([str(info.value), repr(info.value), json.dumps(info.value.details, default=str),
                          v.message, repr(conn), repr(conn._material)])
        assert not v.ok
        assert secret not in shown and secret.splitlines()[len(secret.splitlines()) // 2] not in shown


def test_sanitize_keeps_the_class_and_googles_code_only() -> None:
    from google.auth.exceptions import RefreshError

    body = {"error": "invalid_grant", "error_description": "key SECRETVALUE refused"}
    exc = RefreshError("invalid_grant: key SECRETVALUE refused", body)
    assert GCPConnector.sanitize(exc) == "RefreshError (invalid_grant)"
    assert GCPConnector.sanitize(ValueError("SECRETVALUE")) == "ValueError"
