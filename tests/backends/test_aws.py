"""The ``aws`` backend against moto in server mode: what only this backend has (ownership
tag, name prefix, version mapping, request counts, credentials), through the gateway's
API and directly. The shared behaviour is tests/contract/backend_suite.py's."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from backends.aws import AWSBackendConfig, AWSSecretsManagerBackend, version_id, version_of
from backends.base import BackendContext, SecretRef
from gateway.errors import Conflict, NotFound, TargetError, TargetUnreachable, ValidationFailed
from tests.conftest import Gateway, service_missing
from tests.services.motoserver import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, MotoServer

ACCOUNT = "123456789012"


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only: these tests are about AWS, not about the gateway's store."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(scope="module", autouse=True)
def ambient_keys() -> Iterator[None]:
    """moto's dummy keys as the ambient credentials (and never an instance-role lookup)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ROLE_ARN"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="module")
def moto_auth() -> Iterator[dict[str, Any]]:
    """A moto server of this module's own with auth enforcement on, and IAM made while it
    was off: user ``cg`` (may only assume roles), role ``sm`` (all of Secrets Manager),
    user ``ro`` (may only list and read secrets)."""
    try:
        server = MotoServer().start()
    except Exception as exc:  # noqa: BLE001
        service_missing("moto server", f"{type(exc).__name__}: {exc}")
    try:
        iam = server.boto3_client("iam")

        def user(name: str, actions: list[str]) -> dict[str, str]:
            iam.create_user(UserName=name)
            iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=_policy(actions))
            return iam.create_access_key(UserName=name)["AccessKey"]

        cg = user("cg", ["sts:AssumeRole"])
        ro = user("ro", ["secretsmanager:ListSecrets", "secretsmanager:GetSecretValue"])
        trust = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/cg"}, "Action": "sts:AssumeRole"}],
        }
        role = iam.create_role(RoleName="sm", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
        iam.put_role_policy(RoleName="sm", PolicyName="p", PolicyDocument=_policy(["secretsmanager:*"]))
        server.enable_auth(0)
        yield {"server": server, "cg": cg, "ro": ro, "role_arn": role["Arn"]}
    finally:
        server.stop()


def _policy(actions: list[str]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]})


def _prefix() -> str:
    return f"t{secrets.token_hex(4)}/"


def _config(server: MotoServer, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "region": TEST_REGION, "endpoint_url": server.endpoint_url, "name_prefix": _prefix(),
        "recovery_window_days": 7, "connect_timeout": 1, "read_timeout": 3, "max_attempts": 2, "call_timeout": 10,
    }
    cfg.update(overrides)
    return cfg


RefReader = Callable[[SecretRef], Awaitable[str]]


async def _direct(
    server: MotoServer, name: str = "awsd", read_ref: RefReader | None = None, **overrides: Any
) -> AWSSecretsManagerBackend:
    cfg = AWSBackendConfig.model_validate(_config(server, **overrides))
    backend = AWSSecretsManagerBackend(name, cfg, BackendContext(None, None, read_ref=read_ref))  # type: ignore[arg-type]
    await backend.start()
    return backend


def _refs(values: dict[str, str]) -> tuple[dict[str, Any], RefReader]:
    """A ``keys`` config pointing into a fake other backend, and the reader for it."""

    async def read_ref(ref: SecretRef) -> str:
        assert ref.backend == "vaultish" and ref.path == "aws/keys"
        return values[ref.key]

    keys = {k: {"backend": "vaultish", "path": "aws/keys", "key": k} for k in ("access_key_id", "secret_access_key")}
    return keys, read_ref


def _count_requests(backend: AWSSecretsManagerBackend) -> list[str]:
    """The operation of every HTTP request the backend's client sends from now on."""
    sent: list[str] = []

    def before_send(request: Any, **_: Any) -> None:
        sent.append(request.headers.get("X-Amz-Target", b"").decode().rpartition(".")[2])

    backend._client.meta.events.register("before-send.secrets-manager", before_send)
    return sent


# --- configuration --------------------------------------------------------------------


