"""Shared fixtures: real services, a fresh store per test, and an in-process gateway.

Services: the store tests run on SQLite and on the PostgreSQL server at
127.0.0.1:5432 (database ``test`` is used only to create a throwaway database
per test session). When a service is unreachable its tests are skipped,
unless CREDGATE_REQUIRE_SERVICES=1 (set by .ci/run), which makes them fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.web.app import create_app
from gateway.crypto.keyring import new_key_file
from gateway.settings import load_settings

PG_ADMIN_URL = os.environ.get("CREDGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("CREDGATE_REQUIRE_SERVICES") == "1"


def service_missing(name: str, why: str) -> None:
    """Skip the test, or fail it when CI requires every service."""
    msg = f"{name} is not reachable: {why}"
    if REQUIRE_SERVICES:
        pytest.fail(msg + " (CREDGATE_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The libpq URL of the shared PostgreSQL server (checked once)."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        service_missing("PostgreSQL", f"{PG_ADMIN_URL}: {type(exc).__name__}")
    return PG_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the shared server for one test; dropped after."""
    import psycopg

    name = "credgate_t_" + secrets.token_hex(6)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = postgres_server.rsplit("/", 1)[0]
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Parametrises a test over both stores."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    path = tmp_path / "kek"
    new_key_file(path)
    return path


ADMIN_TOKEN = "cgt_test-admin-token-" + "x" * 24


@pytest.fixture
def settings_factory(tmp_path: Path, store_url: str, kek_file: Path):
    def make(**overrides):
        values = dict(
            data_dir=tmp_path / "data",
            database_url=store_url,
            kek_file=kek_file,
            bootstrap_token=ADMIN_TOKEN,
            # Tests drive the reaper by hand (runtime.reaper.tick()) unless they turn it on,
            # and hammer the gateway from one address: rate limits are tested on their own.
            reaper_enabled=False,
            rate_per_address=0,
            rate_per_principal=0,
        )
        values.update(overrides)
        return load_settings(**values)

    return make


class Gateway:
    """An in-process gateway: the app with its lifespan, and an httpx client on it."""

    def __init__(self, app, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    @property
    def runtime(self):
        return self.app.state.runtime

    def as_token(self, token: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://gateway", headers=headers
        )


@pytest.fixture
async def gateway(settings_factory) -> AsyncIterator[Gateway]:
    app = create_app(settings_factory())
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://gateway",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as client:
            gw = Gateway(app, client)
            try:
                yield gw
            finally:
                # Whatever a test left live at a real target is revoked, pass or fail.
                from gateway.errors import StoreUnavailable

                rt = gw.runtime
                try:
                    await rt.credentials.revoke(await rt.leases.mark_revoking())
                except StoreUnavailable:
                    pass  # a test that took the store away on purpose



# --- target services for connectors -------------------------------------------

MARIADB = dict(host="127.0.0.1", port=3306, user="root", password="")
REDIS_URL = os.environ.get("CREDGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster with scram-sha-256 passwords (the shared
    server trusts every local login, so it can't show a password refused)."""
    from tests.services.pgcluster import PgCluster

    try:
        cluster = PgCluster().start()
    except Exception as exc:  # noqa: BLE001
        service_missing("PostgreSQL binaries (initdb/pg_ctl)", f"{type(exc).__name__}: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mariadb_server() -> dict:
    try:
        import pymysql

        pymysql.connect(**MARIADB, connect_timeout=3).close()
    except Exception as exc:  # noqa: BLE001
        service_missing("MariaDB", f"127.0.0.1:3306: {type(exc).__name__}")
    return MARIADB


@pytest.fixture(scope="session")
def redis_server() -> str:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        service_missing("Redis", f"{REDIS_URL}: {type(exc).__name__}")
    return REDIS_URL


@pytest.fixture(scope="session")
def moto_server():
    """moto in server mode on a free 127.0.0.1 port (a real HTTP server boto3 talks to)."""
    from tests.services.motoserver import MotoServer

    try:
        server = MotoServer().start()
    except Exception as exc:  # noqa: BLE001
        service_missing("moto server", f"{type(exc).__name__}: {exc}")
    try:
        yield server
    finally:
        server.stop()
