"""The ZenML service connector type ``credgate``: the real ``zenml[server]`` 0.98 (its own venv,
tests/zenml/conftest.py), its SQL store (SQLite: the SqlZenStore a ZenML server runs, whose
``get_service_connector_client`` is the server side of ZenML's client call), the connector type
registered through the ``zenml.init_hooks`` entry point credgate declares (pyproject.toml), against a real ``credgate serve --dev``
with an ``aws`` connector on moto and a ``postgres`` connector on a real PostgreSQL cluster.

One ZenML process serves most tests, driven line by line over stdin/stdout (ZenML's start-up
is slow), so a test can act in credgate (revoke a lease, revoke a run) between two of ZenML's
requests; a ZenML server, its two clients (a user, a step's run-scoped token) and the example
pipeline run in processes of their own."""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.test_cli import Server, server  # noqa: F401  (the served gateway, module-scoped)
from tests.services.waiting import clean_env
from tests.zenml.conftest import zenml_server_process
from tests.zenml.test_secrets_store import SERVER_SIDE

TRUST = {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}

DRIVER = r'''
import json, sys
from zenml import pipeline, step

@step
def step_environment() -> str:
    """The API token ZenML's orchestrators hand a step of this run (scoped to the run)."""
    from zenml.orchestrators.utils import get_config_environment_vars
    from zenml.steps import get_step_context
    _, secrets = get_config_environment_vars(pipeline_run_id=get_step_context().pipeline_run.id)
    return secrets["ZENML_STORE_API_TOKEN"]

@pipeline(enable_cache=False)
def credgate_run() -> None:
    step_environment()

def main():
    from zenml.client import Client
    from zenml.service_connectors.service_connector_registry import service_connector_registry as registry
    client = Client()
    handles = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        out = {}
        try:
            if op == "types":
                out["registered"] = registry.is_registered("credgate")
                spec = registry.get_service_connector_type("credgate")
                out["auth_methods"] = sorted(spec.auth_method_dict)
                out["resource_types"] = sorted(spec.resource_type_dict)
            elif op == "create":
                model, _ = client.create_service_connector(**cmd)
                out["id"] = str(model.id)
                out["auth_method"] = model.auth_method
            elif op == "client":
                cc = client.get_service_connector_client(cmd["name"], resource_type=cmd["type"],
                                                         resource_id=cmd.get("id"))
                handles[cmd["as"]] = cc
                out["auth_method"] = cc.auth_method
                out["run_id"] = cc.config.run_id
                out["resource_id"] = cc.resource_id
                out["model"] = cc.to_response_model().model_dump_json()
                out["repr"] = repr(cc) + str(cc.config)
            elif op == "s3":
                s3 = handles[cmd["as"]].connect()
                out["class"] = type(s3).__module__ + "." + type(s3).__name__
                out["keys"] = [o["Key"] for o in s3.list_objects_v2(Bucket=cmd["bucket"]).get("Contents", [])]
                out["access_key"] = s3.credentials.access_key
                out["region"] = s3.meta.region_name
            elif op == "session":
                session = handles[cmd["as"]].connect()
                out["class"] = type(session).__module__ + "." + type(session).__name__
                out["account"] = session.client("sts", endpoint_url=cmd["endpoint"]).get_caller_identity()["Account"]
            elif op == "pg":
                conn = handles[cmd["as"]].connect(autocommit=True)
                handles[cmd["as"] + ":conn"] = conn
                out["class"] = type(conn).__module__ + "." + type(conn).__name__
                out["user"], out["db"] = conn.execute("select current_user, current_database()").fetchone()
            elif op == "pg_old":
                try:
                    handles[cmd["as"] + ":conn"].execute("select 1")
                    out["old"] = "still works"
                except Exception as exc:
                    out["old"] = type(exc).__module__ + "." + type(exc).__name__
            elif op == "sqlalchemy":
                import sqlalchemy
                cc = handles[cmd["as"]]
                engine = sqlalchemy.create_engine("postgresql+psycopg://", creator=cc.connect)
                with engine.connect() as conn:
                    out["user"] = conn.execute(sqlalchemy.text("select current_user")).scalar()
                engine.dispose()
            elif op == "pipeline":
                run = client.get_pipeline_run(credgate_run().id)
                out["run_id"] = str(run.id)
                out["token"] = run.steps["step_environment"].output.load()
            elif op == "connect":
                handles[cmd["as"]].connect()
                out["connected"] = True
            else:
                raise ValueError(op)
        except Exception as exc:
            out["error"] = type(exc).__name__ + ": " + str(exc)
        print("RESULT " + json.dumps(out), flush=True)

main()
'''


