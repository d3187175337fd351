"""Keyless GCP: a ``gcp`` connector with auth method ``web-identity`` in a real gateway.

The gateway is served over real HTTP (tests/gateway/test_web_identity.py's ``served``: its
public_url is its own address), because the party that trusts it fetches its discovery
document and JWKS as Google does. That party is tests/standins/gcp_auth.py: a workload
identity pool provider configured with the gateway's issuer (signature, ``iss``, ``aud``,
``exp``, ``google.subject = assertion.sub``), STS, and IAM Credentials, whose tokenCreator
binding names the pool's principals. The token the gateway hands out is then used against the
stand-in's Cloud Storage with google-auth.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.connectors.test_gcp import ALLOWED, OTHER, POOL, PROJECT, TARGET, objects
from tests.gateway.test_web_identity import served  # noqa: F401 - fixture
from tests.standins.gcp_auth import GCPAuthStandIn

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def google() -> Iterator[GCPAuthStandIn]:
    gcp = GCPAuthStandIn(PROJECT).start()
    try:
        gcp.add_service_account(TARGET)
        gcp.grant_token_creator(TARGET, gcp.pool_principal_set(POOL))
        for bucket in (ALLOWED, OTHER):
            gcp.add_bucket(bucket, {"report.txt": f"in {bucket}".encode()})
        yield gcp
    finally:
        gcp.stop()


class _Target:  # what tests.connectors.test_gcp.objects needs
    def __init__(self, gcp: GCPAuthStandIn) -> None:
        self.gcp = gcp


async def _keyless(gw: Gateway, gcp: GCPAuthStandIn, provider: str, name: str) -> httpx.Response:
    e = gcp.endpoint
    return await gw.client.put(f"/v1/connectors/{name}", json={
        "type": "gcp", "auth_method": "web-identity",
        "config": {"project_id": PROJECT, "target_service_account": TARGET, "workload_identity_provider": provider,
                   "iam_endpoint": e, "sts_endpoint": e, "storage_endpoint": e},
        "resources": [f"gcs-bucket:{ALLOWED}", f"gcp-project:{PROJECT}"],
    })


async def test_a_keyless_gcp_connector_trusts_the_gateways_own_issuer(served: Gateway, google: GCPAuthStandIn) -> None:
    gw = served
    issuer = gw.runtime.settings.issuer_url
    provider = google.add_provider(POOL, "gateway-oidc", issuer)
    r = await _keyless(gw, google, provider, "gcp-wi")
    assert r.status_code == 201, r.text
    assert (await gw.client.get("/v1/connectors/gcp-wi")).json()["secret"] is None

    r = await gw.client.post("/v1/credentials", json={"connector": "gcp-wi", "resource": f"gcs-bucket:{ALLOWED}",
                                                      "ttl_seconds": 900})
    assert r.status_code == 200, r.text
    issued = r.json()
    token = issued["credential"]["access_token"]
    assert await asyncio.to_thread(objects, _Target(google), token, ALLOWED) == 200
    assert await asyncio.to_thread(objects, _Target(google), token, OTHER) == 403
    claims = google.accepted_claims[-1]
    assert claims["iss"] == issuer and claims["aud"] == "https:" + provider
    assert claims["sub"] == "credgate/admin_key:bootstrap" and claims["lease"] == issued["lease_id"]
    assert google.lifetimes[-1] == 900

    # A run's credential: the federated subject is the run's principal, and the run claim is carried.
    run = (await gw.client.post("/v1/runs/run-gcp/token", json={"connectors": ["gcp-wi"],
                                                               "resources": [f"gcs-bucket:{ALLOWED}"]})).json()
    async with httpx.AsyncClient(base_url=str(gw.client.base_url),
                                 headers={"Authorization": f"Bearer {run['token']}"}) as pipeline:
        r = await pipeline.post("/v1/runs/run-gcp/credentials", json={"connector": "gcp-wi",
                                                                       "resource": f"gcs-bucket:{ALLOWED}"})
    assert r.status_code in (200, 201), r.text
    assert google.accepted_claims[-1]["sub"] == "credgate/run:run-gcp"
    assert google.accepted_claims[-1]["run"] == "run-gcp"
    token = r.json()["credential"]["access_token"]
    assert google.token_info(token).principal == f"serviceAccount:{TARGET}"
    assert await asyncio.to_thread(objects, _Target(google), token, ALLOWED) == 200

    verified = (await gw.client.post("/v1/connectors/gcp-wi/verify")).json()
    assert verified["ok"] is True and verified["identity"] == TARGET, verified
    assert google.accepted_claims[-1]["sub"] == "connector:gcp-wi"


async def test_a_provider_trusting_another_issuer_gives_nothing(served: Gateway, google: GCPAuthStandIn) -> None:
    gw = served
    provider = google.add_provider(POOL, "other-oidc", "http://127.0.0.1:9/not-the-gateway")
    assert (await _keyless(gw, google, provider, "gcp-wx")).status_code == 201
    before = len(google.accepted_claims)
    r = await gw.client.post("/v1/credentials", json={"connector": "gcp-wx", "resource": f"gcp-project:{PROJECT}"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "target_auth_failed", r.text
    assert len(google.accepted_claims) == before
    leases: Any = (await gw.client.get("/v1/leases", params={"connector": "gcp-wx"})).json()["items"]
    assert all(item["state"] != "active" for item in leases)
