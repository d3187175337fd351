"""The identity commands end to end: `credgate issuer|client|policy|run` in
subprocesses against a real `credgate serve --dev` process (see test_cli.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import RSAKey

from gateway.cli.main import main
from tests.gateway.test_cli import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("cli-identity") / "data")
    try:
        yield srv
    finally:
        srv.stop()


def whoami(server: Server, token: str) -> httpx.Response:
    return httpx.get(f"{server.addr}/v1/auth/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_issuer_add_list_show_rm(server: Server, tmp_path: Path) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    out = server.cli(
        "issuer", "add", "k8s", "--issuer-url", "https://kubernetes.default.svc", "--jwks-file", str(jwks),
        "--audience", "credgate", "--audience", "credgate-dev", "--algorithm", "RS256", "--leeway", "10",
        "--map", "project=kubernetes.io.namespace", "--role-map", "ops=operator", "--role-map", "ops=auditor",
    ).stdout
    assert out == "issuer k8s (https://kubernetes.default.svc) saved\n"
    server.cli("issuer", "add", "idp", "--issuer-url", "https://idp.example", "--jwks-url", "https://idp.example/jwks",
               "--no-check",  # nothing serves that JWKS (tests/gateway/test_issuer_check.py checks)
               "--audience", "credgate-cli", "--map", "groups=groups", "--role-map", "credgate-admins=admin")

    header, *listed = server.cli("issuer", "list").stdout.splitlines()  # a table: its header, then a row per issuer
    assert header.split() == ["NAME", "ISSUER", "URL", "AUDIENCES"]
    assert [line.split()[0] for line in listed] == ["idp", "k8s"]
    shown = server.cli("issuer", "show", "k8s").stdout
    assert "audiences:   credgate, credgate-dev" in shown and "leeway:      10s" in shown
    assert "project=kubernetes.io.namespace" in shown and "ops=operator+auditor" in shown
    raw = json.loads(server.cli("issuer", "show", "k8s", "--json").stdout)
    assert raw["jwks"]["keys"][0]["kid"] == "k1" and raw["algorithms"] == ["RS256"]
    assert raw["role_mapping"] == {"ops": ["operator", "auditor"]} and raw["jwks_url"] is None

    assert server.cli("issuer", "rm", "k8s").stdout == "removed issuer k8s\n"
    gone = server.cli("issuer", "show", "k8s", check=False)
    assert gone.returncode == 1 and gone.stderr.startswith("credgate: issuer_not_found:")
    server.cli("issuer", "rm", "idp")


@pytest.mark.parametrize(
    "args",
    [
        ["issuer", "add", "x", "--issuer-url", "https://i", "--audience", "a"],  # no key source
        ["issuer", "add", "x", "--issuer-url", "https://i", "--audience", "a", "--jwks-url", "https://i/j",
         "--jwks-file", "/nonexistent"],  # both
        ["issuer", "add", "x", "--issuer-url", "https://i", "--audience", "a", "--jwks-url", "https://i/j",
         "--map", "groups"],
        ["issuer", "add", "x", "--issuer-url", "https://i", "--audience", "a", "--jwks-file", "/nonexistent.json"],
        ["client", "create", "svc", "--token-ttl", "soon"],
        ["policy", "put", "p", "/nonexistent.yaml"],
        ["policy", "explain", "--subject", "s", "--action", "secrets:read", "--claim", "novalue"],
        ["run", "token", "r1", "--connector", "c", "--resource", "r", "--format", "xml"],
        ["run", "token", "r1", "--connector", "c"],  # --resource is required
        ["run", "token", "r/1", "--connector", "c", "--resource", "r"],
    ],
)
def test_bad_usage_is_one_line_and_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any request is made, so the CLI runs in-process (a subprocess per case is slow).
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("credgate: ") and err.count("\n") == 1 and "Traceback" not in err


def test_issuer_refused_by_the_gateway_exits_1(server: Server) -> None:
    res = server.cli("issuer", "add", "x", "--issuer-url", "https://i", "--audience", "a", "--jwks-url", "https://i/j",
                     "--algorithm", "HS256", check=False)
    assert res.returncode == 1 and res.stderr.startswith("credgate: validation_failed:") and res.stderr.count("\n") == 1


def test_client_secret_is_printed_once_and_never_listed(server: Server) -> None:
    out = server.cli("client", "create", "metadata-server", "--role", "operator", "--token-ttl", "15m").stdout
    secrets = re.findall(r"^CREDGATE_CLIENT_SECRET=(\S+)$", out, re.M)
    assert len(secrets) == 1 and out.count(secrets[0]) == 1, out
    secret = secrets[0]

    listed = server.cli("client", "list").stdout
    assert "metadata-server" in listed and "operator" in listed and "ttl=900s" in listed and "active" in listed
    assert secret not in listed and secret not in server.cli("client", "list", "--json").stdout

    # The secret works at the token endpoint, and the token carries the client's role.
    grant = {"grant_type": "client_credentials", "client_id": "metadata-server", "client_secret": secret}
    r = httpx.post(f"{server.addr}/v1/auth/token", data=grant, timeout=10)
    assert r.status_code == 200, r.text
    me = whoami(server, r.json()["access_token"]).json()
    assert me["kind"] == "client" and me["subject"] == "client:metadata-server" and me["roles"] == ["operator"]

    assert server.cli("client", "revoke", "metadata-server").stdout == "revoked client metadata-server\n"
    assert "revoked" in server.cli("client", "list").stdout
    r = httpx.post(f"{server.addr}/v1/auth/token", data=grant, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"

    again = server.cli("client", "create", "metadata-server", check=False)
    assert again.returncode == 1 and again.stderr.startswith("credgate: client_exists:")


def test_client_with_keys_gets_no_secret(server: Server, tmp_path: Path) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "svc-1"})
    jwks = tmp_path / "svc.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    out = server.cli("client", "create", "keyed-svc", "--jwks-file", str(jwks)).stdout
    assert "CREDGATE_CLIENT_SECRET" not in out and "private_key_jwt" in out


POLICY_YAML = """\
description: the ML team issues read credentials for analytics
rules:
  - description: ml-team reads analytics
    principals:
      issuer: idp
      claims: {groups: ml-team}
    actions: [credentials:issue]
    connectors: [warehouse]
    resources: ["analytics/*"]
    max_ttl_seconds: 900
