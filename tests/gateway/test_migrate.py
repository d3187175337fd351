"""`credgate secret migrate` and `credgate connector repoint` (issue 12, item 7), run as the
real `credgate` command in subprocesses against a real gateway served by uvicorn on a free
port (in a thread of this process, so the tests can read and seed its store).

Destinations: `team`, a second mount of type `local` (its own secrets, apart from
`local`'s), and `vlt`, a `vault` mount on a real OpenBao dev server (the issue's
scenario, 1,000 secrets from local to vault interrupted and resumed, is in
test_migrate_scale.py, a file of its own for time; here: a real size limit, 128 KiB, that
refuses one secret while the rest go through).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.services.openbao import OpenBao, openbao  # noqa: F401 - the fixture
from tests.services.waiting import clean_env, free_port

CREDGATE = str(Path(sys.executable).parent / "credgate")
ADMIN_TOKEN = "cgt_test-migrate-admin-" + "m" * 24
CANARY = "CANARY-migrate-value-"


class ServedGateway:
    """The gateway's app under uvicorn in a thread, on a free 127.0.0.1 port."""

    def __init__(self, tmp: Path, database_url: str | None = None) -> None:
        import uvicorn

        from gateway.crypto.keyring import new_key_file
        from gateway.settings import load_settings
        from gateway.web.app import create_app

        new_key_file(tmp / "kek")
        settings = load_settings(
            data_dir=tmp / "data", database_url=database_url or f"sqlite:///{tmp / 'store.db'}", kek_file=tmp / "kek",
            bootstrap_token=ADMIN_TOKEN, reaper_enabled=False, rate_per_address=0, rate_per_principal=0,
        )
        self.app = create_app(settings)
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)
        self.http = httpx.Client(base_url=self.addr, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    def run(self, coro: Awaitable[Any]) -> Any:
        """Run a coroutine on the server's loop (to read or seed the store directly)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def cli(self, *args: str, token: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = clean_env(CREDGATE_ADDR=self.addr, CREDGATE_TOKEN=token or ADMIN_TOKEN)
        return subprocess.run([CREDGATE, *args], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def vault_prefix() -> str:
    return "c" + secrets.token_hex(6)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, openbao: OpenBao, vault_prefix: str) -> Iterator[ServedGateway]:
    served = ServedGateway(tmp_path_factory.mktemp("migrate"))
    try:
        vault = {"url": openbao.url, "path_prefix": vault_prefix, "timeout": 10,
                 "auth": {"token": {"token": openbao.root_token}}}
        for name, type_, config in (("team", "local", {}), ("vlt", "vault", vault)):
            r = served.http.put(f"/v1/backends/{name}", json={"type": type_, "config": config})
            assert r.status_code == 201, r.text
        yield served
    finally:
        served.stop()


# --- helpers -----------------------------------------------------------------------------------


def put(gw: ServedGateway, ref: str, data: dict[str, str]) -> dict[str, Any]:
    r = gw.http.put(f"/v1/secrets/{ref}", json={"data": data})
    assert r.status_code == 200, r.text
    return r.json()


def reveal(gw: ServedGateway, ref: str, version: int | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"reveal": "true"}
    if version is not None:
        params["version"] = version
    r = gw.http.get(f"/v1/secrets/{ref}", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def listed(gw: ServedGateway, backend: str, prefix: str) -> list[str]:
    r = gw.http.get(f"/v1/secrets/{backend}", params={"prefix": prefix, "limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def versions_by_path(gw: ServedGateway, backend: str, prefix: str) -> dict[str, list[int]]:
    """Every version the store holds for each secret under the prefix (read from the store)."""
    from sqlalchemy import select

    from gateway.store.models import SecretRow, SecretVersionRow

    async def read() -> dict[str, list[int]]:
        async with gw.runtime.store.read() as s:
            rows = await s.execute(
                select(SecretRow.path, SecretVersionRow.version)
                .join(SecretVersionRow, SecretVersionRow.secret_id == SecretRow.id)
                .where(SecretRow.backend == backend, SecretRow.path.startswith(prefix))
                .order_by(SecretRow.path, SecretVersionRow.version)
            )
            out: dict[str, list[int]] = {}
            for path, version in rows:
                out.setdefault(path, []).append(version)
            return out

    return gw.run(read())


def vault_versions(bao: OpenBao, prefix: str, folder: str) -> dict[str, list[int]]:
    """Every version OpenBao holds for each secret under ``folder`` (read from OpenBao itself)."""
    kv = bao.client().secrets.kv.v2
    out: dict[str, list[int]] = {}

    def walk(sub: str) -> None:
        try:
            keys = kv.list_secrets(path=f"{prefix}/{sub}", mount_point="secret")["data"]["keys"]
        except Exception:  # noqa: BLE001 - hvac's InvalidPath: nothing there
            return
        for key in keys:
            if key.endswith("/"):
                walk(sub + key)
            else:
                meta = kv.read_secret_metadata(path=f"{prefix}/{sub}{key}", mount_point="secret")["data"]
                out[sub + key] = sorted(int(v) for v in meta["versions"])

    walk(folder)
    return out


def seed(gw: ServedGateway, backend: str, secrets: dict[str, dict[str, str]]) -> None:
    """Many secrets at once, straight into the local store in one transaction (as the local
    backend writes them: one sealed version each); the API path is what the migration tests."""
    import json as _json

    from gateway.store import changes
    from gateway.store.models import SecretRow, SecretVersionRow, utcnow
    from gateway.store.sealed import secret_context

    envelope = gw.runtime.mounts._envelope

    async def write() -> None:
        now = utcnow()
        async with gw.runtime.store.write() as s:
            for path, data in secrets.items():
                row = SecretRow(backend=backend, path=path, current_version=1, created_at=now, updated_at=now)
                ver = SecretVersionRow(version=1, keys=sorted(data), created_at=now, created_by="test")
                ver.sealed = envelope.seal(_json.dumps(data, separators=(",", ":"), sort_keys=True).encode(),
                                           secret_context(backend, path, 1))
                row.versions.append(ver)
                s.add(row)
            await changes.note(s, "backend", backend)

    gw.run(write())


def report_of(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    m = re.search(r"report: (\S+\.json)\)?", res.stdout + res.stderr)
    assert m, (res.stdout, res.stderr)
    return json.loads(Path(m.group(1)).read_text())


def test_dry_run_writes_nothing(gw: ServedGateway, tmp_path: Path) -> None:
    for i in range(3):
        put(gw, f"local/dry/s{i}", {"k": f"{CANARY}{i}"})
    put(gw, "team/dry/s0", {"k": f"{CANARY}0"})  # already there: would be skipped
    res = gw.cli("secret", "migrate", "--from", "local/dry", "--to", "team/dry", "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "2 to copy" in res.stdout and "1 already there" in res.stdout and "nothing written" in res.stdout
    assert listed(gw, "team", "dry/") == ["dry/s0"] and versions_by_path(gw, "team", "dry/") == {"dry/s0": [1]}
    # the default report is a file in the current directory, and says so
    written = list(tmp_path.glob("credgate-migrate-*.json"))
    assert len(written) == 1 and str(written[0]) in res.stdout
    rep = json.loads(written[0].read_text())
    assert {s["source"]: s["status"] for s in rep["secrets"]} == {
        "local/dry/s0": "would_skip", "local/dry/s1": "would_copy", "local/dry/s2": "would_copy"}
    assert CANARY not in written[0].read_text()


def test_all_versions_keep_their_order_and_a_rerun_adds_nothing(gw: ServedGateway, tmp_path: Path) -> None:
    history = [{"k": "one"}, {"k": "two"}, {"k": "one"}]  # a value that comes back is still its own version
    for data in history:
        put(gw, "local/av/a", data)
    put(gw, "local/av/b", {"k": "only"})
    args = ["secret", "migrate", "--from", "local/av", "--to", "team/av", "--all-versions", "--report",
            str(tmp_path / "r.json")]
    res = gw.cli(*args)
    assert res.returncode == 0, res.stderr
    assert [reveal(gw, "team/av/a", v)["data"] for v in (1, 2, 3)] == history
    assert versions_by_path(gw, "team", "av/") == {"av/a": [1, 2, 3], "av/b": [1]}
    a = next(s for s in json.loads((tmp_path / "r.json").read_text())["secrets"] if s["source"] == "local/av/a")
    assert a["versions_copied"] == [1, 2, 3] and a["destination_versions"] == [1, 2, 3] and a["verified"]

    assert gw.cli(*args).returncode == 0
    assert versions_by_path(gw, "team", "av/") == {"av/a": [1, 2, 3], "av/b": [1]}  # nothing duplicated

    # A new source version, and a crash right after writing the first version of a new secret
    # (written, never recorded): the next run appends only what is missing.
    put(gw, "local/av/a", {"k": "four"})
    for data in ({"k": "c1"}, {"k": "c2"}):
        put(gw, "local/av/c", data)
    put(gw, "team/av/c", {"k": "c1"})
    res = gw.cli(*args)
    assert res.returncode == 0, res.stderr
    assert versions_by_path(gw, "team", "av/") == {"av/a": [1, 2, 3, 4], "av/b": [1], "av/c": [1, 2]}
    assert reveal(gw, "team/av/a", 4)["data"] == {"k": "four"} and reveal(gw, "team/av/c", 2)["data"] == {"k": "c2"}
    rep = {s["source"]: s for s in json.loads((tmp_path / "r.json").read_text())["secrets"]}
    assert (rep["local/av/a"]["versions_skipped"], rep["local/av/a"]["versions_copied"]) == ([1, 2, 3], [4])
    assert (rep["local/av/c"]["versions_skipped"], rep["local/av/c"]["versions_copied"]) == ([1], [2])


def test_all_versions_into_vault(gw: ServedGateway, openbao: OpenBao, vault_prefix: str, tmp_path: Path) -> None:
    history = [{"k": "v1"}, {"k": "v2", "extra": "x"}, {"k": "v3"}]
    for data in history:
        put(gw, "local/avv/a", data)
    args = ["secret", "migrate", "--from", "local/avv", "--to", "vlt/avv", "--all-versions", "--report",
            str(tmp_path / "r.json")]
    for _ in range(2):  # the second run finds everything there and writes nothing
        res = gw.cli(*args)
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert vault_versions(openbao, vault_prefix, "avv/") == {"avv/a": [1, 2, 3]}
    assert [reveal(gw, "vlt/avv/a", v)["data"] for v in (1, 2, 3)] == history
    assert "0 copied" in res.stdout and "1 already there" in res.stdout


def test_a_destination_that_differs_or_is_soft_deleted_gets_one_new_version(gw: ServedGateway, tmp_path: Path) -> None:
    put(gw, "local/upd/changed", {"k": "new"})
    put(gw, "local/upd/gone", {"k": "back"})
    put(gw, "team/upd/changed", {"k": "old"})
    put(gw, "team/upd/gone", {"k": "old"})
    assert gw.http.delete("/v1/secrets/team/upd/gone").status_code == 204  # soft-deleted at the destination
    args = ["secret", "migrate", "--from", "local/upd", "--to", "team/upd", "--report", str(tmp_path / "r.json")]
    res = gw.cli(*args)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "2 copied" in res.stdout
    assert reveal(gw, "team/upd/changed")["data"] == {"k": "new"} and reveal(gw, "team/upd/gone")["data"] == {"k": "back"}
    assert versions_by_path(gw, "team", "upd/") == {"upd/changed": [1, 2], "upd/gone": [1, 2]}
    assert gw.cli(*args).returncode == 0
    assert versions_by_path(gw, "team", "upd/") == {"upd/changed": [1, 2], "upd/gone": [1, 2]}


def test_a_refused_secret_is_reported_and_the_rest_continue(gw: ServedGateway, tmp_path: Path) -> None:
    put(gw, "local/big/a", {"k": "small"})
    put(gw, "local/big/b", {f"k{i}": CANARY + "x" * 60000 for i in range(3)})  # ~180 KB: local takes it, vault (128 KiB) not
    put(gw, "local/big/c", {"k": "small too"})
    res = gw.cli("secret", "migrate", "--from", "local/big", "--to", "vlt/big", "--report", str(tmp_path / "r.json"))
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "2 copied" in res.stdout and "1 failed" in res.stdout
    assert re.search(r"failed: local/big/b -> vlt/big/b: value_too_large: .*takes at most 131072", res.stdout)
    assert CANARY not in res.stdout + res.stderr + (tmp_path / "r.json").read_text()
    rep = {s["source"]: s for s in json.loads((tmp_path / "r.json").read_text())["secrets"]}
    assert rep["local/big/b"]["error"]["code"] == "value_too_large" and not rep["local/big/b"]["verified"]
    assert rep["local/big/b"]["status"] == "failed" and rep["local/big/b"]["destination_versions"] == []
    assert rep["local/big/a"]["verified"] and rep["local/big/c"]["verified"]
    assert listed(gw, "vlt", "big/") == ["big/a", "big/c"]


def test_a_caller_without_reveal_on_the_source_gets_one_clean_error_and_nothing_is_written(
    gw: ServedGateway, tmp_path: Path
) -> None:
    for i in range(3):
        put(gw, f"local/authz/s{i}", {"k": f"{CANARY}{i}"})
    operator = gw.http.post("/v1/admin-keys", json={"name": "migrator", "role": "operator"}).json()["token"]
    res = gw.cli("secret", "migrate", "--from", "local/authz", "--to", "team/authz", "--report",
                 str(tmp_path / "r.json"), token=operator)
    assert res.returncode == 1 and res.stdout == "", res.stderr
    last = res.stderr.splitlines()[-1]
    assert last.startswith("credgate: permission_denied: admin_key:migrator may not secrets:reveal"), res.stderr
    assert res.stderr.count("permission_denied") == 1 and "Traceback" not in res.stderr
    assert "no further secret was started" in last
    assert listed(gw, "team", "authz/") == []
    events = gw.http.get("/v1/audit", params={"action": "secrets:reveal", "decision": "deny", "limit": 1000}).json()
    assert any(e["subject"] == "admin_key:migrator" for e in events["items"])


def test_a_caller_without_write_on_the_destination_gets_one_clean_error(gw: ServedGateway, tmp_path: Path) -> None:
    for i in range(3):
        put(gw, f"local/nowrite/s{i}", {"k": f"{CANARY}{i}"})
    token = gw.http.post("/v1/admin-keys", json={"name": "reader", "role": "auditor"}).json()["token"]
    policy = {"rules": [{"principals": {"issuer": "credgate", "subject": "admin_key:reader"},
                         "actions": ["secrets:read", "secrets:reveal"], "resources": ["local/nowrite/*", "team/nowrite/*"]}]}
    assert gw.http.put("/v1/policies/reader", json=policy).status_code == 201
    res = gw.cli("secret", "migrate", "--from", "local/nowrite", "--to", "team/nowrite", "--report",
                 str(tmp_path / "r.json"), token=token)
    assert res.returncode == 1 and res.stdout == "", res.stderr
    last = res.stderr.splitlines()[-1]
    assert last.startswith("credgate: permission_denied: admin_key:reader may not secrets:write"), res.stderr
    assert res.stderr.count("permission_denied") == 1 and CANARY not in res.stderr
    assert listed(gw, "team", "nowrite/") == []
    # with --dry-run it needs no write: it compares and says what it would do
    dry = gw.cli("secret", "migrate", "--from", "local/nowrite", "--to", "team/nowrite", "--dry-run", "--report",
                 str(tmp_path / "d.json"), token=token)
    assert dry.returncode == 0 and "3 to copy" in dry.stdout, dry.stderr


def test_a_destination_that_is_down_stops_the_run_in_one_line(gw: ServedGateway, tmp_path: Path) -> None:
    put(gw, "local/down/a", {"k": "v"})
    config = {"url": f"http://127.0.0.1:{free_port()}", "timeout": 2, "auth": {"token": {"token": "t"}}}
    assert gw.http.put("/v1/backends/vdown", json={"type": "vault", "config": config}).status_code == 201
    started = time.monotonic()
    res = gw.cli("secret", "migrate", "--from", "local/down", "--to", "vdown/down", "--report", str(tmp_path / "r.json"))
    assert res.returncode == 1 and res.stdout == "", res.stderr
    last = res.stderr.splitlines()[-1]
    assert last.startswith("credgate: backend_unavailable: Backend 'vdown' is unavailable"), res.stderr
    assert time.monotonic() - started < 30  # retried a few times with backoff, then stopped


@pytest.mark.parametrize("args, says", [
    (["--from", "local/app", "--to", "local/app/copy"], "overlap"),
    (["--from", "local/app", "--to", "nowhere/app"], "there is no backend 'nowhere'"),
    (["--from", "local/../x", "--to", "team/x"], "--from: "),
    (["--from", "local/a"], "Missing option '--to'"),
])
def test_bad_input_is_exit_2_in_one_line(gw: ServedGateway, args: list[str], says: str) -> None:
    res = gw.cli("secret", "migrate", *args)
    assert res.returncode == 2 and says in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_connectors_repointed_and_still_issuing(gw: ServedGateway, tmp_path: Path) -> None:
    put(gw, "local/svc/wandb", {"api_key": CANARY + "wandb"})
    put(gw, "local/other/keep", {"api_key": CANARY + "other"})
    for name, secret in (("wandb", "local/svc/wandb"), ("keep", "local/other/keep")):
        r = gw.http.put(f"/v1/connectors/{name}", json={"type": "static", "auth_method": "static", "secret": secret,
                                                       "resources": ["default"]})
        assert r.status_code == 201, r.text
    assert gw.cli("secret", "migrate", "--from", "local/svc", "--to", "team/svc", "--report",
                  str(tmp_path / "r.json")).returncode == 0

    dry = gw.cli("connector", "repoint", "--from", "local/svc", "--to", "team/svc", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip() == "would repoint wandb: local/svc/wandb -> team/svc/wandb"
    assert gw.http.get("/v1/connectors/wandb").json()["secret"] == "local/svc/wandb"
    res = gw.cli("connector", "repoint", "--from", "local/svc", "--to", "team/svc", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [{"connector": "wandb", "from": "local/svc/wandb", "to": "team/svc/wandb",
                                       "status": "repointed", "error": None}]
    assert gw.http.get("/v1/connectors/wandb").json()["secret"] == "team/svc/wandb"
    assert gw.http.get("/v1/connectors/keep").json()["secret"] == "local/other/keep"  # outside --from: untouched

    # It draws on the new location now: the old secret can go, and it still issues.
    assert gw.http.delete("/v1/secrets/local/svc/wandb", params={"destroy": "true"}).status_code == 204
    issued = gw.http.post("/v1/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})
    assert issued.status_code == 200, issued.text
    unwrapped = httpx.post(f"{gw.addr}/v1/unwrap", json={"wrap_token": issued.json()["wrap_token"]})
    assert unwrapped.status_code == 200 and unwrapped.json()["credential"] == {"api_key": CANARY + "wandb"}

    # A destination without the secret: the gateway refuses, the command says which and exits 1.
    put(gw, "local/lone/x", {"api_key": "v"})
    assert gw.http.put("/v1/connectors/lone", json={"type": "static", "auth_method": "static",
                                                    "secret": "local/lone/x", "resources": ["default"]}).status_code == 201
    res = gw.cli("connector", "repoint", "--from", "local/lone", "--to", "team/lone")
    assert res.returncode == 1 and "FAILED lone: local/lone/x -> team/lone/x: connector_material_missing" in res.stdout
    assert gw.http.get("/v1/connectors/lone").json()["secret"] == "local/lone/x"


def _as_from_a_terminal() -> None:
    """The CLI starts with Ctrl-C at its default, as from a shell. A process started with SIGINT
    ignored (a background job, ``nohup``) passes that on, and Python then never turns it into
    KeyboardInterrupt: a CI run started that way ran the migration to its end (exit 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_cleanly_and_says_how_to_resume(gw: ServedGateway, tmp_path: Path, sig: int) -> None:
    folder = f"int{int(sig)}"
    seed(gw, "local", {f"{folder}/s{i:03d}": {"k": f"v{i}"} for i in range(60)})
    report = tmp_path / "r.json"
    env = clean_env(CREDGATE_ADDR=gw.addr, CREDGATE_TOKEN=ADMIN_TOKEN)
    proc = subprocess.Popen([CREDGATE, "secret", "migrate", "--from", f"local/{folder}", "--to", f"team/{folder}", "--report",
                             str(report), "--concurrency", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=_as_from_a_terminal)
    assert proc.stderr is not None
    for line in proc.stderr:
        if re.match(r"migrate: \d+/60 done", line):
            proc.send_signal(sig)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted with" in err and "run the same command again to resume" in err
    rep = json.loads(report.read_text())
    assert rep["interrupted"] is True and rep["complete"] is False
    done = {s["source"] for s in rep["secrets"] if s["status"] == "copied"}
    assert done and rep["totals"].get("not_done", 0) > 0
    again = gw.cli("secret", "migrate", "--from", f"local/{folder}", "--to", f"team/{folder}", "--report", str(report))
    assert again.returncode == 0, again.stderr
    assert versions_by_path(gw, "team", f"{folder}/") == {f"{folder}/s{i:03d}": [1] for i in range(60)}


# --- the engine alone, against an in-memory API with faults injected ------------------------------


class FakeGateway:
    """The few secrets routes a migration calls, in memory; ``faults`` decides, per call,
    whether a write lands and whether its answer comes back."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], list[dict[str, str]]] = {}
        self.faults: list[str] = []  # consumed one per PUT: "ok", "lost" (lands, answer lost), "503" (refused)
        self.puts = 0

    def get(self, path: str, **params: Any) -> Any:
        from gateway.client.errors import RequestFailed

        parts = path.split("/", 4)[3:]  # /v1/secrets/BACKEND[/PATH]
        if len(parts) == 1:
            prefix = params.get("prefix") or ""
            items = sorted(p for (b, p) in self.secrets if b == parts[0] and p.startswith(prefix))
            return {"items": items, "next_page_token": None}
        versions = self.secrets.get((parts[0], parts[1]))
        if not versions:
            raise RequestFailed(404, "secret_not_found", "no such secret")
        want = params.get("version") or len(versions)
        out = {"version": want, "current_version": len(versions),
               "versions": [{"version": i + 1} for i in range(len(versions))]}
        if params.get("reveal"):
            out["data"] = dict(versions[want - 1])
        return out

    def request(self, method: str, path: str, *, json: Any = None, **_: Any) -> Any:
        from gateway.client.errors import GatewayUnreachable, RequestFailed

        assert method == "PUT"
        self.puts += 1
        fault = self.faults.pop(0) if self.faults else "ok"
        if fault == "503":
            raise RequestFailed(503, "backend_unavailable", "Backend 'dst' is unavailable: it did not answer.")
        backend, rel = path.split("/", 4)[3:]
        versions = self.secrets.setdefault((backend, rel), [])
        if json.get("cas") is not None and json["cas"] != len(versions):
            raise RequestFailed(409, "cas_mismatch", "moved")
        versions.append(dict(json["data"]))
        if fault == "lost":
            raise GatewayUnreachable("the answer was lost")
        return {"version": len(versions)}


def _engine(fake: FakeGateway, *, all_versions: bool, cas: bool = True) -> Any:
    from gateway.cli import migrate as m

    class FakeApi(m.Api):
        c = fake  # type: ignore[assignment]

        def _pause(self, attempt: int) -> None:
            if self.stop.is_set():
                raise m.Stopped()

    api = FakeApi("http://unused", "t", threading.Event())
    opts = m.Options(m.Location("src", "a/"), m.Location("dst", "b/"), all_versions=all_versions, dry_run=False,
                     cas=cas, dst_versions=True)
    return m, api, opts


@pytest.mark.parametrize("all_versions", [False, True], ids=["latest", "all-versions"])
@pytest.mark.parametrize("cas", [True, False], ids=["cas", "no-cas"])
def test_engine_a_write_that_landed_but_whose_answer_was_lost_is_not_written_twice(all_versions: bool, cas: bool) -> None:
    fake = FakeGateway()
    fake.secrets[("src", "a/x")] = [{"k": "1"}, {"k": "2"}]
    m, api, opts = _engine(fake, all_versions=all_versions, cas=cas)
    fake.faults = ["lost", "ok", "lost", "ok"]
    out = m.Migrator(api, opts, present=set()).run("x")
    assert out.status == "copied" and out.verified, out
    assert fake.secrets[("dst", "b/x")] == ([{"k": "1"}, {"k": "2"}] if all_versions else [{"k": "2"}])
    # reported as copied by this run (it was), not as found there
    assert (out.versions_copied, out.versions_skipped) == (([1, 2] if all_versions else [2]), [])


def test_engine_history_alignment_appends_only_what_is_missing() -> None:
    fake = FakeGateway()
    a, b, c = {"k": "a"}, {"k": "b"}, {"k": "c"}
    fake.secrets[("src", "a/x")] = [a, b, a, c]
    fake.secrets[("dst", "b/x")] = [c, a, b]  # an unrelated older version, then s1..s2 (a run cut short)
    m, api, opts = _engine(fake, all_versions=True)
    out = m.Migrator(api, opts).run("x")
    assert (out.versions_skipped, out.versions_copied, out.destination_versions) == ([1, 2], [3, 4], [4, 5])
    assert fake.secrets[("dst", "b/x")] == [c, a, b, a, c]
    again = m.Migrator(api, opts).run("x")
    assert again.status == "skipped" and again.versions_skipped == [1, 2, 3, 4]
    assert len(fake.secrets[("dst", "b/x")]) == 5


def test_engine_a_destination_that_stays_unavailable_stops_the_run() -> None:
    fake = FakeGateway()
    fake.secrets[("src", "a/x")] = [{"k": "1"}]
    m, api, opts = _engine(fake, all_versions=False)
    fake.faults = ["503"] * 10
    with pytest.raises(m.Fatal) as stopped:
        m.Migrator(api, opts, present=set()).run("x")
    assert stopped.value.error.code == "backend_unavailable" and fake.puts == m.RETRIES
    assert ("dst", "b/x") not in fake.secrets or fake.secrets[("dst", "b/x")] == []
