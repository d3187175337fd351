"""The azure connector against the Entra + Blob stand-in (tests/standins/entra_storage.py, one
HTTPS server for the module), driven by the vendor's clients: azure-identity inside the
connector, azure-storage-blob to use the SAS it issues (and, independently of credgate, to
request a delegation key and sign a SAS, which checks the stand-in against Microsoft's own SDK).

Web-identity tests use tests/services/workload_issuer.py as the gateway's issuer: a real RSA key
whose discovery document and JWKS the stand-in fetches, as Entra does.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, quote

import httpx
import jwt
import pytest

from connectors.azure import (
    SAS_VERSION,
    AzureConnector,
    AzureWebIdentityMaterial,
    parse_resource,
    sign_sas,
)
from connectors.base import (
    IssueRequest,
    Issued,
    ResourceNotSupported,
    Revocability,
    ServiceConnector,
    TargetError,
    TargetUnreachable,
    is_keyless,
)
from gateway.errors import NotRenewable, ValidationFailed
from tests.services.pgcluster import free_port
from tests.services.workload_issuer import WorkloadIssuer
from tests.standins.azure_keyvault import new_rsa_key, pem_of, self_signed
from tests.standins.entra_storage import EntraStorageStandIn

ACCOUNT = "cgacct"
ALLOWED, OTHER = "allowed", "other"
SUB = "3f1c2b7e-0a4d-4a8e-9a52-6c1d2e3f4a5b"


@dataclass
class Azure:
    s: EntraStorageStandIn
    secret_app: tuple[str, str]  # role rwdc on ACCOUNT
    reader_app: tuple[str, str]  # role r only on ACCOUNT
    cert_app: tuple[str, bytes]  # role rwdc on ACCOUNT

    def config(self, client_id: str, **extra: Any) -> dict[str, Any]:
        return {"tenant_id": self.s.tenant_id, "client_id": client_id, "authority": self.s.authority,
                "ca_bundle": self.s.ca_file, "blob_endpoint": self.s.blob_endpoint(),
                "arm_endpoint": self.s.arm_endpoint, **extra}


@pytest.fixture(scope="module")
def entra() -> Iterator[Azure]:
    s = EntraStorageStandIn().start()
    secret_app, reader_app, cert_app = s.add_secret_app(), s.add_secret_app(), s.add_certificate_app()
    s.grant(secret_app[0], ACCOUNT, "rwdc")
    s.grant(reader_app[0], ACCOUNT, "r")
    s.grant(cert_app[0], ACCOUNT, "rwdc")
    s.seed(ACCOUNT, ALLOWED, {"report.txt": b"in allowed"})
    s.seed(ACCOUNT, OTHER, {"report.txt": b"in other"})
    yield Azure(s, secret_app, reader_app, cert_app)
    s.stop()


@pytest.fixture(scope="module")
def issuer() -> Iterator[WorkloadIssuer]:
    iss = WorkloadIssuer().start()
    yield iss
    iss.stop()


def secret_connector(az: Azure, app: tuple[str, str] | None = None, name: str = "az", **config: Any) -> AzureConnector:
    client_id, secret = app or az.secret_app
    return AzureConnector(az.config(client_id, **config), "service-principal", {"client_secret": secret}, name=name)


def lease(conn: AzureConnector, resource: str, *, principal: str = "", run_id: str | None = None,
          ttl: timedelta = timedelta(hours=1)) -> IssueRequest:
    lease_id = "L" + secrets.token_hex(6)
    return IssueRequest(lease_id=lease_id, resource=resource, ttl=ttl, expires_at=datetime.now(UTC) + ttl,
                        revoke_state=conn.plan(lease_id, resource), principal=principal, run_id=run_id)


def container_client(az: Azure, cred: dict[str, str], container: str | None = None) -> Any:
    from azure.storage.blob import ContainerClient

    url = cred["container_url"] if container is None else cred["container_url"].rsplit("/", 1)[0] + "/" + container
    return ContainerClient.from_container_url(f"{url}?{cred['sas_token']}", connection_verify=az.s.ca_file,
                                              retry_total=0)


def storage_error_code(fn: Any) -> str | None:
    """Call ``fn``; the Azure Storage error code it failed with, None if it succeeded."""
    from azure.core.exceptions import HttpResponseError

    try:
        fn()
    except HttpResponseError as exc:
        return exc.error_code
    return None


def with_sas_field(cred: dict[str, str], **changes: str) -> dict[str, str]:
    fields = dict(parse_qsl(cred["sas_token"], keep_blank_values=True))
    fields.update(changes)
    return {**cred, "sas_token": urlencode(fields, quote_via=quote, safe="")}


def access_claims(az: Azure, token: str, audience: str) -> dict[str, Any]:
    """The claims of an access token, its signature verified with the stand-in's published key."""
    key = jwt.PyJWKSet.from_dict(az.s.public_jwks()).keys[0].key
    return jwt.decode(token, key, algorithms=["RS256"], audience=audience)