async def test_bad_config_is_a_422_naming_the_field(gateway: Gateway, moto_server: MotoServer) -> None:
    for bad, field in [
        ({"region": TEST_REGION, "surprise": 1}, "config.surprise"),
        ({"region": "mars"}, "config.region"),
        ({"region": TEST_REGION, "name_prefix": "a b/"}, "config.name_prefix"),
        ({"region": TEST_REGION, "owner_tag_key": "aws:owner"}, "config.owner_tag_key"),
        ({"region": TEST_REGION, "recovery_window_days": 3}, "config.recovery_window_days"),
        ({"region": TEST_REGION, "assume_role": {"role_arn": "not-an-arn"}}, "config.assume_role.role_arn"),
        ({"region": TEST_REGION, "keys": {"access_key_id": "AKIA..."}}, "config.keys.access_key_id"),
    ]:
        r = await gateway.client.put("/v1/backends/aws1", json={"type": "aws", "config": bad})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["errors"][0]["field"] == field


async def test_names_versions_tags_and_values_as_stored_in_aws(moto_server: MotoServer) -> None:
    b = await _direct(moto_server)
    prefix = b.config.name_prefix
    await b.put("app/db", {"user": "u", "password": "CANARY-aws-1"}, author="alice")
    await b.put("app/db", {"user": "u", "password": "CANARY-aws-2"}, author="bob")
    sm = moto_server.boto3_client("secretsmanager")
    d = sm.describe_secret(SecretId=f"{prefix}app/db")
    assert {"Key": "credgate:owner", "Value": "awsd"} in d["Tags"]
    current = sm.get_secret_value(SecretId=f"{prefix}app/db")
    assert current["VersionId"] == version_id(2) and version_of(current["VersionId"]) == 2
    body = json.loads(current["SecretString"])
    assert body["credgate"] == 1 and body["owner"] == "awsd" and body["by"] == "bob"
    assert body["data"] == {"user": "u", "password": "CANARY-aws-2"}
    old = sm.get_secret_value(SecretId=f"{prefix}app/db", VersionId=version_id(1))
    assert json.loads(old["SecretString"])["data"]["password"] == "CANARY-aws-1"
    meta = await b.metadata("app/db")
    assert meta.current_version == 2 and [(v.version, v.created_by) for v in meta.versions] == [(1, "alice"), (2, "bob")]
    assert version_of("0b1f8e2c-5a4d-4f6e-9c3b-2d1e0f9a8b7c") is None
    # No staging labels beyond AWS's own two: credgate's versions don't use up the 20 allowed.
    stages = {label for labels in d["VersionIdsToStages"].values() for label in labels}
    assert stages == {"AWSCURRENT", "AWSPREVIOUS"}
    await b.aclose()


async def test_a_current_read_is_one_get_secret_value_and_a_version_read_too(moto_server: MotoServer) -> None:
    b = await _direct(moto_server)
    for i in range(3):
        await b.put("hot", {"k": f"v{i}"}, author="t")
    sent = _count_requests(b)
    value = await b.get("hot")
    assert (value.version, value.data) == (3, {"k": "v2"})
    assert sent == ["GetSecretValue"]
    sent.clear()
    assert (await b.get("hot", 1)).data == {"k": "v0"}
    assert sent == ["GetSecretValue"]
    sent.clear()
    await b.put("hot", {"k": "v3"}, author="t")
    assert sent[:2] == ["DescribeSecret", "PutSecretValue"]  # then ListSecretVersionIds for the metadata
    await b.aclose()


# --- ownership and isolation ---------------------------------------------------------------


async def test_a_secret_made_outside_credgate_is_refused_and_left_alone(gateway: Gateway, moto_server: MotoServer) -> None:
    cfg = _config(moto_server)
    prefix = cfg["name_prefix"]
    sm = moto_server.boto3_client("secretsmanager")
    sm.create_secret(Name=f"{prefix}theirs", SecretString=json.dumps({"k": "CANARY-foreign"}))
    sm.create_secret(
        Name=f"{prefix}other-owner", SecretString="{}", Tags=[{"Key": "credgate:owner", "Value": "someone-else"}]
    )
    assert (await gateway.client.put("/v1/backends/aws1", json={"type": "aws", "config": cfg})).status_code == 201
    await gateway.client.put("/v1/secrets/aws1/mine", json={"data": {"k": "v"}})
    for path in ("theirs", "other-owner"):
        for r in (
            await gateway.client.get(f"/v1/secrets/aws1/{path}", params={"reveal": "true"}),
            await gateway.client.delete(f"/v1/secrets/aws1/{path}"),
            await gateway.client.delete(f"/v1/secrets/aws1/{path}", params={"destroy": "true"}),
            await gateway.client.post(f"/v1/secrets/aws1/{path}:restore"),
        ):
            assert r.status_code == 404 and r.json()["error"]["code"] == "secret_not_owned", r.text
            assert "CANARY" not in r.text
        r = await gateway.client.put(f"/v1/secrets/aws1/{path}", json={"data": {"k": "mine now"}})
        assert r.status_code == 409 and r.json()["error"]["code"] == "secret_not_owned"
    listed = (await gateway.client.get("/v1/secrets/aws1", params={"include_deleted": "true"})).json()["items"]
    assert listed == ["mine"]
    # Untouched: same value, one version, not scheduled for deletion.
    d = sm.describe_secret(SecretId=f"{prefix}theirs")
    assert "DeletedDate" not in d and len(d["VersionIdsToStages"]) == 1 and "Tags" not in d or not d.get("Tags")
    assert json.loads(sm.get_secret_value(SecretId=f"{prefix}theirs")["SecretString"]) == {"k": "CANARY-foreign"}
    # A direct read refuses too, even though the tag is not asked for on the hot path.
    b = await gateway.runtime.mounts.get("aws1")
    with pytest.raises(NotFound) as e:
        await b.get("theirs")
    assert e.value.code == "secret_not_owned" and "CANARY" not in str(e.value)


