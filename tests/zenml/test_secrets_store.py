"""ZenML keeps its secrets' values in credgate: the real ``zenml[server]`` 0.98 (in its own
venv, tests/zenml/conftest.py) runs its SQL store (SQLite, no server: the same SqlZenStore a
ZenML server runs) with ``credgate_zenml.secrets_store.CredgateSecretsStore`` configured by
the ``ZENML_SECRETS_STORE_*`` environment variables, as docs/zenml.md tells a server to, against
a real ``credgate serve --dev`` over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grimp
import httpx
import pytest

from tests.gateway.test_cli import Server, server  # noqa: F401  (the served gateway, module-scoped)
from tests.services.waiting import clean_env
from tests.zenml.conftest import zenml_server_process

CANARY = "CANARY-zenml-pw-7f3a"
UPDATED = "CANARY-zenml-rotated-91c2"

DRIVER = r'''
import json, sys, uuid
from zenml.client import Client

def main():
    op, args = sys.argv[1], json.loads(sys.argv[2])
    client = Client()
    store = client.zen_store.secrets_store  # builds the store: a refusing credgate fails here
    out = {"store": type(store).__module__ + "." + type(store).__name__}
    if op == "create":
        out["id"] = str(client.create_secret(args["name"], values=args["values"]).id)
    elif op == "roundtrip":
        secret = client.create_secret(args["name"], values=args["values"])
        out["id"] = str(secret.id)
        out["got"] = client.get_secret(secret.id).secret_values
        client.update_secret(secret.id, add_or_update_values=args["update"], remove_values=args["remove"])
        out["updated"] = client.get_secret(secret.id).secret_values
        client.delete_secret(secret.id)
        try:
            store.get_secret_values(secret.id)
            out["after_delete"] = "values still there"
        except KeyError as exc:
            out["after_delete"] = "KeyError: " + str(exc)
        for call in (lambda: store.delete_secret_values(secret.id),
                     lambda: store.update_secret_values(secret.id, {"k": "v"})):
            try:
                call()
                out.setdefault("missing", []).append("no error")
            except KeyError:
                out.setdefault("missing", []).append("KeyError")
    elif op == "get":
        out["values"] = client.get_secret(args["name"]).secret_values
    print("RESULT " + json.dumps(out))

def rest(op, args):
    client = Client()
    out = {"store": type(client.zen_store).__name__}
    secret = client.create_secret(args["name"], values=args["values"])
    out["id"] = str(secret.id)
    out["got"] = client.get_secret(secret.id).secret_values
    print("RESULT " + json.dumps(out))

if sys.argv[1] == "rest":
    rest(sys.argv[1], json.loads(sys.argv[2]))
else:
    main()
'''


class Zen:
    """A ZenML local SQL store (its own config dir) whose secrets store is credgate."""

    def __init__(self, python: Path, home: Path, gateway: Server) -> None:
        self.python, self.home, self.gateway = python, home, gateway
        self.config = home / "zenml-config"
        self.driver = home / "driver.py"  # a file: ZenML wants a source root
        self.driver.write_text(DRIVER)

    def env(self, token: str | None, **identity: str) -> dict[str, str]:
        env = clean_env(
            ZENML_CONFIG_PATH=str(self.config),
            ZENML_ANALYTICS_OPT_IN="false",
            ZENML_ENABLE_RICH_TRACEBACK="false",
            ZENML_SECRETS_STORE_TYPE="custom",
            ZENML_SECRETS_STORE_CLASS_PATH="credgate_zenml.secrets_store.CredgateSecretsStore",
            ZENML_SECRETS_STORE_ADDR=self.gateway.addr,
            ZENML_SECRETS_STORE_BACKEND="local",
            ZENML_SECRETS_STORE_PREFIX="zenml/",
        )
        if token is not None:
            env["ZENML_SECRETS_STORE_TOKEN"] = token
        env.update({f"ZENML_SECRETS_STORE_{k.upper()}": v for k, v in identity.items()})
        return env

    def run(self, op: str, token: str | None = None, identity: dict[str, str] | None = None,
            **args: Any) -> subprocess.CompletedProcess[str]:
        env = self.env(None, **identity) if identity else self.env(self.gateway.token if token is None else token)
        return subprocess.run(
            [str(self.python), str(self.driver), op, json.dumps(args)],
            capture_output=True, text=True, timeout=120, cwd=self.home, env=env,
        )

    def result(self, op: str, identity: dict[str, str] | None = None, **args: Any) -> dict[str, Any]:
        res = self.run(op, identity=identity, **args)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        assert res.returncode == 0 and lines, (res.stdout[-3000:], res.stderr[-3000:])
        return json.loads(lines[-1][len("RESULT "):])

    @property
    def database(self) -> Path:
        return self.config / "local_stores" / "default_zen_store" / "zenml.db"


@pytest.fixture(scope="module")
def zen(zenml_python: Path, server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zen]:  # noqa: F811
    yield Zen(zenml_python, tmp_path_factory.mktemp("zenml"), server)


@pytest.fixture(scope="module")
def created(zen: Zen) -> dict[str, Any]:
    """A secret created through ZenML's Client API."""
    return zen.result("create", name="warehouse", values={"user": "etl", "password": CANARY})