# -- pure ---------------------------------------------------------------------------------------


def test_metadata() -> None:
    assert set(AzureConnector.auth_methods) == {"service-principal", "web-identity"}
    assert is_keyless(AzureConnector.auth_methods["web-identity"]) and is_keyless(AzureWebIdentityMaterial)
    assert not is_keyless(AzureConnector.auth_methods["service-principal"])
    assert AzureConnector.resource_types == ("azure-subscription", "key-vault", "blob-container")
    assert AzureConnector.revocability is Revocability.EXPIRY_ONLY and AzureConnector.renewable is False


@pytest.mark.parametrize(("resource", "expected"), [
    (f"azure-subscription:{SUB}", ("azure-subscription", (SUB,))),
    (f"azure-subscription:{SUB.upper()}", ("azure-subscription", (SUB,))),
    ("key-vault:My-Vault1", ("key-vault", ("my-vault1",))),
    ("blob-container:cgacct/data-2024", ("blob-container", ("cgacct", "data-2024"))),
])
def test_resources_parsed(resource: str, expected: tuple[str, tuple[str, ...]]) -> None:
    assert parse_resource(resource) == expected


@pytest.mark.parametrize("resource", [
    "azure-subscription:not-a-guid", "key-vault:1vault", "key-vault:a--b", "key-vault:ab",
    "blob-container:cgacct", "blob-container:CGacct/box", "blob-container:cgacct/Box", "blob-container:cgacct/a--b",
    "blob-container:cgacct/box/blob", "s3-bucket:x", "", "key-vault",
])
def test_bad_resources_refused(resource: str) -> None:
    with pytest.raises(ResourceNotSupported):
        parse_resource(resource)


def test_config_and_material_are_checked() -> None:
    base = {"tenant_id": "contoso.onmicrosoft.com", "client_id": SUB}
    ok = AzureConnector({**base, "blob_permissions": "lwr"}, "service-principal", {"client_secret": "s"})
    assert ok.config.blob_permissions == "rwl"  # Azure's order
    assert isinstance(ok, ServiceConnector)
    pem = pem_of(key := new_rsa_key(), self_signed(key, "x")).decode()
    assert AzureConnector(base, "service-principal", {"client_certificate": pem})
    bad = [
        (base, {"client_secret": "s", "client_certificate": pem}),  # both
        (base, {}),  # neither
        (base, {"client_certificate": "-----BEGIN nonsense"}),
        ({**base, "blob_endpoint": "http://{account}.blob.core.windows.net"}, {"client_secret": "s"}),
        ({**base, "blob_endpoint": "https://blob.example"}, {"client_secret": "s"}),  # no {account}
        ({**base, "blob_permissions": "rz"}, {"client_secret": "s"}),
        ({**base, "blob_permissions": "rr"}, {"client_secret": "s"}),
        ({**base, "federated_subject": "anyone"}, {"client_secret": "s"}),
        ({**base, "client_id": "not-a-guid"}, {"client_secret": "s"}),
    ]
    for config, material in bad:
        with pytest.raises(ValidationFailed) as err:
            AzureConnector(config, "service-principal", material)
        assert "nonsense" not in str(err.value)
    with pytest.raises(ValidationFailed):
        AzureConnector(base, "web-identity", {"client_secret": "s"})  # keyless: no material


