"""The registry connector: distribution token auth against the registry v2 stand-in, ECR on moto.

Token auth: tokens are used the way a docker client uses them (httpx: there is no official
Python registry client and no docker CLI here) against tests/standins/registry_v2.py, which
verifies every token's chain/kid, signature, iss, aud, exp/nbf and access claim.

ECR: moto in server mode (the session fixture ``moto_server``) serves ``GetAuthorizationToken``
and ``DescribeRepositories``; it has no registry endpoint, so an ECR token is checked for its
shape (``AWS:<password>``, the proxy endpoint) and not used for a pull. moto does not enforce
session policies: the per-repository scoping is proven by evaluating the policy document.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from connectors.base import (
    IssueRequest,
    ResourceNotSupported,
    ResourceRejected,
    Revocability,
    ServiceConnector,
    TargetError,
    TargetUnreachable,
)
from connectors.registry import (
    ECR_TOKEN_LIFETIME,
    RegistryConfig,
    RegistryConnector,
    ecr_session_policy,
    libtrust_kid,
    parse_resource,
)
from gateway.errors import NotRenewable, ValidationFailed
from tests.services.pgcluster import free_port
from tests.standins.registry_v2 import RegistryV2StandIn, make_chain

ISSUER, SERVICE = "credgate-test-issuer", "registry.test"
REPO, OTHER = "team/app", "team/other"
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}'
CANARY = "CANARY" + secrets.token_hex(8)


@dataclass
class PKI:
    ca: str
    key: str
    chain: str


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI(*make_chain("ec"))


@pytest.fixture(scope="module")
def registry(pki: PKI) -> Iterator[RegistryV2StandIn]:
    server = RegistryV2StandIn(root_bundle_pem=pki.ca, issuer=ISSUER, service=SERVICE).start()
    server.put_manifest(REPO, "v1", MANIFEST)
    server.put_manifest(OTHER, "v1", MANIFEST)
    try:
        yield server
    finally:
        server.stop()


def token_connector(registry: RegistryV2StandIn, pki: PKI, **config: Any) -> RegistryConnector:
    material = {"private_key": config.pop("_key", pki.key), "certificate_chain": config.pop("_chain", pki.chain)}
    cfg = {"registry_url": registry.url, "service": SERVICE, "issuer": ISSUER} | config
    return RegistryConnector(RegistryConfig(**cfg), "token", material, name="reg")


def request(conn: RegistryConnector, resource: str, *, ttl: timedelta = timedelta(minutes=15),
            principal: str = "owner:alice", lease_id: str | None = None) -> IssueRequest:
    lease_id = lease_id or "lease" + secrets.token_hex(6)
    return IssueRequest(lease_id=lease_id, resource=resource, ttl=ttl, expires_at=datetime.now(UTC) + ttl,
                        revoke_state=conn.plan(lease_id, resource), principal=principal, run_id=None)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(head))), json.loads(base64.urlsafe_b64decode(pad(body)))


# --- token auth: what the stand-in lets a token do ------------------------------------------


async def test_pull_token_pulls_and_cannot_push(registry: RegistryV2StandIn, pki: PKI) -> None:
    conn = token_connector(registry, pki)
    cred = (await conn.issue(request(conn, f"repository:{REPO}:pull"))).credential
    assert cred["registry"] == registry.url and cred["scope"] == f"repository:{REPO}:pull"
    with httpx.Client(base_url=registry.url) as http:
        got = http.get(f"/v2/{REPO}/manifests/v1", headers=bearer(cred["token"]))
        assert got.status_code == 200 and got.content == MANIFEST
        assert http.head(f"/v2/{REPO}/manifests/v1", headers=bearer(cred["token"])).status_code == 200
        pushed = http.put(f"/v2/{REPO}/manifests/v2", content=MANIFEST, headers=bearer(cred["token"]))
    assert pushed.status_code == 401
    assert 'error="insufficient_scope"' in pushed.headers["www-authenticate"]
    assert f'scope="repository:{REPO}:pull,push"' in pushed.headers["www-authenticate"]
    assert (REPO, "v2") not in registry.manifests
    await conn.aclose()


async def test_pull_push_token_pushes(registry: RegistryV2StandIn, pki: PKI) -> None:
    conn = token_connector(registry, pki)
    cred = (await conn.issue(request(conn, f"repository:{REPO}:pull+push"))).credential
    with httpx.Client(base_url=registry.url) as http:
        pushed = http.put(f"/v2/{REPO}/manifests/pushed", content=MANIFEST, headers=bearer(cred["token"]))
        assert pushed.status_code == 201, pushed.text
        assert http.get(f"/v2/{REPO}/manifests/pushed", headers=bearer(cred["token"])).content == MANIFEST
    await conn.aclose()


async def test_token_for_one_repository_is_refused_on_another(registry: RegistryV2StandIn, pki: PKI) -> None:
    conn = token_connector(registry, pki)
    cred = (await conn.issue(request(conn, f"repository:{REPO}"))).credential  # default actions: pull
    with httpx.Client(base_url=registry.url) as http:
        assert http.get(f"/v2/{REPO}/manifests/v1", headers=bearer(cred["token"])).status_code == 200
        other = http.get(f"/v2/{OTHER}/manifests/v1", headers=bearer(cred["token"]))
        prefix = http.get(f"/v2/{REPO}x/manifests/v1", headers=bearer(cred["token"]))
    assert other.status_code == 401 and 'error="insufficient_scope"' in other.headers["www-authenticate"]
    assert prefix.status_code == 401
    await conn.aclose()


async def test_unauthenticated_request_gets_the_bearer_challenge(registry: RegistryV2StandIn) -> None:
    with httpx.Client(base_url=registry.url) as http:
        base = http.get("/v2/")
        manifest = http.get(f"/v2/{REPO}/manifests/v1")
    assert base.status_code == 401
    assert base.headers["www-authenticate"] == f'Bearer realm="{registry.realm}",service="{SERVICE}"'
    assert manifest.status_code == 401
    assert f'scope="repository:{REPO}:pull"' in manifest.headers["www-authenticate"]


async def test_tampered_tokens_are_refused(registry: RegistryV2StandIn, pki: PKI) -> None:
    conn = token_connector(registry, pki)
    token = (await conn.issue(request(conn, f"repository:{REPO}:pull"))).credential["token"]
    head, body, sig = token.split(".")
    _, claims = unverified(token)
    claims["access"] = [{"type": "repository", "name": OTHER, "actions": ["pull", "push"]}]
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    # A key the registry does not trust, presenting the trusted chain in x5c: the signature fails.
    _, rogue_key, rogue_chain = make_chain("ec", ca_name="rogue CA")
    rogue = token_connector(registry, pki, check_registry=False, _key=rogue_key, _chain=rogue_chain)
    rogue_self = (await rogue.issue(request(rogue, f"repository:{REPO}:pull"))).credential["token"]
    rh, rb, rs = rogue_self.split(".")
    real_header, _ = unverified(token)
    rogue_header, _ = unverified(rogue_self)
    rogue_header["x5c"] = real_header["x5c"]
    swapped = base64.urlsafe_b64encode(json.dumps(rogue_header).encode()).rstrip(b"=").decode()
    cases = {
        "forged access claim": f"{head}.{forged_body}.{sig}",
        "flipped signature": f"{head}.{body}.{flipped}",
        "untrusted chain": rogue_self,
        "trusted x5c, rogue signature": f"{swapped}.{rb}.{rs}",
    }
    with httpx.Client(base_url=registry.url) as http:
        assert http.get(f"/v2/{REPO}/manifests/v1", headers=bearer(token)).status_code == 200  # the control
        for what, bad in cases.items():
            for path in (f"/v2/{REPO}/manifests/v1", f"/v2/{OTHER}/manifests/v1"):
                r = http.get(path, headers=bearer(bad))
                assert r.status_code == 401, what
                assert 'error="invalid_token"' in r.headers["www-authenticate"], what
    assert "x5c does not chain to the root certificate bundle" in registry.rejected
    assert "bad signature" in registry.rejected
    await conn.aclose()
    await rogue.aclose()


async def test_expired_and_not_yet_valid_tokens_are_refused(registry: RegistryV2StandIn, pki: PKI) -> None:
    conn = token_connector(registry, pki)
    access = [{"type": "repository", "name": REPO, "actions": ["pull"]}]
    expired = conn._token(subject="owner:alice", jti="j1", access=access,
                          expires_at=datetime.now(UTC) - timedelta(hours=1))
    valid = conn._token(subject="owner:alice", jti="j2", access=access,
                        expires_at=datetime.now(UTC) + timedelta(minutes=5))
    head, body, _ = valid.split(".")
    with httpx.Client(base_url=registry.url) as http:
        assert http.get(f"/v2/{REPO}/manifests/v1", headers=bearer(valid)).status_code == 200
        r = http.get(f"/v2/{REPO}/manifests/v1", headers=bearer(expired))
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert registry.rejected[-1] == "expired"
    await conn.aclose()


async def test_wrong_issuer_or_service_is_refused_at_issue(registry: RegistryV2StandIn, pki: PKI) -> None:
    for config in ({"issuer": "someone-else"}, {"service": "other.registry"}):
        conn = token_connector(registry, pki, **config)
        with pytest.raises(TargetError) as err:
            await conn.issue(request(conn, f"repository:{REPO}:pull"))
        assert err.value.code == "target_auth_failed"
        assert registry.rejected[-1] in ("wrong issuer", "wrong audience")
        await conn.aclose()


async def test_untrusted_key_fails_issue_and_verify(registry: RegistryV2StandIn, pki: PKI) -> None:
    _, key, chain = make_chain("ec", ca_name="unknown CA")
    conn = token_connector(registry, pki, _key=key, _chain=chain)
    with pytest.raises(TargetError) as err:
        await conn.issue(request(conn, f"repository:{REPO}:pull"))
    assert err.value.code == "target_auth_failed" and err.value.status == 502
    result = await conn.verify()
    assert not result.ok and "refused" in result.message
    await conn.aclose()


async def test_token_header_and_claims_follow_the_spec(registry: RegistryV2StandIn, pki: PKI) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    conn = token_connector(registry, pki)
    req = request(conn, f"repository:{REPO}:pull+push", principal="credgate/run:42", lease_id="lease-abc123")
    issued = await conn.issue(req)
    header, claims = unverified(issued.credential["token"])
    leaf = x509.load_pem_x509_certificates(pki.chain.encode())[0]
    assert header["alg"] == "ES256" and header["typ"] == "JWT"
    assert re.fullmatch(r"([A-Z2-7]{4}:){11}[A-Z2-7]{4}", header["kid"])
    assert header["kid"] == libtrust_kid(leaf.public_key())
    assert base64.b64decode(header["x5c"][0]) == leaf.public_bytes(serialization.Encoding.DER)
    assert len(header["x5c"]) == 2
    assert claims["iss"] == ISSUER and claims["aud"] == SERVICE and claims["sub"] == "credgate/run:42"
    assert claims["jti"] == "lease-abc123"
    assert claims["exp"] == int(req.expires_at.timestamp()) and issued.expires_at == req.expires_at
    assert claims["nbf"] <= claims["iat"] <= claims["exp"]
    assert claims["access"] == [{"type": "repository", "name": REPO, "actions": ["pull", "push"]}]
    assert registry.accepted[-1]["jti"] == "lease-abc123"  # the issue-time check presented this very token
    await conn.aclose()


async def test_rsa_key_signs_rs256_tokens_the_registry_accepts(pki: PKI) -> None:
    ca, key, chain = make_chain("rsa")
    server = RegistryV2StandIn(root_bundle_pem=ca, issuer=ISSUER, service=SERVICE).start()
    try:
        server.put_manifest(REPO, "v1", MANIFEST)
        conn = token_connector(server, pki, _key=key, _chain=chain)
        token = (await conn.issue(request(conn, f"repository:{REPO}:pull"))).credential["token"]
        assert unverified(token)[0]["alg"] == "RS256"
        with httpx.Client(base_url=server.url) as http:
            assert http.get(f"/v2/{REPO}/manifests/v1", headers=bearer(token)).status_code == 200
        await conn.aclose()
    finally:
        server.stop()


async def test_kid_only_tokens_verify_against_the_bundle_key(pki: PKI) -> None:
    """Without x5c the registry finds the key by its libtrust kid among its bundle's certificates."""
    leaf_only = pki.chain.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    server = RegistryV2StandIn(root_bundle_pem=leaf_only, issuer=ISSUER, service=SERVICE).start()
    try:
        server.put_manifest(REPO, "v1", MANIFEST)
        conn = token_connector(server, pki, x5c=False)
        token = (await conn.issue(request(conn, f"repository:{REPO}:pull"))).credential["token"]
        assert "x5c" not in unverified(token)[0]
        _, key, chain = make_chain("ec", ca_name="other")
        other = token_connector(server, pki, x5c=False, check_registry=False, _key=key, _chain=chain)
        foreign = (await other.issue(request(other, f"repository:{REPO}:pull"))).credential["token"]
        with httpx.Client(base_url=server.url) as http:
            assert http.get(f"/v2/{REPO}/manifests/v1", headers=bearer(token)).status_code == 200
            assert http.get(f"/v2/{REPO}/manifests/v1", headers=bearer(foreign)).status_code == 401
        assert server.rejected == ["no certificate of the root bundle has the token's kid"]
        await conn.aclose()
        await other.aclose()
    finally:
        server.stop()


