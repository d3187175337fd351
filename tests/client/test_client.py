"""The pipeline client against a real gateway over HTTP: each way to authenticate, typed
credentials, the cache, typed errors, and secret values never in repr, str or logs."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.client import (
    AsyncClient, Client, ClientCredentials, CredgateError, Credential, GatewayUnreachable, NotFound, PermissionDenied,
    RequestFailed, StaticCredential, TokenFile, Unauthenticated,
)
from gateway.client.credentials import PostgresCredential, credential_from
from tests.client.common import CANARY, add_static, post, put, start_server
from tests.gateway.test_cli import Server


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    for srv in start_server(tmp_path_factory, "client"):
        add_static(srv)
        yield srv


def test_admin_key_typed_static_credential_and_cache_hit(gw: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with Client(gw.addr, token=gw.token, margin=1) as c:
        cred = c.credentials("vendor", "default", ttl=60)
        assert isinstance(cred, StaticCredential) and cred.type == "static"
        assert cred["api_key"] == CANARY and cred.fields["user"] == "svc"
        assert cred.connector == "vendor" and cred.resource == "default" and not cred.renewable
        assert 55 < cred.remaining() <= 60 and cred.lease_id.startswith("lease_")
        assert c.credentials("vendor", "default", ttl=60) is cred  # cached: no second lease
        other = c.credentials("vendor", "other", ttl=60)
        assert other.lease_id != cred.lease_id  # cached per (connector, resource)
        for text in (repr(cred), str(cred), repr(c), repr(other)):
            assert CANARY not in text and "api_key" in repr(cred)
    assert CANARY not in caplog.text


def test_env_configuration(gw: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDGATE_ADDR", gw.addr)
    monkeypatch.setenv("CREDGATE_TOKEN", gw.token)
    with Client(margin=1) as c:
        assert c.addr == gw.addr
        assert c.credentials("vendor", "default", ttl=30)["api_key"] == CANARY


def test_run_token_from_env(gw: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    run = post(gw, "/v1/runs/run-client-1/token", {"connectors": ["vendor"], "resources": ["default"], "ttl_seconds": 600})
    monkeypatch.delenv("CREDGATE_TOKEN", raising=False)
    monkeypatch.setenv("CREDGATE_RUN_TOKEN", run["token"])
    with Client(gw.addr, margin=1) as c:
        cred = c.credentials("vendor", "default", ttl=30)
        assert cred["api_key"] == CANARY
        with pytest.raises(PermissionDenied) as denied:  # outside the run's scope
            c.credentials("vendor", "other", ttl=30)
        assert denied.value.status == 403 and denied.value.code
    with Client(gw.addr, token=gw.token) as admin:
        assert admin.request("GET", f"/v1/leases/{cred.lease_id}")["run_id"] == "run-client-1"


def test_a_metadata_server_mints_and_ends_runs(gw: Server) -> None:
    """Client.run_token / end_run: the metadata server's side of a run; the run's client
    revokes its own lease at close, and an ended run's token is refused."""
    with Client(gw.addr, token=gw.token) as server:
        run = server.run_token("run-client-2", ["vendor"], ["default"], ttl=600)
        assert run.token not in repr(run) and "redacted" in repr(run)
        assert (run.run_id, run.connectors, run.resources) == ("run-client-2", ("vendor",), ("default",))
        assert 590 <= run.expires_in <= 600
        with Client(gw.addr, run_token=run.token, margin=1) as pipeline:
            first = pipeline.credentials("vendor", "default", ttl=30)
        assert server.request("GET", f"/v1/leases/{first.lease_id}")["state"] == "revoked"  # close(), as its owner
        with Client(gw.addr, run_token=run.token, margin=1) as pipeline:
            second = pipeline.credentials("vendor", "default", ttl=30)
            ended = server.end_run("run-client-2")
            assert ended["revoked"] is True and ended["leases_revoked"] == 1
            assert server.request("GET", f"/v1/leases/{second.lease_id}")["state"] == "revoked"
            with pytest.raises(Unauthenticated) as refused:
                pipeline.credentials("vendor", "other", ttl=30)
            assert refused.value.code == "run_revoked"
        assert server.end_run("run-client-2")["leases_revoked"] == 0  # idempotent


def test_client_credentials_refresh_their_access_token(gw: Server) -> None:
    made = post(gw, "/v1/clients", {"client_id": "pipeline-cc", "roles": ["operator"], "token_ttl_seconds": 60})
    auth = ClientCredentials("pipeline-cc", made["client_secret"], refresh_before=57)  # due after ~3 s
    with Client(gw.addr, auth=auth, margin=1, revoke_on_close=False) as c:
        c.credentials("vendor", "default", ttl=30)
        first = auth.bearer()
        assert auth.fetches == 1 and first
        c.credentials("vendor", "other", ttl=30)
        assert auth.fetches == 1  # still fresh: not fetched again
        time.sleep(3.2)
        assert c.credentials("vendor", "extra", ttl=30)["api_key"] == CANARY
        assert auth.fetches == 2 and auth.bearer() != first
        assert made["client_secret"] not in repr(auth) + repr(c)
    bad = ClientCredentials("pipeline-cc", "wrong-" + CANARY)
    with Client(gw.addr, auth=bad) as c, pytest.raises(Unauthenticated) as refused:
        c.credentials("vendor", "default")
    assert refused.value.code == "invalid_client" and CANARY not in str(refused.value)