def test_plan_is_pure_and_names_the_scope() -> None:
    conn = AzureConnector({"tenant_id": "t", "client_id": SUB}, "service-principal", {"client_secret": "s"})
    assert conn.plan("L1", "blob-container:cgacct/box") == {
        "resource_type": "blob-container", "scope": "https://storage.azure.com/.default",
        "auth_method": "service-principal", "permissions": "r"}
    assert conn.plan("L1", f"azure-subscription:{SUB}")["scope"] == "https://management.azure.com/.default"
    assert conn.plan("L1", "key-vault:kv1")["scope"] == "https://vault.azure.net/.default"


def test_sas_signature_equals_azure_storage_blob_generator() -> None:
    """The connector's string-to-sign, checked against Microsoft's own SDK (not the stand-in):
    the same key, times and permissions give the same ``sig``."""
    from azure.storage.blob import UserDelegationKey, generate_container_sas

    key = UserDelegationKey()
    key.signed_oid, key.signed_tid = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
    key.signed_start, key.signed_expiry = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"
    key.signed_service, key.signed_version = "b", SAS_VERSION
    key.value = base64.b64encode(secrets.token_bytes(32)).decode()
    start, expiry = datetime(2026, 1, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 2, tzinfo=UTC)
    vendor = dict(parse_qsl(generate_container_sas(
        "cgacct", "box", user_delegation_key=key, permission="rl", start=start, expiry=expiry, protocol="https")))
    assert vendor["sv"] == SAS_VERSION  # the SDK signs the version the connector implements
    ours = {"sp": "rl", "st": "2026-01-01T01:00:00Z", "se": "2026-01-01T02:00:00Z", "skoid": key.signed_oid,
            "sktid": key.signed_tid, "skt": key.signed_start, "ske": key.signed_expiry, "sks": "b",
            "skv": SAS_VERSION, "spr": "https", "sv": SAS_VERSION, "sr": "c"}
    assert {k: vendor[k] for k in ours} == ours
    assert sign_sas(ours, "/blob/cgacct/box", key.value) == vendor["sig"]
    assert sign_sas(ours, "/blob/cgacct/other", key.value) != vendor["sig"]


async def test_renew_refused_revoke_noop_and_no_listing() -> None:
    conn = AzureConnector({"tenant_id": "t", "client_id": SUB}, "service-principal", {"client_secret": "s"})
    with pytest.raises(NotRenewable):
        await conn.renew({}, datetime.now(UTC))
    assert await conn.revoke({}) is None
    for kind in ("blob-container", "key-vault", "nothing"):  # before any call: no target configured
        with pytest.raises(ResourceNotSupported):
            await conn.list_resources(kind)


# -- the stand-in, checked with the vendor's clients alone -----------------------------------------


def test_standin_with_vendor_clients_only(entra: Azure) -> None:
    """azure-identity + azure-storage-blob, no credgate code: a delegation key from the stand-in,
    a SAS signed by the SDK, accepted on its container and refused on another or tampered."""
    from azure.identity import ClientSecretCredential
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    client_id, secret = entra.secret_app
    cred = ClientSecretCredential(entra.s.tenant_id, client_id, secret, authority=entra.s.authority,
                                  disable_instance_discovery=True, connection_verify=entra.s.ca_file)
    service = BlobServiceClient(f"https://{entra.s.authority}/{ACCOUNT}", credential=cred,
                                connection_verify=entra.s.ca_file)
    now = datetime.now(UTC)
    key = service.get_user_delegation_key(now - timedelta(minutes=5), now + timedelta(hours=1))
    assert key.signed_oid == entra.s.object_id(client_id) and key.signed_tid == entra.s.tenant_id
    sas = generate_container_sas(ACCOUNT, ALLOWED, user_delegation_key=key,
                                 permission=ContainerSasPermissions(read=True), expiry=now + timedelta(hours=1))
    good = {"container_url": f"https://{entra.s.authority}/{ACCOUNT}/{ALLOWED}", "sas_token": sas}
    assert container_client(entra, good).download_blob("report.txt").readall() == b"in allowed"
    assert storage_error_code(lambda: container_client(entra, good, OTHER).download_blob("report.txt").readall()) \
        == "AuthenticationFailed"
    forged = with_sas_field(good, sig=base64.b64encode(b"x" * 32).decode())
    assert storage_error_code(lambda: container_client(entra, forged).download_blob("report.txt").readall()) \
        == "AuthenticationFailed"