async def test_registry_down_is_unreachable(pki: PKI, registry: RegistryV2StandIn) -> None:
    conn = token_connector(registry, pki, registry_url=f"http://127.0.0.1:{free_port('127.0.0.1')}")
    with pytest.raises(TargetUnreachable) as err:
        await conn.issue(request(conn, f"repository:{REPO}:pull"))
    assert err.value.status == 503
    assert not (await conn.verify()).ok
    await conn.aclose()


async def test_verify_and_list_the_catalog(registry: RegistryV2StandIn, pki: PKI) -> None:
    conn = token_connector(registry, pki)
    result = await conn.verify()
    assert result.ok and result.identity == libtrust_kid(
        __import__("cryptography.x509", fromlist=["x"]).load_pem_x509_certificates(pki.chain.encode())[0].public_key()
    )
    assert f"repository:{REPO}" in result.reachable["repository"]
    assert f"repository:{OTHER}" in await conn.list_resources("repository")
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("ecr-repository")
    await conn.aclose()


# --- pure: resources, configuration, capabilities ---------------------------------------------


def test_resources_parse_and_refuse(registry: RegistryV2StandIn, pki: PKI) -> None:
    assert parse_resource("repository:team/app") == ("repository", "team/app", None)
    assert parse_resource("repository:a/b-c__d.e:pull+push") == ("repository", "a/b-c__d.e", ("pull", "push"))
    assert parse_resource("ecr-repository:app:pull") == ("ecr-repository", "app", ("pull",))
    for bad in ("repository:Team/App", "repository:app:delete", "repository:/app", "repository:a//b",
                "repository:app:pull,push", "s3-bucket:x", "repository:", "repository:a-"):
        with pytest.raises(ResourceNotSupported):
            parse_resource(bad)
    conn = token_connector(registry, pki, default_actions="pull+push")
    assert conn.plan("l1", "repository:app") == {
        "auth_method": "token", "repository": "app", "actions": ["pull", "push"], "jti": "l1"}
    with pytest.raises(ResourceNotSupported):
        conn.validate_resource("ecr-repository:app")


