"""A KEK held in a customer KMS: ``aws-kms`` against moto in server mode, ``vault-transit``
against a real OpenBao (tests/services/openbao.py).

Covered for both: a store whose KEK is in the KMS writes and reads secrets, and a read or
a write makes no KMS call (counted); a KMS key rotation is followed (a new KEK version
under the new KMS key version, the records re-wrapped in the background, the older KEK
versions re-wrapped under the new KMS key version) and a new runtime on the same store
reads everything; the KMS unreachable at start, a wrong key, refused credentials and a
missing permission are one-line ConfigurationErrors naming the source (``credgate serve``
exits 2 without a traceback); the KMS down during a write is 503 ``kms_unavailable`` with
Retry-After, nothing written, and the gateway recovers by itself; canary values never
reach a log, an error body or an exception message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from gateway.crypto.kmsring import KmsKeyRing, KmsUnavailable
from gateway.errors import ConfigurationError
from gateway.runtime import kek_source_for, keyring_for
from gateway.settings import load_settings
from gateway.store.models import KekVersion, SecretVersionRow
from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN, Gateway
from tests.services.motoserver import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY
from tests.services.openbao import openbao  # noqa: F401 (the session fixture)
from tests.services.tcpproxy import TcpProxy
from tests.services.waiting import clean_env, free_port, wait_until_serving

CANARY = "canary-kms-7f3a9c"


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite unless a test asks for PostgreSQL too (parametrize store_url, indirect)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's boto3 finds moto's test keys in the environment, and nothing else."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


@asynccontextmanager
async def serving(settings: Any) -> AsyncIterator[Gateway]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            yield Gateway(app, client)


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def settled(gw: Gateway, version: int) -> None:
    """Until ``version`` is current and every record is re-wrapped under it."""
    async def done() -> bool:
        status = await gw.runtime.keys.status()
        return status.current_version == version and status.rewrap_pending == 0 and not status.rotating

    await until(done)


async def probe(settings: Any) -> None:
    """What `credgate serve` runs before starting (keyring_for(settings) there, outside a loop)."""
    ring = keyring_for(settings, probe=False)
    await ring.probe()


async def put(gw: Gateway, path: str, value: str) -> httpx.Response:
    return await gw.client.put(f"/v1/secrets/local/{path}", json={"data": {"v": value}})


async def reveal(gw: Gateway, path: str) -> httpx.Response:
    return await gw.client.get(f"/v1/secrets/local/{path}", params={"reveal": "true"})


async def versions_used(gw: Gateway) -> set[int]:
    async with gw.runtime.store.read() as s:
        return set((await s.execute(select(SecretVersionRow.kek_version))).scalars())


async def kek_rows(gw: Gateway) -> list[KekVersion]:
    async with gw.runtime.store.read() as s:
        return list((await s.execute(select(KekVersion).order_by(KekVersion.version))).scalars())


async def secret_versions(gw: Gateway) -> int:
    async with gw.runtime.store.read() as s:
        return (await s.execute(select(func.count()).select_from(SecretVersionRow))).scalar_one()


def calls(gw: Gateway) -> int:
    return sum(gw.runtime.keyring.source.calls.values())


def no_canary(logs: pytest.LogCaptureFixture, *texts: str) -> None:
    assert CANARY not in logs.text
    for text in texts:
        assert CANARY not in text


# --- aws-kms (moto) ----------------------------------------------------------------------


@pytest.fixture
def aws_key(moto_server) -> str:
    return moto_server.boto3_client("kms").create_key(Description="credgate test KEK")["KeyMetadata"]["KeyId"]


@pytest.fixture
def kms_proxy(moto_server) -> Any:
    proxy = TcpProxy(("127.0.0.1", moto_server.port))
    yield proxy
    proxy.stop()


@pytest.fixture
def aws_settings(settings_factory, aws_key: str, kms_proxy: TcpProxy) -> Callable[..., Any]:
    def make(**overrides: Any) -> Any:
        values: dict[str, Any] = dict(
            kek_file=None, kek_source="aws-kms", kek_aws_key_id=aws_key, kek_aws_region=TEST_REGION,
            kek_aws_endpoint_url=f"http://127.0.0.1:{kms_proxy.port}", kek_kms_timeout_seconds=5,
        )
        values.update(overrides)
        return settings_factory(**values)

    return make


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_aws_kms_store_rotation_and_restart(aws_settings, moto_server, aws_key: str, logs) -> None:
    settings = aws_settings(kek_check_seconds=3600)  # the follower looks once at start, then on demand
    async with serving(settings) as gw:
        rt = gw.runtime
        assert isinstance(rt.keyring, KmsKeyRing)
        await until(lambda: rt.keyring.source.calls["DescribeKey"] >= 3)  # open, version 1, the first look
        for i in range(12):
            assert (await put(gw, f"app/{i}", f"{CANARY}-{i}")).status_code == 200
        (row,) = await kek_rows(gw)
        blob = json.loads(row.wrapped_key)
        assert blob["key"].endswith(aws_key) and row.kms_key_version == f"{aws_key}#1"

        # Reads and writes make no KMS call: the KEK version was unwrapped once, at start.
        before = calls(gw)
        for _ in range(5):
            for i in range(12):
                r = await reveal(gw, f"app/{i}")
                assert r.status_code == 200 and r.json()["data"]["v"] == f"{CANARY}-{i}"
        assert (await put(gw, "app/extra", CANARY)).status_code == 200
        assert calls(gw) == before, dict(rt.keyring.source.calls)

        # The customer rotates the KMS key; the gateway's follower looks (woken here instead of
        # waiting kek_check_seconds) and follows.
        moto_server.boto3_client("kms").rotate_key_on_demand(KeyId=aws_key)
        rt.keyring.wake.set()
        await settled(gw, 2)
        assert (await put(gw, "app/after", CANARY)).status_code == 200
        assert await versions_used(gw) == {2}  # new writes and the re-wrapped old ones
        rows = await kek_rows(gw)
        assert [r.kms_key_version for r in rows] == [f"{aws_key}#2"] * 2  # v1's blob follows the KMS key too
        status = (await gw.client.get("/v1/keys/status")).json()
        assert status["current_version"] == 2 and status["rewrap_pending"] == 0
        assert {v["version"]: v["state"] for v in status["versions"]} == {1: "retired", 2: "current"}
        assert f"key version {aws_key}#2" in status["source"]

    # Not a KEK version's bytes in any log, even at DEBUG (botocore logs request and response
    # bodies there: kms/aws.py drops those records).
    for key in rt.keyring._keys.values():
        assert base64.b64encode(key).decode() not in logs.text and key.hex() not in logs.text

    # A restart: a new runtime on the same store unwraps each KEK version once and reads everything.
    async with serving(settings) as gw:
        source = gw.runtime.keyring.source
        assert source.calls["Decrypt"] == 2 and source.calls["Encrypt"] == 0
        for i in range(12):
            assert (await reveal(gw, f"app/{i}")).json()["data"]["v"] == f"{CANARY}-{i}"
        assert (await reveal(gw, "app/after")).json()["data"]["v"] == CANARY
    no_canary(logs)


async def test_aws_kms_unreachable_at_start_is_a_configuration_error(aws_settings, kms_proxy: TcpProxy) -> None:
    settings = aws_settings()
    with kms_proxy.failing("refuse"):
        with pytest.raises(ConfigurationError) as probed:
            await probe(settings)
        with pytest.raises(ConfigurationError) as start:
            async with serving(settings):
                pass
    for exc in (probed.value, start.value):
        text = str(exc)
        assert "aws-kms" in text and "did not answer" in text and "refusing to start" in text, text
        assert "\n" not in text and exc.__cause__ is None
    # Black-holed instead of refused: the deadline (kek_kms_timeout_seconds=5; 2 s failed
    # a start-up under load) ends it.
    t0 = time.monotonic()
    with kms_proxy.failing("blackhole"):
        with pytest.raises(ConfigurationError, match="did not answer"):
            async with serving(settings):
                pass
    assert time.monotonic() - t0 < 15


def test_cli_serve_exits_2_in_one_line_when_the_kms_is_unreachable(tmp_path: Path, aws_key: str,
                                                                     kms_proxy: TcpProxy) -> None:
    env = clean_env()
    env.update(
        CREDGATE_DATA_DIR=str(tmp_path / "data"), CREDGATE_KEK_SOURCE="aws-kms", CREDGATE_KEK_AWS_KEY_ID=aws_key,
        CREDGATE_KEK_AWS_REGION=TEST_REGION, CREDGATE_KEK_AWS_ENDPOINT_URL=f"http://127.0.0.1:{kms_proxy.port}",
        CREDGATE_KEK_KMS_TIMEOUT_SECONDS="2", AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
    )
    credgate = Path(sys.executable).with_name("credgate")
    with kms_proxy.failing("refuse"):
        res = subprocess.run([str(credgate), "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("credgate: the KEK can't be loaded: aws-kms key") and "did not answer" in lines[0]
    # The same settings with a wrong key: one line naming what is wrong.
    env["CREDGATE_KEK_AWS_KEY_ID"] = "alias/credgate-missing"
    res = subprocess.run([str(credgate), "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "does not exist" in res.stderr


def test_cli_serve_with_the_kek_in_aws_kms(tmp_path: Path, aws_key: str, moto_server) -> None:
    """`credgate serve` as a user runs it: the KMS checked, the server ready, a secret
    written and read through HTTP, the store's KEK version held wrapped by the KMS key."""
    port = free_port()
    env = clean_env(
        CREDGATE_DATA_DIR=str(tmp_path / "data"), CREDGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}",
        CREDGATE_PORT=str(port), CREDGATE_BOOTSTRAP_TOKEN=ADMIN_TOKEN, CREDGATE_KEK_SOURCE="aws-kms",
        CREDGATE_KEK_AWS_KEY_ID=aws_key, CREDGATE_KEK_AWS_REGION=TEST_REGION,
        CREDGATE_KEK_AWS_ENDPOINT_URL=moto_server.endpoint_url, AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
    )
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("credgate")), "serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until_serving(f"{url}/readyz", proc, log=log)
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        r = httpx.put(f"{url}/v1/secrets/local/app/db", json={"data": {"password": CANARY}}, headers=auth)
        assert r.status_code == 200, r.text
        r = httpx.get(f"{url}/v1/secrets/local/app/db", params={"reveal": "true"}, headers=auth)
        assert r.json()["data"] == {"password": CANARY}
        status = httpx.get(f"{url}/v1/keys/status", headers=auth).json()
        assert status["source"].startswith(f"aws-kms key {aws_key}") and status["current_version"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert CANARY not in log.read_text()


async def test_aws_wrong_key_disabled_key_and_denied_permission(aws_settings, moto_server, aws_key: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=r"aws-kms key alias/nope .*the key does not exist"):
        await probe(aws_settings(kek_aws_key_id="alias/nope"))
    kms = moto_server.boto3_client("kms")
    disabled = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=disabled)
    with pytest.raises(ConfigurationError, match="the key is Disabled"):
        await probe(aws_settings(kek_aws_key_id=disabled))

    # Credentials that may describe the key but not encrypt with it (moto enforcing IAM).
    iam = moto_server.boto3_client("iam")
    user = f"credgate-kms-{os.getpid()}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="describe-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["kms:DescribeKey", "kms:ListKeyRotations"], "Resource": "*"}],
    }))
    keys = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["SecretAccessKey"])
    moto_server.enable_auth()
    try:
        with pytest.raises(ConfigurationError) as denied:
            await probe(aws_settings())
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 25)
        with pytest.raises(ConfigurationError) as refused:
            await probe(aws_settings())
    finally:
        moto_server.disable_auth()
    assert "may not use the key" in str(denied.value) and "AccessDenied" in str(denied.value)
    assert "refused the credentials" in str(refused.value)
    for exc in (denied.value, refused.value):
        assert keys["SecretAccessKey"] not in str(exc) and "not-the-secret" not in str(exc)