def test_standin_delegation_key_needs_a_storage_token(entra: Azure) -> None:
    from azure.identity import ClientSecretCredential

    client_id, secret = entra.secret_app
    cred = ClientSecretCredential(entra.s.tenant_id, client_id, secret, authority=entra.s.authority,
                                  disable_instance_discovery=True, connection_verify=entra.s.ca_file)
    body = "<KeyInfo><Expiry>2099-01-01T00:00:00Z</Expiry></KeyInfo>"
    url = f"https://{entra.s.authority}/{ACCOUNT}/?restype=service&comp=userdelegationkey"
    for scope, status in (("https://management.azure.com/.default", 401), ("https://storage.azure.com/.default", 400)):
        token = cred.get_token(scope).token
        r = httpx.post(url, content=body, headers={"Authorization": f"Bearer {token}"}, verify=ssl.create_default_context(cafile=entra.s.ca_file))
        assert r.status_code == status, r.text  # a management token is refused; a storage one reaches the 7-day check
    r = httpx.post(url, content=body, headers={"Authorization": "Bearer forged.token.here"}, verify=ssl.create_default_context(cafile=entra.s.ca_file))
    assert r.status_code == 401
    # Resource Manager wants a management token: a storage one is refused there.
    storage = cred.get_token("https://storage.azure.com/.default").token
    r = httpx.get(f"{entra.s.arm_endpoint}/subscriptions?api-version=2022-12-01",
                  headers={"Authorization": f"Bearer {storage}"}, verify=ssl.create_default_context(cafile=entra.s.ca_file))
    assert r.status_code == 401


# -- service-principal -------------------------------------------------------------------------------


async def test_blob_sas_reads_its_container_only(entra: Azure) -> None:
    conn = secret_connector(entra)
    issued = await conn.issue(req := lease(conn, f"blob-container:{ACCOUNT}/{ALLOWED}"))
    cred = issued.credential
    assert cred["container_url"] == f"https://{entra.s.authority}/{ACCOUNT}/{ALLOWED}"
    assert cred["permissions"] == "r" and "sig=" in cred["sas_token"] and "sr=c" in cred["sas_token"]
    assert abs((issued.expires_at - req.expires_at).total_seconds()) < 1  # se is the lease's expiry
    assert cred["sas_token"] not in repr(issued) and dict(parse_qsl(cred["sas_token"]))["sig"] not in repr(issued)

    def read(c: dict[str, str], container: str | None = None) -> Any:
        return lambda: container_client(entra, c, container).download_blob("report.txt").readall()

    assert read(cred)() == b"in allowed"
    assert storage_error_code(lambda: container_client(entra, cred).upload_blob("new.txt", b"x")) \
        == "AuthorizationPermissionMismatch"  # sp=r
    assert storage_error_code(read(cred, OTHER)) == "AuthenticationFailed"  # container A's SAS on B
    assert storage_error_code(read(with_sas_field(cred, sp="rw"))) == "AuthenticationFailed"  # widened sp
    sig = dict(parse_qsl(cred["sas_token"]))["sig"]
    tampered = base64.b64encode(bytes([base64.b64decode(sig)[0] ^ 1]) + base64.b64decode(sig)[1:]).decode()
    assert storage_error_code(read(with_sas_field(cred, sig=tampered))) == "AuthenticationFailed"
    assert entra.s.blob(ACCOUNT, ALLOWED, "new.txt") is None