def test_config_and_material_are_checked(registry: RegistryV2StandIn, pki: PKI) -> None:
    _, other_key, _ = make_chain("ec")
    with pytest.raises(ValueError, match="not private_key's"):
        token_connector(registry, pki, _key=other_key)
    with pytest.raises(ValueError, match="PEM private key"):
        token_connector(registry, pki, _key=f"-----BEGIN PRIVATE KEY-----\n{CANARY}\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValidationFailed, match="needs config"):
        RegistryConnector(RegistryConfig(registry_url=registry.url), "token",
                          {"private_key": pki.key, "certificate_chain": pki.chain})
    with pytest.raises(ValidationFailed, match="does not use"):
        token_connector(registry, pki, role_arn="arn:aws:iam::123456789012:role/x")
    conn = token_connector(registry, pki)
    assert pki.key.splitlines()[1] not in repr(conn) and pki.key.splitlines()[1] not in repr(conn._signer)


async def test_capabilities_expiry_only_not_renewable(registry: RegistryV2StandIn, pki: PKI) -> None:
    conn = token_connector(registry, pki)
    assert isinstance(conn, ServiceConnector)
    assert conn.revocability is Revocability.EXPIRY_ONLY and not conn.renewable
    assert RegistryConnector.ttl.max == ECR_TOKEN_LIFETIME
    with pytest.raises(NotRenewable):
        await conn.renew({}, datetime.now(UTC))
    assert await conn.revoke({"jti": "x"}) is None


# --- ECR on moto ------------------------------------------------------------------------------

ACCOUNT = "123456789012"
TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "sts:AssumeRole"}]}


