"""Keyless federation: the gateway as an OIDC issuer, and an ``aws`` connector that holds no secret.

The gateway is served over real HTTP (uvicorn on a free 127.0.0.1 port, its public_url that
address), because the party that trusts it fetches its discovery document and keys the way
AWS does. That party is tests/standins/sts_oidc.py: a stand-in for STS's web-identity token
checks (signature through discovery + JWKS, issuer, audience, expiry, the role's trust
condition on ``sub``) in front of moto, which issues the credentials (moto alone checks no
token at all). The credentials are then used with boto3 against moto.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN, Gateway
from tests.standins.sts_oidc import StsOidcStandIn

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

ALLOWED, OTHER = "cg-wi-allowed", "cg-wi-other"
AUDIENCE = "sts.amazonaws.com"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def aws_target(moto_server: Any) -> Iterator[dict[str, str]]:
    iam = moto_server.boto3_client("iam")
    trust = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
        "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/credgate"},
    }]}
    role = iam.create_role(RoleName="cg-web-identity", AssumeRolePolicyDocument=json.dumps(trust),
                           MaxSessionDuration=43200)["Role"]
    s3 = moto_server.boto3_client("s3")
    for bucket in (ALLOWED, OTHER):
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="report.txt", Body=f"in {bucket}".encode())
    sts = StsOidcStandIn(moto_server.endpoint_url).start()
    try:
        yield {"role_arn": role["Arn"], "sts": sts, "moto": moto_server}  # type: ignore[dict-item]
    finally:
        sts.stop()


@pytest.fixture
async def served(settings_factory: Any) -> AsyncIterator[Gateway]:
    """The gateway on a real port, its issuer URL that address."""
    import uvicorn

    port = _free_port()
    app = create_app(settings_factory(public_url=f"http://127.0.0.1:{port}"))
    async with app.router.lifespan_context(app):
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
                yield Gateway(app, client)
        finally:
            server.should_exit = True
            await task


async def _keyless(gw: Gateway, target: dict[str, Any], name: str = "aws-wi") -> httpx.Response:
    return await gw.client.put(f"/v1/connectors/{name}", json={
        "type": "aws", "auth_method": "web-identity",
        "config": {"role_arn": target["role_arn"], "endpoint_url": target["sts"].endpoint},
        "resources": [f"s3-bucket:{ALLOWED}"],
    })


def _s3(target: dict[str, Any], cred: dict[str, str]) -> Any:
    return target["moto"].boto3_client(
        "s3", aws_access_key_id=cred["aws_access_key_id"], aws_secret_access_key=cred["aws_secret_access_key"],
        aws_session_token=cred["aws_session_token"], region_name=cred["region"])


async def test_a_keyless_connector_issues_with_no_secret_anywhere(served: Gateway, aws_target: dict[str, Any]) -> None:
    gw, sts = served, aws_target["sts"]
    issuer = gw.runtime.settings.issuer_url
    sts.register_provider(issuer, [AUDIENCE])
    sts.trust(aws_target["role_arn"], issuer, ["credgate/admin_key:*", "credgate/run:*", "connector:aws-wi"])

    r = await _keyless(gw, aws_target)
    assert r.status_code == 201, r.text
    shown = (await gw.client.get("/v1/connectors/aws-wi")).json()
    assert shown["secret"] is None and shown["holds_secret"] is False
    types = {t["type"]: t for t in (await gw.client.get("/v1/connector-types")).json()["items"]}
    assert types["aws"]["keyless_auth_methods"] == ["web-identity"]

    # Discovery, as the stand-in read it: the issuer is the gateway's public URL.
    doc = (await gw.client.get("/.well-known/openid-configuration")).json()
    assert doc["issuer"] == issuer and doc["jwks_uri"] == f"{issuer}/v1/jwks"

    r = await gw.client.post("/v1/credentials", json={"connector": "aws-wi", "resource": f"s3-bucket:{ALLOWED}",
                                                      "ttl_seconds": 900})
    assert r.status_code == 200, (r.text, sts.rejected, sts.why)
    issued = r.json()
    body = await asyncio.to_thread(lambda: _s3(aws_target, issued["credential"]).get_object(
        Bucket=ALLOWED, Key="report.txt")["Body"].read())
    assert body == f"in {ALLOWED}".encode()
    claims = sts.accepted[-1]
    assert claims["iss"] == issuer and claims["aud"] == AUDIENCE
    assert claims["sub"] == "credgate/admin_key:bootstrap" and claims["lease"] == issued["lease_id"]
    assert claims["exp"] - claims["iat"] <= 3600 and claims["cg_connector"] == "aws-wi"

    # A run's credential names the run: sub and the run claim.
    run = (await gw.client.post("/v1/runs/run-wi/token", json={"connectors": ["aws-wi"],
                                                              "resources": [f"s3-bucket:{ALLOWED}"]})).json()
    async with httpx.AsyncClient(base_url=str(gw.client.base_url),
                                 headers={"Authorization": f"Bearer {run['token']}"}) as pipeline:
        r = await pipeline.post("/v1/runs/run-wi/credentials", json={"connector": "aws-wi",
                                                                      "resource": f"s3-bucket:{ALLOWED}"})
        assert r.status_code == 200, r.text
    assert sts.accepted[-1]["sub"] == "credgate/run:run-wi" and sts.accepted[-1]["run"] == "run-wi"

    # Outside the connector's patterns: refused before any token is minted or sent.
    before = len(sts.accepted) + len(sts.rejected)
    r = await gw.client.post("/v1/credentials", json={"connector": "aws-wi", "resource": f"s3-bucket:{OTHER}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "resource_not_allowed"
    assert len(sts.accepted) + len(sts.rejected) == before

    verified = (await gw.client.post("/v1/connectors/aws-wi/verify")).json()
    assert verified["ok"] is True and "No secret is held" in verified["message"], (verified, sts.rejected, sts.why)
    assert sts.accepted[-1]["sub"] == "connector:aws-wi"


async def test_the_trust_decides_and_rotation_is_followed(served: Gateway, aws_target: dict[str, Any]) -> None:
    gw, sts = served, aws_target["sts"]
    issuer = gw.runtime.settings.issuer_url
    sts.register_provider(issuer, [AUDIENCE])
    sts.trust(aws_target["role_arn"], issuer, ["credgate/run:*"])  # admins are not trusted by this role
    assert (await _keyless(gw, aws_target)).status_code == 201
    r = await gw.client.post("/v1/credentials", json={"connector": "aws-wi", "resource": f"s3-bucket:{ALLOWED}"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "target_error", r.text
    assert "AccessDenied" in r.json()["error"]["message"] and sts.rejected[-1] == "AccessDenied"
    lease = (await gw.client.get("/v1/leases", params={"connector": "aws-wi"})).json()["items"]
    assert all(item["state"] != "active" for item in lease)

    # A new signing key: the stand-in fetches the JWKS again for the new kid, and trusts it.
    sts.trust(aws_target["role_arn"], issuer, ["credgate/admin_key:*"])
    assert (await gw.client.post("/v1/keys/signing/rotate")).status_code == 200
    r = await gw.client.post("/v1/credentials", json={"connector": "aws-wi", "resource": f"s3-bucket:{ALLOWED}"})
    assert r.status_code == 200, (r.text, sts.rejected, sts.why)
    assert sts.accepted[-1]["sub"] == "credgate/admin_key:bootstrap"


async def test_a_forged_or_misused_token_gets_nothing(served: Gateway, aws_target: dict[str, Any]) -> None:
    gw, sts = served, aws_target["sts"]
    issuer = gw.runtime.settings.issuer_url
    sts.register_provider(issuer, [AUDIENCE])
    sts.trust(aws_target["role_arn"], issuer, ["credgate/*"])
    kid = gw.runtime.signing.jwks()["keys"][0]["kid"]
    # The same claims and kid, signed with a key that is not the gateway's: STS refuses it.
    forger = RSAKey.generate_key(2048, parameters={"kid": kid})
    import time

    now = int(time.time())
    forged = jwt.encode({"alg": "RS256", "kid": kid, "typ": "JWT"},
                        {"iss": issuer, "sub": "credgate/admin_key:bootstrap", "aud": AUDIENCE,
                         "iat": now, "nbf": now, "exp": now + 300}, forger)
    unsigned = sts_client(aws_target)
    with pytest.raises(Exception) as info:
        await asyncio.to_thread(unsigned.assume_role_with_web_identity, RoleArn=aws_target["role_arn"],
                                RoleSessionName="forger", WebIdentityToken=forged)
    assert "InvalidIdentityToken" in str(info.value)

    # A real web-identity token is no bearer token at the gateway (its audience is the cloud's).
    from gateway.identity.workload import WebIdentityTokens

    token = await WebIdentityTokens(gw.runtime.signing, issuer, "aws-wi").token(
        audience=AUDIENCE, subject="credgate/admin_key:bootstrap")
    r = await gw.client.get("/v1/connectors", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401


def sts_client(target: dict[str, Any]) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    return boto3.session.Session().client("sts", region_name="us-east-1", endpoint_url=target["sts"].endpoint,
                                          config=Config(signature_version=UNSIGNED))


async def test_keyless_and_keyed_auth_methods_are_told_apart(gateway: Gateway) -> None:
    r = await gateway.client.put("/v1/connectors/aws-x", json={
        "type": "aws", "auth_method": "web-identity", "secret": "local/aws/keys",
        "config": {"role_arn": "arn:aws:iam::123456789012:role/x"}, "resources": ["aws-generic"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "secret_not_used"
    r = await gateway.client.put("/v1/connectors/aws-y", json={
        "type": "aws", "auth_method": "iam-role",
        "config": {"role_arn": "arn:aws:iam::123456789012:role/x"}, "resources": ["aws-generic"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "secret_required"
    r = await gateway.client.put("/v1/connectors/aws-z", json={
        "type": "aws", "auth_method": "web-identity", "config": {}, "resources": ["aws-generic"]})
    assert r.status_code == 422 and r.json()["error"]["code"] in ("invalid_connector_config", "connector_invalid")