async def test_expired_sas_is_refused_even_when_correctly_signed(entra: Azure) -> None:
    """``se`` in the past, re-signed with the real delegation key (read behind the API): the
    signature is right, the expiry check alone refuses it."""
    conn = secret_connector(entra)
    cred = (await conn.issue(lease(conn, f"blob-container:{ACCOUNT}/{ALLOWED}"))).credential
    fields = dict(parse_qsl(cred["sas_token"]))
    value = next(v for k, (v, _) in entra.s._keys.items() if k[1] == fields["skoid"] and k[3] == fields["ske"])
    past = {k: v for k, v in fields.items() if k != "sig"} | {"se": "2020-01-01T00:00:00Z", "st": "2019-12-31T00:00:00Z"}
    past["sig"] = sign_sas(past, f"/blob/{ACCOUNT}/{ALLOWED}", value)
    expired = {**cred, "sas_token": urlencode(past, quote_via=quote, safe="")}
    fresh = {k: v for k, v in fields.items() if k != "sig"}
    fresh["sig"] = sign_sas(fresh, f"/blob/{ACCOUNT}/{ALLOWED}", value)
    assert fresh["sig"] == fields["sig"]  # the same computation reproduces the issued signature
    assert storage_error_code(lambda: container_client(entra, expired).download_blob("report.txt").readall()) \
        == "AuthenticationFailed"


async def test_write_sas_is_bounded_by_the_apps_role(entra: Azure) -> None:
    writer = secret_connector(entra, blob_permissions="rcw")
    cred = (await writer.issue(lease(writer, f"blob-container:{ACCOUNT}/{ALLOWED}"))).credential
    assert cred["permissions"] == "rcw"
    await asyncio.to_thread(lambda: container_client(entra, cred).upload_blob("up.txt", b"written"))
    assert entra.s.blob(ACCOUNT, ALLOWED, "up.txt") == b"written"
    # The reader app holds only r on the account: its SAS claims w, Azure grants the intersection.
    reader = secret_connector(entra, entra.reader_app, blob_permissions="rw")
    rcred = (await reader.issue(lease(reader, f"blob-container:{ACCOUNT}/{ALLOWED}"))).credential
    assert storage_error_code(lambda: container_client(entra, rcred).upload_blob("up2.txt", b"x")) \
        == "AuthorizationPermissionMismatch"
    assert container_client(entra, rcred).download_blob("report.txt").readall() == b"in allowed"


async def test_delegation_key_refused_without_a_role(entra: Azure) -> None:
    app = entra.s.add_secret_app()  # no role on any account
    conn = secret_connector(entra, app)
    with pytest.raises(TargetError) as err:
        await conn.issue(lease(conn, f"blob-container:{ACCOUNT}/{ALLOWED}"))
    assert err.value.code == "target_permission_denied" and "AuthorizationPermissionMismatch" in str(err.value)


async def test_tokens_for_subscription_and_vault(entra: Azure) -> None:
    conn = secret_connector(entra)
    sub = await conn.issue(lease(conn, f"azure-subscription:{SUB}"))
    claims = access_claims(entra, sub.credential["access_token"], "https://management.azure.com")
    assert claims["appid"] == entra.secret_app[0] and claims["tid"] == entra.s.tenant_id
    assert sub.credential["subscription_id"] == SUB and sub.credential["token_type"] == "Bearer"
    kv = await conn.issue(lease(conn, "key-vault:team-kv"))
    access_claims(entra, kv.credential["access_token"], "https://vault.azure.net")
    assert kv.credential["vault_url"] == "https://team-kv.vault.azure.net"
    assert sub.expires_at <= datetime.now(UTC) + timedelta(hours=1, seconds=5)
    await conn.aclose()