class Zen:
    """One ZenML process (a local SQL store in its own config dir) taking commands."""

    def __init__(self, python: Path, home: Path, env: dict[str, str], name: str = "zenml") -> None:
        self.home, self.python, self.env = home, python, env
        self.driver = home / "driver.py"
        self.driver.write_text(DRIVER)
        self.log = home / f"{name}.err"
        self.proc = subprocess.Popen([str(python), str(self.driver)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log.open("w"), text=True, cwd=home, env=env)
        self.outputs: list[str] = []

    def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"the ZenML process ended: {self.log.read_text()[-3000:]}")
            self.outputs.append(line)
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])

    def close(self) -> str:
        """Stop it (end of its input); everything it wrote (stdout and stderr)."""
        if self.proc.returncode is not None:
            return "".join(self.outputs) + self.log.read_text()
        try:
            rest, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        return "".join(self.outputs) + (rest or "") + self.log.read_text()


class Setup:
    def __init__(self, gateway: Server, bucket: str, db: str, client: dict[str, str], moto_url: str) -> None:
        self.gateway, self.bucket, self.db, self.client, self.moto_url = gateway, bucket, db, client, moto_url

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.gateway.addr + path, timeout=30,
                             headers={"Authorization": f"Bearer {self.gateway.token}"}, **kw)

    def leases(self, connector: str, run_id: str) -> list[dict[str, Any]]:
        r = self.admin("GET", "/v1/leases", params={"connector": connector, "limit": 1000})
        assert r.status_code == 200, r.text
        return [x for x in r.json()["items"] if x["run_id"] == run_id]


@pytest.fixture(scope="module")
def setup(server: Server, moto_server, pg_cluster) -> Setup:  # noqa: F811
    """credgate: an ``aws`` connector (assume-role on moto, bucket ``zen-<hex>`` with one
    object), a ``pg`` connector (a database on the scram cluster), and an OAuth2 client
    ``zenml-server`` allowed to delegate them to runs."""
    import psycopg

    iam = moto_server.boto3_client("iam")
    iam.create_user(UserName="cg-zenml")
    key = iam.create_access_key(UserName="cg-zenml")["AccessKey"]
    role = iam.create_role(RoleName="cg-zenml-s3", AssumeRolePolicyDocument=json.dumps(TRUST),
                           MaxSessionDuration=43200)["Role"]
    bucket = "zen-" + secrets.token_hex(3)
    moto_server.boto3_client("s3").create_bucket(Bucket=bucket)
    moto_server.boto3_client("s3").put_object(Bucket=bucket, Key="features.csv", Body=b"a,b\n")
    server.cli("secret", "put", "local/zsc/aws", f"aws_access_key_id={key['AccessKeyId']}",
               f"aws_secret_access_key={key['SecretAccessKey']}")
    server.cli("connector", "add", "aws", "--type", "aws", "--auth-method", "iam-role", "--secret", "local/zsc/aws",
               "--resource", f"s3-bucket:{bucket}", "--resource", "aws-generic",
               f"endpoint_url={moto_server.endpoint_url}", f"role_arn={role['Arn']}")
    db = "zsc_" + secrets.token_hex(3)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    server.cli("secret", "put", "local/zsc/pg", f"dsn={pg_cluster.dsn()}")
    server.cli("connector", "add", "pg", "--type", "postgres", "--auth-method", "password",
               "--secret", "local/zsc/pg", "--resource", db)
    client = json.loads(server.cli("-o", "json", "client", "create", "zenml-server").stdout)
    policy = Path(server.data_dir).parent / "zenml-server.json"
    policy.write_text(json.dumps({"rules": [{
        "principals": {"issuer": "credgate", "subject": "client:zenml-server"},
        "actions": ["runs:delegate", "credentials:issue", "connectors:read"],
        "connectors": ["aws", "pg"], "resources": [f"s3-bucket:{bucket}", "aws-generic", db],
        "max_ttl_seconds": 900,
    }]}))
    server.cli("policy", "put", "zenml-server", str(policy))
    return Setup(server, bucket, db, {"client_id": client["client_id"], "client_secret": client["client_secret"]},
                 moto_server.endpoint_url)


