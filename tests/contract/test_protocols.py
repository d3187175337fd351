"""Every registered backend and connector type has the shape its protocol module
(backends/base.py, connectors/base.py) says: the constructor, the lifecycle, declared
capabilities, and a sanitizer of its own when it brings an SDK. A new plugin that forgets
one of them fails here, by name."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from backends.base import BackendBase, BackendCapabilities
from connectors.base import ConnectorBase, ConnectorCapabilities, Revocability, TTLLimits, generic_sanitize
from gateway.plugins.registry import BACKEND_TYPES, CONNECTOR_TYPES, backend_class, connector_class

CANARY = "hunter2-CANARY-5b1e"


class _VendorError(Exception):
    """Shaped like the SDK errors the sanitizers know (a SQLSTATE, an AWS response, an errno)."""

    sqlstate = "42501"
    response = {"Error": {"Code": "AccessDenied", "Message": CANARY}}


def _params(fn: Any) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("type_name", sorted(BACKEND_TYPES))
def test_backend_type_satisfies_the_protocol(type_name: str) -> None:
    cls = backend_class(type_name)
    assert issubclass(cls, BackendBase), f"{type_name}: subclass backends.base.BackendBase"
    assert cls.type == type_name
    assert issubclass(cls.config_model, BaseModel)
    assert "capabilities" in vars(cls), f"{type_name}: declare capabilities = BackendCapabilities(...)"
    assert isinstance(cls.capabilities, BackendCapabilities)
    assert [n for n, _ in _params(cls.__init__)] == ["self", "name", "config", "context"], type_name
    for method in ("start", "aclose", "get", "metadata", "put", "delete", "restore", "list", "count", "check"):
        assert inspect.iscoroutinefunction(getattr(cls, method)), f"{type_name}.{method} must be async"
    _assert_sanitizer(cls, type_name, BACKEND_TYPES[type_name][1], BackendBase)


@pytest.mark.parametrize("type_name", sorted(CONNECTOR_TYPES))
def test_connector_type_satisfies_the_protocol(type_name: str) -> None:
    cls = connector_class(type_name)
    assert issubclass(cls, ConnectorBase), f"{type_name}: subclass connectors.base.ConnectorBase"
    assert cls.type == type_name
    assert issubclass(cls.config_model, BaseModel)
    assert isinstance(cls.auth_methods, Mapping) and cls.auth_methods
    assert all(issubclass(m, BaseModel) for m in cls.auth_methods.values())
    assert cls.resource_types and all(isinstance(t, str) for t in cls.resource_types)
    assert isinstance(cls.ttl, TTLLimits) and timedelta(0) < cls.ttl.min <= cls.ttl.default <= cls.ttl.max
    assert "capabilities" in vars(cls), f"{type_name}: declare capabilities = ConnectorCapabilities(...)"
    caps = cls.capabilities
    assert isinstance(caps, ConnectorCapabilities) and isinstance(caps.revocability, Revocability)
    # the mirrors the gateway and older callers read follow the one declaration
    assert (cls.revocability, cls.renewable, cls.wrap_only, cls.creates_at_target) == (
        caps.revocability, caps.renewable, caps.wrap_only, caps.creates_at_target
    )
    params = _params(cls.__init__)
    assert [n for n, _ in params[:4]] == ["self", "config", "auth_method", "material"], type_name
    assert ("name", inspect.Parameter.KEYWORD_ONLY) in params, f"{type_name}: take name= (keyword) and pass it on"
    assert ("pool", inspect.Parameter.KEYWORD_ONLY) in params, f"{type_name}: take pool= (keyword) and pass it on"
    for method in ("start", "aclose", "issue", "renew", "revoke", "verify", "list_resources"):
        assert inspect.iscoroutinefunction(getattr(cls, method)), f"{type_name}.{method} must be async"
    for method in ("validate_resource", "plan"):
        assert not inspect.iscoroutinefunction(getattr(cls, method)), f"{type_name}.{method} is pure, not async"
    _assert_sanitizer(cls, type_name, CONNECTOR_TYPES[type_name][1], ConnectorBase)


def _assert_sanitizer(cls: Any, type_name: str, extra: str | None, base: type) -> None:
    if extra is not None:  # it brings a vendor SDK: it must say what of that SDK's errors may be shown
        assert "sanitize" in vars(cls), f"{type_name}: define sanitize(exc) for its SDK's exceptions"
    for exc in (_VendorError(f"CREATE ROLE x PASSWORD '{CANARY}'"), OSError(111, CANARY), ValueError(CANARY)):
        shown = cls.sanitize(exc)
        assert isinstance(shown, str) and shown.startswith(type(exc).__name__)
        assert CANARY not in shown


def test_capabilities_are_frozen_data() -> None:
    for caps_type in (BackendCapabilities, ConnectorCapabilities):
        assert dataclasses.is_dataclass(caps_type) and caps_type.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_a_connector_that_forgets_its_capabilities_fails() -> None:
    class Forgetful(ConnectorBase):
        type = "forgetful"

    assert "capabilities" not in vars(Forgetful)
    with pytest.raises(AttributeError):
        Forgetful.capabilities  # noqa: B018


def test_generic_sanitizer_keeps_class_and_errno_only() -> None:
    assert generic_sanitize(ValueError(CANARY)) == "ValueError"
    assert generic_sanitize(ConnectionRefusedError(111, CANARY)) == "ConnectionRefusedError (111)"


async def test_run_sync_runs_off_the_loop_under_a_timeout() -> None:
    import asyncio
    import threading
    import time

    from connectors.base import run_sync

    loop_thread = threading.get_ident()
    assert await run_sync(lambda a, b: (a + b, threading.get_ident() != loop_thread), 1, 2, timeout=5) == (3, True)
    with pytest.raises(asyncio.TimeoutError):
        await run_sync(time.sleep, 0.5, timeout=0.05)


# --- the lifecycle, as the gateway drives it ------------------------------------------

from backends.local import LocalBackend  # noqa: E402
from connectors.static import StaticConnector  # noqa: E402

EVENTS: list[tuple[str, str, Any]] = []


class ProbeBackend(LocalBackend):
    """A local backend that records its lifecycle and declares itself not cacheable."""

    type = "probe"
    capabilities = BackendCapabilities(cacheable=False)

    async def start(self) -> None:
        EVENTS.append(("start", self.name, self.context.metadata_cache))

    async def aclose(self) -> None:
        EVENTS.append(("aclose", self.name, None))


async def test_mounts_start_a_backend_lend_the_cache_by_capability_and_close_it(gateway, monkeypatch) -> None:
    import gateway.plugins.backends as mounts_module

    real = mounts_module.backend_class
    monkeypatch.setattr(mounts_module, "backend_class", lambda t: ProbeBackend if t == "probe" else real(t))
    EVENTS.clear()
    mounts = gateway.runtime.mounts
    assert (await mounts.get("local")).context.metadata_cache is mounts.metadata  # local: cacheable
    await mounts.put("p1", "probe", {})
    first = await mounts.get("p1")
    assert EVENTS == [("start", "p1", None)]  # started before use; not cacheable: no cache lent
    await mounts.put("p1", "probe", {})  # a new configuration: rebuilt, the old one closed
    assert await mounts.get("p1") is not first
    assert EVENTS[1:] == [("start", "p1", None), ("aclose", "p1", None)]
    await mounts.delete("p1")
    assert EVENTS[-1] == ("aclose", "p1", None)


async def test_catalog_starts_a_connector_reuses_it_and_closes_it_when_dropped(gateway, monkeypatch) -> None:
    import asyncio

    events: list[tuple[str, int]] = []

    async def start(self) -> None:
        events.append(("start", id(self)))

    async def aclose(self) -> None:
        events.append(("aclose", id(self)))

    monkeypatch.setattr(StaticConnector, "start", start)
    monkeypatch.setattr(StaticConnector, "aclose", aclose)
    c = gateway.client
    assert (await c.put("/v1/secrets/local/vendors/k", json={"data": {"api_key": CANARY}})).status_code == 200
    body = {"type": "static", "auth_method": "static", "secret": "local/vendors/k", "resources": ["default"]}
    assert (await c.put("/v1/connectors/st", json=body)).status_code == 201
    catalog = gateway.runtime.catalog
    one = await catalog.instance(await catalog.get("st"))
    assert one.name == "st" and events == [("start", id(one))]
    if catalog.material is not None:  # reused while its cached material is current
        assert await catalog.instance(await catalog.get("st")) is one
    assert (await c.put("/v1/connectors/st", json={**body, "resources": ["default", "other"]})).status_code == 200
    for _ in range(100):  # the change is heard through the feed; the old instance is closed
        if ("aclose", id(one)) in events:
            break
        await asyncio.sleep(0.05)
    assert ("aclose", id(one)) in events
    two = await catalog.instance(await catalog.get("st"))
    assert two is not one and events[-1] == ("start", id(two))
    await catalog.aclose()
    assert events[-1] == ("aclose", id(two))


def test_describe_uses_the_connector_types_own_sanitizer() -> None:
    from gateway.issuing.service import describe

    exc = _VendorError(CANARY)
    assert describe(exc, "postgres") == "_VendorError (42501)"
    assert describe(exc, "aws") == "_VendorError (AccessDenied)"
    assert describe(exc) == describe(exc, "static") == "_VendorError"


class ReadOnlyProbe(LocalBackend):
    type = "probe-ro"
    capabilities = BackendCapabilities(read_only=True)


class PlainProbe(LocalBackend):
    type = "probe-plain"
    capabilities = BackendCapabilities(versions=False, soft_delete=False, check_and_set=False)


async def test_secret_routes_refuse_what_a_backend_does_not_declare(gateway, monkeypatch) -> None:
    import gateway.plugins.backends as mounts_module

    probes = {"probe-ro": ReadOnlyProbe, "probe-plain": PlainProbe}
    real = mounts_module.backend_class
    monkeypatch.setattr(mounts_module, "backend_class", lambda t: probes.get(t) or real(t))
    c = gateway.client
    for name, kind in (("ro", "probe-ro"), ("plain", "probe-plain")):
        await gateway.runtime.mounts.put(name, kind, {})

    def code(r: Any) -> tuple[int, str]:
        return r.status_code, r.json()["error"]["code"]

    assert code(await c.put("/v1/secrets/ro/a", json={"data": {"k": "v"}})) == (409, "backend_read_only")
    assert code(await c.delete("/v1/secrets/ro/a")) == (409, "backend_read_only")
    assert (await c.put("/v1/secrets/plain/a", json={"data": {"k": "v"}})).status_code == 200
    assert code(await c.put("/v1/secrets/plain/a", json={"data": {"k": "w"}, "cas": 1})) == (409, "not_supported")
    assert code(await c.delete("/v1/secrets/plain/a")) == (409, "not_supported")
    assert code(await c.post("/v1/secrets/plain/a:restore")) == (409, "not_supported")
    assert (await c.delete("/v1/secrets/plain/a", params={"destroy": "true"})).status_code == 204
