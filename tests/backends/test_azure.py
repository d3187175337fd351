"""The ``azure`` backend beyond the shared contract: the name encoding and its 127-character
limit, integer versions over Key Vault's version ids, soft delete/recover/purge (purge
protection, a write to a soft-deleted secret), ownership and adoption, each auth method
(client secret held in ``local``, certificate, workload identity with a rotated token
file), wrong credentials, a missing permission, a stopped store, sanitised errors.

Azure can't run here: every test talks HTTPS to the stand-in
(:mod:`tests.standins.azure_keyvault`) through the real azure-keyvault-secrets and
azure-identity SDKs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.azure import NAME_MAX, AzureBackendConfig, AzureKeyVaultBackend, decode_name, encode_path
from backends.base import BackendContext, SecretRef
from gateway.errors import Conflict, NotFound, TargetError, TargetUnreachable, ValidationFailed
from tests.conftest import Gateway
from tests.standins.azure_keyvault import READ_PERMISSIONS, AzureKeyVaultStandIn

CANARY = "CANARY-azure-7c41e2"
KV_NAME = re.compile(r"^[0-9a-z-]{1,127}$")
TRICKY = [
    "a", "A", "a.b", "a_b", "a-b", "a/b", "a--b", "-", "_", ".x", "x.", "a..b", "Z9", "z9",
    "1/2/3/4/5/6/7/8/9/10/11/12", "team-a/db.password", "UPPER/lower/MiXeD", "v1.2.3_rc-1/file.tar.gz",
]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """The gateway's own store holds nothing of an azure backend's secrets: SQLite is enough."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(scope="module")
def kv() -> Iterator[AzureKeyVaultStandIn]:
    server = AzureKeyVaultStandIn().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def admin(kv: AzureKeyVaultStandIn) -> tuple[str, str]:
    return kv.add_secret_app()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}-"


def _config(kv: AzureKeyVaultStandIn, prefix: str, auth: dict[str, Any], **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "vault_url": kv.vault_url, "name_prefix": prefix, "authority_host": kv.authority, "ca_bundle": kv.ca_file,
        "verify_challenge_resource": False, "connection_timeout": 2, "read_timeout": 5, "retry_total": 0,
        "call_timeout": 10, "auth": auth,
    }
    config.update(extra)
    return config


def _secret_auth(kv: AzureKeyVaultStandIn, app: tuple[str, str]) -> dict[str, Any]:
    return {"method": "client_secret", "tenant_id": kv.tenant_id, "client_id": app[0], "secret": app[1]}


async def _direct(config: dict[str, Any], read_ref: Any = None, name: str = "az") -> AzureKeyVaultBackend:
    ctx = BackendContext(None, None, None, read_ref)  # type: ignore[arg-type]
    backend = AzureKeyVaultBackend(name, AzureBackendConfig.model_validate(config), ctx)
    await backend.start()
    return backend


def _sdk(kv: AzureKeyVaultStandIn, app: tuple[str, str]) -> Any:
    """The vendor SDK itself, to look at or change the vault behind the backend's back."""
    from azure.identity import ClientSecretCredential
    from azure.keyvault.secrets import SecretClient

    cred = ClientSecretCredential(
        kv.tenant_id, app[0], app[1], authority=kv.authority, disable_instance_discovery=True, connection_verify=kv.ca_file
    )
    return SecretClient(kv.vault_url, cred, verify_challenge_resource=False, connection_verify=kv.ca_file)


def _code(r: Any) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


# --- names ---------------------------------------------------------------------------------