def credgate_secret(gateway: Server, path: str) -> httpx.Response:
    return httpx.get(f"{gateway.addr}/v1/secrets/local/{path}", params={"reveal": "true"},
                     headers={"Authorization": f"Bearer {gateway.token}"}, timeout=10)


def test_a_secret_created_through_zenml_is_in_credgate_at_backend_prefix_id(zen: Zen, created: dict) -> None:
    assert created["store"] == "credgate_zenml.secrets_store.CredgateSecretsStore"
    resp = credgate_secret(zen.gateway, f"zenml/{created['id']}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"] == {"user": "etl", "password": CANARY}
    # and ZenML reads it back from there
    assert zen.result("get", name="warehouse")["values"] == {"user": "etl", "password": CANARY}


def test_zenmls_database_holds_no_value(zen: Zen, created: dict) -> None:
    db = zen.database
    assert db.exists()
    with sqlite3.connect(db) as conn:
        rows = conn.execute('SELECT name, "values" FROM secret').fetchall()
    assert ("warehouse", None) in rows, rows  # the secret's row is here, its values are not
    assert all(values is None for _, values in rows), rows
    for f in zen.config.rglob("*"):  # the database (and any journal), config.yaml, anything
        if f.is_file():
            data = f.read_bytes()
            assert CANARY.encode() not in data, f
            assert zen.gateway.token.encode() not in data, f  # the store's token is not saved either


def test_get_update_delete_round_trip_through_credgate(zen: Zen) -> None:
    out = zen.result("roundtrip", name="roundtrip", values={"a": "1", "password": "CANARY-zenml-first"},
                     update={"password": UPDATED, "b": "2"}, remove=["a"])
    assert out["got"] == {"a": "1", "password": "CANARY-zenml-first"}
    assert out["updated"] == {"password": UPDATED, "b": "2"}
    # deleting the ZenML secret destroyed its values in credgate
    assert credgate_secret(zen.gateway, f"zenml/{out['id']}").status_code == 404
    # and the store answers what ZenML's own stores answer for values it does not hold
    assert out["after_delete"].startswith("KeyError"), out
    assert out["missing"] == ["KeyError", "KeyError"], out


def test_a_credgate_that_refuses_gives_zenml_a_clear_error_never_the_value(zen: Zen, created: dict) -> None:
    res = zen.run("get", token="cgt_wrong-token-for-zenml", name="warehouse")
    assert res.returncode != 0
    output = res.stdout + res.stderr
    assert "RESULT" not in res.stdout
    assert "credgate refused" in output and "401" in output, output[-3000:]
    assert CANARY not in output and "cgt_wrong-token-for-zenml" not in output


def test_a_least_privilege_oauth_client_of_credgate_is_enough(zen: Zen) -> None:
    """A credgate client allowed only secrets:read/write/reveal on local/zenml/* (no
    backends:read: the start-up check is refused and the store goes on) runs the store, by
    client_id/client_secret exchanged at /v1/auth/token; outside its prefix it is refused."""
    made = zen.gateway.cli("-o", "json", "client", "create", "zenml-secrets-store")
    client = json.loads(made.stdout)
    policy = zen.home / "zenml-store.json"
    policy.write_text(json.dumps({"rules": [{
        "principals": {"issuer": "credgate", "subject": "client:zenml-secrets-store"},
        "actions": ["secrets:read", "secrets:write", "secrets:reveal"],
        "resources": ["local/zenml/*"],
    }]}))
    zen.gateway.cli("policy", "put", "zenml-secrets-store", str(policy))
    identity = {"client_id": client["client_id"], "client_secret": client["client_secret"]}
    out = zen.result("roundtrip", identity=identity, name="scoped", values={"password": "CANARY-zenml-scoped"},
                     update={"password": "CANARY-zenml-scoped-2"}, remove=[])
    assert out["got"] == {"password": "CANARY-zenml-scoped"}
    assert out["updated"] == {"password": "CANARY-zenml-scoped-2"}
    assert out["after_delete"].startswith("KeyError") and out["missing"] == ["KeyError", "KeyError"], out
    # the same client with another prefix: its policy refuses, ZenML gets credgate's 403
    res = zen.run("create", identity={**identity, "prefix": "elsewhere/"}, name="outside",
                  values={"password": "CANARY-zenml-outside"})
    output = res.stdout + res.stderr
    assert res.returncode != 0 and "RESULT" not in res.stdout
    assert "credgate refused to store the values" in output and "403" in output, output[-3000:]
    assert "CANARY-zenml-outside" not in output and client["client_secret"] not in output