def test_token_file_is_exchanged_and_read_again_after_rotation(gw: Server, tmp_path: Path) -> None:
    from tests.services.oidc_provider import OIDCProvider

    with OIDCProvider() as idp:
        put(gw, "/v1/issuers/k8s", {"issuer_url": idp.issuer, "jwks_url": f"{idp.issuer}/jwks", "audiences": ["credgate"],
                                     "algorithms": ["RS256"], "role_mapping": {"pipelines": ["operator"]}})

        def token(sub: str) -> str:
            now = int(time.time())
            return idp.sign({"iss": idp.issuer, "sub": sub, "aud": "credgate", "iat": now, "nbf": now,
                             "exp": now + 600, "groups": ["pipelines"]})

        path = tmp_path / "token"
        path.write_text(token("system:serviceaccount:ml:a"))
        for grant in ("token-exchange", "jwt-bearer"):
            auth = TokenFile(path, grant=grant)
            with Client(gw.addr, auth=auth, margin=1) as c:
                assert c.credentials("vendor", "default", ttl=30)["api_key"] == CANARY
                who = c.request("GET", "/v1/auth/whoami")
                assert who["subject"] == "system:serviceaccount:ml:a" and auth.fetches == 1
                assert c.request("GET", "/v1/auth/whoami") and auth.fetches == 1  # unchanged file: no exchange
                # the kubelet rotates the projected token: a new file in its place
                rotated = tmp_path / "token.new"
                rotated.write_text(token("system:serviceaccount:ml:b"))
                os.replace(rotated, path)
                assert c.request("GET", "/v1/auth/whoami")["subject"] == "system:serviceaccount:ml:b"
                assert auth.fetches == 2
                path.write_text(token("system:serviceaccount:ml:a"))
        path.write_text("not.a.jwt")
        with Client(gw.addr, auth=TokenFile(path)) as c, pytest.raises(RequestFailed) as refused:
            c.credentials("vendor", "default")
        assert refused.value.status == 400 and refused.value.code == "invalid_grant"


def test_typed_errors(gw: Server) -> None:
    with Client(gw.addr, token=gw.token, retries=0) as c:
        with pytest.raises(NotFound) as missing:
            c.credentials("no-such-connector", "default")
        assert missing.value.status == 404 and missing.value.code == "connector_not_found"
        assert isinstance(missing.value, RequestFailed) and isinstance(missing.value, CredgateError)
    with Client(gw.addr, token="cgt_not-a-token-" + CANARY) as c, pytest.raises(Unauthenticated) as bad:
        c.credentials("vendor", "default")
    assert bad.value.status == 401 and CANARY not in str(bad.value)
    with Client("http://127.0.0.1:9", token="x", retries=1, max_retry_wait=0.1) as c, \
            pytest.raises(GatewayUnreachable) as down:
        c.credentials("vendor", "default")
    assert down.value.code == "gateway_unreachable"


def test_unknown_types_are_the_base_credential_and_known_ones_typed() -> None:
    body = {"lease_id": "lease_1", "connector": "x", "connector_type": "future-db", "resource": "r",
            "issued_at": "2030-01-01T00:00:00+00:00", "expires_at": "2030-01-01T00:10:00+00:00", "renewable": True,
            "credential": {"token": CANARY}}
    cred = credential_from(body)
    assert type(cred) is Credential and cred["token"] == CANARY and cred.lifetime == 600
    pg = credential_from({**body, "connector_type": "postgres",
                          "credential": {"username": "u", "password": CANARY, "host": "h", "port": "5432",
                                         "dbname": "d", "dsn": f"postgresql://u:{CANARY}@h:5432/d"}})
    assert isinstance(pg, PostgresCredential) and pg.port == 5432 and pg.password == CANARY and pg.database == "d"
    assert CANARY not in repr(pg) + str(pg) + repr(cred)


async def test_async_client_issues_typed_cached_credentials(gw: Server) -> None:
    async with AsyncClient(gw.addr, token=gw.token, margin=1) as c:
        cred = await c.credentials("vendor", "default", ttl=30)
        assert isinstance(cred, StaticCredential) and cred["api_key"] == CANARY
        assert await c.credentials("vendor", "default", ttl=30) is cred
        with pytest.raises(NotFound):
            await c.credentials("no-such-connector", "default")