async def test_adopt_prefixes_let_credgate_take_over_existing_secrets(moto_server: MotoServer) -> None:
    b = await _direct(moto_server, adopt_prefixes=["legacy/"])
    prefix = b.config.name_prefix
    sm = moto_server.boto3_client("secretsmanager")
    sm.create_secret(Name=f"{prefix}legacy/db", SecretString=json.dumps({"user": "u", "port": 5432}))
    sm.create_secret(Name=f"{prefix}legacy/token", SecretString="plain-text-token")
    sm.create_secret(Name=f"{prefix}other/db", SecretString="{}")
    # Before credgate writes: the foreign value is version 1.
    v = await b.get("legacy/db")
    assert (v.version, v.data) == (1, {"user": "u", "port": "5432"})
    assert (await b.get("legacy/token")).data == {"value": "plain-text-token"}
    assert (await b.get("legacy/db", 1)).data == {"user": "u", "port": "5432"}
    meta = await b.metadata("legacy/db")
    assert meta.current_version == 1 and [x.version for x in meta.versions] == [1] and meta.keys == ["port", "user"]
    assert (await b.list()).items == ["legacy/db", "legacy/token"]
    # The first write adopts it: tagged, the old value stays readable as version 1.
    written = await b.put("legacy/db", {"user": "u", "password": "p"}, author="t")
    assert written.current_version == 2 and [x.version for x in written.versions] == [1, 2]
    assert {"Key": "credgate:owner", "Value": "awsd"} in sm.describe_secret(SecretId=f"{prefix}legacy/db")["Tags"]
    assert (await b.get("legacy/db")).data == {"user": "u", "password": "p"}
    assert (await b.get("legacy/db", 1)).data == {"user": "u", "port": "5432"}
    assert (await b.put("legacy/db", {"x": "3"}, author="t", cas=2)).current_version == 3
    # Outside the adopt prefixes, still refused.
    with pytest.raises(NotFound) as e:
        await b.get("other/db")
    assert e.value.code == "secret_not_owned"
    await b.aclose()


async def test_a_value_written_behind_credgates_back_is_not_served_as_a_version(moto_server: MotoServer) -> None:
    b = await _direct(moto_server)
    await b.put("x", {"k": "1"}, author="t")
    sm = moto_server.boto3_client("secretsmanager")
    sm.put_secret_value(SecretId=f"{b.config.name_prefix}x", SecretString=json.dumps({"k": "sneaky"}))
    with pytest.raises(Conflict) as e:
        await b.get("x")
    assert e.value.code == "foreign_version"
    assert (await b.get("x", 1)).data == {"k": "1"}
    # credgate's next write supersedes it, with the next number.
    assert (await b.put("x", {"k": "2"}, author="t")).current_version == 2
    assert (await b.get("x")).data == {"k": "2"}
    await b.aclose()


async def test_name_prefixes_and_owners_isolate_mounts(moto_server: MotoServer) -> None:
    a = await _direct(moto_server, name="team-a")
    b = await _direct(moto_server, name="team-b")
    same_prefix_other_owner = await _direct(moto_server, name="team-c", name_prefix=a.config.name_prefix)
    await a.put("s", {"k": "a"}, author="t")
    await b.put("s", {"k": "b"}, author="t")
    assert (await a.get("s")).data == {"k": "a"} and (await b.get("s")).data == {"k": "b"}
    assert (await a.list()).items == ["s"] and await a.count() == 1
    assert (await same_prefix_other_owner.list()).items == [] and await same_prefix_other_owner.count() == 0
    with pytest.raises(NotFound) as e:
        await same_prefix_other_owner.get("s")
    assert e.value.code == "secret_not_owned"
    for backend in (a, b, same_prefix_other_owner):
        await backend.aclose()


