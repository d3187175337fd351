"""The redis connector against the real Redis at 127.0.0.1:6379.

Every test works under its own random key prefix and removes the keys and
ACL users it made.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from connectors.base import (
    IssueRequest,
    ResourceNotSupported,
    Revocability,
    ServiceConnector,
    TargetError,
    TargetUnreachable,
    role_name,
)
from connectors.redis import SERVER_WIDE_EXCLUSIONS, RedisConfig, RedisConnector, RedisPasswordMaterial
from gateway.errors import ValidationFailed
from tests.conftest import service_missing
from tests.services.pgcluster import free_port

REDIS_URL = os.environ.get("CREDGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        service_missing("Redis", f"{REDIS_URL}: {type(exc).__name__}")
    return REDIS_URL


class Scratch:
    """A random key prefix, and a record of the users and keys to remove."""

    def __init__(self, url: str, admin: redis.Redis) -> None:
        self.url = url
        self.admin = admin
        self.tag = "cgt" + secrets.token_hex(4)
        self.users: list[str] = []
        self.keys: list[tuple[int, str]] = []

    def db(self, number: int) -> redis.Redis:
        return redis.Redis.from_url(self.url.rsplit("/", 1)[0] + f"/{number}", socket_timeout=5)

    def set(self, key: str, value: str, db: int = 0) -> None:
        with self.db(db) as client:
            client.set(key, value)
        self.keys.append((db, key))

    def lease(self, conn: RedisConnector, resource: str, ttl: int = 60) -> IssueRequest:
        lease_id = "lease_" + secrets.token_hex(14)
        state = conn.plan(lease_id, resource)
        self.users.append(state["user"])
        return IssueRequest(
            lease_id=lease_id,
            resource=resource,
            ttl=timedelta(seconds=ttl),
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl),
            revoke_state=state,
            timeout_seconds=5,
        )

    def cleanup(self) -> None:
        for user in self.users:
            self.admin.execute_command("ACL", "DELUSER", user)
        for db, key in self.keys:
            with self.db(db) as client:
                client.delete(key)


@pytest.fixture
def scratch(redis_url: str) -> Iterator[Scratch]:
    admin = redis.Redis.from_url(redis_url, socket_timeout=5, decode_responses=True)
    s = Scratch(redis_url, admin)
    try:
        yield s
    finally:
        s.cleanup()
        admin.close()


def connector(url: str, **config: object) -> RedisConnector:
    return RedisConnector(RedisConfig(**config), "password", RedisPasswordMaterial(url=url))


def client_for(url: str) -> redis.Redis:
    """A client that does not reconnect, so a killed connection shows as an error."""
    return redis.Redis.from_url(url, socket_timeout=5, retry=Retry(NoBackoff(), 0), decode_responses=True)


# -- metadata and pure methods ------------------------------------------------


def test_metadata_and_protocol() -> None:
    conn = connector("redis://127.0.0.1:6379/0")
    assert isinstance(conn, ServiceConnector)
    assert RedisConnector.type == "redis"
    assert set(RedisConnector.auth_methods) == {"password"}
    assert RedisConnector.resource_types == ("keyspace",)
    assert RedisConnector.revocability is Revocability.REVOCABLE
    assert RedisConnector.renewable is True and RedisConnector.wrap_only is False
    assert RedisConnector.ttl.default == timedelta(hours=1)
    assert RedisConnector.ttl.min == timedelta(seconds=1)
    assert RedisConnector.ttl.max == timedelta(hours=24)


@pytest.mark.parametrize("grant", ["+@read", "-@write", "+get", "-config|set", "+@all"])
def test_config_accepts_grants(grant: str) -> None:
    assert RedisConfig(categories=[grant]).categories == [grant]


@pytest.mark.parametrize("grant", ["@read", "+@READ", "+get x", "+@read,+@write", "", "+", "allkeys", "~*", "+@"])
def test_config_refuses_grants(grant: str) -> None:
    with pytest.raises(ValueError):
        RedisConfig(categories=[grant])
    with pytest.raises(ValueError):
        RedisConfig(resource_commands={"x*": [grant]})


@pytest.mark.parametrize("sep", ["*", "a b", "", "[", "?", "too-long-sep"])
def test_config_refuses_separators(sep: str) -> None:
    with pytest.raises(ValueError):
        RedisConfig(key_separator=sep)


def test_config_refuses_unknown_fields_and_empty_grants() -> None:
    with pytest.raises(ValueError):
        RedisConfig(categorys=["+@read"])
    with pytest.raises(ValueError):
        RedisConfig(categories=[])
    with pytest.raises(ValueError):
        RedisConfig(resource_commands={"a b": ["+@read"]})


def test_material_url_errors_do_not_quote_it() -> None:
    for bad in ("http://:hunter2@h:6379", "redis://:hunter2@h:6379/x", "redis://:hunter2@:6379"):
        with pytest.raises(ValueError) as info:
            RedisPasswordMaterial(url=bad)
        assert "hunter2" not in str(info.value.errors(include_input=False))
    assert "hunter2" not in repr(RedisPasswordMaterial(url="redis://:hunter2@h:6379", password="hunter2"))


def test_unknown_auth_method_and_bad_config_objects() -> None:
    with pytest.raises(ValidationFailed):
        RedisConnector(RedisConfig(), "token", RedisPasswordMaterial(url="redis://h"))
    conn = RedisConnector({"categories": ["+@write"]}, "password", {"url": "redis://h:1/2"})
    assert conn.config.categories == ["+@write"]
    with pytest.raises(ValidationFailed) as info:
        RedisConnector({}, "password", {"url": "redis://:hunter2@h", "pasword": "x"})
    assert "hunter2" not in info.value.message


def test_validate_resource_and_plan() -> None:
    conn = connector("redis://127.0.0.1:6379/0")
    assert conn.validate_resource("features") == "keyspace"
    assert conn.validate_resource("a.b_c-1") == "keyspace"
    for bad in ("", "feat*", "a:b", "a b", "x" * 129, "feat?"):
        with pytest.raises(ResourceNotSupported):
            conn.validate_resource(bad)
    lease = "lease_0190aa55bb66" + "c" * 16
    assert conn.plan(lease, "features") == {"user": role_name(lease)}
    assert conn.plan(lease, "features") == conn.plan(lease, "other")  # pure, by lease only
    with pytest.raises(ResourceNotSupported):
        conn.plan(lease, "feat*")


def test_acl_rules() -> None:
    conn = connector("redis://127.0.0.1:6379/0")
    assert conn.acl_rules("features", "PW") == [
        "reset", "on", ">PW", "~features:*", "resetchannels", "-@all", "+@read", *SERVER_WIDE_EXCLUSIONS,
    ]
    assert SERVER_WIDE_EXCLUSIONS[0] == "-@dangerous"
    assert {"-function|flush", "-function|load", "-function|delete", "-function|restore", "-script|flush",
            "-script|kill"} <= set(SERVER_WIDE_EXCLUSIONS)
    # The exclusions come after whatever is granted, so no category can bring those commands back.
    rules = connector("redis://127.0.0.1:6379/0", categories=["+@all"]).acl_rules("x", "PW")
    assert rules[rules.index("+@all") + 1:] == list(SERVER_WIDE_EXCLUSIONS)
    conn = connector(
        "redis://127.0.0.1:6379/4",
        categories=["+@read", "+@write"],
        resource_commands={"cache*": ["+get", "+set"], "*": ["+@read"]},
        key_separator="/",
        allow_dangerous=True,
    )
    assert conn.acl_rules("cache1", "PW")[3:] == ["~cache1/*", "resetchannels", "-@all", "+get", "+set", "+select"]
    assert conn.acl_rules("other", "PW")[6:] == ["+@read", "+select"]


# -- against Redis --------------------------------------------------------------


async def test_issued_credential_reads_its_prefix_only(redis_url: str, scratch: Scratch) -> None:
    feat = scratch.tag + "feat"
    scratch.set(f"{feat}:x", "hello")
    scratch.set(f"{scratch.tag}other:x", "secret")
    conn = connector(redis_url)
    req = scratch.lease(conn, feat)
    issued = await conn.issue(req)

    cred = issued.credential
    assert set(cred) == {"username", "password", "host", "port", "url"}
    assert cred["username"] == req.revoke_state["user"]
    assert cred["url"] == f"redis://{cred['username']}:{cred['password']}@127.0.0.1:6379"
    assert (cred["host"], cred["port"]) == ("127.0.0.1", "6379")
    assert issued.expires_at == req.expires_at
    assert cred["password"] not in repr(issued)

    acl = scratch.admin.acl_getuser(cred["username"])
    assert acl["keys"] == [f"~{feat}:*"] and acl["channels"] == []

    with client_for(cred["url"]) as c:
        assert c.get(f"{feat}:x") == "hello"
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.get(f"{scratch.tag}other:x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.set(f"{feat}:x", "changed")
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.flushdb()  # in @write too, but removed by -@dangerous
    assert scratch.admin.get(f"{feat}:x") == "hello"

    with pytest.raises(redis.exceptions.AuthenticationError):
        client_for(cred["url"].replace(cred["password"], "wrong")).ping()
    await conn.revoke(req.revoke_state)


async def test_resource_commands_override_grants(redis_url: str, scratch: Scratch) -> None:
    rw = scratch.tag + "rw"
    conn = connector(redis_url, resource_commands={f"{scratch.tag}rw*": ["+@read", "+@write"]})
    req = scratch.lease(conn, rw)
    cred = (await conn.issue(req)).credential
    scratch.keys.append((0, f"{rw}:y"))
    with client_for(cred["url"]) as c:
        assert c.set(f"{rw}:y", "1") is True
        assert c.get(f"{rw}:y") == "1"
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.set(f"{scratch.tag}other:y", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.flushall()
    await conn.revoke(req.revoke_state)


@pytest.mark.parametrize("grants", [["+@read", "+@write"], ["+@all"], ["+@write", "+@scripting"]])
async def test_server_wide_commands_stay_refused_whatever_is_granted(
    redis_url: str, scratch: Scratch, grants: list[str]
) -> None:
    """FUNCTION FLUSH/LOAD/DELETE (in @write) and SCRIPT FLUSH/KILL act on the whole server:
    a lease on one key prefix can't run them, even with +@write or +@all."""
    mine = scratch.tag + "fn"
    conn = connector(redis_url, categories=grants)
    req = scratch.lease(conn, mine)
    cred = (await conn.issue(req)).credential
    scratch.keys.append((0, f"{mine}:k"))
    library = f"#!lua name={scratch.tag}lib\nredis.register_function('{scratch.tag}f', function() return 1 end)"
    scratch.admin.execute_command("FUNCTION", "LOAD", library)  # someone else's function, which must survive
    try:
        with client_for(cred["url"]) as c:
            assert c.set(f"{mine}:k", "1") is True  # the grant itself works
            refused = [
                ("FUNCTION", "FLUSH"), ("FUNCTION", "DELETE", f"{scratch.tag}lib"),
                ("FUNCTION", "LOAD", "REPLACE", library), ("FUNCTION", "RESTORE", "x"), ("FUNCTION", "KILL"),
                ("SCRIPT", "FLUSH"), ("SCRIPT", "KILL"), ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"),
                ("KEYS", "*"), ("SWAPDB", "0", "1"), ("ACL", "LIST"), ("MONITOR",),
            ]
            for command in refused:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    c.execute_command(*command)
        assert scratch.admin.get(f"{mine}:k") == "1"
        (library_info,) = scratch.admin.function_list(library=f"{scratch.tag}lib")  # still loaded
        assert dict(zip(library_info[::2], library_info[1::2]))["library_name"] == f"{scratch.tag}lib"
    finally:
        try:
            scratch.admin.execute_command("FUNCTION", "DELETE", f"{scratch.tag}lib")
        except redis.exceptions.ResponseError:
            pass  # already gone: the failure above says why
        await conn.revoke(req.revoke_state)


