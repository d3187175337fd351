"""Keyless federation to Azure: the gateway as the issuer an Entra app's federated identity
credential trusts, and an ``azure`` connector that holds no secret.

The gateway is served over real HTTP (the ``served`` fixture of test_web_identity.py), because
the Entra stand-in (tests/standins/entra_storage.py) fetches its discovery document and JWKS
the way Entra does, verifies the assertion's signature, and matches ``iss``/``sub``/``aud``
exactly against the app's federated credential. The SAS it leads to is used with
azure-storage-blob.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.gateway.test_web_identity import served  # noqa: F401 - fixture
from tests.standins.entra_storage import EntraStorageStandIn

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

ACCOUNT, ALLOWED = "cgwiacct", "wi-allowed"


@pytest.fixture(scope="module")
def entra() -> Iterator[EntraStorageStandIn]:
    s = EntraStorageStandIn().start()
    s.seed(ACCOUNT, ALLOWED, {"report.txt": b"keyless"})
    yield s
    s.stop()


async def _connector(gw: Gateway, s: EntraStorageStandIn, name: str, client_id: str, **config: Any) -> None:
    r = await gw.client.put(f"/v1/connectors/{name}", json={
        "type": "azure", "auth_method": "web-identity",
        "config": {"tenant_id": s.tenant_id, "client_id": client_id, "authority": s.authority,
                   "ca_bundle": s.ca_file, "blob_endpoint": s.blob_endpoint(), **config},
        "resources": [f"blob-container:{ACCOUNT}/*"],
    })
    assert r.status_code == 201, r.text


def _read(s: EntraStorageStandIn, cred: dict[str, str]) -> bytes:
    from azure.storage.blob import ContainerClient

    client = ContainerClient.from_container_url(f"{cred['container_url']}?{cred['sas_token']}",
                                                connection_verify=s.ca_file, retry_total=0)
    return client.download_blob("report.txt").readall()


async def test_keyless_azure_connector_issues_a_sas(served: Gateway, entra: EntraStorageStandIn) -> None:  # noqa: F811
    gw = served
    issuer = gw.runtime.settings.issuer_url
    client_id = entra.add_federated_app(issuer, "connector:az-wi")
    entra.grant(client_id, ACCOUNT, "r")
    await _connector(gw, entra, "az-wi", client_id)
    shown = (await gw.client.get("/v1/connectors/az-wi")).json()
    assert shown["secret"] is None and shown["holds_secret"] is False
    types = {t["type"]: t for t in (await gw.client.get("/v1/connector-types")).json()["items"]}
    assert types["azure"]["keyless_auth_methods"] == ["web-identity"]

    r = await gw.client.post("/v1/credentials", json={"connector": "az-wi", "resource": f"blob-container:{ACCOUNT}/{ALLOWED}",
                                                      "ttl_seconds": 900})
    assert r.status_code == 200, r.text
    assert await asyncio.to_thread(_read, entra, r.json()["credential"]) == b"keyless"
    assert (client_id, "workload_identity", "https://storage.azure.com") in entra.token_requests
    assert (await gw.client.post("/v1/connectors/az-wi/verify")).json()["ok"] is True


async def test_entra_matches_the_subject_exactly(served: Gateway, entra: EntraStorageStandIn) -> None:  # noqa: F811
    gw = served
    issuer = gw.runtime.settings.issuer_url
    # The app trusts the admin principal's subject; the connector sends its fixed subject: refused.
    client_id = entra.add_federated_app(issuer, "credgate/admin_key:bootstrap")
    entra.grant(client_id, ACCOUNT, "r")
    await _connector(gw, entra, "az-fixed", client_id)
    r = await gw.client.post("/v1/credentials", json={"connector": "az-fixed", "resource": f"blob-container:{ACCOUNT}/{ALLOWED}"})
    assert r.status_code == 502 and "AADSTS700213" in r.json()["error"]["message"], r.text
    # federated_subject=principal sends the issuance's principal, which this credential names.
    await _connector(gw, entra, "az-principal", client_id, federated_subject="principal")
    r = await gw.client.post("/v1/credentials", json={"connector": "az-principal",
                                                      "resource": f"blob-container:{ACCOUNT}/{ALLOWED}"})
    assert r.status_code == 200, r.text
    assert await asyncio.to_thread(_read, entra, r.json()["credential"]) == b"keyless"