async def test_aws_kms_down_during_writes(aws_settings, moto_server, aws_key: str, kms_proxy: TcpProxy,
                                          logs) -> None:
    """While the KMS answers nothing, a replica that must use a KEK version it has not
    unwrapped yet refuses the write (503, nothing written) and recovers by itself."""
    async with serving(aws_settings(kek_check_seconds=0.2)) as gw:
        rt = gw.runtime
        assert (await put(gw, "before", CANARY)).status_code == 200
        # Another replica (its own KMS client, straight to the KMS) makes KEK version 2.
        other = KmsKeyRing(kek_source_for(aws_settings(kek_aws_endpoint_url=moto_server.endpoint_url)))
        await other.open(rt.store)
        assert await other.create_version() == 2
        await other.aclose()
        stored = await secret_versions(gw)
        with kms_proxy.failing("refuse"):
            await until(lambda: rt.keyring.current_version == 2)  # seen in the store, not unwrapped
            r = await put(gw, "during", CANARY)
            assert r.status_code == 503 and r.json()["error"]["code"] == "kms_unavailable", r.text
            assert int(r.headers["retry-after"]) > 0
            assert (await gw.client.get("/v1/secrets/local/during")).status_code == 404
            assert await secret_versions(gw) == stored  # nothing written
            no_canary(logs, r.text)
            # /v1/keys/rotate needs the KMS too: 503, no new version.
            r = await gw.client.post("/v1/keys/rotate")
            assert r.status_code == 503 and r.json()["error"]["code"] == "kms_unavailable"
            assert [k.version for k in await kek_rows(gw)] == [1, 2]
        # The KMS answers again: the follower unwraps version 2 by itself; writes go on under it.
        await until(lambda: 2 in rt.keyring.versions())
        r = await put(gw, "during", CANARY)
        assert r.status_code == 200, r.text
        await settled(gw, 2)  # what this replica wrote under version 1 is moved by itself
        assert await versions_used(gw) == {2}
        assert (await reveal(gw, "before")).json()["data"]["v"] == CANARY
    no_canary(logs)


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_two_replicas_on_postgresql_one_cut_off_from_the_kms(aws_settings, moto_server, logs) -> None:
    """Two gateways on one PostgreSQL store, each with its own way to the KMS. A rotates;
    B, cut off from the KMS, sees the new KEK version in the store and refuses writes it
    can't wrap under it (503, nothing written) instead of writing under the old one; when
    its KMS comes back B unwraps the version by itself, writes go on, and each reads the
    other's secrets."""
    b_proxy = TcpProxy(("127.0.0.1", moto_server.port))
    try:
        async with serving(aws_settings(kek_check_seconds=0.2)) as a, serving(
            aws_settings(kek_check_seconds=0.2, kek_aws_endpoint_url=f"http://127.0.0.1:{b_proxy.port}")
        ) as b:
            assert (await put(a, "from-a", CANARY)).status_code == 200
            assert (await put(b, "from-b", CANARY)).status_code == 200
            stored = await secret_versions(a)
            with b_proxy.failing("refuse"):
                r = await a.client.post("/v1/keys/rotate")
                assert r.status_code == 202 and r.json()["current_version"] == 2
                await until(lambda: b.runtime.keyring.current_version == 2)
                w = await put(b, "during", CANARY)
                assert w.status_code == 503 and w.json()["error"]["code"] == "kms_unavailable", w.text
                assert int(w.headers["retry-after"]) > 0
                assert await secret_versions(a) == stored
                r = await reveal(a, "from-b")  # A serves on, KMS or not
                assert r.status_code == 200 and r.json()["data"]["v"] == CANARY
            await until(lambda: 2 in b.runtime.keyring.versions())
            assert (await put(b, "during", CANARY)).status_code == 200
            await settled(a, 2)
            await settled(b, 2)
            assert await versions_used(a) == {2}
            for gw in (a, b):
                for path in ("from-a", "from-b", "during"):
                    assert (await reveal(gw, path)).json()["data"]["v"] == CANARY
    finally:
        b_proxy.stop()
    no_canary(logs)