@dataclass
class ECRAccount:
    moto: Any
    key_id: str
    secret: str
    role_arn: str
    repo_arn: str


@pytest.fixture(scope="module")
def ecr(moto_server: Any) -> ECRAccount:
    iam = moto_server.boto3_client("iam")
    tag = secrets.token_hex(3)
    iam.create_user(UserName=f"cg-ecr-{tag}")
    key = iam.create_access_key(UserName=f"cg-ecr-{tag}")["AccessKey"]
    role = iam.create_role(RoleName=f"cg-ecr-{tag}", AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]
    client = moto_server.boto3_client("ecr")
    repo = client.create_repository(repositoryName=f"{REPO}-{tag}")["repository"]
    client.create_repository(repositoryName=f"{OTHER}-{tag}")
    return ECRAccount(moto_server, key["AccessKeyId"], key["SecretAccessKey"], role["Arn"], repo["repositoryArn"])


def ecr_connector(acct: ECRAccount, secret: str | None = None, **config: Any) -> RegistryConnector:
    config.setdefault("endpoint_url", acct.moto.endpoint_url)
    material = {"aws_access_key_id": acct.key_id, "aws_secret_access_key": secret or acct.secret}
    return RegistryConnector(RegistryConfig(**config), "ecr", material, name="ecr")