async def test_database_number_is_kept(redis_url: str, scratch: Scratch) -> None:
    feat = scratch.tag + "db"
    scratch.set(f"{feat}:x", "in-db-3", db=3)
    conn = connector(redis_url.rsplit("/", 1)[0] + "/3")
    req = scratch.lease(conn, feat)
    cred = (await conn.issue(req)).credential
    assert cred["url"].endswith(":6379/3")
    with client_for(cred["url"]) as c:
        assert c.get(f"{feat}:x") == "in-db-3"
    await conn.revoke(req.revoke_state)


async def test_revoke_kills_open_connections_and_is_idempotent(redis_url: str, scratch: Scratch) -> None:
    feat = scratch.tag + "feat"
    scratch.set(f"{feat}:x", "v")
    conn = connector(redis_url)
    req = scratch.lease(conn, feat)
    cred = (await conn.issue(req)).credential
    user = cred["username"]

    with client_for(cred["url"]) as c:
        assert c.get(f"{feat}:x") == "v"  # the connection is open and authenticated
        assert f"user={user}" in scratch.admin.execute_command("CLIENT", "LIST", "TYPE", "normal")
        await conn.revoke(req.revoke_state)
        with pytest.raises(redis.exceptions.ConnectionError):
            c.get(f"{feat}:x")
    assert scratch.admin.acl_getuser(user) is None
    assert f"user={user} " not in scratch.admin.execute_command("CLIENT", "LIST")
    with pytest.raises(redis.exceptions.AuthenticationError):
        client_for(cred["url"]).ping()

    await conn.revoke(req.revoke_state)  # already gone
    await conn.revoke(scratch.lease(conn, feat).revoke_state)  # planned, never issued