@pytest.fixture(scope="module")
def zen(zenml_python: Path, setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zen]:
    home = tmp_path_factory.mktemp("zenml-sc")
    env = clean_env(ZENML_CONFIG_PATH=str(home / "zenml-config"), ZENML_ANALYTICS_OPT_IN="false",
                    ZENML_ENABLE_RICH_TRACEBACK="false", ZENML_LOGGING_VERBOSITY="DEBUG",
                    AWS_DEFAULT_REGION="us-east-1")
    for k in list(env):
        if k.startswith("AWS_") and k != "AWS_DEFAULT_REGION":
            env.pop(k)  # the keys boto3 uses come from credgate, not the environment
    z = Zen(zenml_python, home, env)
    try:
        yield z
    finally:
        z.close()


@pytest.fixture(scope="module")
def registered(zen: Zen, setup: Setup) -> dict[str, Any]:
    """The ``credgate`` type as ZenML sees it, and two connectors of it (client credentials)
    created through ZenML's Client, which verifies them (whoami with the client's token)."""
    types = zen("types")
    common = {"addr": setup.gateway.addr, **setup.client}
    made = {
        "aws": zen("create", name="cg-aws", connector_type="credgate", auth_method="client-credentials",
                   configuration={**common, "connector": "aws", "ttl_seconds": 900}, expiration_seconds=600),
        "pg": zen("create", name="cg-pg", connector_type="credgate", auth_method="client-credentials",
                  resource_type="postgres-database", resource_id=setup.db,
                  configuration={**common, "connector": "pg", "ttl_seconds": 300}),
    }
    return {"types": types, **made}


def test_zenml_loads_the_credgate_type_through_its_init_hooks_entry_point(registered: dict) -> None:
    assert registered["types"] == {"registered": True, "auth_methods": ["client-credentials", "run-token", "token"],
                                   "resource_types": ["aws-generic", "postgres-database", "s3-bucket"]}
    assert registered["aws"].get("auth_method") == "client-credentials", registered["aws"]
    assert registered["pg"].get("auth_method") == "client-credentials", registered["pg"]


def test_an_s3_client_through_zenml_carries_a_credential_with_a_live_lease_for_the_run(
        zen: Zen, setup: Setup, registered: dict) -> None:
    cc = zen("client", name="cg-aws", type="s3-bucket", id=f"s3://{setup.bucket}", **{"as": "s3"})
    assert cc.get("auth_method") == "run-token", cc
    assert cc["resource_id"] == f"s3://{setup.bucket}" and cc["run_id"].startswith("zenml-adhoc-")
    assert setup.leases("aws", cc["run_id"]) == []  # the run token alone issued nothing
    got = zen("s3", bucket=setup.bucket, **{"as": "s3"})
    assert got.get("keys") == ["features.csv"], got
    assert got["class"] == "botocore.client.S3" and got["region"] == "us-east-1"
    (lease,) = setup.leases("aws", cc["run_id"])
    assert lease["state"] == "active" and lease["resource"] == f"s3-bucket:{setup.bucket}"
    assert lease["principal"] == f"credgate/run:{cc['run_id']}", lease
    # aws-generic: a boto3 Session, its own lease, same run-token flow
    gen = zen("client", name="cg-aws", type="aws-generic", **{"as": "generic"})
    assert gen.get("auth_method") == "run-token" and gen["resource_id"] == "aws-generic", gen
    session = zen("session", endpoint=setup.moto_url, **{"as": "generic"})
    assert session.get("class") == "boto3.session.Session" and session.get("account"), session
    assert [x["state"] for x in setup.leases("aws", gen["run_id"])] == ["active"]
    # the `token` auth method (an admin key here) delegates the same way
    made = zen("create", name="cg-token", connector_type="credgate", auth_method="token", resource_type="aws-generic",
               configuration={"addr": setup.gateway.addr, "token": setup.gateway.token, "connector": "aws"})
    assert made.get("auth_method") == "token", made
    tok = zen("client", name="cg-token", type="aws-generic", **{"as": "token"})
    assert tok.get("auth_method") == "run-token" and setup.gateway.token not in tok["model"], tok
    assert zen("session", endpoint=setup.moto_url, **{"as": "token"}).get("account")
    assert [x["state"] for x in setup.leases("aws", tok["run_id"])] == ["active"]