def repo_name(acct: ECRAccount) -> str:
    return acct.repo_arn.split(":repository/")[1]


async def test_ecr_token_is_a_docker_login(ecr: ECRAccount) -> None:
    conn = ecr_connector(ecr)
    req = request(conn, f"ecr-repository:{repo_name(ecr)}")
    issued = await conn.issue(req)
    cred = issued.credential
    assert cred["username"] == "AWS" and cred["password"]
    assert cred["proxy_endpoint"] == f"https://{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com"
    assert cred["registry"] == f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com"
    assert cred["scoped"] == "false"  # no role_arn: the token is the material's whole identity
    # the docker login pair is exactly what ECR's authorizationToken decodes to
    raw = ecr.moto.boto3_client("ecr").get_authorization_token()["authorizationData"][0]["authorizationToken"]
    assert base64.b64decode(raw).decode() == f"AWS:{cred['password']}"
    assert issued.expires_at == req.expires_at  # the lease: shorter than the token
    # moto states a 2015 expiry; a past expiry is not believed: the documented 12 h is reported
    token_expiry = datetime.fromisoformat(cred["token_expires_at"])
    assert req.expires_at < token_expiry <= datetime.now(UTC) + ECR_TOKEN_LIFETIME
    await conn.aclose()


async def test_ecr_with_role_is_scoped_to_the_repository(ecr: ECRAccount) -> None:
    conn = ecr_connector(ecr, role_arn=ecr.role_arn)
    req = request(conn, f"ecr-repository:{repo_name(ecr)}:pull+push")
    cred = (await conn.issue(req)).credential
    assert cred["scoped"] == "true" and cred["username"] == "AWS" and cred["proxy_endpoint"]
    await conn.aclose()
    # moto keeps the session it was asked for (its state dump): the role, and the policy passed
    state = httpx.get(f"{ecr.moto.endpoint_url}/moto-api/data.json", timeout=10).json()
    (session,) = [s for s in state["sts"]["AssumedRole"] if s["session_name"] == req.revoke_state["session_name"]]
    assert session["role_arn"] == ecr.role_arn
    sent = json.loads(session["policy"])
    assert sent == ecr_session_policy(ecr.repo_arn, ("pull", "push"))

    def allows(policy: dict[str, Any], action: str, resource: str) -> bool:
        return any(
            s["Effect"] == "Allow"
            and any(fnmatch.fnmatchcase(action, a) for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
            and fnmatch.fnmatchcase(resource, s["Resource"])
            for s in policy["Statement"]
        )

    other_arn = ecr.repo_arn.replace(REPO, OTHER)
    pull = ecr_session_policy(ecr.repo_arn, ("pull",))
    both = sent
    assert allows(pull, "ecr:GetAuthorizationToken", "*")
    assert allows(pull, "ecr:BatchGetImage", ecr.repo_arn) and not allows(pull, "ecr:BatchGetImage", other_arn)
    assert not allows(pull, "ecr:PutImage", ecr.repo_arn)
    assert allows(both, "ecr:PutImage", ecr.repo_arn) and not allows(both, "ecr:PutImage", other_arn)
    assert not allows(both, "ecr:DeleteRepository", ecr.repo_arn)


async def test_ecr_missing_repository_is_rejected(ecr: ECRAccount) -> None:
    conn = ecr_connector(ecr)
    with pytest.raises(ResourceRejected) as err:
        await conn.issue(request(conn, "ecr-repository:no/such-repo"))
    assert err.value.reason == "not_found" and err.value.status == 409
    with pytest.raises(ResourceNotSupported):
        conn.validate_resource(f"repository:{REPO}")
    with pytest.raises(ResourceNotSupported):
        conn.validate_resource(f"ecr-repository:{REPO}:push")  # an ECR push needs pull too
    await conn.aclose()


async def test_ecr_verify_and_list(ecr: ECRAccount) -> None:
    conn = ecr_connector(ecr)
    result = await conn.verify()
    assert result.ok and "can't be scoped" in result.message
    assert f"ecr-repository:{repo_name(ecr)}" in result.reachable["ecr-repository"]
    assert f"ecr-repository:{repo_name(ecr)}" in await conn.list_resources("ecr-repository")
    await conn.aclose()


async def test_ecr_refused_keys_and_down_endpoint_never_show_the_secret(ecr: ECRAccount) -> None:
    conn = ecr_connector(ecr, secret=CANARY)
    ecr.moto.enable_auth()
    try:
        with pytest.raises(TargetError) as err:
            await conn.issue(request(conn, f"ecr-repository:{repo_name(ecr)}"))
        verified = await conn.verify()
    finally:
        ecr.moto.disable_auth()
    # moto's ECR answers a bare 403 (no AWS error code), so only "refused, 502" can be asserted
    assert err.value.status == 502 and not isinstance(err.value, TargetUnreachable)
    assert CANARY not in str(err.value) and CANARY not in repr(err.value)
    assert not verified.ok and CANARY not in verified.message
    assert CANARY not in repr(conn)
    await conn.aclose()
    down = ecr_connector(ecr, secret=CANARY, endpoint_url=f"http://127.0.0.1:{free_port('127.0.0.1')}")
    with pytest.raises(TargetUnreachable) as unreachable:
        await down.issue(request(down, f"ecr-repository:{repo_name(ecr)}"))
    assert CANARY not in str(unreachable.value)
    await down.aclose()
