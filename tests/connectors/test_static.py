"""The static connector: stored material handed out unchanged, only through wrap tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from connectors.base import IssueRequest, ResourceNotSupported, Revocability, ServiceConnector, TargetError
from connectors.static import StaticConfig, StaticConnector, StaticMaterial
from gateway.errors import NotRenewable, ValidationFailed

SECRETS = {"api_key": "sk-live-aaaaaaaaaaaaaaaa", "api_secret": "shh-bbbbbbbbbbbbbbbb", "region": "eu-west-1"}


def connector(keys: list[str] | None = None, material: dict[str, str] | None = None) -> StaticConnector:
    return StaticConnector(
        StaticConfig(keys=keys), "static", StaticMaterial.model_validate(SECRETS if material is None else material)
    )


def request(conn: StaticConnector, resource: str = "default") -> IssueRequest:
    ttl = timedelta(minutes=5)
    return IssueRequest(
        lease_id="lease_0190aabbccdd0123456789abcdef",
        resource=resource,
        ttl=ttl,
        expires_at=datetime.now(UTC) + ttl,
        revoke_state=conn.plan("lease_0190aabbccdd0123456789abcdef", resource),
    )


def test_metadata() -> None:
    assert isinstance(connector(), ServiceConnector)
    assert StaticConnector.type == "static"
    assert set(StaticConnector.auth_methods) == {"static"}
    assert StaticConnector.resource_types == ("static",)
    assert StaticConnector.wrap_only is True
    assert StaticConnector.revocability is Revocability.EXPIRY_ONLY
    assert StaticConnector.renewable is False
    assert (StaticConnector.ttl.default, StaticConnector.ttl.min, StaticConnector.ttl.max) == (
        timedelta(minutes=5), timedelta(seconds=1), timedelta(hours=1),
    )


def test_material_is_any_map_of_strings_and_never_shown() -> None:
    material = StaticMaterial.model_validate({"token": "t0p-s3cret", "odd key.name": "v", "values": "x"})
    assert set(material.values()) == {"token", "odd key.name", "values"}
    assert "t0p-s3cret" not in repr(material) and "t0p-s3cret" not in str(material)
    assert "t0p-s3cret" not in material.model_dump_json()
    for bad in ({"token": 1}, {"token": None}, {"token": ["a"]}, {"token": {"nested": "x"}}):
        with pytest.raises(ValidationError):
            StaticMaterial.model_validate(bad)
    assert "t0p-s3cret" not in repr(StaticConnector(StaticConfig(), "static", material))


def test_config_validation() -> None:
    assert StaticConfig().keys is None
    assert StaticConfig(keys=["a", "b.c"]).keys == ["a", "b.c"]
    for bad in ([], ["a", "a"], [""], ["x" * 129], ["bad\nkey"]):
        with pytest.raises(ValidationError):
            StaticConfig(keys=bad)
    with pytest.raises(ValidationError):
        StaticConfig(key=["a"])
    with pytest.raises(ValidationFailed):
        StaticConnector(StaticConfig(), "password", StaticMaterial())
    conn = StaticConnector({"keys": ["api_key"]}, "static", {"api_key": "v"})  # plain dicts are validated
    assert conn.config.keys == ["api_key"]
    with pytest.raises(ValidationFailed) as info:
        StaticConnector({}, "static", {"api_key": 12345678})
    assert "12345678" not in info.value.message


def test_resources_are_labels() -> None:
    conn = connector()
    for label in ("default", "stripe", "team-a.prod_1", "x" * 64):
        assert conn.validate_resource(label) == "static"
        assert conn.plan("lease_x", label) == {}
    for bad in ("", "a b", "x" * 65, "a/b", "a:b", "*"):
        with pytest.raises(ResourceNotSupported):
            conn.validate_resource(bad)


async def test_issue_hands_out_all_keys_by_default() -> None:
    conn = connector()
    req = request(conn)
    issued = await conn.issue(req)
    assert issued.credential == SECRETS
    assert issued.expires_at == req.expires_at
    assert SECRETS["api_key"] not in repr(issued)


async def test_issue_hands_out_only_configured_keys() -> None:
    conn = connector(keys=["api_key", "region"])
    issued = await conn.issue(request(conn, "stripe"))
    assert issued.credential == {"api_key": SECRETS["api_key"], "region": "eu-west-1"}


async def test_missing_key_names_the_key_never_a_value() -> None:
    conn = connector(keys=["api_key", "webhook_secret", "other"])
    with pytest.raises(TargetError) as info:
        await conn.issue(request(conn))
    err = info.value
    assert err.code == "material_incomplete" and err.status == 502
    assert "'webhook_secret'" in err.message and "'other'" in err.message
    assert "'api_key'" not in err.message
    body = repr((err.body(), str(err)))
    for value in SECRETS.values():
        assert value not in body
    result = await conn.verify()
    assert not result.ok and "2 of 3" in result.message and "'webhook_secret'" in result.message
    for value in SECRETS.values():
        assert value not in result.message


async def test_empty_material_is_incomplete() -> None:
    conn = connector(material={})
    with pytest.raises(TargetError) as info:
        await conn.issue(request(conn))
    assert info.value.code == "material_incomplete"
    assert not (await conn.verify()).ok


async def test_verify_counts_keys_without_values() -> None:
    result = await connector().verify()
    assert result.ok and result.message.startswith("3 keys") and result.identity is None
    assert result.reachable == {}
    result = await connector(keys=["api_key"]).verify()
    assert result.ok and result.message.startswith("1 key ")
    for value in SECRETS.values():
        assert value not in result.message


async def test_renew_refused_revoke_noop_and_resources() -> None:
    conn = connector()
    with pytest.raises(NotRenewable) as info:
        await conn.renew({}, datetime.now(UTC))
    assert info.value.code == "not_renewable"
    assert await conn.revoke({}) is None
    assert await conn.revoke({}) is None
    assert await conn.list_resources("static") == ["default"]
    with pytest.raises(ResourceNotSupported):
        await conn.list_resources("keyspace")