@pytest.fixture(scope="module")
def zenml_server(zen: Zen) -> Iterator[tuple[str, Path, Path]]:
    """A real ZenML server (its FastAPI app under uvicorn, no auth, SQLite) whose secrets
    store is credgate, configured by the environment variables docs/zenml.md gives."""
    home = zen.home / "server"
    home.mkdir()
    env = zen.env(zen.gateway.token)
    env.update(ZENML_CONFIG_PATH=str(home / "config"), ZENML_STORE_URL=f"sqlite:///{home / 'zenml.db'}",
               ZENML_SERVER_AUTH_SCHEME="NO_AUTH", ZENML_SERVER_AUTO_ACTIVATE="1")
    with zenml_server_process(zen.python, home, env) as (addr, log):
        yield addr, home / "zenml.db", log


def test_a_zenml_server_keeps_the_values_of_secrets_created_over_its_api_in_credgate(
        zen: Zen, zenml_server: tuple[str, Path, Path]) -> None:
    url, database, log = zenml_server
    info = httpx.get(f"{url}/api/v1/info", timeout=10).json()
    assert info["secrets_store_type"] == "custom", info
    canary = "CANARY-zenml-server-5d1e"
    env = clean_env(ZENML_CONFIG_PATH=str(zen.home / "rest-client"), ZENML_ANALYTICS_OPT_IN="false",
                    ZENML_STORE_URL=url, ZENML_STORE_TYPE="rest")
    res = subprocess.run([str(zen.python), str(zen.driver), "rest", json.dumps(
        {"name": "via-server", "values": {"password": canary}})],
        capture_output=True, text=True, timeout=120, cwd=zen.home, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, (res.stdout[-3000:], res.stderr[-3000:])
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["store"] == "RestZenStore" and out["got"] == {"password": canary}
    resp = credgate_secret(zen.gateway, f"zenml/{out['id']}")
    assert resp.status_code == 200 and resp.json()["data"] == {"password": canary}, resp.text
    with sqlite3.connect(database) as conn:
        rows = conn.execute('SELECT name, "values" FROM secret').fetchall()
    assert ("via-server", None) in rows, rows
    for f in database.parent.rglob("*"):
        if f.is_file():
            assert canary.encode() not in f.read_bytes(), f  # the database, its journal, the log
            assert zen.gateway.token.encode() not in f.read_bytes(), f


SERVER_SIDE = ("gateway.web", "gateway.runtime", "gateway.issuing", "gateway.plugins", "gateway.identity",
               "gateway.policy", "gateway.audit", "gateway.crypto", "gateway.store", "gateway.settings",
               "gateway.cli", "backends", "connectors", "kms", "fastapi", "sqlalchemy")


def test_the_integration_imports_zenml_and_the_light_client_only_and_nothing_imports_it() -> None:
    # (not an import-linter contract: tests/test_architecture.py lints a copy of the four
    # credgate packages, without this one)
    graph = grimp.build_graph("credgate_zenml", "gateway", "backends", "connectors", "kms",
                              include_external_packages=True, cache_dir=None)
    imported = {m for mod in graph.find_children("credgate_zenml") | {"credgate_zenml"}
                for m in graph.find_modules_directly_imported_by(mod)}
    assert "zenml" in imported and "gateway.client.http" in imported, imported
    assert not {m for m in imported for p in SERVER_SIDE if m == p or m.startswith(p + ".")}, imported
    for package in ("gateway", "backends", "connectors", "kms"):
        for target in ("credgate_zenml", "zenml"):
            assert not graph.chain_exists(importer=package, imported=target, as_packages=True), (package, target)
