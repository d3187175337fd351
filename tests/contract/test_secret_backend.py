"""The SecretBackend contract: every backend type passes this suite.

Parametrised over every implementation in the registry (today: ``local``, on
both stores). A new backend type adds a factory to BACKENDS; the test below
fails if the registry names a type with no factory here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from backends.base import SecretBackend, SecretValue
from gateway.errors import Conflict, NotFound
from gateway.plugins.registry import BACKEND_TYPES


async def local_backend(gateway_runtime) -> SecretBackend:
    return await gateway_runtime.mounts.get("local")


BACKENDS: dict[str, Callable[..., Awaitable[SecretBackend]]] = {"local": local_backend}


def test_every_registered_backend_type_runs_the_contract() -> None:
    assert set(BACKENDS) == set(BACKEND_TYPES)


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, gateway) -> AsyncIterator[SecretBackend]:
    yield await BACKENDS[request.param](gateway.runtime)


async def test_is_a_secret_backend(backend: SecretBackend) -> None:
    assert isinstance(backend, SecretBackend)
    assert backend.config_model.model_json_schema()["type"] == "object"


async def test_put_get_versions(backend: SecretBackend) -> None:
    m1 = await backend.put("c/one", {"a": "1"}, author="t")
    m2 = await backend.put("c/one", {"a": "2", "b": "x"}, author="t")
    assert (m1.current_version, m2.current_version) == (1, 2)
    assert m2.keys == ["a", "b"] and [v.version for v in m2.versions] == [1, 2]
    cur = await backend.get("c/one")
    assert isinstance(cur, SecretValue) and cur.version == 2 and cur.data == {"a": "2", "b": "x"}
    assert (await backend.get("c/one", 1)).data == {"a": "1"}
    with pytest.raises(NotFound) as e:
        await backend.get("c/one", 3)
    assert e.value.code == "version_not_found"


async def test_value_repr_is_redacted(backend: SecretBackend) -> None:
    await backend.put("c/r", {"token": "CANARY-repr"}, author="t")
    value = await backend.get("c/r")
    assert "CANARY" not in repr(value) and "CANARY" not in str(value) and "token" in repr(value)


async def test_missing_secret(backend: SecretBackend) -> None:
    for call in (backend.get("c/none"), backend.metadata("c/none"), backend.delete("c/none", author="t")):
        with pytest.raises(NotFound) as e:
            await call
        assert e.value.code == "secret_not_found"


async def test_cas(backend: SecretBackend) -> None:
    await backend.put("c/cas", {"a": "1"}, author="t", cas=0)
    with pytest.raises(Conflict):
        await backend.put("c/cas", {"a": "1"}, author="t", cas=0)
    assert (await backend.put("c/cas", {"a": "2"}, author="t", cas=1)).current_version == 2


async def test_soft_delete_restore_destroy(backend: SecretBackend) -> None:
    await backend.put("c/d", {"a": "1"}, author="t")
    await backend.delete("c/d", author="t")
    with pytest.raises(NotFound) as e:
        await backend.get("c/d")
    assert e.value.code == "secret_deleted"
    assert (await backend.restore("c/d")).deleted_at is None
    assert (await backend.get("c/d")).data == {"a": "1"}
    await backend.delete("c/d", author="t", destroy=True)
    with pytest.raises(NotFound) as e:
        await backend.metadata("c/d")
    assert e.value.code == "secret_not_found"


async def test_list_pages_in_order(backend: SecretBackend) -> None:
    for name in ["b", "a", "c", "aa", "a_b", "d/e"]:
        await backend.put(f"l/{name}", {"k": "v"}, author="t")
    page = await backend.list("l/", limit=4)
    assert page.items == ["l/a", "l/a_b", "l/aa", "l/b"] and page.next_after == "l/b"
    rest = await backend.list("l/", after=page.next_after, limit=4)
    assert rest.items == ["l/c", "l/d/e"] and rest.next_after is None
    assert (await backend.list("l/a_")).items == ["l/a_b"]


async def test_check_reports_health(backend: SecretBackend) -> None:
    health = await backend.check()
    assert health.ok is True and health.message