async def test_revocations_of_one_user_at_the_same_moment_and_out_of_band(redis_url: str, scratch: Scratch) -> None:
    feat = scratch.tag + "feat"
    conn, other = connector(redis_url), connector(redis_url)
    reqs = [scratch.lease(conn, feat) for _ in range(6)]
    users = [(await conn.issue(req)).credential["username"] for req in reqs]
    results = await asyncio.gather(
        *(c.revoke(req.revoke_state) for req in reqs for c in (conn, other)), return_exceptions=True
    )
    assert [r for r in results if r is not None] == []
    assert [u for u in users if scratch.admin.acl_getuser(u) is not None] == []
    # Deleted by someone else before the revoke (ACL DELUSER of a missing user answers 0): revoked.
    req = scratch.lease(conn, feat)
    user = (await conn.issue(req)).credential["username"]
    assert scratch.admin.acl_deluser(user) == 1
    await conn.revoke(req.revoke_state)
    assert scratch.admin.acl_getuser(user) is None


async def test_renew_checks_the_user_exists(redis_url: str, scratch: Scratch) -> None:
    conn = connector(redis_url)
    req = scratch.lease(conn, scratch.tag + "feat")
    await conn.issue(req)
    later = req.expires_at + timedelta(hours=1)
    assert await conn.renew(req.revoke_state, later) == later
    await conn.revoke(req.revoke_state)
    with pytest.raises(TargetError) as info:
        await conn.renew(req.revoke_state, later)
    assert info.value.code == "credential_missing"