async def test_certificate_auth(entra: Azure) -> None:
    client_id, pem = entra.cert_app
    conn = AzureConnector(entra.config(client_id), "service-principal", {"client_certificate": pem.decode()}, name="az")
    before = len(entra.s.token_requests)
    issued = await conn.issue(lease(conn, f"blob-container:{ACCOUNT}/{ALLOWED}"))
    assert container_client(entra, issued.credential).download_blob("report.txt").readall() == b"in allowed"
    assert (client_id, "certificate", "https://storage.azure.com") in entra.s.token_requests[before:]
    # A certificate that is not the registered one: its key signs, Entra refuses.
    other = pem_of(key := new_rsa_key(), self_signed(key, "impostor")).decode()
    impostor = AzureConnector(entra.config(client_id), "service-principal", {"client_certificate": other}, name="az")
    with pytest.raises(TargetError) as err:
        await impostor.issue(lease(impostor, "key-vault:team-kv"))
    assert err.value.code == "target_auth_failed" and "AADSTS700027" in str(err.value)
    assert "PRIVATE KEY" not in str(err.value)


async def test_wrong_secret_refused_without_leaking(entra: Azure) -> None:
    canary = "CANARY" + secrets.token_hex(8)
    conn = secret_connector(entra, (entra.secret_app[0], canary))
    with pytest.raises(TargetError) as err:
        await conn.issue(lease(conn, f"blob-container:{ACCOUNT}/{ALLOWED}"))
    assert err.value.code == "target_auth_failed" and "AADSTS7000215" in str(err.value)
    verified = await conn.verify()
    assert not verified.ok and verified.identity is None
    for text in (str(err.value), repr(err.value), verified.message, repr(conn)):
        assert canary not in text
    assert 7000215 in entra.s.refused


async def test_unreadable_ca_bundle_refused_at_start(entra: Azure, tmp_path: Any) -> None:
    await secret_connector(entra).start()
    conn = secret_connector(entra, ca_bundle=str(tmp_path / "missing.pem"))
    with pytest.raises(ValidationFailed) as err:
        await conn.start()
    assert err.value.code == "invalid_ca_bundle"


async def test_verify(entra: Azure) -> None:
    result = await secret_connector(entra).verify()
    assert result.ok and entra.secret_app[0] in (result.identity or "")


async def test_list_subscriptions_through_resource_manager(entra: Azure) -> None:
    app = entra.s.add_secret_app()
    other = "9a8b7c6d-0000-4000-8000-000000000001"
    entra.s.add_subscription(app[0], SUB)
    entra.s.add_subscription(app[0], other)
    entra.s.add_subscription(entra.reader_app[0], "9a8b7c6d-0000-4000-8000-0000000000ff")  # not this app's
    conn = secret_connector(entra, app)
    assert await conn.list_resources("azure-subscription") == sorted(
        [f"azure-subscription:{SUB}", f"azure-subscription:{other}"])
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("key-vault")
    bad = secret_connector(entra, (app[0], "wrong"))
    with pytest.raises(TargetError) as err:
        await bad.list_resources("azure-subscription")
    assert err.value.code == "target_auth_failed"


async def test_unreachable_authority_and_blob_service(entra: Azure) -> None:
    port = free_port("127.0.0.1")
    conn = secret_connector(entra, authority=f"127.0.0.1:{port}")
    with pytest.raises(TargetUnreachable):
        await conn.issue(lease(conn, f"azure-subscription:{SUB}"))
    conn = secret_connector(entra, blob_endpoint=f"https://127.0.0.1:{port}/{{account}}")
    with pytest.raises(TargetUnreachable):
        await conn.issue(lease(conn, f"blob-container:{ACCOUNT}/{ALLOWED}"))


# -- web-identity ------------------------------------------------------------------------------------------


def wi_connector(az: Azure, issuer: WorkloadIssuer | None, client_id: str, name: str, **config: Any) -> AzureConnector:
    conn = AzureConnector(az.config(client_id, **config), "web-identity", {}, name=name)
    conn.identity = issuer
    return conn


