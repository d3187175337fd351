"""Backend health (issue 12, item 9): `GET /v1/backends[/NAME]` shows each backend's
status (no I/O) and its last check, `/readyz` reports every live backend's status without
failing on it, `credgate backend check NAME` says what is wrong; and a backend whose
configuration holds a SecretRef needs secrets:reveal on that secret and can't name itself.

`probe` is a backend type registered for these tests only: a local backend whose check()
and status() answer what its configuration says (the real stores' checks are tested with
each backend type against its real server or stand-in).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import ClassVar, Literal

import pytest
from pydantic import BaseModel, ConfigDict

from backends.base import Health, SecretRef, TargetError, TargetUnreachable
from backends.local import LocalBackend
from tests.conftest import Gateway
from tests.services.openbao import OpenBao, openbao  # noqa: F401 - the fixture
from tests.services.waiting import free_port

CANARY = "CANARY-health-credential"


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    check: Literal["ok", "unreachable", "auth_refused", "permission_missing"] = "ok"
    status: Literal["ok", "expiring"] = "ok"
    credential: SecretRef | None = None
    more: list[SecretRef] = []


class ProbeBackend(LocalBackend):
    type: ClassVar[str] = "probe"
    config_model: ClassVar[type[BaseModel]] = ProbeConfig
    checks: ClassVar[int] = 0  # how many times check() ran, all instances together

    async def start(self) -> None:
        if self.config.credential is not None:
            assert self.context.read_ref is not None
            self.credential = await self.context.read_ref(self.config.credential)

    def status(self) -> Health:
        if self.config.status == "expiring":
            return Health(False, "its token expires in 42 s and can't be renewed", problem="expiring")
        return Health(True, "serving")

    async def check(self) -> Health:
        type(self).checks += 1
        match self.config.check:
            case "unreachable":
                raise TargetUnreachable("the store at 127.0.0.1:9 refused the connection")
            case "auth_refused":
                raise TargetError("the store refused the backend's token (403)", code="target_auth_failed")
            case "permission_missing":
                return Health(False, "authenticated, but writing is denied", {"list": "ok", "read": "ok", "write": "denied"},
                              problem="permission_missing")
        return Health(True, "probe answers", {"list": "ok", "read": "ok", "write": "ok"})


@pytest.fixture(autouse=True)
def probe_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.plugins.registry import BACKEND_TYPES

    monkeypatch.setitem(BACKEND_TYPES, "probe", (f"{__name__}:ProbeBackend", None))
    monkeypatch.setattr(ProbeBackend, "checks", 0)


SQLITE = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


@SQLITE
async def test_list_and_show_give_status_and_last_check_without_probing(gateway: Gateway) -> None:
    c = gateway.client
    assert (await c.put("/v1/backends/p1", json={"type": "probe", "config": {"status": "expiring"}})).status_code == 201
    body = (await c.get("/v1/backends/p1")).json()
    assert body["health"] == {"status": None, "last_check": None}  # registered, not started here yet
    assert body["capabilities"]["versions"] is True and body["capabilities"]["max_value_bytes"] == 512 * 1024

    assert (await c.get("/v1/secrets/p1")).status_code == 200  # first use starts it
    assert (await c.get("/v1/secrets/local")).status_code == 200
    listed = {b["name"]: b for b in (await c.get("/v1/backends")).json()["items"]}
    assert listed["p1"]["health"]["status"] == {
        "ok": False, "message": "its token expires in 42 s and can't be renewed", "problem": "expiring",
        "details": {}, "checked_at": None}
    assert listed["local"]["health"]["status"]["ok"] is True
    assert ProbeBackend.checks == 0  # listing and showing never probe a store

    r = await c.post("/v1/backends/p1/check")
    assert r.status_code == 200 and r.json()["ok"] is True and r.json()["checked_at"]
    shown = (await c.get("/v1/backends/p1")).json()["health"]["last_check"]
    assert shown["ok"] is True and shown["details"] == {"list": "ok", "read": "ok", "write": "ok"}
    assert shown["checked_at"] == r.json()["checked_at"]
    await c.get("/v1/backends")
    await c.get("/v1/backends/p1")
    assert ProbeBackend.checks == 1

    # Replacing the configuration forgets the check of the old one.
    await c.put("/v1/backends/p1", json={"type": "probe", "config": {}})
    assert (await c.get("/v1/backends/p1")).json()["health"]["last_check"] is None


@SQLITE
@pytest.mark.parametrize("check, problem, details", [
    ("unreachable", "unreachable", {"code": "backend_unavailable"}),
    ("auth_refused", "auth_refused", {"code": "target_auth_failed"}),
    ("permission_missing", "permission_missing", {"list": "ok", "read": "ok", "write": "denied"}),
])
async def test_check_names_what_is_wrong(gateway: Gateway, check: str, problem: str, details: dict[str, str]) -> None:
    await gateway.client.put("/v1/backends/p2", json={"type": "probe", "config": {"check": check}})
    r = await gateway.client.post("/v1/backends/p2/check")
    assert r.status_code == 200
    body = r.json()
    assert (body["ok"], body["problem"], body["details"]) == (False, problem, details)
    last = (await gateway.client.get("/v1/backends/p2")).json()["health"]["last_check"]
    assert (last["ok"], last["problem"]) == (False, problem)


@SQLITE
async def test_readyz_reports_each_live_backend_and_stays_ready(gateway: Gateway) -> None:
    await gateway.client.put("/v1/backends/p3", json={"type": "probe", "config": {"status": "expiring"}})
    await gateway.client.put("/v1/backends/p4", json={"type": "probe", "config": {"check": "unreachable"}})
    await gateway.client.get("/v1/secrets/p3")
    await gateway.client.get("/v1/secrets/p4")
    async with gateway.as_token(None) as anon:
        r = await anon.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert r.json()["checks"] == {"store": "ok", "kek": "ok", "audit": "ok"}
    assert r.json()["backends"]["p3"] == {
        "ok": False, "problem": "expiring", "message": "its token expires in 42 s and can't be renewed"}
    assert r.json()["backends"]["p4"] == {"ok": True, "problem": None, "message": "serving"}  # status(): no I/O
    assert ProbeBackend.checks == 0
    # once checked, the last check is there too (still no probe on /readyz, still ready)
    await gateway.client.post("/v1/backends/p4/check")
    async with gateway.as_token(None) as anon:
        r = await anon.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    last = r.json()["backends"]["p4"]["last_check"]
    assert (last["ok"], last["problem"]) == (False, "unreachable") and last["checked_at"]
    assert ProbeBackend.checks == 1


# --- SecretRef in a backend's configuration ------------------------------------------------


async def _manager(gateway: Gateway) -> str:
    """An admin key allowed to manage backends and to reveal only local/allowed/*."""
    c = gateway.client
    token = (await c.post("/v1/admin-keys", json={"name": "mgr", "role": "auditor"})).json()["token"]
    policy = {"rules": [{"principals": {"issuer": "credgate", "subject": "admin_key:mgr"},
                         "actions": ["backends:manage", "secrets:read", "secrets:reveal"],
                         "resources": ["local/allowed/*"]}]}
    assert (await c.put("/v1/policies/mgr", json=policy)).status_code == 201
    return token


@SQLITE
async def test_a_secret_ref_needs_reveal_on_the_referenced_secret(gateway: Gateway) -> None:
    c = gateway.client
    await c.put("/v1/secrets/local/allowed/cred", json={"data": {"token": CANARY}})
    await c.put("/v1/secrets/local/private/cred", json={"data": {"token": CANARY}})
    token = await _manager(gateway)
    async with gateway.as_token(token) as mgr:
        for config in (
            {"credential": {"backend": "local", "path": "private/cred", "key": "token"}},
            {"more": [{"backend": "local", "path": "allowed/cred", "key": "token"},
                      {"backend": "local", "path": "private/cred", "key": "token"}]},  # found inside a list too
        ):
            r = await mgr.put("/v1/backends/refd", json={"type": "probe", "config": config})
            assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", r.text
            assert "secrets:reveal" in r.json()["error"]["message"] and CANARY not in r.text
            assert (await c.get("/v1/backends/refd")).status_code == 404  # nothing created
        r = await mgr.put("/v1/backends/refd", json={
            "type": "probe", "config": {"credential": {"backend": "local", "path": "allowed/cred", "key": "token"}}})
        assert r.status_code == 201, r.text
    denied = (await c.get("/v1/audit", params={"action": "secrets:reveal", "decision": "deny"})).json()["items"]
    assert len([e for e in denied if e["subject"] == "admin_key:mgr"]) == 2
    # the backend reads its credential at start, from the other backend
    assert (await c.get("/v1/secrets/refd")).status_code == 200
    assert gateway.runtime.mounts.live()["refd"].inner.credential == CANARY


@SQLITE
@pytest.mark.parametrize("type_, config", [
    ("vault", {"url": "http://127.0.0.1:9", "auth": {"approle": {"role_id": "r", "secret_id_ref": "REF"}}}),
    ("aws", {"region": "us-east-1", "keys": {"access_key_id": "REF", "secret_access_key": "REF"}}),
])
async def test_the_real_types_secret_refs_are_found_too(gateway: Gateway, type_: str, config: dict) -> None:
    """The walk finds a SecretRef wherever a real backend type's model keeps it."""
    ref = {"backend": "local", "path": "private/cred", "key": "token"}

    def fill(value):
        if value == "REF":
            return dict(ref)
        return {k: fill(v) for k, v in value.items()} if isinstance(value, dict) else value

    token = await _manager(gateway)
    async with gateway.as_token(token) as mgr:
        r = await mgr.put("/v1/backends/real", json={"type": type_, "config": fill(config)})
    if r.status_code == 422:  # the model's shape moved on: say so rather than pass by accident
        pytest.fail(f"{type_} config no longer validates here: {r.text}")
    assert r.status_code == 403 and "secrets:reveal" in r.json()["error"]["message"], r.text
    assert (await gateway.client.get("/v1/backends/real")).status_code == 404


@SQLITE
async def test_a_backend_can_not_reference_itself(gateway: Gateway) -> None:
    r = await gateway.client.put("/v1/backends/selfish", json={
        "type": "probe", "config": {"credential": {"backend": "selfish", "path": "cred", "key": "k"}}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "backend_ref_cycle"
    assert (await gateway.client.get("/v1/backends/selfish")).status_code == 404
    r = await gateway.client.put("/v1/backends/bad", json={
        "type": "probe", "config": {"credential": {"backend": "local", "path": "a/../b", "key": "k"}}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path"


# --- the command --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from gateway.plugins.registry import BACKEND_TYPES
    from tests.gateway.test_migrate import ServedGateway

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(BACKEND_TYPES, "probe", (f"{__name__}:ProbeBackend", None))
        gw = ServedGateway(tmp_path_factory.mktemp("health"))
        try:
            yield gw
        finally:
            gw.stop()


@pytest.mark.parametrize("check, exit_code, says", [
    ("ok", 0, "cli-ok: ok: probe answers"),
    ("unreachable", 1, "cli-unreachable: FAILED: unreachable: the store did not answer (Backend 'cli-unreachable' is "
                       "unavailable: the store at 127.0.0.1:9 refused the connection)"),
    ("auth_refused", 1, "cli-auth_refused: FAILED: auth refused: the store refused the backend's credentials "
                        "(the store refused the backend's token (403))"),
    ("permission_missing", 1, "cli-permission_missing: FAILED: permission missing for write (authenticated, but "
                              "writing is denied)"),
])
def test_backend_check_command(served, check: str, exit_code: int, says: str) -> None:
    name = f"cli-{check}"
    added = served.cli("backend", "add", name, "--type", "probe", f"check={check}")
    assert added.returncode == 0 and added.stdout == f"backend {name} (probe) saved\n", added.stderr
    res = served.cli("backend", "check", name)
    assert res.returncode == exit_code, (res.stdout, res.stderr)
    assert res.stdout.splitlines()[0] == says
    if check == "permission_missing":
        assert "  write: denied" in res.stdout.splitlines()
    listed = served.cli("backend", "list", "-o", "json")
    assert listed.returncode == 0
    health = next(b for b in json.loads(listed.stdout)["items"] if b["name"] == name)["health"]
    assert health["last_check"]["ok"] is (check == "ok") and health["last_check"]["problem"] == (
        None if check == "ok" else check)
    shown = served.cli("backend", "show", name)
    assert shown.returncode == 0, shown.stderr
    assert ("last check: ok at " if check == "ok" else "last check: ") in shown.stdout
    assert "status: ok (serving)" in shown.stdout


# --- the same words for a real store: the vault backend against OpenBao ------------------------

_READ_ONLY = """
path "secret/data/{p}/*"     {{ capabilities = ["read"] }}
path "secret/metadata/{p}/*" {{ capabilities = ["read", "list"] }}
"""


def test_backend_check_against_a_real_openbao(served, openbao: OpenBao) -> None:
    prefix = "h" + secrets.token_hex(5)
    openbao.write_policy(f"ro-{prefix}", _READ_ONLY.format(p=prefix))
    read_only = openbao.create_token([f"ro-{prefix}", "default"])

    def vault(name: str, url: str, token: str) -> None:
        config = {"url": url, "path_prefix": prefix, "timeout": 3, "auth": {"token": {"token": token}}}
        r = served.http.put(f"/v1/backends/{name}", json={"type": "vault", "config": config})
        assert r.status_code in (200, 201), r.text

    vault("v-ok", openbao.url, openbao.root_token)
    vault("v-ro", openbao.url, read_only)
    vault("v-badtoken", openbao.url, "s.not-a-token-" + secrets.token_hex(8))
    vault("v-down", f"http://127.0.0.1:{free_port()}", openbao.root_token)

    ok = served.cli("backend", "check", "v-ok")
    assert ok.returncode == 0 and ok.stdout.startswith("v-ok: ok: "), ok.stdout
    ro = served.cli("backend", "check", "v-ro")
    assert ro.returncode == 1 and ro.stdout.startswith("v-ro: FAILED: permission missing for write"), ro.stdout
    assert "  write: denied" in ro.stdout.splitlines() and "  read: ok" in ro.stdout.splitlines()
    bad = served.cli("backend", "check", "v-badtoken")
    assert bad.returncode == 1 and bad.stdout.startswith(
        "v-badtoken: FAILED: auth refused: the store refused the backend's credentials"), bad.stdout
    assert "not-a-token" not in bad.stdout + bad.stderr
    down = served.cli("backend", "check", "v-down")
    assert down.returncode == 1 and down.stdout.startswith("v-down: FAILED: unreachable: the store did not answer"), down.stdout
    as_json = json.loads(served.cli("backend", "check", "v-ro", "-o", "json").stdout)
    assert (as_json["ok"], as_json["problem"], as_json["details"]["write"]) == (False, "permission_missing", "denied")