async def test_two_replicas_making_the_same_kek_version_agree(aws_settings, moto_server) -> None:
    """Two replicas following the same KMS rotation at once: one version is made, the
    other replica takes it (the store's primary key decides), nothing is lost."""
    async with serving(aws_settings()) as gw:
        rt = gw.runtime
        assert (await put(gw, "x", CANARY)).status_code == 200
        other = KmsKeyRing(kek_source_for(aws_settings(kek_aws_endpoint_url=moto_server.endpoint_url)))
        await other.open(rt.store)
        assert await other.create_version() == 2
        # This replica has not looked at the store since: it also tries to make version 2.
        assert rt.keyring.versions() == [1]
        assert await rt.keyring.create_version() == 2  # the other's, unwrapped from the store
        assert rt.keyring.fingerprint(2) == other.fingerprint(2)
        assert [k.version for k in await kek_rows(gw)] == [1, 2]
        await other.aclose()
        assert (await put(gw, "y", CANARY)).status_code == 200
        assert (await reveal(gw, "x")).json()["data"]["v"] == CANARY


async def test_kms_grace_counts_from_when_the_follower_watches(aws_settings, moto_server) -> None:
    """A start-up slower than kek_kms_grace_seconds (migrations, a loaded machine) is not a
    silent KMS: grace counts only once the follower asks the KMS periodically."""
    async with serving(aws_settings()) as gw:
        ring = KmsKeyRing(kek_source_for(aws_settings(kek_aws_endpoint_url=moto_server.endpoint_url)),
                          grace_seconds=0.3)
        await ring.open(gw.runtime.store)
        await asyncio.sleep(0.5)  # the start-up between open() and the follower
        assert ring.unwrap(1, ring.wrap(1, b"k" * 32, b"aad"), b"aad") == b"k" * 32
        ring.watch()  # the follower starts; nothing answers for longer than grace from here
        await asyncio.sleep(0.5)
        with pytest.raises(KmsUnavailable, match="has not answered for over 0.3 s"):
            ring.wrap(1, b"k" * 32, b"aad")
        assert ring.wake.is_set()  # the follower is told to look at once
        await ring.check_kms()
        assert ring.unwrap(1, ring.wrap(1, b"k" * 32, b"aad"), b"aad") == b"k" * 32
        await ring.aclose()


