"""The ``gcp`` backend beyond the shared contract: credentials (a key held in another backend,
inline, ambient; self-signed JWTs and the token flow), wrong keys, missing permissions,
labels and ownership, the path encoding, versions, destroy, capabilities through the API,
a stopped store, and values that never reach an error or a log.

GCP can't run here: every test talks HTTP to the stand-in
(:mod:`tests.standins.gcp_secretmanager`) through the real google-cloud-secret-manager SDK.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.base import BackendContext, SecretRef
from backends.gcp import OWNER_LABEL, GCPConfig, GCPSecretManagerBackend, decode_id, encode_path
from gateway.errors import Conflict, NotFound, TargetError, TargetUnreachable, ValidationFailed
from tests.conftest import Gateway
from tests.standins.gcp_secretmanager import READ_PERMISSIONS, GCPSecretManagerStandIn, make_service_account_key

CANARY = "CANARY-gcp-5d1e7b"
GCP_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
TRICKY = [
    "a", "a.b", "a_b", "a-b", "a/b", "a_sb", "a_db", "a__b", "_", "__", "_s", "-", ".x", "x.", "a..b",
    "x/_s/y", "x/_d/y", "1/2/3/4/5/6/7/8/9/10/11/12", "seg/a.b/c_d/e-f/0/Z9/x.y-z_w",
    "team-a/db.password", "UPPER/lower/MiXeD", "v1.2.3_rc-1/file.tar.gz",
]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """The gateway's own store holds nothing of a gcp backend's secrets: SQLite is enough."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(scope="module")
def standin() -> Iterator[GCPSecretManagerStandIn]:
    server = GCPSecretManagerStandIn().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def admin_key(standin: GCPSecretManagerStandIn) -> dict[str, str]:
    return standin.add_service_account("credgate@credgate-test.iam.gserviceaccount.com")


@pytest.fixture(scope="module")
def reader_key(standin: GCPSecretManagerStandIn) -> dict[str, str]:
    return standin.add_service_account("reader@credgate-test.iam.gserviceaccount.com", permissions=READ_PERMISSIONS)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}-"


def _config(standin: GCPSecretManagerStandIn, prefix: str, key: dict[str, str] | None, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "project": standin.project, "name_prefix": prefix, "api_endpoint": standin.endpoint,
        "timeout_seconds": 3, "retries": 0,
    }
    if key is not None:
        config["service_account_key"] = json.dumps(key)
    config.update(extra)
    return config


async def _direct(config: dict[str, Any], read_ref: Any = None) -> GCPSecretManagerBackend:
    backend = GCPSecretManagerBackend("g", GCPConfig.model_validate(config), BackendContext(None, None, None, read_ref))  # type: ignore[arg-type]
    await backend.start()
    return backend


def _sdk(standin: GCPSecretManagerStandIn, key: dict[str, str]) -> Any:
    """The vendor SDK itself, to look at or change the store behind the backend's back."""
    from google.api_core.client_options import ClientOptions
    from google.cloud.secretmanager_v1 import SecretManagerServiceClient
    from google.oauth2 import service_account

    return SecretManagerServiceClient(
        transport="rest", credentials=service_account.Credentials.from_service_account_info(key),
        client_options=ClientOptions(api_endpoint=standin.endpoint),
    )


def _code(r: Any) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


# --- names ---------------------------------------------------------------------------


def test_encoding_is_reversible_prefix_preserving_and_within_gcp_id_rules() -> None:
    rng = random.Random(12)
    alphabet = "ab_.-Z9"
    generated = []
    for _ in range(400):
        segs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 8))]
        generated.append("/".join(s for s in segs if s not in (".", "..")) or "x")
    encoded = {}
    for path in TRICKY + generated:
        sid = encode_path(path)
        assert GCP_ID.match(sid), path
        assert decode_id(sid) == path
        encoded.setdefault(sid, path)
        assert encoded[sid] == path  # injective: no two paths share an id
        for cut in range(1, len(path)):
            assert sid.startswith(encode_path(path[:cut]))  # a prefix's encoding prefixes every id under it
    assert encode_path("team-a/db.password") == "team-a_sdb_dpassword" and encode_path("a_b") == "a__b"
    for not_an_encoding in ["a_", "a_x", "_c", "a.b", "a/b", "é"]:
        assert decode_id(not_an_encoding) is None