async def test_web_identity_fixed_connector_subject(entra: Azure, issuer: WorkloadIssuer) -> None:
    client_id = entra.s.add_federated_app(issuer.issuer, "connector:az-wi")
    entra.s.grant(client_id, ACCOUNT, "r")
    conn = wi_connector(entra, issuer, client_id, "az-wi")
    req = lease(conn, f"blob-container:{ACCOUNT}/{ALLOWED}", principal="credgate/run:R1", run_id="R1")
    issued = await conn.issue(req)
    assert container_client(entra, issued.credential).download_blob("report.txt").readall() == b"in allowed"
    minted = issuer.issued[-1]
    assert minted["sub"] == "connector:az-wi" and minted["aud"] == "api://AzureADTokenExchange"
    assert minted["run"] == "R1" and minted["lease"] == req.lease_id
    assert (client_id, "workload_identity", "https://storage.azure.com") in entra.s.token_requests
    assert (await conn.verify()).ok


async def test_web_identity_principal_subject_must_match_exactly(entra: Azure, issuer: WorkloadIssuer) -> None:
    client_id = entra.s.add_federated_app(issuer.issuer, "credgate/run:R1")
    conn = wi_connector(entra, issuer, client_id, "az-p", federated_subject="principal")
    ok = await conn.issue(lease(conn, f"azure-subscription:{SUB}", principal="credgate/run:R1", run_id="R1"))
    assert access_claims(entra, ok.credential["access_token"], "https://management.azure.com")["appid"] == client_id
    assert issuer.issued[-1]["sub"] == "credgate/run:R1"
    with pytest.raises(TargetError) as err:
        await conn.issue(lease(conn, f"azure-subscription:{SUB}", principal="credgate/run:R2", run_id="R2"))
    assert err.value.code == "target_auth_failed" and "AADSTS700213" in str(err.value)


async def test_web_identity_forged_assertion_refused(entra: Azure, issuer: WorkloadIssuer) -> None:
    client_id = entra.s.add_federated_app(issuer.issuer, "connector:az-forged")
    conn = wi_connector(entra, issuer, client_id, "az-forged")
    issuer.rogue = True  # same iss, same kid, another key
    try:
        with pytest.raises(TargetError) as err:
            await conn.issue(lease(conn, "key-vault:team-kv"))
    finally:
        issuer.rogue = False
    assert err.value.code == "target_auth_failed" and "AADSTS700027" in str(err.value)
    assert isinstance(await conn.issue(lease(conn, "key-vault:team-kv")), Issued)  # the real key passes


async def test_web_identity_needs_the_gateway_as_issuer(entra: Azure) -> None:
    client_id = entra.s.add_federated_app("http://127.0.0.1:1", "connector:none")
    for mode in ("connector", "principal"):
        conn = wi_connector(entra, None, client_id, "none", federated_subject=mode)
        with pytest.raises(TargetError) as err:
            await conn.issue(lease(conn, "key-vault:team-kv", principal="p"))
        assert err.value.code == "oidc_issuer_unconfigured"


def test_sanitize_keeps_class_status_and_aadsts_never_the_message() -> None:
    from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError

    secret = "CANARY" + secrets.token_hex(6)
    refused = ClientAuthenticationError(message=f"AADSTS7000215: Invalid client secret {secret} provided.")
    assert AzureConnector.sanitize(refused) == "ClientAuthenticationError (AADSTS7000215)"
    try:
        try:
            raise ServiceRequestError(f"cannot connect to https://{secret}.example")
        except ServiceRequestError as inner:
            raise ClientAuthenticationError(message=f"failed {secret}") from inner
    except ClientAuthenticationError as wrapped:
        text = AzureConnector.sanitize(wrapped)
    assert text == "ClientAuthenticationError from ServiceRequestError" and secret not in text
    assert AzureConnector.sanitize(ValueError(secret)) == "ValueError"
