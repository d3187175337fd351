"""A backend whose credentials live in another backend's secret (a SecretRef): changing that
secret changes where the backend reads and writes, so it needs ``backends:manage``; and the
backend reads its credentials again when the secret changes."""

from __future__ import annotations

import pytest

from backends.base import BackendCapabilities, Health, SecretRef
from backends.local import LocalBackend
from pydantic import BaseModel, ConfigDict
from tests.conftest import Gateway

STARTS: list[str] = []


class RefConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credential: SecretRef


class RefProbe(LocalBackend):
    """A local backend that reads a credential from another backend at start (as vault's
    AppRole secret id or aws's keys do) and reports which value it holds."""

    type = "probe-ref"
    config_model = RefConfig
    capabilities = BackendCapabilities(cacheable=False)

    async def start(self) -> None:
        assert self.context.read_ref is not None
        self.credential = await self.context.read_ref(self.config.credential)
        STARTS.append(self.credential)

    async def check(self) -> Health:
        return Health(True, "probe")


@pytest.fixture
def probe_type(monkeypatch) -> None:
    import gateway.plugins.backends as mounts_module
    import gateway.plugins.registry as registry

    real = registry.backend_class
    monkeypatch.setattr(mounts_module, "backend_class", lambda t: RefProbe if t == "probe-ref" else real(t))
    STARTS.clear()


async def test_changing_a_backends_credentials_needs_backends_manage_and_the_backend_reads_them_again(
    gateway: Gateway, probe_type
) -> None:
    c = gateway.client
    assert (await c.put("/v1/secrets/local/ops/cred", json={"data": {"token": "first"}})).status_code == 200
    ref = {"backend": "local", "path": "ops/cred", "key": "token"}
    r = await c.put("/v1/backends/withref", json={"type": "probe-ref", "config": {"credential": ref}})
    assert r.status_code == 201, r.text
    await gateway.runtime.mounts.get("withref")
    assert STARTS == ["first"]

    # The admin (backends:manage) rotates the credential: the backend reads it again at next use.
    assert (await c.put("/v1/secrets/local/ops/cred", json={"data": {"token": "second"}})).status_code == 200
    backend = await gateway.runtime.mounts.get("withref")
    assert backend.credential == "second" and STARTS == ["first", "second"]

    # A caller who may write secrets but not manage backends (the built-in operator) can't swap them.
    r = await c.post("/v1/admin-keys", json={"name": "op", "role": "operator"})
    assert r.status_code in (200, 201), r.text
    async with gateway.as_token(r.json()["token"]) as op:
        r = await op.put("/v1/secrets/local/ops/cred", json={"data": {"token": "attacker"}})
        assert r.status_code == 403 and "backends:manage" in r.json()["error"]["message"], r.text
        assert (await op.delete("/v1/secrets/local/ops/cred")).status_code == 403
        # Other secrets are the operator's to write as before.
        assert (await op.put("/v1/secrets/local/ops/other", json={"data": {"k": "v"}})).status_code == 200
    revealed = await c.get("/v1/secrets/local/ops/cred", params={"reveal": "true"})
    assert revealed.json()["data"] == {"token": "second"}  # nothing changed
    assert (await gateway.runtime.mounts.get("withref")).credential == "second"


async def test_a_vendor_mount_can_be_removed_while_its_store_holds_secrets_or_is_down(gateway: Gateway, monkeypatch) -> None:
    """A vendor store's secrets are the customer's: removing credgate's mount leaves them there,
    and does not need the store to answer (a local mount still has to be emptied first)."""
    import gateway.plugins.backends as mounts_module
    import gateway.plugins.registry as registry

    class VendorProbe(LocalBackend):  # stands for a vendor type: not `local`
        type = "probe-vendor"
        capabilities = BackendCapabilities(cacheable=False)

        async def count(self) -> int:  # a store that holds secrets, and is down right now
            from gateway.errors import TargetUnreachable

            raise TargetUnreachable("the vendor store is down")

    real = registry.backend_class
    monkeypatch.setattr(mounts_module, "backend_class", lambda t: VendorProbe if t == "probe-vendor" else real(t))
    c = gateway.client
    assert (await c.put("/v1/backends/vendor", json={"type": "probe-vendor", "config": {}})).status_code == 201
    assert (await c.delete("/v1/backends/vendor")).status_code == 204
    assert (await c.get("/v1/backends/vendor")).status_code == 404