async def test_tricky_paths_round_trip_and_list_in_lexical_order(standin, admin_key, prefix) -> None:
    backend = await _direct(_config(standin, prefix, admin_key))
    try:
        for i, path in enumerate(TRICKY):
            meta = await backend.put(path, {"i": str(i)}, author="t")
            assert meta.current_version == 1
        for i, path in enumerate(TRICKY):
            assert (await backend.get(path)).data == {"i": str(i)}
        assert (await backend.list("")).items == sorted(TRICKY)
        assert (await backend.list("a_")).items == ["a__b", "a_b", "a_db", "a_sb"]
        assert (await backend.list("x/")).items == ["x/_d/y", "x/_s/y"]
        ids = [s for s in standin.secret_ids() if s.startswith(prefix)]
        assert len(ids) == len(TRICKY) and all(GCP_ID.match(s) for s in ids)
        assert await backend.count() == len(TRICKY)
    finally:
        await backend.aclose()


async def test_list_follows_the_stores_pages(standin, admin_key, prefix) -> None:
    backend = await _direct(_config(standin, prefix, admin_key))
    try:
        for i in range(7):
            await backend.put(f"p/{i}", {"k": "v"}, author="t")
        standin.page_size_max = 2  # the SDK must follow nextPageToken
        try:
            first = await backend.list("p/", limit=5)
            rest = await backend.list("p/", after=first.next_after, limit=5)
        finally:
            standin.page_size_max = 25_000
        assert first.items == [f"p/{i}" for i in range(5)] and first.next_after == "p/4"
        assert rest.items == ["p/5", "p/6"] and rest.next_after is None
    finally:
        await backend.aclose()


async def test_a_path_too_long_for_a_secret_id_is_refused_and_nothing_is_created(standin, admin_key, prefix) -> None:
    backend = await _direct(_config(standin, prefix, admin_key))
    try:
        path = "/".join(["a.b"] * 60)  # 239 characters, 419 encoded
        with pytest.raises(ValidationFailed) as e:
            await backend.put(path, {"k": "v"}, author="t")
        assert e.value.code == "path_too_long"
        assert not [s for s in standin.secret_ids() if s.startswith(prefix)]
    finally:
        await backend.aclose()


# --- labels and ownership --------------------------------------------------------------


async def test_labels_and_the_ownership_label_are_applied(standin, admin_key, prefix) -> None:
    backend = await _direct(_config(standin, prefix, admin_key, labels={"team": "payments", "env": "test"}))
    try:
        await backend.put("db/password", {"k": "v"}, author="t")
        secret = standin.secret(prefix + "db_spassword")
        assert secret is not None
        assert secret["labels"] == {"team": "payments", "env": "test", OWNER_LABEL: "true"}
    finally:
        await backend.aclose()


async def test_secrets_credgate_did_not_create_are_left_alone(standin, admin_key, prefix) -> None:
    foreign = prefix + encode_path("foreign/x")
    standin.plant(foreign, json.dumps({"k": CANARY}).encode(), labels={"owner": "someone-else"})
    backend = await _direct(_config(standin, prefix, admin_key))
    try:
        for call, refused in (
            (backend.get("foreign/x"), NotFound), (backend.metadata("foreign/x"), NotFound),
            (backend.delete("foreign/x", author="t", destroy=True), NotFound),
            (backend.put("foreign/x", {"k": "overwritten"}, author="t"), Conflict),  # the name is taken
        ):
            with pytest.raises(refused) as e:
                await call
            assert e.value.code == "secret_not_owned" and CANARY not in str(e.value)
        assert (await backend.list("")).items == [] and await backend.count() == 0
        secret = standin.secret(foreign)
        assert secret is not None and OWNER_LABEL not in secret["labels"]
        versions = list(_sdk(standin, admin_key).list_secret_versions(request={"parent": secret["name"]}))
        assert len(versions) == 1  # the refused put wrote nothing
    finally:
        await backend.aclose()