"""


def test_policy_put_from_yaml_explain_show_rm(server: Server, tmp_path: Path) -> None:
    f = tmp_path / "ml.yaml"
    f.write_text(POLICY_YAML)
    assert server.cli("policy", "put", "ml-read", str(f)).stdout == "policy ml-read saved (1 rule(s))\n"
    g = tmp_path / "audit.json"
    g.write_text(json.dumps({"rules": [{"principals": {"subject": "auditor-*"}, "actions": ["audit:read"]}]}))
    server.cli("policy", "put", "audit", str(g))

    assert [line.split()[0] for line in server.cli("policy", "list").stdout.splitlines()] == ["NAME", "audit", "ml-read"]
    shown = server.cli("policy", "show", "ml-read").stdout
    assert "ml-team reads analytics" in shown and "analytics/*" in shown and "max_ttl_seconds: 900" in shown

    explain = ["policy", "explain", "--subject", "bob", "--issuer", "idp", "--claim", "groups=ml-team",
               "--claim", "groups=other", "--action", "credentials:issue", "--connector", "warehouse"]
    allowed = server.cli(*explain, "--resource", "analytics/sales").stdout.splitlines()
    assert allowed == ["allow", "rule:    ml-read/0", "reason:  ml-team reads analytics", "max ttl: 900s"]
    denied = server.cli(*explain, "--resource", "hr/salaries", check=False)  # exit 1 on deny, the answer printed
    lines = denied.stdout.splitlines()
    assert denied.returncode == 1 and denied.stderr == ""
    assert lines[0] == "deny" and lines[1] == "rule:    -" and "no rule allows credentials:issue" in lines[2]
    denied = server.cli(*explain, "--resource", "hr/salaries", "--json", check=False)
    assert denied.returncode == 1 and json.loads(denied.stdout)["decision"] == "deny"
    assert json.loads(server.cli(*explain, "--resource", "analytics/sales", "--json").stdout)["decision"] == "allow"
    admin = server.cli("policy", "explain", "--subject", "ops", "--role", "admin", "--action", "keys:manage").stdout
    assert admin.splitlines()[:2] == ["allow", "rule:    builtin/admin"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{principals: {}, actions: [fly]}]\n")
    res = server.cli("policy", "put", "bad", str(bad), check=False)
    assert res.returncode == 1 and res.stderr.startswith("credgate: validation_failed:") and res.stderr.count("\n") == 1

    assert server.cli("policy", "rm", "ml-read").stdout == "removed policy ml-read\n"
    gone = server.cli("policy", "show", "ml-read", check=False)
    assert gone.returncode == 1 and gone.stderr.startswith("credgate: policy_not_found:")


def test_run_token_works_until_the_run_is_revoked(server: Server) -> None:
    token = server.cli("run", "token", "run-42", "--connector", "warehouse", "--resource", "analytics/*",
                       "--ttl", "10m").stdout.strip()
    assert token.count(".") == 2
    r = whoami(server, token)
    assert r.status_code == 200, r.text
    assert r.json() == {"kind": "run", "subject": "run:run-42", "issuer": "credgate", "roles": [], "run_id": "run-42",
                        "may": ["credentials:issue", "credentials:wrap"]}

    env = server.cli("run", "token", "run-42", "--connector", "warehouse", "--resource", "analytics/*",
                     "--format", "env").stdout
    assert re.fullmatch(r"export CREDGATE_TOKEN=\S+\n", env)
    assert whoami(server, env.split("=", 1)[1].strip()).json()["run_id"] == "run-42"

    assert server.cli("run", "revoke", "run-42").stdout == "revoked run run-42; 0 lease(s) revoked\n"
    r = whoami(server, token)
    assert r.status_code == 401 and r.json()["error"]["code"] == "run_revoked"
    res = server.cli("whoami", token=token, check=False)
    assert res.returncode == 1 and res.stderr.startswith("credgate: run_revoked:")
    again = server.cli("run", "token", "run-42", "--connector", "warehouse", "--resource", "analytics/*", check=False)
    assert again.returncode == 1 and "run_revoked" in again.stderr
    missing = server.cli("run", "revoke", "never-was", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("credgate: run_not_found:")
