"""Credentials in the formats programs read: AWS credential_process (through botocore itself
and the real AWS CLI, against moto), a Kubernetes ExecCredential, shell export lines with a prefix, and the
Docker credential helper's protocol."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.gateway.test_cli import CREDGATE, Server, server  # noqa: F401 - the served gateway fixture
from tests.services.waiting import clean_env

HELPER = str(Path(CREDGATE).parent / "docker-credential-credgate")
CANARY = "CANARY-fmt-" + secrets.token_hex(4)
TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}


@pytest.fixture(scope="module")
def static(server: Server) -> str:  # noqa: F811
    """Static connectors: ``kube`` (a token), ``registry`` (username/password) and ``odd``
    (values a shell must not interpret)."""
    server.cli("secret", "put", "local/fmt/kube", f"token={CANARY}-kube")
    server.cli("connector", "add", "kube", "--type", "static", "--auth-method", "static",
               "--secret", "local/fmt/kube", "--resource", "default")
    server.cli("secret", "put", "local/fmt/registry", "username=robot", f"password={CANARY}-reg")
    server.cli("connector", "add", "registry", "--type", "static", "--auth-method", "static",
               "--secret", "local/fmt/registry", "--resource", "pull")
    server.cli("secret", "put", "local/fmt/odd", "user=it's \"$HOME\" `id` x", f"password={CANARY}-odd")
    server.cli("connector", "add", "odd", "--type", "static", "--auth-method", "static",
               "--secret", "local/fmt/odd", "--resource", "default")
    return "kube"


def test_credential_process_through_botocore(server: Server, moto_server, tmp_path: Path,  # noqa: F811
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    iam = moto_server.boto3_client("iam")
    iam.create_user(UserName="cg-fmt")
    key = iam.create_access_key(UserName="cg-fmt")["AccessKey"]
    role = iam.create_role(RoleName="cg-fmt-s3", AssumeRolePolicyDocument=json.dumps(TRUST),
                           MaxSessionDuration=43200)["Role"]
    bucket = "cg-fmt-" + secrets.token_hex(3)
    moto_server.boto3_client("s3").create_bucket(Bucket=bucket)
    moto_server.boto3_client("s3").put_object(Bucket=bucket, Key="report.txt", Body=b"hi")
    server.cli("secret", "put", "local/fmt/aws", f"aws_access_key_id={key['AccessKeyId']}",
               f"aws_secret_access_key={key['SecretAccessKey']}")
    server.cli("connector", "add", "s3", "--type", "aws", "--auth-method", "iam-role", "--secret", "local/fmt/aws",
               "--resource", f"s3-bucket:{bucket}", f"endpoint_url={moto_server.endpoint_url}", f"role_arn={role['Arn']}")

    doc = json.loads(server.cli("cred", "issue", "s3", f"s3-bucket:{bucket}", "--format", "credential-process").stdout)
    assert set(doc) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    assert doc["Version"] == 1 and doc["Expiration"].endswith("Z") and doc["AccessKeyId"] != key["AccessKeyId"]

    config = tmp_path / "aws-config"
    config.write_text(
        "[profile cg]\n"
        f"credential_process = {CREDGATE} cred issue s3 s3-bucket:{bucket} --format credential-process\n"
        "region = us-east-1\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("CREDGATE_ADDR", server.addr)
    monkeypatch.setenv("CREDGATE_TOKEN", server.token)
    session = boto3.Session(profile_name="cg")
    creds = session.get_credentials().get_frozen_credentials()
    assert creds.access_key not in (key["AccessKeyId"], doc["AccessKeyId"])  # a fresh one, from the process
    s3 = session.client("s3", endpoint_url=moto_server.endpoint_url)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["report.txt"]

    # The real AWS CLI (awscli from PyPI, its own botocore) with the same profile.
    aws = str(Path(CREDGATE).parent / "aws")
    env = clean_env(AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                    CREDGATE_ADDR=server.addr, CREDGATE_TOKEN=server.token)
    ls = subprocess.run([aws, "--profile", "cg", "--endpoint-url", moto_server.endpoint_url, "s3", "ls", f"s3://{bucket}"],
                        capture_output=True, text=True, timeout=60, env=env)
    assert ls.returncode == 0 and ls.stdout.split()[-1] == "report.txt", (ls.stdout, ls.stderr)
    who = subprocess.run([aws, "--profile", "cg", "--endpoint-url", moto_server.endpoint_url, "sts",
                          "get-caller-identity", "--output", "json"], capture_output=True, text=True, timeout=60, env=env)
    assert who.returncode == 0 and ":assumed-role/cg-fmt-s3/" in json.loads(who.stdout)["Arn"], who.stderr
    # The gateway refusing (a bad token): the CLI fails with credgate's one-line reason, no key printed.
    env["CREDGATE_TOKEN"] = "cg_not-a-token"
    bad = subprocess.run([aws, "--profile", "cg", "--endpoint-url", moto_server.endpoint_url, "s3", "ls", f"s3://{bucket}"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode != 0 and "custom-process: credgate: invalid_token:" in bad.stderr, bad.stderr
    assert key["SecretAccessKey"] not in bad.stderr + bad.stdout


def test_k8s_exec_credential(server: Server, static: str) -> None:  # noqa: F811
    out = json.loads(server.cli("cred", "issue", "kube", "default", "--wrap", "--format", "k8s-exec").stdout)
    assert set(out) == {"apiVersion", "kind", "status"}
    assert out["apiVersion"] == "client.authentication.k8s.io/v1" and out["kind"] == "ExecCredential"
    assert set(out["status"]) == {"token", "expirationTimestamp"} and out["status"]["token"] == f"{CANARY}-kube"
    lease = json.loads(server.cli("lease", "list", "--connector", "kube", "--json").stdout)["items"][-1]
    assert out["status"]["expirationTimestamp"] == lease["expires_at"][:19] + "Z"


@pytest.mark.parametrize(
    ("connector", "resource", "fmt", "words"),
    [
        ("registry", "pull", "k8s-exec", "has no token: --format k8s-exec needs"),
        ("kube", "default", "credential-process", "--format credential-process needs an aws connector"),
    ],
)
def test_a_format_the_credential_cannot_fill_is_one_line_exit_2(
    server: Server, static: str, connector: str, resource: str, fmt: str, words: str  # noqa: F811
) -> None:
    res = server.cli("cred", "issue", connector, resource, "--wrap", "--format", fmt, check=False)
    assert res.returncode == 2 and words in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stdout == "" and CANARY not in res.stderr
    last = json.loads(server.cli("lease", "list", "--connector", connector, "--json").stdout)["items"][-1]
    assert last["state"] == "revoked"  # nobody can use it: not left live


def test_env_with_prefix_is_shell_safe(server: Server, static: str) -> None:  # noqa: F811
    wrapped = json.loads(server.cli("cred", "issue", "odd", "default", "--wrap", "-o", "json").stdout)
    lines = server.cli("unwrap", wrapped["wrap_token"], "--format", "env", "--prefix", "ODD_", token="").stdout
    names = [line.removeprefix("export ").split("=", 1)[0] for line in lines.splitlines()]
    assert sorted(names) == ["CREDGATE_EXPIRES_AT", "CREDGATE_LEASE_ID", "ODD_PASSWORD", "ODD_USER"]
    shell = subprocess.run(["bash", "-c", 'eval "$1"; printf "%s|%s|%s" "$ODD_USER" "$ODD_PASSWORD" "${USER-unset}"',
                            "_", lines], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "USER": "me"})
    assert shell.stdout == f"it's \"$HOME\" `id` x|{CANARY}-odd|me", shell.stderr
    bad = server.cli("cred", "issue", "odd", "default", "--prefix", "X_", check=False)
    assert bad.returncode == 2 and "--prefix goes with --format env" in bad.stderr


def helper(server: Server, action: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:  # noqa: F811
    return subprocess.run([HELPER, action], input=stdin, capture_output=True, text=True, timeout=60,
                          env=clean_env(**{"CREDGATE_ADDR": server.addr, "CREDGATE_TOKEN": server.token, **env}))


def test_docker_credential_helper_protocol(server: Server, static: str, tmp_path: Path) -> None:  # noqa: F811
    mapped = {"CREDGATE_DOCKER_REGISTRIES": "registry.example.com=registry:pull,ghcr.example.org:5000=registry:pull"}
    got = helper(server, "get", "https://registry.example.com/v2/\n", **mapped)
    assert got.returncode == 0 and json.loads(got.stdout) == {
        "ServerURL": "https://registry.example.com/v2/", "Username": "robot", "Secret": f"{CANARY}-reg"}
    assert json.loads(helper(server, "get", "ghcr.example.org:5000", **mapped).stdout)["Username"] == "robot"

    missing = helper(server, "get", "other.example.com", **mapped)
    assert (missing.returncode, missing.stdout) == (1, "credentials not found in native keychain\n")
    listed = helper(server, "list", **mapped)
    assert json.loads(listed.stdout) == {"registry.example.com": "", "ghcr.example.org:5000": ""}
    store = helper(server, "store", json.dumps({"ServerURL": "x", "Username": "u", "Secret": "s"}), **mapped)
    assert store.returncode == 1 and "does not store" in store.stdout
    erase = helper(server, "erase", "registry.example.com", **mapped)
    assert (erase.returncode, erase.stdout) == (0, "")

    config = tmp_path / "registries.json"
    config.write_text(json.dumps({"registry.example.com": "registry:pull"}))
    from_file = helper(server, "get", "registry.example.com", CREDGATE_DOCKER_CONFIG=str(config))
    assert json.loads(from_file.stdout)["Secret"] == f"{CANARY}-reg"
    refused = helper(server, "get", "registry.example.com", CREDGATE_DOCKER_CONFIG=str(config), CREDGATE_TOKEN="nope")
    assert refused.returncode == 1 and refused.stdout.startswith("credgate: invalid_token") and CANARY not in refused.stdout