async def test_verify_and_list_resources(redis_url: str, scratch: Scratch) -> None:
    scratch.set(f"{scratch.tag}feat:x", "v")
    conn = connector(redis_url)
    result = await conn.verify()
    assert result.ok and result.identity == "default"
    assert "default" in result.message
    assert isinstance(result.reachable["keyspace"], list)
    prefixes = await conn.list_resources("keyspace")
    assert all(conn.validate_resource(p) == "keyspace" for p in prefixes)
    if scratch.admin.dbsize() <= 50:  # one SCAN COUNT 100 returns every key of a small database
        assert f"{scratch.tag}feat" in result.reachable["keyspace"]
        assert f"{scratch.tag}feat" in prefixes
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("bucket")


async def test_verify_as_a_restricted_user(redis_url: str, scratch: Scratch) -> None:
    user, password = scratch.tag + "adm", secrets.token_hex(16)
    scratch.users.append(user)
    scratch.admin.execute_command("ACL", "SETUSER", user, "on", ">" + password, "-@all", "+acl|whoami", "+ping")
    conn = RedisConnector(RedisConfig(), "password", RedisPasswordMaterial(url=redis_url, username=user, password=password))
    result = await conn.verify()
    assert result.ok and result.identity == user and "SCAN is not permitted" in result.message
    assert result.reachable == {}
    # ...and it can't create users: a permission error, no password in it
    req = scratch.lease(conn, "features")
    with pytest.raises(TargetError) as info:
        await conn.issue(req)
    assert info.value.code == "target_permission_denied"
    assert password not in info.value.message


async def test_errors_never_carry_passwords(redis_url: str, scratch: Scratch) -> None:
    secret = "hunter2-" + secrets.token_hex(8)
    host = redis_url.split("//", 1)[1].split("/", 1)[0]
    bad_login = RedisConnector(
        RedisConfig(), "password",
        RedisPasswordMaterial(url=f"redis://nosuchuser:{secret}@{host}/0", password=secret),
    )
    req = scratch.lease(bad_login, scratch.tag + "feat")
    with pytest.raises(TargetError) as info:
        await bad_login.issue(req)
    assert info.value.code == "target_auth_failed"
    texts = [info.value.message, str(info.value), repr(info.value), str(info.value.__cause__ or "")]
    with pytest.raises(TargetError) as info2:
        await bad_login.revoke(req.revoke_state)
    texts.append(info2.value.message)
    result = await bad_login.verify()
    assert not result.ok
    texts.append(result.message)

    dead = RedisConnector(
        RedisConfig(), "password",
        RedisPasswordMaterial(url=f"redis://:{secret}@127.0.0.1:{free_port('127.0.0.1')}/0"),
    )
    with pytest.raises(TargetUnreachable) as info3:
        await dead.issue(scratch.lease(dead, "features"))
    texts.append(info3.value.message)
    assert info3.value.status == 503
    result = await dead.verify()
    assert not result.ok and result.identity is None
    texts.append(result.message)
    with pytest.raises(TargetUnreachable):
        await dead.list_resources("keyspace")

    for text in texts:
        assert secret not in text
    assert secret not in repr(bad_login) and secret not in repr(dead)


def test_sanitize_keeps_the_class_only() -> None:
    from redis import exceptions as rx

    assert RedisConnector.sanitize(rx.AuthenticationError("WRONGPASS hunter2-canary")) == "AuthenticationError"
    assert RedisConnector.sanitize(rx.ResponseError("ERR key hunter2-canary")) == "ResponseError"