def test_revoking_the_lease_in_credgate_is_visible_to_zenmls_next_request(
        zen: Zen, setup: Setup, registered: dict) -> None:
    """A postgres lease is revocable: revoking it drops the role and ends its sessions; ZenML's
    next connect() gets a new lease and a new role (the connector keeps no credential)."""
    cc = zen("client", name="cg-pg", type="postgres-database", id=setup.db, **{"as": "pg"})
    assert cc.get("auth_method") == "run-token", cc
    first = zen("pg", **{"as": "pg"})
    assert first.get("db") == setup.db and first["user"].startswith("cg_"), first
    assert first["class"] == "psycopg.Connection"
    (lease,) = setup.leases("pg", cc["run_id"])
    assert lease["state"] == "active"
    r = setup.admin("POST", f"/v1/leases/{lease['lease_id']}/revoke")
    assert r.status_code == 200, r.text
    assert zen("pg_old", **{"as": "pg"})["old"].startswith("psycopg.")  # its session was terminated
    second = zen("pg", **{"as": "pg"})
    assert second.get("db") == setup.db and second["user"].startswith("cg_") and second["user"] != first["user"]
    states = {x["lease_id"]: x["state"] for x in setup.leases("pg", cc["run_id"])}
    assert states.pop(lease["lease_id"]) == "revoked" and list(states.values()) == ["active"], states
    # SQLAlchemy on the same connector client: each pooled connection is a connect()
    via = zen("sqlalchemy", **{"as": "pg"})
    assert via.get("user", "").startswith("cg_") and via["user"] not in (first["user"], second["user"]), via


def test_revoking_the_run_stops_the_steps_access_and_revokes_its_leases(
        zen: Zen, setup: Setup, registered: dict) -> None:
    cc = zen("client", name="cg-pg", type="postgres-database", id=setup.db, **{"as": "run"})
    assert zen("pg", **{"as": "run"}).get("db") == setup.db
    assert [x["state"] for x in setup.leases("pg", cc["run_id"])] == ["active"]
    r = setup.admin("POST", f"/v1/runs/{cc['run_id']}/revoke")
    assert r.status_code == 200 and r.json()["leases_revoked"] == 1, r.text
    assert [x["state"] for x in setup.leases("pg", cc["run_id"])] == ["revoked"]
    after = zen("connect", **{"as": "run"})
    assert after.get("error", "").startswith("AuthorizationException") and "run_revoked" in after["error"], after
    assert [x["state"] for x in setup.leases("pg", cc["run_id"])] == ["revoked"]  # nothing new was issued
    # the server side still hands out new runs: the client identity was not revoked
    again = zen("client", name="cg-pg", type="postgres-database", id=setup.db, **{"as": "next"})
    assert again.get("auth_method") == "run-token" and again["run_id"] != cc["run_id"], again


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "zenml_pipeline.py"


def test_the_example_pipeline_reads_the_bucket_with_a_lease_on_its_zenml_run(zen: Zen, setup: Setup) -> None:
    """examples/zenml_pipeline.py as docs/zenml.md runs it (local orchestrator): --setup creates
    the ZenML connector from CREDGATE_* variables; the run's step gets a run token for run
    ``zenml-<ZenML run id>`` (the step's context) and lists the bucket with its lease."""
    def example(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([str(zen.python), str(EXAMPLE), *args], capture_output=True, text=True, timeout=120,
                             cwd=zen.home, env={**zen.env, **env})
        assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
        return res

    made = example("--setup", "--connector", "ex-aws", CREDGATE_ADDR=setup.gateway.addr,
                   CREDGATE_CLIENT_ID=setup.client["client_id"], CREDGATE_CLIENT_SECRET=setup.client["client_secret"])
    assert "ZenML connector 'ex-aws'" in made.stdout
    res = example("--bucket", setup.bucket, "--connector", "ex-aws")
    output = res.stdout + res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("ZenML run ")]
    run_id = line.split()[2].rstrip(":")
    assert "completed" in line and line.endswith("1 object(s)"), line
    assert "features.csv" in output and f"credgate run zenml-{run_id}" in output, output[-3000:]
    (lease,) = setup.leases("aws", f"zenml-{run_id}")
    assert lease["state"] == "active" and lease["resource"] == f"s3-bucket:{setup.bucket}"
    assert setup.client["client_secret"] not in output