_segment = st.text(alphabet="abcxyzABCXYZ0189._-", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
_paths = st.lists(_segment, min_size=1, max_size=10).map("/".join)


@settings(max_examples=400, deadline=None)
@given(_paths, _paths)
def test_the_name_encoding_round_trips_exactly_and_never_merges_two_paths(p: str, q: str) -> None:
    name = encode_path(p)
    assert re.fullmatch(r"[0-9a-z-]+", name)  # Key Vault's alphabet, and no case to lose
    assert decode_name(name) == p and decode_name(name.upper()) == p  # Key Vault compares without case
    if p != q:
        assert encode_path(q).lower() != name.lower()


def test_the_documented_encoding_and_what_is_no_encoding() -> None:
    assert encode_path("team/DB_main-1.json") == "team-0-d-b-3main-11-2json"
    for path in TRICKY:
        assert decode_name(encode_path(path)) == path
    for not_an_encoding in ["a-", "-9check", "a-x-", "a--b", "-0a", "a-0", "a-0-0b", "-2", "-2-2", "é"]:
        assert decode_name(not_an_encoding) is None, not_an_encoding


async def test_tricky_paths_round_trip_and_list_in_lexical_order(kv, admin, prefix) -> None:
    backend = await _direct(_config(kv, prefix, _secret_auth(kv, admin)))
    try:
        for i, path in enumerate(TRICKY):
            assert (await backend.put(path, {"i": str(i)}, author="t")).current_version == 1
        for i, path in enumerate(TRICKY):
            assert (await backend.get(path)).data == {"i": str(i)}
        assert (await backend.list("")).items == sorted(TRICKY)
        assert (await backend.list("a")).items == sorted(p for p in TRICKY if p.startswith("a"))
        names = [n for n in kv.names() if n.startswith(prefix)]
        assert len(names) == len(TRICKY) and all(KV_NAME.match(n) for n in names)
        assert await backend.count() == len(TRICKY)
    finally:
        await backend.aclose()


async def test_the_127_character_limit(gateway: Gateway, kv, admin, prefix) -> None:
    backend = await _direct(_config(kv, prefix, _secret_auth(kv, admin)))
    try:
        fits = "a" * (NAME_MAX - len(prefix))  # lower case encodes as itself
        assert (await backend.put(fits, {"k": "v"}, author="t")).current_version == 1
        assert len(prefix + encode_path(fits)) == NAME_MAX
        for too_long in ("a" * (NAME_MAX - len(prefix) + 1), "A" * ((NAME_MAX - len(prefix)) // 2 + 1)):
            for call in (
                backend.put(too_long, {"k": "v"}, author="t"), backend.get(too_long), backend.metadata(too_long),
                backend.delete(too_long, author="t"), backend.restore(too_long),
            ):
                with pytest.raises(ValidationFailed) as e:
                    await call
                assert e.value.code == "path_too_long"
        assert [n for n in kv.names() if n.startswith(prefix)] == [prefix + fits]
    finally:
        await backend.aclose()
    c = gateway.client
    assert (await c.put("/v1/backends/az", json={"type": "azure", "config": _config(kv, prefix, _secret_auth(kv, admin))})).status_code == 201
    r = await c.put("/v1/secrets/az/" + "B" * 80, json={"data": {"k": CANARY}})
    assert _code(r) == (422, "path_too_long") and CANARY not in r.text


# --- versions ------------------------------------------------------------------------------


async def test_versions_are_numbered_in_tags_and_old_ones_readable(kv, admin, prefix) -> None:
    backend = await _direct(_config(kv, prefix, _secret_auth(kv, admin)))
    try:
        for i in range(1, 31):  # more than one page (25) of Key Vault versions
            meta = await backend.put("app/db", {"n": str(i)}, author="alice")
            assert meta.current_version == i and meta.keys == ["n"]
        assert [v.version for v in meta.versions] == list(range(1, 31))
        assert meta.versions[0].created_by == "alice"
        raw = kv.raw_secret(prefix + encode_path("app/db"))
        assert raw is not None and sorted(int(v["tags"]["credgate:version"]) for v in raw["versions"]) == list(range(1, 31))
        assert all(re.fullmatch(r"[0-9a-f]{32}", v["id"]) for v in raw["versions"])
        assert all(v["content_type"] == "application/json" and json.loads(v["value"]) == {"n": v["tags"]["credgate:version"]} for v in raw["versions"])
        assert (await backend.get("app/db")).version == 30
        fresh = await _direct(_config(kv, prefix, _secret_auth(kv, admin)))  # nothing remembered: lists the versions
        try:
            for n in (1, 7, 26):
                got = await fresh.get("app/db", n)
                assert (got.version, got.data) == (n, {"n": str(n)})
            with pytest.raises(NotFound) as e:
                await fresh.get("app/db", 31)
            assert e.value.code == "version_not_found"
        finally:
            await fresh.aclose()
        # A version disabled in Key Vault can't be read: version_not_found, and it leaves the list.
        vid = next(v["id"] for v in raw["versions"] if v["tags"]["credgate:version"] == "7")
        _sdk(kv, admin).update_secret_properties(prefix + encode_path("app/db"), vid, enabled=False)
        with pytest.raises(NotFound) as e:
            await backend.get("app/db", 7)
        assert e.value.code == "version_not_found"
        assert 7 not in [v.version for v in (await backend.metadata("app/db")).versions]
        # The current version disabled: unreadable, and the next write does not reuse its number.
        vid = next(v["id"] for v in raw["versions"] if v["tags"]["credgate:version"] == "30")
        _sdk(kv, admin).update_secret_properties(prefix + encode_path("app/db"), vid, enabled=False)
        with pytest.raises(NotFound) as e:
            await backend.get("app/db")
        assert e.value.code == "version_not_found"
        assert (await backend.put("app/db", {"n": "31"}, author="t")).current_version == 31
        assert (await backend.get("app/db")).data == {"n": "31"}
    finally:
        await backend.aclose()


async def test_long_key_lists_do_not_fit_a_tag_and_are_read_from_the_value(kv, admin, prefix) -> None:
    backend = await _direct(_config(kv, prefix, _secret_auth(kv, admin)))
    try:
        data = {f"key_{i:03d}_{'x' * 20}": str(i) for i in range(20)}
        await backend.put("many", data, author="t")
        raw = kv.raw_secret(prefix + "many")
        assert raw is not None and "credgate:keys" not in raw["versions"][0]["tags"]
        fresh = await _direct(_config(kv, prefix, _secret_auth(kv, admin)))
        try:
            assert (await fresh.metadata("many")).keys == sorted(data)
        finally:
            await fresh.aclose()
    finally:
        await backend.aclose()


# --- soft delete, recover, purge -------------------------------------------------------------


async def test_soft_delete_recover_purge_and_a_write_to_a_deleted_secret(kv, admin, prefix) -> None:
    backend = await _direct(_config(kv, prefix, _secret_auth(kv, admin)))
    name = prefix + encode_path("d/s")
    try:
        await backend.put("d/s", {"k": "1"}, author="t")
        await backend.put("d/s", {"k": "2"}, author="t")
        await backend.delete("d/s", author="t")
        assert kv.raw_secret(name)["deleted"] is True  # type: ignore[index]
        for call in (backend.get("d/s"), backend.metadata("d/s")):
            with pytest.raises(NotFound) as e:
                await call
            assert e.value.code == "secret_deleted"
        assert (await backend.list("d/")).items == []
        assert (await backend.list("d/", include_deleted=True)).items == ["d/s"]
        await backend.delete("d/s", author="t")  # deleting a deleted secret: nothing to do
        meta = await backend.restore("d/s")
        assert meta.current_version == 2 and meta.deleted_at is None
        # A write to a soft-deleted secret: Key Vault refuses the name (409 Conflict,
        # ObjectIsDeletedButRecoverable), so the backend recovers it and writes version 3.
        await backend.delete("d/s", author="t")
        meta = await backend.put("d/s", {"k": "3"}, author="t")
        assert meta.current_version == 3 and [v.version for v in meta.versions] == [1, 2, 3]
        assert (await backend.get("d/s", 1)).data == {"k": "1"}
        # Destroy = delete + purge: every version gone; a new write starts at 1.
        await backend.delete("d/s", author="t", destroy=True)
        assert kv.raw_secret(name) is None
        with pytest.raises(NotFound) as e:
            await backend.metadata("d/s")
        assert e.value.code == "secret_not_found"
        assert (await backend.put("d/s", {"k": "new"}, author="t")).current_version == 1
        # Destroying an already soft-deleted secret purges it.
        await backend.delete("d/s", author="t")
        await backend.delete("d/s", author="t", destroy=True)
        assert kv.raw_secret(name) is None
    finally:
        await backend.aclose()


async def test_purge_protection_refuses_destroy_before_anything_changes(gateway: Gateway, kv, admin, prefix) -> None:
    c = gateway.client
    assert (await c.put("/v1/backends/az", json={"type": "azure", "config": _config(kv, prefix, _secret_auth(kv, admin))})).status_code == 201
    assert (await c.put("/v1/secrets/az/p", json={"data": {"k": "v"}})).status_code == 200
    kv.purge_protection = True
    try:
        r = await c.delete("/v1/secrets/az/p", params={"destroy": "true"})
        assert _code(r) == (409, "purge_forbidden")
        assert (await c.get("/v1/secrets/az/p")).status_code == 200  # still live, not even soft-deleted
        assert (await c.delete("/v1/secrets/az/p")).status_code == 204  # a soft delete still works
        r = await c.delete("/v1/secrets/az/p", params={"destroy": "true"})
        assert _code(r) == (409, "purge_forbidden")
        assert kv.raw_secret(prefix + "p")["deleted"] is True  # type: ignore[index]
    finally:
        kv.purge_protection = False
    assert (await c.delete("/v1/secrets/az/p", params={"destroy": "true"})).status_code == 204


# --- ownership -----------------------------------------------------------------------------------


async def test_secrets_credgate_did_not_create_are_left_alone(kv, admin, prefix) -> None:
    foreign = prefix + encode_path("foreign/x")
    kv.seed(foreign, json.dumps({"k": CANARY}), tags={"credgate:owner": "someone-else"})
    kv.seed(prefix + encode_path("plain/y"), CANARY)  # no tags at all
    backend = await _direct(_config(kv, prefix, _secret_auth(kv, admin)))
    try:
        for path in ("foreign/x", "plain/y"):
            for call, refused in (
                (backend.get(path), NotFound), (backend.metadata(path), NotFound),
                (backend.delete(path, author="t", destroy=True), NotFound),
                (backend.put(path, {"k": "overwritten"}, author="t"), Conflict),
            ):
                with pytest.raises(refused) as e:
                    await call
                assert e.value.code == "secret_not_owned" and CANARY not in str(e.value)
        assert (await backend.list("")).items == [] and await backend.count() == 0
        assert len(kv.raw_secret(foreign)["versions"]) == 1  # type: ignore[index]
    finally:
        await backend.aclose()


async def test_an_adopt_prefix_opens_foreign_secrets_and_a_foreign_write_is_flagged(kv, admin, prefix) -> None:
    kv.seed(prefix + encode_path("legacy/a"), "plain-text-value")
    kv.seed(prefix + encode_path("legacy/b"), json.dumps({"user": "u", "port": 5432}), content_type="application/json")
    backend = await _direct(_config(kv, prefix, _secret_auth(kv, admin), adopt_prefixes=["legacy/"]))
    try:
        assert (await backend.list("")).items == ["legacy/a", "legacy/b"]
        a = await backend.get("legacy/a")
        assert (a.version, a.data) == (1, {"value": "plain-text-value"})
        assert (await backend.get("legacy/b")).data == {"user": "u", "port": "5432"}
        assert (await backend.metadata("legacy/a")).current_version == 1
        meta = await backend.put("legacy/a", {"value": "mine"}, author="t")
        assert meta.current_version == 2 and [v.version for v in meta.versions] == [1, 2]
        assert (await backend.get("legacy/a", 1)).data == {"value": "plain-text-value"}
        # Someone writes into an owned secret behind credgate's back.
        kv.seed(prefix + encode_path("legacy/a"), CANARY)
        with pytest.raises(Conflict) as e:
            await backend.get("legacy/a")
        assert e.value.code == "foreign_version" and CANARY not in str(e.value)
        assert (await backend.put("legacy/a", {"value": "again"}, author="t")).current_version == 3
        assert (await backend.get("legacy/a")).data == {"value": "again"}
    finally:
        await backend.aclose()


# --- auth methods --------------------------------------------------------------------------------


async def test_through_the_api_with_the_client_secret_held_in_local(gateway: Gateway, kv, prefix, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client_id, secret = kv.add_secret_app()
    c = gateway.client
    assert (await c.put("/v1/secrets/local/azure/app", json={"data": {"secret": secret}})).status_code == 200
    ref = {"backend": "local", "path": "azure/app", "key": "secret"}
    auth = {"method": "client_secret", "tenant_id": kv.tenant_id, "client_id": client_id, "secret": ref}
    r = await c.put("/v1/backends/az", json={"type": "azure", "config": _config(kv, prefix, auth)})
    assert r.status_code == 201, r.text
    r = await c.put("/v1/secrets/az/app/db.password", json={"data": {"password": CANARY}})
    assert r.status_code == 200 and r.json()["version"] == 1 and CANARY not in r.text
    assert (await c.put("/v1/secrets/az/app/db.password", json={"data": {"password": CANARY + "2"}})).json()["version"] == 2
    r = await c.get("/v1/secrets/az/app/db.password", params={"reveal": "true", "version": 1})
    assert r.status_code == 200 and r.json()["data"] == {"password": CANARY}
    assert (await c.get("/v1/secrets/az", params={"prefix": "app/"})).json()["items"] == ["app/db.password"]
    r = await c.post("/v1/backends/az/check")
    assert r.status_code == 200 and r.json()["ok"] is True, r.text
    assert r.json()["details"] == {"list": "ok", "read": "ok", "write": "ok"}
    # No check-and-set in Key Vault: the gateway refuses it before the store.
    r = await c.put("/v1/secrets/az/app/db.password", json={"data": {"password": "x"}, "cas": 2})
    assert _code(r) == (409, "not_supported")
    assert (await c.get("/v1/secrets/az/app/db.password")).json()["current_version"] == 2
    assert (await c.delete("/v1/secrets/az/app/db.password", params={"destroy": "true"})).status_code == 204
    assert kv.raw_secret(prefix + encode_path("app/db.password")) is None
    assert ("client_secret" in {how for cid, how in kv.token_requests if cid == client_id})
    assert CANARY not in caplog.text and secret not in caplog.text


async def test_certificate_auth_inline_and_from_a_file(gateway: Gateway, kv, prefix, tmp_path) -> None:
    client_id, pem = kv.add_certificate_app()
    auth = {"method": "certificate", "tenant_id": kv.tenant_id, "client_id": client_id, "certificate": pem.decode()}
    c = gateway.client
    r = await c.put("/v1/backends/az", json={"type": "azure", "config": _config(kv, prefix, auth)})
    assert r.status_code == 201 and "PRIVATE KEY" not in r.text
    assert (await c.put("/v1/secrets/az/c", json={"data": {"k": "v"}})).status_code == 200
    cert_file = tmp_path / "app.pem"
    cert_file.write_bytes(pem)
    backend = await _direct(_config(kv, prefix, {**auth, "certificate": None, "certificate_file": str(cert_file)}))
    try:
        assert (await backend.get("c")).data == {"k": "v"}
    finally:
        await backend.aclose()
    assert [how for cid, how in kv.token_requests if cid == client_id] == ["certificate", "certificate"]
    # Another key for the same application is refused by Entra.
    _, other_pem = kv.add_certificate_app()
    backend = await _direct(_config(kv, prefix, {**auth, "certificate": other_pem.decode()}))
    try:
        with pytest.raises(TargetError) as e:
            await backend.get("c")
        assert e.value.code == "target_auth_failed" and "AADSTS700027" in e.value.message
    finally:
        await backend.aclose()


async def test_workload_identity_reads_a_rotated_token_file(tmp_path) -> None:
    own = AzureKeyVaultStandIn(token_lifetime=0).start()  # access tokens born expired: every call asks Entra
    try:
        issuer = own.add_issuer("https://oidc.cluster.test")
        subject = "system:serviceaccount:credgate:gateway"
        client_id = own.add_federated_app(issuer, subject)
        token_file = tmp_path / "azure-identity-token"

        def rotate(token: str) -> None:  # as the kubelet does: a new file swapped in
            tmp = tmp_path / "token.tmp"
            tmp.write_text(token)
            os.replace(tmp, token_file)

        rotate(issuer.mint(subject))
        auth = {"method": "workload_identity", "tenant_id": own.tenant_id, "client_id": client_id, "token_file": str(token_file)}
        backend = await _direct(_config(own, "w-", auth))
        try:
            await backend.put("s", {"k": "v"}, author="t")
            # The issuer rotates its signing key: the old token in the file no longer verifies.
            from tests.standins.azure_keyvault import new_rsa_key

            issuer.key = new_rsa_key()
            rotate(issuer.mint(subject))
            refused_before, issued_before = len(own.refused), len(own.token_requests)
            assert (await backend.get("s")).data == {"k": "v"}
            assert len(own.token_requests) > issued_before  # a new access token, for the new federated token
            assert len(own.refused) == refused_before  # the new token was read and accepted
            assert {how for cid, how in own.token_requests if cid == client_id} == {"workload_identity"}
            rotate(issuer.mint("system:serviceaccount:other:sa"))  # a subject the app does not trust
            with pytest.raises(TargetError) as e:
                await backend.get("s")
            assert e.value.code == "target_auth_failed" and "AADSTS700213" in e.value.message
            token_file.unlink()
            with pytest.raises(TargetError) as e:
                await backend.get("s")
            assert e.value.code == "target_auth_failed" and str(token_file) not in e.value.message
        finally:
            await backend.aclose()
    finally:
        own.stop()


async def test_ambient_credentials_use_the_environment(kv, admin, prefix, monkeypatch) -> None:
    monkeypatch.setenv("AZURE_TENANT_ID", kv.tenant_id)
    monkeypatch.setenv("AZURE_CLIENT_ID", admin[0])
    monkeypatch.setenv("AZURE_CLIENT_SECRET", admin[1])
    backend = await _direct(_config(kv, prefix, {"method": "ambient"}))
    try:
        await backend.put("amb", {"k": "v"}, author="t")
        assert (await backend.get("amb")).data == {"k": "v"}
    finally:
        await backend.aclose()


async def test_a_wrong_secret_is_target_auth_failed(gateway: Gateway, kv, admin, prefix, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    c = gateway.client
    wrong = {"method": "client_secret", "tenant_id": kv.tenant_id, "client_id": admin[0], "secret": CANARY}
    assert (await c.put("/v1/backends/az", json={"type": "azure", "config": _config(kv, prefix, wrong)})).status_code == 201
    r = await c.put("/v1/secrets/az/x", json={"data": {"k": CANARY}})
    assert _code(r) == (502, "target_auth_failed"), r.text
    assert CANARY not in r.text and "Invalid client secret" not in r.text and "Trace ID" not in r.text
    assert "AADSTS7000215" in r.text  # the code an operator looks up, no more
    r = await c.post("/v1/backends/az/check")
    assert r.json()["ok"] is False and r.json()["problem"] == "auth_refused" and CANARY not in r.text
    assert not [n for n in kv.names() if n.startswith(prefix)]
    assert CANARY not in caplog.text


async def test_a_missing_permission_is_reported_by_check_and_refused_on_write(gateway: Gateway, kv, admin, prefix) -> None:
    writer = await _direct(_config(kv, prefix, _secret_auth(kv, admin), owner_tag_value="team"))
    await writer.put("shared/s", {"k": "v"}, author="t")
    await writer.aclose()
    reader = kv.add_secret_app(READ_PERMISSIONS)
    c = gateway.client
    config = _config(kv, prefix, _secret_auth(kv, reader), owner_tag_value="team")
    assert (await c.put("/v1/backends/ro", json={"type": "azure", "config": config})).status_code == 201
    body = (await c.post("/v1/backends/ro/check")).json()
    assert body["ok"] is False and body["problem"] == "permission_missing"
    assert body["details"] == {"list": "ok", "read": "ok", "write": "denied"}
    r = await c.get("/v1/secrets/ro/shared/s", params={"reveal": "true"})
    assert r.status_code == 200 and r.json()["data"] == {"k": "v"}
    r = await c.put("/v1/secrets/ro/shared/s", json={"data": {"k": CANARY}})
    assert _code(r) == (502, "target_permission_denied") and CANARY not in r.text and reader[0] not in r.text
    r = await c.delete("/v1/secrets/ro/shared/s")
    assert _code(r) == (502, "target_permission_denied")
    assert (await c.get("/v1/secrets/ro/shared/s")).json()["current_version"] == 1
    nothing = kv.add_secret_app(set())
    assert (await c.put("/v1/backends/none", json={"type": "azure", "config": _config(kv, prefix, _secret_auth(kv, nothing))})).status_code == 201
    body = (await c.post("/v1/backends/none/check")).json()
    assert body["problem"] == "permission_missing" and body["details"] == {"list": "denied", "read": "denied", "write": "denied"}


def test_the_standin_refuses_like_entra_and_key_vault(kv, admin) -> None:
    """The stand-in's refusals, as a client sees them on the wire (the shapes the SDKs parse)."""
    import ssl

    import httpx

    token_url = f"https://{kv.authority}/{kv.tenant_id}/oauth2/v2.0/token"
    form = {"grant_type": "client_credentials", "client_id": admin[0], "scope": "https://vault.azure.net/.default"}
    with httpx.Client(verify=ssl.create_default_context(cafile=kv.ca_file), timeout=5) as http:
        r = http.post(token_url, data={**form, "client_secret": "wrong"})
        body = r.json()
        assert r.status_code == 401 and body["error"] == "invalid_client" and body["error_codes"] == [7000215]
        assert body["error_description"].startswith("AADSTS7000215:") and "Trace ID:" in body["error_description"]
        r = http.post(token_url, data={**form, "client_id": str(uuid.uuid4()), "client_secret": admin[1]})
        assert r.status_code == 400 and r.json()["error_codes"] == [700016]
        r = http.post(token_url, data={**form, "client_secret": admin[1], "scope": "https://storage.azure.com/.default"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
        ok = http.post(token_url, data={**form, "client_secret": admin[1]})
        assert ok.status_code == 200 and ok.json()["token_type"] == "Bearer"
        vault = f"{kv.vault_url}secrets/x/?api-version=7.5"
        r = http.get(vault)
        assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthorized"
        assert r.headers["WWW-Authenticate"] == (
            f'Bearer authorization="https://login.microsoftonline.com/{kv.tenant_id}", resource="https://vault.azure.net"'
        )
        token = ok.json()["access_token"]
        forged = token[: token.rindex(".") + 1] + ("A" if token[-1] != "A" else "B") * 8
        assert http.get(vault, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
        r = http.get(vault, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "SecretNotFound"
        r = http.get(f"{kv.vault_url}secrets/x/", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "BadParameter"  # no api-version


# --- faults ------------------------------------------------------------------------------------------


async def test_a_stopped_store_is_a_503_with_retry_after_and_recovers(gateway: Gateway, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    own = AzureKeyVaultStandIn().start()  # its own: stopping it must not disturb the other tests
    try:
        app = own.add_secret_app()
        c = gateway.client
        assert (await c.put("/v1/backends/az", json={"type": "azure", "config": _config(own, "s-", _secret_auth(own, app))})).status_code == 201
        assert (await c.put("/v1/secrets/az/s", json={"data": {"k": CANARY}})).status_code == 200
        own.stop()
        for r in (
            await c.get("/v1/secrets/az/s", params={"reveal": "true"}),
            await c.put("/v1/secrets/az/s", json={"data": {"k": CANARY}}),
            await c.get("/v1/secrets/az"),
        ):
            assert _code(r) == (503, "backend_unavailable"), r.text
            assert int(r.headers["Retry-After"]) >= 1 and CANARY not in r.text
        r = await c.post("/v1/backends/az/check")
        assert r.json()["ok"] is False and r.json()["problem"] == "unreachable"
        assert (await c.get("/healthz")).status_code == 200
        own.start()  # same port, same data
        r = await c.get("/v1/secrets/az/s", params={"reveal": "true"})
        assert r.status_code == 200 and r.json()["data"] == {"k": CANARY} and r.json()["current_version"] == 1
    finally:
        own.stop()
    assert CANARY not in caplog.text


async def test_an_unreachable_authority_is_unreachable_not_an_auth_failure(kv, admin, prefix) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    backend = await _direct(_config(kv, prefix, _secret_auth(kv, admin), authority_host=f"127.0.0.1:{dead}"))
    try:
        with pytest.raises(TargetUnreachable):
            await backend.get("x")
    finally:
        await backend.aclose()


async def test_a_slow_store_times_out_and_an_abandoned_write_still_holds_its_number(kv, admin, prefix) -> None:
    backend = await _direct(_config(kv, prefix, _secret_auth(kv, admin), call_timeout=0.3))
    try:
        kv.delay = 0.5
        try:
            with pytest.raises(TargetUnreachable):
                await backend.list("")
            # A caller gives up on a write (the mounts' deadline); its request is on the wire.
            with pytest.raises(TargetUnreachable):
                await backend.put("slow", {"w": "first"}, author="t")
        finally:
            kv.delay = 0.0
        # The next writer of the path waits for that write to end, then takes the next number.
        meta = await backend.put("slow", {"w": "second"}, author="t")
        assert meta.current_version == 2 and [v.version for v in meta.versions] == [1, 2]
        assert (await backend.get("slow", 1)).data == {"w": "first"}
    finally:
        await backend.aclose()


def test_sanitize_keeps_class_status_and_codes_never_the_message() -> None:
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    class _Resp:
        status_code = 409
        reason = "Conflict"
        headers: dict[str, str] = {}

        def text(self) -> str:
            return json.dumps({"error": {"code": "Conflict", "message": CANARY, "innererror": {"code": "ObjectIsDeletedButRecoverable"}}})

    exc = HttpResponseError(response=_Resp())  # type: ignore[arg-type]
    assert AzureKeyVaultBackend.sanitize(exc) == "HttpResponseError (409, Conflict, ObjectIsDeletedButRecoverable)"
    config = AzureBackendConfig.model_validate(
        {"vault_url": "https://v.vault.azure.net/", "auth": {"method": "ambient"}}
    )
    backend = AzureKeyVaultBackend("az", config, BackendContext(None, None))  # type: ignore[arg-type]
    mapped = backend._map(exc, "writing a secret")
    assert type(mapped) is TargetError and CANARY not in mapped.message

    class _Busy(_Resp):
        def text(self) -> str:
            return json.dumps({"error": {"code": "Conflict", "message": CANARY, "innererror": {"code": "ObjectIsBeingDeleted"}}})

    busy = backend._map(HttpResponseError(response=_Busy()), "writing a secret")  # type: ignore[arg-type]
    assert isinstance(busy, TargetUnreachable) and busy.code == "target_busy" and CANARY not in busy.message
    auth = ClientAuthenticationError(message=f"Authentication failed: AADSTS7000215: {CANARY}\r\nTrace ID: x")
    assert AzureKeyVaultBackend.sanitize(auth) == "ClientAuthenticationError (AADSTS7000215)"
    assert AzureKeyVaultBackend.sanitize(ServiceRequestError(CANARY)) == "ServiceRequestError"
    assert AzureKeyVaultBackend.sanitize(ValueError(CANARY)) == "ValueError"


async def test_bad_configuration_is_a_422(gateway: Gateway, kv, admin) -> None:
    c = gateway.client
    good = _config(kv, "p-", _secret_auth(kv, admin))
    for bad in (
        {**good, "unknown": 1},
        {**good, "name_prefix": "has_underscore"},
        {**good, "vault_url": "http://127.0.0.1:1/"},  # Key Vault is HTTPS only
        {**good, "auth": {**good["auth"], "method": "password"}},
        {**good, "auth": {"method": "certificate", "tenant_id": kv.tenant_id, "client_id": admin[0]}},  # no certificate
        {**good, "auth": {**good["auth"], "token_file": "/x"}},  # fields of another method
    ):
        r = await c.put("/v1/backends/bad", json={"type": "azure", "config": bad})
        assert r.status_code == 422, (bad, r.text)
        assert admin[1] not in r.text
    r = await c.put("/v1/backends/ok", json={"type": "azure", "config": good})
    assert r.status_code == 201 and admin[1] not in r.text  # the inline secret is shown masked
    # Caught at start, before any call: a CA file that is not there, a certificate that is not PEM.
    assert (await c.put("/v1/backends/noca", json={"type": "azure", "config": {**good, "ca_bundle": "/nonexistent/ca.pem"}})).status_code == 201
    assert _code(await c.get("/v1/secrets/noca/x")) == (422, "invalid_ca_bundle")
    cert = {"method": "certificate", "tenant_id": kv.tenant_id, "client_id": admin[0], "certificate": CANARY}
    assert (await c.put("/v1/backends/nopem", json={"type": "azure", "config": {**good, "auth": cert}})).status_code == 201
    r = await c.get("/v1/secrets/nopem/x")
    assert _code(r) == (422, "invalid_certificate") and CANARY not in r.text


async def test_a_secret_ref_is_read_at_start(kv, admin, prefix) -> None:
    asked: list[SecretRef] = []

    async def read_ref(ref: SecretRef) -> str:
        asked.append(ref)
        return admin[1]

    ref = {"backend": "keys", "path": "azure/app", "key": "secret"}
    auth = {"method": "client_secret", "tenant_id": kv.tenant_id, "client_id": admin[0], "secret": ref}
    backend = await _direct(_config(kv, prefix, auth), read_ref)
    try:
        await backend.put("ref", {"k": "v"}, author="t")
    finally:
        await backend.aclose()
    assert asked == [SecretRef(**ref)]