async def test_a_path_too_long_for_a_name_is_a_422(moto_server: MotoServer) -> None:
    b = await _direct(moto_server)
    with pytest.raises(ValidationFailed) as e:
        await b.put("/".join(["s" * 50] * 10), {"k": "v"}, author="t")
    assert e.value.code == "path_too_long"
    await b.aclose()


# --- versions and concurrency ----------------------------------------------------------------


async def test_a_stale_writer_collides_on_the_version_token_and_takes_the_next(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers that picked the same N: Secrets Manager keeps the first, the second
    moves on (here the second believes version 1 is current when 2 already exists)."""
    b = await _direct(moto_server)
    await b.put("c", {"k": "1"}, author="t")
    await b.put("c", {"k": "2"}, author="t")
    from backends import aws

    monkeypatch.setattr(aws._Described, "max_version", lambda self: 1)
    sent = _count_requests(b)
    assert (await b.put("c", {"k": "3"}, author="t")).current_version == 3
    assert sent.count("PutSecretValue") == 2  # token for 2 refused, token for 3 taken
    monkeypatch.undo()
    assert [(await b.get("c", n)).data["k"] for n in (1, 2, 3)] == ["1", "2", "3"]
    await b.aclose()


async def test_cas_is_atomic_across_writers_without_a_shared_lock(moto_server: MotoServer) -> None:
    one = await _direct(moto_server)
    two = await _direct(moto_server, name_prefix=one.config.name_prefix)  # its own locks
    await one.put("cas", {"k": "0"}, author="t")
    results = await asyncio.gather(
        *(w.put("cas", {"k": str(i)}, author="t", cas=1) for i, w in enumerate([one, two] * 4)),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, Conflict)]
    assert len(won) == 1 and len(lost) == 7 and all(r.code == "cas_mismatch" for r in lost)
    assert won[0].current_version == 2 and (await one.metadata("cas")).current_version == 2
    await one.aclose()
    await two.aclose()


async def test_writers_in_two_processes_lose_no_version(moto_server: MotoServer) -> None:
    """Two backends (no lock in common, as two gateway replicas): 2 x 10 writers."""
    one = await _direct(moto_server)
    two = await _direct(moto_server, name_prefix=one.config.name_prefix)
    results = await asyncio.gather(*(w.put("many", {"i": str(i)}, author="t") for i, w in enumerate([one, two] * 10)))
    assert sorted(r.current_version for r in results) == list(range(1, 21))
    seen = {(await one.get("many", n)).data["i"] for n in range(1, 21)}
    assert seen == {str(i) for i in range(20)}
    await one.aclose()
    await two.aclose()


async def test_writing_to_a_soft_deleted_secret_restores_it(moto_server: MotoServer) -> None:
    b = await _direct(moto_server)
    await b.put("d", {"k": "1"}, author="t")
    await b.delete("d", author="t")
    sm = moto_server.boto3_client("secretsmanager")
    assert "DeletedDate" in sm.describe_secret(SecretId=f"{b.config.name_prefix}d")
    assert (await b.list()).items == [] and (await b.list(include_deleted=True)).items == ["d"]
    meta = await b.put("d", {"k": "2"}, author="t")
    assert meta.current_version == 2 and meta.deleted_at is None
    assert "DeletedDate" not in sm.describe_secret(SecretId=f"{b.config.name_prefix}d")
    await b.delete("d", author="t")
    await b.delete("d", author="t", destroy=True)  # destroys a soft-deleted secret too
    with pytest.raises(NotFound) as e:
        await b.metadata("d")
    assert e.value.code == "secret_not_found"
    await b.aclose()


async def test_the_largest_value_fits_in_a_secret_string(moto_server: MotoServer) -> None:
    b = await _direct(moto_server, owner_tag_value="o" * 128)
    limit = b.capabilities.max_value_bytes
    data = {"k": "é" * ((limit - len('{"k":""}')) // 2)}
    size = len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())
    assert limit - 2 <= size <= limit
    await b.put("big", data, author="a" * 10_000)
    stored = moto_server.boto3_client("secretsmanager").get_secret_value(SecretId=f"{b.config.name_prefix}big")
    assert len(stored["SecretString"].encode()) <= 65_536
    assert (await b.get("big")).data == data
    await b.aclose()


# --- credentials ---------------------------------------------------------------------


async def test_keys_held_in_the_local_backend(gateway: Gateway, moto_auth: dict[str, Any], caplog) -> None:
    caplog.set_level(logging.DEBUG)
    server, ro = moto_auth["server"], moto_auth["ro"]
    await gateway.client.put(
        "/v1/secrets/local/aws/ro", json={"data": {"id": ro["AccessKeyId"], "secret": ro["SecretAccessKey"]}}
    )
    await gateway.client.put("/v1/secrets/local/aws/bad", json={"data": {"id": ro["AccessKeyId"], "secret": "CANARY-wrong-key"}})

    def keys(path: str) -> dict[str, Any]:
        return {
            "access_key_id": {"backend": "local", "path": path, "key": "id"},
            "secret_access_key": {"backend": "local", "path": path, "key": "secret"},
        }

    cfg = _config(server, keys=keys("aws/ro"))
    assert (await gateway.client.put("/v1/backends/awsro", json={"type": "aws", "config": cfg})).status_code == 201
    shown = (await gateway.client.get("/v1/backends/awsro")).json()["config"]
    assert ro["SecretAccessKey"] not in json.dumps(shown)
    # ro may list and read, not write: a listing works, a write is a permission error.
    r = await gateway.client.get("/v1/secrets/awsro")
    assert r.status_code == 200 and r.json()["items"] == []
    r = await gateway.client.put("/v1/secrets/awsro/x", json={"data": {"k": "v"}})
    assert r.status_code == 502 and r.json()["error"]["code"] == "target_permission_denied"
    health = (await gateway.client.post("/v1/backends/awsro/check")).json()
    assert health["ok"] is False and health["details"]["write"] == "denied" and health["details"]["read"] == "ok"
    # Wrong keys: the store refuses them.
    cfg = _config(server, keys=keys("aws/bad"))
    assert (await gateway.client.put("/v1/backends/awsbad", json={"type": "aws", "config": cfg})).status_code == 201
    r = await gateway.client.get("/v1/secrets/awsbad")
    assert r.status_code == 502 and r.json()["error"]["code"] == "target_auth_failed"
    health = (await gateway.client.post("/v1/backends/awsbad/check")).json()
    assert health["ok"] is False
    # Keys that are not there: the backend's credentials fail, not the caller's path.
    cfg = _config(server, keys=keys("aws/missing"))
    assert (await gateway.client.put("/v1/backends/awsnokeys", json={"type": "aws", "config": cfg})).status_code == 201
    r2 = await gateway.client.get("/v1/secrets/awsnokeys/x")
    assert r2.status_code == 502 and r2.json()["error"]["code"] == "target_auth_failed"
    for text in (r.text, json.dumps(health), *(rec.getMessage() for rec in caplog.records)):
        assert "CANARY" not in text and ro["SecretAccessKey"] not in text and "<Message>" not in text


async def test_wrong_keys_are_target_auth_failed_and_check_says_auth_refused(moto_auth: dict[str, Any]) -> None:
    keys, read_ref = _refs({"access_key_id": "AKIAIOSFODNN7EXAMPLE", "secret_access_key": "CANARY-not-a-key"})
    b = await _direct(moto_auth["server"], keys=keys, read_ref=read_ref)
    with pytest.raises(TargetError) as e:
        await b.get("x")
    assert e.value.code == "target_auth_failed" and "CANARY" not in str(e.value) and "<" not in str(e.value)
    health = await b.check()
    assert (health.ok, health.problem) == (False, "auth_refused")
    await b.aclose()


async def test_keys_without_a_reader_are_a_clear_error(moto_server: MotoServer) -> None:
    keys, _ = _refs({})
    with pytest.raises(ValidationFailed) as e:
        await _direct(moto_server, keys=keys, read_ref=None)
    assert e.value.code == "secret_ref_unavailable"


async def test_assume_role_with_keys_from_another_backend_and_refresh(moto_auth: dict[str, Any]) -> None:
    cg = moto_auth["cg"]
    keys, read_ref = _refs({"access_key_id": cg["AccessKeyId"], "secret_access_key": cg["SecretAccessKey"]})
    # cg itself may only assume roles:
    plain = await _direct(moto_auth["server"], keys=keys, read_ref=read_ref)
    with pytest.raises(TargetError) as e:
        await plain.put("x", {"k": "v"}, author="t")
    assert e.value.code == "target_permission_denied"
    await plain.aclose()
    role = {"role_arn": moto_auth["role_arn"], "session_name": "credgate-test", "duration_seconds": 900, "external_id": "ext-1"}
    b = await _direct(moto_auth["server"], keys=keys, read_ref=read_ref, assume_role=role)
    assert b.role_refreshes == 0  # assumed at the first call, not at start
    await b.put("x", {"k": "v"}, author="t")
    assert (await b.get("x")).data == {"k": "v"}
    assert b.role_refreshes == 1  # not once per call
    assert (await b.check()).ok
    # Near the end of its lifetime the role is assumed again before the next call.
    from dateutil.tz import tzlocal

    from datetime import datetime

    b._role_creds._expiry_time = datetime.now(tzlocal()) + timedelta(seconds=20)
    assert (await b.get("x")).data == {"k": "v"}
    assert b.role_refreshes == 2
    await b.aclose()


async def test_a_role_that_cannot_be_assumed_is_target_auth_failed(moto_auth: dict[str, Any]) -> None:
    ro = moto_auth["ro"]  # may not call sts:AssumeRole
    keys, read_ref = _refs({"access_key_id": ro["AccessKeyId"], "secret_access_key": ro["SecretAccessKey"]})
    b = await _direct(moto_auth["server"], keys=keys, read_ref=read_ref, assume_role={"role_arn": moto_auth["role_arn"]})
    with pytest.raises(TargetError) as e:
        await b.get("x")
    assert e.value.code == "target_auth_failed" and "AssumeRole (AccessDenied)" in str(e.value)
    await b.aclose()


# --- failures ------------------------------------------------------------------------------


async def test_moto_stopped_mid_run_is_503_backend_unavailable(gateway: Gateway, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    server = MotoServer().start()
    try:
        cfg = _config(server)
        assert (await gateway.client.put("/v1/backends/awsdown", json={"type": "aws", "config": cfg})).status_code == 201
        r = await gateway.client.put("/v1/secrets/awsdown/s", json={"data": {"k": "CANARY-down"}})
        assert r.status_code == 200
    finally:
        server.stop()
    started = time.monotonic()
    for r in (
        await gateway.client.get("/v1/secrets/awsdown/s", params={"reveal": "true"}),
        await gateway.client.put("/v1/secrets/awsdown/s", json={"data": {"k": "CANARY-down-2"}}),
        await gateway.client.get("/v1/secrets/awsdown"),
    ):
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable", r.text
        assert r.headers.get("Retry-After")
        assert "CANARY" not in r.text
    assert time.monotonic() - started < 30
    health = (await gateway.client.post("/v1/backends/awsdown/check")).json()
    assert health["ok"] is False and health.get("problem") == "unreachable"
    assert (await gateway.client.get("/healthz")).status_code == 200
    assert not [rec for rec in caplog.records if "CANARY" in rec.getMessage()]


async def test_unreachable_is_target_unreachable_directly() -> None:
    from tests.services.pgcluster import free_port

    cfg = AWSBackendConfig(region=TEST_REGION, endpoint_url=f"http://127.0.0.1:{free_port('127.0.0.1')}", connect_timeout=1, max_attempts=1)
    b = AWSSecretsManagerBackend("gone", cfg, BackendContext(None, None))  # type: ignore[arg-type]
    await b.start()
    with pytest.raises(TargetUnreachable):
        await b.get("x")
    assert (await b.check()).problem == "unreachable"
    await b.aclose()


def test_sanitize_keeps_class_and_code_never_the_message() -> None:
    from botocore.exceptions import ClientError

    exc = ClientError(
        {"Error": {"Code": "AccessDeniedException", "Message": "arn:aws:iam::123:user/x CANARY"},
         "ResponseMetadata": {"RequestId": "req-CANARY", "HTTPStatusCode": 400}},
        "GetSecretValue",
    )
    assert AWSSecretsManagerBackend.sanitize(exc) == "ClientError (AccessDeniedException)"
    xml = ClientError(
        {"Error": {"Code": "403", "Message": "<ErrorResponse><Error><Code>InvalidClientTokenId</Code><Message>CANARY</Message>"},
         "ResponseMetadata": {"HTTPStatusCode": 403}},
        "ListSecrets",
    )
    assert AWSSecretsManagerBackend.sanitize(xml) == "ClientError (InvalidClientTokenId)"