ZEN_PASSWORD = "zen-" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def zenml_server(zen: Zen, setup: Setup) -> Iterator[tuple[str, Path]]:
    """A real ZenML server (FastAPI under uvicorn, SQLite, its default OAuth2 password login)
    with the ``credgate`` type (the same entry point) and credgate as its secrets store (so
    the connector's client secret is kept in credgate, not in ZenML's database)."""
    home = zen.home / "server"
    home.mkdir()
    env = {**zen.env, "ZENML_CONFIG_PATH": str(home / "config"), "ZENML_STORE_URL": f"sqlite:///{home / 'zenml.db'}",
           "ZENML_SERVER_AUTO_ACTIVATE": "1", "ZENML_DEFAULT_USER_PASSWORD": ZEN_PASSWORD,
           "ZENML_SECRETS_STORE_TYPE": "custom",
           "ZENML_SECRETS_STORE_CLASS_PATH": "credgate_zenml.secrets_store.CredgateSecretsStore",
           "ZENML_SECRETS_STORE_ADDR": setup.gateway.addr, "ZENML_SECRETS_STORE_TOKEN": setup.gateway.token}
    with zenml_server_process(zen.python, home, env) as (addr, _log):
        yield addr, home


def drive(zen: Zen, env: dict[str, str], *commands: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """One ZenML process running ``commands``: their results and everything it printed."""
    res = subprocess.run([str(zen.python), str(zen.driver)], input="".join(json.dumps(c) + "\n" for c in commands),
                         capture_output=True, text=True, timeout=120, cwd=zen.home, env=env)
    results = [json.loads(ln[len("RESULT "):]) for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and len(results) == len(commands), (res.stdout[-3000:], res.stderr[-3000:])
    return results, res.stdout + res.stderr


def test_a_zenml_server_mints_the_run_token_for_the_pipeline_run_whose_api_token_asks(
        zen: Zen, setup: Setup, zenml_server: tuple[str, Path]) -> None:
    """Over HTTP: a user creates the connector (client credentials) on the server, which
    verifies it and keeps the client secret in its secrets store (credgate). The server's
    /client endpoint answers with a run-token connector: for the user's own login, an ad-hoc
    credgate run; for a workload API token scoped to a pipeline run (what ZenML's orchestrators
    give steps), credgate run ``zenml-<that run's id>``. The client's connect() issues the
    credential itself, with a lease on that run."""
    url, home = zenml_server
    secret = setup.client["client_secret"]
    rest = {**zen.env, "ZENML_STORE_URL": url, "ZENML_STORE_TYPE": "rest"}
    user = {**rest, "ZENML_CONFIG_PATH": str(zen.home / "rest-user"), "ZENML_STORE_USERNAME": "default",
            "ZENML_STORE_PASSWORD": ZEN_PASSWORD}
    (made, cc, got, run), printed = _user_session(zen, user, setup)
    assert made.get("auth_method") == "client-credentials", made
    assert cc.get("auth_method") == "run-token" and cc["run_id"].startswith("zenml-adhoc-"), cc
    assert got.get("keys") == ["features.csv"], got
    config = json.loads(cc["model"])["metadata"]["configuration"]
    assert "client_secret" not in config and config["run_id"] == cc["run_id"]
    (lease,) = setup.leases("aws", cc["run_id"])
    assert lease["state"] == "active" and lease["principal"] == f"credgate/run:{cc['run_id']}"
    # a step's workload token, scoped to pipeline run RUN: the server mints for zenml-RUN
    assert run.get("run_id") and run.get("token"), run
    step_env = {**rest, "ZENML_CONFIG_PATH": str(zen.home / "rest-step"), "ZENML_STORE_API_TOKEN": run["token"]}
    (scc, sgot), step_printed = drive(
        zen, step_env,
        {"op": "client", "name": "srv-aws", "type": "s3-bucket", "id": setup.bucket, "as": "s3"},
        {"op": "s3", "bucket": setup.bucket, "as": "s3"},
    )
    assert scc.get("run_id") == f"zenml-{run['run_id']}" and scc["auth_method"] == "run-token", scc
    assert sgot.get("keys") == ["features.csv"], sgot
    assert [x["state"] for x in setup.leases("aws", f"zenml-{run['run_id']}")] == ["active"]
    # the client secret: in credgate (the server's secrets store), not in ZenML's database
    # nor its log, nor anything the clients printed
    with sqlite3.connect(home / "zenml.db") as conn:
        (secret_id,) = conn.execute("SELECT id FROM secret").fetchone()
    stored = setup.admin("GET", f"/v1/secrets/local/zenml/{uuid.UUID(secret_id)}", params={"reveal": "true"})
    assert stored.status_code == 200 and secret in stored.json()["data"].values(), stored.text
    for f in home.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in printed + step_printed


def _user_session(zen: Zen, env: dict[str, str], setup: Setup) -> tuple[list[dict[str, Any]], str]:
    """The user's process: create the connector, get a client and list the bucket, and run a
    pipeline whose step gets the API token ZenML's orchestrators give a step of that run."""
    proc = Zen(zen.python, zen.home, env, name="rest-user")
    try:
        results = [
            proc("create", name="srv-aws", connector_type="credgate", auth_method="client-credentials",
                 resource_type="s3-bucket",
                 configuration={"addr": setup.gateway.addr, **setup.client, "connector": "aws"}),
            proc("client", name="srv-aws", type="s3-bucket", id=setup.bucket, **{"as": "s3"}),
            proc("s3", bucket=setup.bucket, **{"as": "s3"}),
            proc("pipeline"),
        ]
    finally:
        printed = proc.close()
    return results, printed


def test_the_client_secret_never_reaches_the_client_side_connector_logs_or_errors(
        zen: Zen, setup: Setup, registered: dict) -> None:
    secret = setup.client["client_secret"]
    cc = zen("client", name="cg-aws", type="s3-bucket", id=setup.bucket, **{"as": "canary"})
    model = json.loads(cc["model"])
    assert model["body"]["auth_method"] == "run-token", model["body"]
    config = model["metadata"]["configuration"]
    assert set(config) >= {"addr", "connector", "resource", "run_id", "run_token"}, config
    assert "client_secret" not in config and "client_id" not in config
    assert config["resource"] == f"s3-bucket:{setup.bucket}" and cc["resource_id"] == f"s3://{setup.bucket}"
    assert secret not in cc["model"] and secret not in cc["repr"]
    assert config["run_token"] not in cc["repr"]
    # an error from credgate (a bucket the client may not delegate) names credgate's refusal only
    refused = zen("client", name="cg-aws", type="s3-bucket", id="not-allowed-bucket", **{"as": "refused"})
    assert "error" in refused and "delegation_exceeds_caller" in refused["error"], refused
    assert secret not in refused["error"]
    everything = zen.close()  # stdout, stderr (DEBUG logging), every result line
    assert "credgate: run token for run" in everything  # (the debug log was captured)
    assert "delegation_exceeds_caller" in everything and secret not in everything


def test_the_connector_module_imports_zenml_and_the_light_client_only() -> None:
    import grimp

    graph = grimp.build_graph("credgate_zenml", "gateway", include_external_packages=True, cache_dir=None)
    imported = graph.find_modules_directly_imported_by("credgate_zenml.service_connector")
    assert any(m.startswith("zenml") for m in imported) and "gateway.client.sdk" in imported, imported
    assert not {m for m in imported for p in SERVER_SIDE if m == p or m.startswith(p + ".")}, imported
    assert not {m for m in imported if m.startswith("gateway.") and not m.startswith("gateway.client")}, imported