async def test_an_adopt_prefix_opens_foreign_secrets_under_it(standin, admin_key, prefix) -> None:
    standin.plant(prefix + encode_path("legacy/json"), b'{"user":"app","password":"pw"}')
    standin.plant(prefix + encode_path("legacy/plain"), b"just-a-token")
    standin.plant(prefix + encode_path("legacy/binary"), b"\xff\xfe")
    standin.plant(prefix + encode_path("other/x"), b"not adopted")
    backend = await _direct(_config(standin, prefix, admin_key, adopt_prefixes=["legacy/"]))
    try:
        assert (await backend.get("legacy/json")).data == {"user": "app", "password": "pw"}
        assert (await backend.get("legacy/plain")).data == {"value": "just-a-token"}
        with pytest.raises(ValidationFailed) as e:
            await backend.get("legacy/binary")
        assert e.value.code == "unsupported_value"
        assert (await backend.list("")).items == ["legacy/binary", "legacy/json", "legacy/plain"]
        assert (await backend.put("legacy/plain", {"value": "rotated"}, author="t")).current_version == 2
        with pytest.raises(NotFound) as e:
            await backend.get("other/x")
        assert e.value.code == "secret_not_owned"
        await backend.delete("legacy/json", author="t", destroy=True)
        assert standin.secret(prefix + encode_path("legacy/json")) is None
    finally:
        await backend.aclose()


# --- versions and deletes ------------------------------------------------------------------


async def test_versions_are_gcp_numbers_and_unreadable_ones_are_version_not_found(standin, admin_key, prefix) -> None:
    backend = await _direct(_config(standin, prefix, admin_key))
    sdk = _sdk(standin, admin_key)
    try:
        for i in range(1, 5):
            assert (await backend.put("v/s", {"n": str(i)}, author="t")).current_version == i
        name = standin.secret(prefix + "v_ss")["name"]  # type: ignore[index]
        sdk.disable_secret_version(request={"name": f"{name}/versions/2"})
        sdk.destroy_secret_version(request={"name": f"{name}/versions/1"})
        for version in (1, 2, 9):
            with pytest.raises(NotFound) as e:
                await backend.get("v/s", version)
            assert e.value.code == "version_not_found"
        assert (await backend.get("v/s", 3)).data == {"n": "3"}
        meta = await backend.metadata("v/s")
        assert meta.current_version == 4 and meta.keys == ["n"] and [v.version for v in meta.versions] == [3, 4]
        sdk.disable_secret_version(request={"name": f"{name}/versions/4"})
        assert (await backend.metadata("v/s")).current_version == 3  # the newest enabled one
        with pytest.raises(NotFound) as e:
            await backend.get("v/s")  # "latest" is the newest version, disabled
        assert e.value.code == "version_not_found"
        assert (await backend.put("v/s", {"n": "5"}, author="t")).current_version == 5
    finally:
        await backend.aclose()


async def test_destroy_deletes_the_secret_and_soft_delete_is_refused(standin, admin_key, prefix) -> None:
    backend = await _direct(_config(standin, prefix, admin_key))
    try:
        assert GCPSecretManagerBackend.capabilities.soft_delete is False
        assert GCPSecretManagerBackend.capabilities.check_and_set is False
        await backend.put("d/s", {"k": "v"}, author="t")
        for call in (backend.delete("d/s", author="t"), backend.restore("d/s"), backend.put("d/s", {"k": "v"}, author="t", cas=1)):
            with pytest.raises(Conflict) as e:
                await call
            assert e.value.code == "not_supported"
        assert (await backend.get("d/s")).data == {"k": "v"}
        await backend.delete("d/s", author="t", destroy=True)
        assert standin.secret(prefix + "d_ss") is None
        with pytest.raises(NotFound) as e:
            await backend.get("d/s")
        assert e.value.code == "secret_not_found"
        with pytest.raises(NotFound):
            await backend.delete("d/s", author="t", destroy=True)
    finally:
        await backend.aclose()


# --- credentials -------------------------------------------------------------------------