async def test_aws_kms_as_an_off_switch(aws_settings, kms_proxy: TcpProxy, logs) -> None:
    """kek_kms_grace_seconds: once the KMS has not answered for that long, sealed reads and
    writes stop (503 kms_unavailable, nothing written) until it answers again."""
    async with serving(aws_settings(kek_check_seconds=0.2, kek_kms_grace_seconds=2)) as gw:
        assert (await put(gw, "a", CANARY)).status_code == 200
        stored = await secret_versions(gw)
        with kms_proxy.failing("refuse"):
            await asyncio.sleep(2.8)
            w = await put(gw, "b", CANARY)
            r = await reveal(gw, "a")
            for resp in (w, r):
                assert resp.status_code == 503 and resp.json()["error"]["code"] == "kms_unavailable", resp.text
                assert resp.headers.get("retry-after")
            assert await secret_versions(gw) == stored
            no_canary(logs, w.text, r.text)
        await until(lambda: _ok(put(gw, "b", CANARY)), timeout=10)
        assert (await reveal(gw, "a")).json()["data"]["v"] == CANARY
        assert (await reveal(gw, "b")).json()["data"]["v"] == CANARY
    no_canary(logs)


async def _ok(request: Any) -> bool:
    return (await request).status_code == 200


def test_kms_settings_are_validated(tmp_path: Path) -> None:
    base = dict(data_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="kek_source=aws-kms needs kek_aws_key_id"):
        load_settings(**base, kek_source="aws-kms")
    with pytest.raises(ConfigurationError, match="exactly one of kek_vault_token and kek_vault_token_file"):
        load_settings(**base, kek_source="vault-transit", kek_vault_url="http://127.0.0.1:1", kek_vault_key="k")
    with pytest.raises(ConfigurationError, match="unset kek_file and kek"):
        load_settings(**base, kek_source="aws-kms", kek_aws_key_id="k", kek_file=tmp_path / "kek")
    with pytest.raises(ConfigurationError, match="kek_aws_key_id set, but kek_source is not set"):
        load_settings(**base, kek_aws_key_id="k", kek_file=tmp_path / "kek")
    with pytest.raises(ConfigurationError, match="kek_vault_url must start with http"):
        load_settings(**base, kek_source="vault-transit", kek_vault_url="vault:8200", kek_vault_key="k",
                      kek_vault_token="t")
    with pytest.raises(ConfigurationError, match="longer than kek_check_seconds"):
        load_settings(**base, kek_source="aws-kms", kek_aws_key_id="k", kek_kms_grace_seconds=5)
    # --dev keeps its file KEK, and the environment spelling works.
    assert load_settings(**base, dev=True).kek_source is None
    env = {"CREDGATE_KEK_SOURCE": "vault-transit", "CREDGATE_KEK_VAULT_URL": "https://vault:8200",
           "CREDGATE_KEK_VAULT_KEY": "credgate", "CREDGATE_KEK_VAULT_TOKEN_FILE": "~/token"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s = load_settings(**base)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert s.kek_vault_mount == "transit" and s.kek_vault_token_file == Path("~/token").expanduser()
    assert isinstance(keyring_for(s, probe=False), KmsKeyRing)  # built without I/O


# --- vault-transit (a real OpenBao) --------------------------------------------------------

POLICY = """
path "{mount}/keys/{key}"    {{ capabilities = ["read"] }}
path "{mount}/encrypt/{key}" {{ capabilities = ["update"] }}
path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}
"""


@pytest.fixture
def transit(openbao, request: pytest.FixtureRequest) -> dict[str, str]:
    """A fresh transit key and a token whose policy allows only what the gateway needs."""
    mount = openbao.enable_transit("transit")
    key = f"credgate-{request.node.name[:20].replace('[', '-').replace(']', '')}-{os.urandom(3).hex()}"
    openbao.client().secrets.transit.create_key(name=key, mount_point=mount)
    openbao.write_policy(key, POLICY.format(mount=mount, key=key))
    return {"mount": mount, "key": key, "token": openbao.create_token([key])}


@pytest.fixture
def bao_proxy(openbao) -> Any:
    proxy = TcpProxy(openbao.address)
    yield proxy
    proxy.stop()


@pytest.fixture
def vault_settings(settings_factory, transit: dict[str, str], bao_proxy: TcpProxy, tmp_path: Path):
    token_file = tmp_path / "vault-token"
    token_file.write_text(transit["token"] + "\n")

    def make(**overrides: Any) -> Any:
        values: dict[str, Any] = dict(
            kek_file=None, kek_source="vault-transit", kek_vault_url=f"http://127.0.0.1:{bao_proxy.port}",
            kek_vault_mount=transit["mount"], kek_vault_key=transit["key"], kek_vault_token_file=token_file,
            kek_kms_timeout_seconds=2,
        )
        values.update(overrides)
        return settings_factory(**values)

    return make


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_vault_transit_store_rotation_and_restart(vault_settings, openbao, transit, logs) -> None:
    settings = vault_settings(kek_check_seconds=3600)
    admin = openbao.client().secrets.transit
    async with serving(settings) as gw:
        rt = gw.runtime
        await until(lambda: rt.keyring.source.calls["read_key"] >= 2)  # open and the follower's first look
        for i in range(10):
            assert (await put(gw, f"app/{i}", f"{CANARY}-{i}")).status_code == 200
        (row,) = await kek_rows(gw)
        assert row.wrapped_key.startswith(b"vault:v1:") and row.kms_key_version == "1"
        before = calls(gw)
        for _ in range(5):
            for i in range(10):
                assert (await reveal(gw, f"app/{i}")).json()["data"]["v"] == f"{CANARY}-{i}"
        assert (await put(gw, "app/extra", CANARY)).status_code == 200
        assert calls(gw) == before, dict(rt.keyring.source.calls)

        admin.rotate_key(name=transit["key"], mount_point=transit["mount"])  # transit key v2
        rt.keyring.wake.set()
        await settled(gw, 2)
        assert (await put(gw, "app/after", CANARY)).status_code == 200
        assert await versions_used(gw) == {2}
        rows = await kek_rows(gw)
        assert all(r.wrapped_key.startswith(b"vault:v2:") and r.kms_key_version == "2" for r in rows)
    # Nothing needs the transit key's version 1 any more: forbid decrypting with it, restart.
    admin.update_key_configuration(name=transit["key"], mount_point=transit["mount"], min_decryption_version=2)
    async with serving(settings) as gw:
        assert gw.runtime.keyring.source.calls["decrypt"] == 2
        for i in range(10):
            assert (await reveal(gw, f"app/{i}")).json()["data"]["v"] == f"{CANARY}-{i}"
    no_canary(logs)
    assert transit["token"] not in logs.text


async def test_vault_transit_refusals_are_clear(vault_settings, openbao, transit, bao_proxy: TcpProxy,
                                                tmp_path: Path) -> None:
    # A token that may read any transit key learns that this one does not exist.
    openbao.write_policy("transit-reader", f'path "{transit["mount"]}/keys/*" {{ capabilities = ["read"] }}')
    reader = openbao.create_token(["transit-reader"])
    with pytest.raises(ConfigurationError, match=r"vault-transit key transit/nope .*does not exist"):
        await probe(vault_settings(kek_vault_key="nope", kek_vault_token_file=None, kek_vault_token=reader))
    bad = tmp_path / "bad-token"
    bad.write_text("s.not-a-token-" + "x" * 20)
    with pytest.raises(ConfigurationError, match="the token was refused") as refused:
        await probe(vault_settings(kek_vault_token_file=bad))
    read_only = f"{transit['key']}-read"
    openbao.write_policy(read_only, f'path "{transit["mount"]}/keys/{transit["key"]}" {{ capabilities = ["read"] }}')
    token = openbao.create_token([read_only])
    with pytest.raises(ConfigurationError, match="the token may not use the key") as denied:
        await probe(vault_settings(kek_vault_token_file=None, kek_vault_token=token))
    with bao_proxy.failing("refuse"), pytest.raises(ConfigurationError, match="did not answer") as down:
        async with serving(vault_settings()):
            pass
    for exc in (refused.value, denied.value, down.value):
        text = str(exc)
        assert "\n" not in text and "refusing to start" in text and "CREDGATE_KEK_SOURCE=vault-transit" in text
        assert token not in text and transit["token"] not in text and "not-a-token" not in text
        assert reader not in text


async def test_vault_transit_down_during_writes_and_token_file_rotation(vault_settings, openbao, transit,
                                                                        bao_proxy: TcpProxy, tmp_path: Path,
                                                                        logs) -> None:
    settings = vault_settings(kek_check_seconds=0.2, kek_kms_grace_seconds=2)
    async with serving(settings) as gw:
        rt = gw.runtime
        assert (await put(gw, "a", CANARY)).status_code == 200
        stored = await secret_versions(gw)
        with bao_proxy.failing("refuse"):
            await asyncio.sleep(2.8)
            r = await put(gw, "b", CANARY)
            assert r.status_code == 503 and r.json()["error"]["code"] == "kms_unavailable", r.text
            assert r.headers.get("retry-after")
            assert await secret_versions(gw) == stored
            no_canary(logs, r.text)
        await until(lambda: _ok(put(gw, "b", CANARY)))
        # The token in the file is replaced (a Vault Agent renewal): the next KMS call uses it.
        old = transit["token"]
        (tmp_path / "vault-token").write_text(openbao.create_token([transit["key"]]) + "\n")
        openbao.client().auth.token.revoke(old)
        openbao.client().secrets.transit.rotate_key(name=transit["key"], mount_point=transit["mount"])
        await until(lambda: rt.keyring.current_version == 2)
        assert rt.keys.kms_error is None
    no_canary(logs)
