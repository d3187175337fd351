"""The README walkthrough, end to end: a real `credgate serve --dev` process on a
free port, driven by the real `credgate` command in subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.waiting import clean_env, free_port, wait_until_serving

CREDGATE = str(Path(sys.executable).parent / "credgate")


class Server:
    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.out = data_dir.parent / "serve.out"
        self._spawn("w")
        tokens = re.findall(r"^CREDGATE_TOKEN=(\S+)$", self.out.read_text(), re.M)
        assert len(tokens) == 1, self.out.read_text()
        self.token = tokens[0]

    def _spawn(self, mode: str) -> None:
        self.proc = subprocess.Popen(
            [CREDGATE, "serve", "--dev", "--data-dir", str(self.data_dir), "--port", str(self.port)],
            stdout=self.out.open(mode),
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
        try:
            wait_until_serving(f"{self.addr}/readyz", self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.out.read_text()}") from None

    def restart(self) -> None:
        """Stop (SIGTERM: drained) and serve again on the same port and data directory."""
        returncode = self.stop()
        assert stopped_gracefully(returncode, self.out.read_text()), self.out.read_text()[-3000:]
        self._spawn("a")

    def cli(self, *args: str, token: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = clean_env(CREDGATE_ADDR=self.addr, CREDGATE_TOKEN=token if token is not None else self.token)
        res = subprocess.run([CREDGATE, *args], capture_output=True, text=True, env=env, timeout=60)
        if check:
            assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


def stopped_gracefully(returncode: int, log: str) -> bool:
    # uvicorn drains, runs the lifespan shutdown, then re-raises SIGTERM (exit -15) so a
    # supervisor sees the signal it sent.
    return returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("cli") / "data")
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def test_dev_mode_created_data_dir_and_a_private_kek(server: Server) -> None:
    kek = server.data_dir / "kek"
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600
    for f in server.data_dir.glob("credgate.db*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert server.token not in (server.data_dir / "credgate.db").read_bytes().decode("latin-1")


def test_walkthrough_put_read_reveal_rotate_read(server: Server, tmp_path: Path) -> None:
    out = server.cli("secret", "put", "local/ml/warehouse", "user=etl", "password=CANARY-cli-pw").stdout
    assert "version 1" in out and "CANARY" not in out
    meta = server.cli("secret", "get", "local/ml/warehouse").stdout
    assert "password, user" in meta and "CANARY" not in meta
    shown = server.cli("secret", "get", "local/ml/warehouse", "--reveal").stdout
    assert "password=CANARY-cli-pw" in shown
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"password": "second"}))
    server.cli("secret", "put", "local/ml/warehouse", "--from-file", str(f))
    as_json = json.loads(server.cli("secret", "get", "local/ml/warehouse", "--json").stdout)
    assert as_json["current_version"] == 2 and as_json["keys"] == ["password"]

    rotated = server.cli("keys", "rotate").stdout
    assert "current version:  2" in rotated and "re-wrap pending:  0" in rotated
    status = json.loads(server.cli("keys", "status", "--json").stdout)
    assert {v["version"]: v["state"] for v in status["versions"]} == {1: "retired", 2: "current"}

    v1 = json.loads(server.cli("secret", "get", "local/ml/warehouse", "--reveal", "--version", "1", "--json").stdout)
    assert v1["data"] == {"password": "CANARY-cli-pw", "user": "etl"}
    assert "local/ml/warehouse" in server.cli("secret", "list").stdout.split()
    assert server.cli("secret", "list", "local/ml/").stdout.split() == ["local/ml/warehouse"]


def test_delete_restore_destroy(server: Server) -> None:
    server.cli("secret", "put", "local/tmp/x", "k=v")
    server.cli("secret", "rm", "local/tmp/x")
    gone = server.cli("secret", "get", "local/tmp/x", check=False)
    assert gone.returncode == 1 and gone.stderr.startswith("credgate: secret_deleted:")
    assert "local/tmp/x" in server.cli("secret", "list", "local/tmp", "--deleted").stdout
    server.cli("secret", "restore", "local/tmp/x")
    server.cli("secret", "rm", "local/tmp/x", "--destroy")
    assert server.cli("secret", "get", "local/tmp/x", check=False).stderr.startswith("credgate: secret_not_found:")


def test_backends_and_admin_keys(server: Server) -> None:
    server.cli("backend", "add", "team", "--type", "local")
    assert "team" in server.cli("backend", "list").stdout
    assert "team: ok" in server.cli("backend", "check", "team").stdout
    server.cli("backend", "rm", "team")
    created = server.cli("admin-key", "create", "reader", "--role", "auditor").stdout
    token = re.search(r"^CREDGATE_TOKEN=(\S+)$", created, re.M).group(1)
    assert "reader" in server.cli("admin-key", "list").stdout
    denied = server.cli("secret", "get", "local/ml/warehouse", "--reveal", token=token, check=False)
    assert denied.returncode == 1 and "permission_denied" in denied.stderr
    key_id = re.search(r"created (ak_\w+)", created).group(1)
    server.cli("admin-key", "revoke", key_id)
    assert "invalid_token" in server.cli("backend", "list", token=token, check=False).stderr


@pytest.mark.parametrize(
    "args",
    [
        ["secret", "get"],
        ["secret", "put", "local/a"],
        ["secret", "put", "local/a", "novalue"],
        ["secret", "put", "nopath", "k=v"],
        ["secret", "get", "local/a/../b"],
        ["secret", "get", "local/a", "--version", "zero"],
        ["no-such-command"],
        ["secret", "put", "local/a", "--from-file", "/nonexistent.json"],
    ],
)
def test_bad_usage_is_one_line_and_exit_2(server: Server, args: list[str]) -> None:
    res = server.cli(*args, check=False)
    assert res.returncode == 2, res
    assert res.stderr.startswith("credgate: ") and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_failed_requests_exit_1(server: Server) -> None:
    res = server.cli("secret", "get", "local/never/was", check=False)
    assert res.returncode == 1 and res.stderr == "credgate: secret_not_found: Secret local/never/was does not exist.\n"
    res = server.cli("secret", "get", "local/x", token="cgt_wrong", check=False)
    assert res.returncode == 1 and "invalid_token" in res.stderr
    env = clean_env(CREDGATE_ADDR=f"http://127.0.0.1:{free_port()}", CREDGATE_TOKEN="x")
    res = subprocess.run([CREDGATE, "secret", "list"], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and "can't reach the gateway" in res.stderr and res.stderr.count("\n") == 1


def test_serve_without_kek_outside_dev_refuses_in_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [CREDGATE, "serve", "--data-dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True, text=True, env=clean_env(), timeout=30,
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "credgate keys generate" in res.stderr


def test_keys_generate_then_serve_without_dev(tmp_path: Path) -> None:
    kek = tmp_path / "kek"
    res = subprocess.run([CREDGATE, "keys", "generate", "--out", str(kek)], capture_output=True, text=True, env=clean_env())
    assert res.returncode == 0 and stat.S_IMODE(kek.stat().st_mode) == 0o600
    os.chmod(kek, 0o644)
    res = subprocess.run(
        [CREDGATE, "serve", "--data-dir", str(tmp_path / "d"), "--port", str(free_port())],
        capture_output=True, text=True, env=clean_env(CREDGATE_KEK_FILE=str(kek)), timeout=30,
    )
    assert res.returncode == 2 and "chmod 600" in res.stderr


def test_a_second_serve_on_the_same_sqlite_store_is_refused_in_one_line(server: Server) -> None:
    res = subprocess.run(
        [CREDGATE, "serve", "--dev", "--data-dir", str(server.data_dir), "--port", str(free_port())],
        capture_output=True, text=True, env=clean_env(), timeout=30,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "another credgate process is serving the SQLite store" in lines[0]
    assert "PostgreSQL" in lines[0] and "Traceback" not in res.stderr
    assert server.proc.poll() is None  # the first one serves on


def test_db_upgrade(tmp_path: Path) -> None:
    res = subprocess.run(
        [CREDGATE, "db", "upgrade", "--data-dir", str(tmp_path)], capture_output=True, text=True, env=clean_env()
    )
    assert res.returncode == 0 and "store at revision" in res.stdout
    assert (tmp_path / "credgate.db").exists()


def test_yaml_config_file_sets_the_port(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "credgate.yaml"
    cfg.write_text(f"port: {port}\ndata_dir: {tmp_path / 'd'}\nlog_format: json\n")
    proc = subprocess.Popen([CREDGATE, "serve", "--dev", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/healthz", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert stopped_gracefully(proc.returncode, err)
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert logs and all({"time", "level", "message", "request_id"} <= set(entry) for entry in logs)


def test_connectors_credentials_and_leases(server: Server, redis_server: str, tmp_path: Path) -> None:
    import redis

    server.cli("secret", "put", "local/targets/cache", f"url={redis_server}")
    server.cli("connector", "add", "cache", "--type", "redis", "--auth-method", "password",
               "--secret", "local/targets/cache", "--resource", "features", "--max-ttl", "10m",
               'categories=["+@read"]')
    assert "cache" in server.cli("connector", "list").stdout
    assert "cache: ok" in server.cli("connector", "verify", "cache").stdout
    assert "redis" in server.cli("connector", "types").stdout

    env_out = server.cli("cred", "issue", "cache", "features", "--ttl", "2h", "--format", "env").stdout
    exports = dict(line.removeprefix("export ").split("=", 1) for line in env_out.splitlines())
    assert exports["CREDGATE_LEASE_ID"].startswith("lease_") and "URL" in exports
    url = exports["URL"].strip("'")
    assert redis.Redis.from_url(url).get("features:none") is None  # authenticated, allowed
    listed = json.loads(server.cli("lease", "list", "--connector", "cache", "--json").stdout)["items"]
    assert [x["lease_id"] for x in listed] == [exports["CREDGATE_LEASE_ID"]]
    assert listed[0]["expires_at"] < listed[0]["max_expires_at"] or listed[0]["expires_at"] == listed[0]["max_expires_at"]
    out = server.cli("lease", "revoke", exports["CREDGATE_LEASE_ID"]).stdout
    assert "revoked" in out
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(url).get("features:none")

    server.cli("cred", "issue", "cache", "features")
    assert "revoked 1 of 1" in server.cli("lease", "revoke", "--connector", "cache").stdout
    bad = server.cli("cred", "issue", "cache", "other", check=False)
    assert bad.returncode == 1 and "resource_not_allowed" in bad.stderr

    server.cli("secret", "put", "local/thirdparty/key", "api_key=CANARY-cli-static")
    server.cli("connector", "add", "vendor", "--type", "static", "--auth-method", "static",
               "--secret", "local/thirdparty/key", "--resource", "default")
    wrapped = json.loads(server.cli("cred", "issue", "vendor", "default", "--wrap", "--format", "json").stdout)
    assert "CANARY" not in json.dumps(wrapped)
    unwrapped = server.cli("unwrap", wrapped["wrap_token"], token="").stdout
    assert "api_key=CANARY-cli-static" in unwrapped
    again = server.cli("unwrap", wrapped["wrap_token"], token="", check=False)
    assert again.returncode == 1 and "wrap_token_used" in again.stderr
    assert server.cli("connector", "rm", "cache").returncode == 0


def test_sigterm_stops_cleanly(server: Server) -> None:
    # Runs last in this module: the shared server shuts down gracefully.
    assert stopped_gracefully(server.stop(), server.out.read_text())