async def test_through_the_api_with_the_key_held_in_local(gateway: Gateway, standin, admin_key, prefix, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    c = gateway.client
    r = await c.put("/v1/secrets/local/gcp/sa", json={"data": {"json": json.dumps(admin_key)}})
    assert r.status_code == 200
    ref = {"backend": "local", "path": "gcp/sa", "key": "json"}
    r = await c.put("/v1/backends/g", json={"type": "gcp", "config": _config(standin, prefix, None, service_account_key_ref=ref)})
    assert r.status_code == 201, r.text
    assert admin_key["private_key_id"] not in r.text
    r = await c.put("/v1/secrets/g/app/db.password", json={"data": {"password": CANARY}})
    assert r.status_code == 200 and r.json()["version"] == 1 and CANARY not in r.text
    assert (await c.put("/v1/secrets/g/app/db.password", json={"data": {"password": CANARY + "2"}})).json()["version"] == 2
    r = await c.get("/v1/secrets/g/app/db.password", params={"reveal": "true", "version": 1})
    assert r.status_code == 200 and r.json()["data"] == {"password": CANARY}
    assert (await c.get("/v1/secrets/g", params={"prefix": "app/"})).json()["items"] == ["app/db.password"]
    r = await c.post("/v1/backends/g/check")
    assert r.status_code == 200 and r.json()["ok"] is True, r.text
    assert r.json()["details"] == {"list": "ok", "read": "ok", "write": "ok", "destroy": "ok"}
    # What the capabilities say the type lacks is refused by the gateway, before the store.
    assert _code(await c.delete("/v1/secrets/g/app/db.password")) == (409, "not_supported")
    assert _code(await c.post("/v1/secrets/g/app/db.password:restore")) == (409, "not_supported")
    r = await c.put("/v1/secrets/g/app/db.password", json={"data": {"password": "x"}, "cas": 2})
    assert _code(r) == (409, "not_supported")
    assert (await c.get("/v1/secrets/g/app/db.password")).json()["current_version"] == 2
    assert (await c.delete("/v1/secrets/g/app/db.password", params={"destroy": "true"})).status_code == 204
    assert _code(await c.get("/v1/secrets/g/app/db.password")) == (404, "secret_not_found")
    assert standin.secret(prefix + "app_sdb_dpassword") is None
    assert CANARY not in caplog.text and admin_key["private_key"][40:80] not in caplog.text


async def test_a_key_ref_that_is_not_a_key_is_refused_without_echoing_it(gateway: Gateway, standin, prefix) -> None:
    c = gateway.client
    await c.put("/v1/secrets/local/gcp/bad", json={"data": {"json": CANARY}})
    ref = {"backend": "local", "path": "gcp/bad", "key": "json"}
    await c.put("/v1/backends/g", json={"type": "gcp", "config": _config(standin, prefix, None, service_account_key_ref=ref)})
    r = await c.get("/v1/secrets/g/x")
    assert _code(r) == (502, "target_auth_failed") and CANARY not in r.text
    r = await c.post("/v1/backends/g/check")
    assert r.json()["ok"] is False and r.json()["problem"] == "auth_refused" and CANARY not in r.text


@pytest.mark.parametrize("flow", ["self_signed_jwt", "token"])
async def test_a_wrong_key_is_refused(gateway: Gateway, standin, admin_key, prefix, flow, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    forged, _ = make_service_account_key(admin_key["client_email"], standin.project, standin.token_uri)
    forged["private_key_id"] = admin_key["private_key_id"]  # the right account and key id, another private key
    unknown = standin.add_service_account()
    standin.delete_key(unknown["client_email"], unknown["private_key_id"])  # a deleted key
    c = gateway.client
    for i, key in enumerate((forged, unknown)):
        name = f"g{i}"
        config = _config(standin, prefix, key, auth_flow=flow)
        assert (await c.put(f"/v1/backends/{name}", json={"type": "gcp", "config": config})).status_code == 201
        r = await c.put(f"/v1/secrets/{name}/x", json={"data": {"k": CANARY}})
        assert _code(r) == (502, "target_auth_failed"), r.text
        assert CANARY not in r.text and "Invalid JWT" not in r.text and "Request had" not in r.text
        r = await c.post(f"/v1/backends/{name}/check")
        assert r.json()["ok"] is False and r.json()["problem"] == "auth_refused"
    assert not [s for s in standin.secret_ids() if s.startswith(prefix)]
    assert CANARY not in caplog.text


async def test_the_token_flow_uses_the_token_endpoint_and_the_default_does_not(standin, admin_key, prefix) -> None:
    before = standin.calls.get("token", 0)
    backend = await _direct(_config(standin, prefix, admin_key))
    await backend.put("a", {"k": "v"}, author="t")
    await backend.aclose()
    assert standin.calls.get("token", 0) == before  # self-signed JWTs
    backend = await _direct(_config(standin, prefix, admin_key, auth_flow="token"))
    try:
        assert (await backend.get("a")).data == {"k": "v"}
        fetched = standin.calls.get("token", 0)
        assert before < fetched <= before + 2  # get's two parallel calls may each fetch the first token
        for _ in range(3):
            await backend.get("a")
        assert standin.calls.get("token", 0) == fetched  # then it is reused
    finally:
        await backend.aclose()


async def test_a_key_ref_read_directly_and_ambient_credentials(standin, admin_key, prefix, tmp_path, monkeypatch) -> None:
    asked: list[SecretRef] = []

    async def read_ref(ref: SecretRef) -> str:
        asked.append(ref)
        return json.dumps(admin_key)

    ref = {"backend": "keys", "path": "gcp/sa", "key": "json"}
    backend = await _direct(_config(standin, prefix, None, service_account_key_ref=ref), read_ref)
    await backend.put("ref", {"k": "v"}, author="t")
    await backend.aclose()
    assert asked == [SecretRef(**ref)]
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(admin_key))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    backend = await _direct(_config(standin, prefix, None))  # ambient: google.auth.default()
    try:
        assert (await backend.get("ref")).data == {"k": "v"}
    finally:
        await backend.aclose()


# --- permissions ---------------------------------------------------------------------------


async def test_a_missing_permission_is_reported_by_check_and_refused_on_write(
    gateway: Gateway, standin, admin_key, reader_key, prefix
) -> None:
    writer = await _direct(_config(standin, prefix, admin_key))
    await writer.put("shared/s", {"k": "v"}, author="t")
    await writer.aclose()
    c = gateway.client
    assert (await c.put("/v1/backends/ro", json={"type": "gcp", "config": _config(standin, prefix, reader_key)})).status_code == 201
    r = await c.post("/v1/backends/ro/check")
    body = r.json()
    assert body["ok"] is False and body["problem"] == "permission_missing"
    assert body["details"] == {"list": "ok", "read": "ok", "write": "denied", "destroy": "denied"}
    r = await c.get("/v1/secrets/ro/shared/s", params={"reveal": "true"})
    assert r.status_code == 200 and r.json()["data"] == {"k": "v"}
    r = await c.put("/v1/secrets/ro/shared/s", json={"data": {"k": CANARY}})
    assert _code(r) == (502, "target_permission_denied") and CANARY not in r.text and "secretmanager." not in r.text
    r = await c.delete("/v1/secrets/ro/shared/s", params={"destroy": "true"})
    assert _code(r) == (502, "target_permission_denied")
    assert (await c.get("/v1/secrets/ro/shared/s")).json()["current_version"] == 1


# --- faults ----------------------------------------------------------------------------------


async def test_a_stopped_store_is_a_503_with_retry_after_and_recovers(gateway: Gateway, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    own = GCPSecretManagerStandIn().start()  # its own: stopping it must not disturb the other tests
    try:
        key = own.add_service_account()
        c = gateway.client
        config = _config(own, "s-", key)
        assert (await c.put("/v1/backends/g", json={"type": "gcp", "config": config})).status_code == 201
        assert (await c.put("/v1/secrets/g/s", json={"data": {"k": CANARY}})).status_code == 200
        own.stop()
        for r in (
            await c.get("/v1/secrets/g/s", params={"reveal": "true"}),
            await c.put("/v1/secrets/g/s", json={"data": {"k": CANARY}}),
            await c.get("/v1/secrets/g"),
        ):
            assert _code(r) == (503, "backend_unavailable"), r.text
            assert int(r.headers["Retry-After"]) >= 1 and CANARY not in r.text
        r = await c.post("/v1/backends/g/check")
        assert r.json()["ok"] is False and r.json()["problem"] == "unreachable"
        assert (await c.get("/healthz")).status_code == 200
        own.start()  # same port, same data
        r = await c.get("/v1/secrets/g/s", params={"reveal": "true"})
        assert r.status_code == 200 and r.json()["data"] == {"k": CANARY} and r.json()["current_version"] == 1
    finally:
        own.stop()
    assert CANARY not in caplog.text


async def test_a_slow_store_times_out_as_unreachable(standin, admin_key, prefix) -> None:
    backend = await _direct(_config(standin, prefix, admin_key, timeout_seconds=0.3))
    standin.delay = 1.0
    try:
        with pytest.raises(TargetUnreachable):
            await backend.list("")
    finally:
        standin.delay = 0.0
        await backend.aclose()


def test_sanitize_keeps_class_and_status_never_the_message() -> None:
    from google.api_core import exceptions as gx
    from google.auth import exceptions as ga

    exc = gx.NotFound(f"Secret [projects/1/secrets/{CANARY}] not found")
    assert GCPSecretManagerBackend.sanitize(exc) == "NotFound (404 NOT_FOUND)"
    assert GCPSecretManagerBackend.sanitize(gx.Forbidden(CANARY)) == "Forbidden (403)"
    assert GCPSecretManagerBackend.sanitize(ga.RefreshError(CANARY)) == "RefreshError"
    backend = GCPSecretManagerBackend("g", GCPConfig(project="credgate-test"), BackendContext(None, None))  # type: ignore[arg-type]
    for raw, cls, code in [
        (gx.Unauthorized(CANARY), TargetError, "target_auth_failed"),
        (ga.RefreshError(CANARY), TargetError, "target_auth_failed"),
        (gx.Forbidden(CANARY), TargetError, "target_permission_denied"),
        (gx.ServiceUnavailable(CANARY), TargetUnreachable, "target_unreachable"),
        (ga.TransportError(CANARY), TargetUnreachable, "target_unreachable"),
        (TimeoutError(), TargetUnreachable, "target_unreachable"),
        (gx.InternalServerError(CANARY), TargetError, "target_error"),
    ]:
        err = backend._translate(raw, "testing")
        assert type(err) is cls and err.code == code and CANARY not in err.message


# --- configuration ---------------------------------------------------------------------------


async def test_bad_configuration_is_a_422(gateway: Gateway, standin, admin_key) -> None:
    base = _config(standin, "p-", None)
    key = json.dumps(admin_key)
    ref = {"backend": "local", "path": "gcp/sa", "key": "json"}
    for bad in (
        {**base, "labels": {"Team": "a"}},
        {**base, "labels": {OWNER_LABEL: "false"}},
        {**base, "project": "No_Such!"},
        {**base, "name_prefix": "has/slash"},
        {**base, "unknown": 1},
        {**base, "service_account_key": key, "service_account_key_ref": ref},
        {**base, "service_account_key": CANARY},
        {**base, "auth_flow": "token"},
        {**base, "timeout_seconds": 0},
    ):
        r = await gateway.client.put("/v1/backends/g", json={"type": "gcp", "config": bad})
        assert _code(r) == (422, "validation_failed"), bad
        assert CANARY not in r.text and admin_key["private_key_id"] not in r.text
    r = await gateway.client.put("/v1/backends/g", json={"type": "gcp", "config": {**base, "service_account_key": key}})
    assert r.status_code == 201 and r.json()["config"]["service_account_key"] == "**********"
    assert admin_key["private_key_id"] not in r.text and base64.b64encode(b"x") not in r.content


async def test_sdk_errors_from_the_store_are_sanitised_with_their_status(standin, reader_key, prefix) -> None:
    from google.api_core import exceptions as gx

    sdk = _sdk(standin, reader_key)
    with pytest.raises(gx.GoogleAPICallError) as e:
        sdk.create_secret(request={"parent": f"projects/{standin.project}", "secret_id": CANARY,
                                   "secret": {"replication": {"automatic": {}}}})
    assert CANARY in str(e.value)  # Google's own message quotes names...
    assert GCPSecretManagerBackend.sanitize(e.value) == "Forbidden (403 PERMISSION_DENIED)"  # ...ours never


async def test_a_remembered_ownership_check_makes_a_read_one_call_and_zero_turns_it_off(standin, admin_key, prefix) -> None:
    sdk = _sdk(standin, admin_key)
    backend = await _direct(_config(standin, prefix, admin_key))
    try:
        await backend.put("o/s", {"k": "v"}, author="t")
        before = dict(standin.calls)
        assert (await backend.get("o/s")).data == {"k": "v"}
        assert (await backend.metadata("o/s")).keys == ["k"]
        delta = {k: v - before.get(k, 0) for k, v in standin.calls.items() if v != before.get(k, 0)}
        assert delta == {"versions.access": 1, "versions.list": 1}  # no GetSecret, keys remembered
    finally:
        await backend.aclose()
    strict = await _direct(_config(standin, prefix, admin_key, ownership_cache_seconds=0))
    try:
        assert (await strict.get("o/s")).data == {"k": "v"}
        name = standin.secret(prefix + "o_ss")["name"]  # type: ignore[index]
        sdk.update_secret(request={"secret": {"name": name, "labels": {}}, "update_mask": {"paths": ["labels"]}})
        with pytest.raises(NotFound) as e:  # someone took the label off: refused at once
            await strict.get("o/s")
        assert e.value.code == "secret_not_owned"
    finally:
        await strict.aclose()


async def test_sdk_debug_logging_never_carries_a_value(standin, admin_key, prefix, caplog) -> None:
    google = logging.getLogger("google")
    saved = (google.level, google.propagate)
    google.setLevel(logging.DEBUG)
    google.propagate = True  # as an operator debugging the SDK would set it
    caplog.set_level(logging.DEBUG)
    try:
        for flow in ("self_signed_jwt", "token"):
            backend = await _direct(_config(standin, prefix, admin_key, auth_flow=flow))
            try:
                await backend.put(f"log/{flow}", {"k": CANARY}, author="t")
                assert (await backend.get(f"log/{flow}")).data == {"k": CANARY}
            finally:
                await backend.aclose()
    finally:
        google.setLevel(saved[0])
        google.propagate = saved[1]
    payload = base64.b64encode(json.dumps({"k": CANARY}, separators=(",", ":")).encode()).decode()
    everything = " ".join(repr(vars(r)) for r in caplog.records)
    assert CANARY not in everything and payload not in everything and "ya29." not in everything


def _jwt(key: dict[str, str], claims: dict[str, Any], alg: str = "RS256") -> str:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": key["private_key_id"]}).encode())
    body = b64(json.dumps(claims).encode())
    private = serialization.load_pem_private_key(key["private_key"].encode(), None)
    signature = private.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]
    return f"{head}.{body}.{b64(signature)}"


def test_the_stand_in_verifies_what_it_is_given(standin, admin_key) -> None:
    """The stand-in itself: signatures, iss/sub, aud, exp and scope are checked, as Google does."""
    import time

    import httpx

    email, now = admin_key["client_email"], int(time.time())
    api = f"{standin.endpoint}/v1/projects/{standin.project}/secrets"
    good = {"iss": email, "sub": email, "aud": "https://secretmanager.googleapis.com/", "iat": now, "exp": now + 600}
    with httpx.Client(trust_env=False, timeout=5) as http:
        def call(token: str) -> httpx.Response:
            return http.get(api, headers={"Authorization": f"Bearer {token}"})

        assert call(_jwt(admin_key, good)).status_code == 200
        for bad in (
            {**good, "exp": now - 120},  # expired
            {**good, "aud": "https://other.googleapis.com/"},  # someone else's audience
            {**good, "sub": "other@x.iam.gserviceaccount.com"},  # sub is not iss
            {**good, "iss": "unknown@x.iam.gserviceaccount.com", "sub": "unknown@x.iam.gserviceaccount.com"},
            {**good, "exp": now + 7200},  # longer than an hour
        ):
            r = call(_jwt(admin_key, bad))
            assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
        forged = _jwt(admin_key, good)
        assert call(forged[:-4] + ("AAAA" if not forged.endswith("AAAA") else "BBBB")).status_code == 401
        assert call("not-a-token").status_code == 401 and http.get(api).status_code == 401

        grant = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}
        assertion = {**good, "aud": "https://oauth2.googleapis.com/token", "scope": "https://www.googleapis.com/auth/cloud-platform"}
        r = http.post(standin.token_uri, data={**grant, "assertion": _jwt(admin_key, assertion)})
        assert r.status_code == 200 and r.json()["token_type"] == "Bearer"
        assert call(r.json()["access_token"]).status_code == 200
        for bad in ({**assertion, "scope": ""}, {**assertion, "aud": "https://secretmanager.googleapis.com/"}, {**assertion, "exp": now - 120}):
            r = http.post(standin.token_uri, data={**grant, "assertion": _jwt(admin_key, bad)})
            assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
        assert http.post(standin.token_uri, data={"grant_type": "password"}).json()["error"] == "unsupported_grant_type"
