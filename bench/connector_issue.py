"""Issuance per connector type through the gateway, beside a direct call of the same vendor API.

::

    .venv/bin/python bench/connector_issue.py [--issues 200] [--rounds 3] [--types aws,aws-web-identity,...]

For each connector type, against its local target (moto in server mode, a throwaway scram
PostgreSQL cluster, the stand-ins of tests/standins/ where no server can run here), one
``credgate serve`` (SQLite store, 1 worker) issues ``--issues`` credentials one after another
(``POST /v1/credentials``, as a pipeline would), and a plain client makes the vendor call that
issuance is made of, as many times, against the same target: ``assume_role`` with boto3,
``CREATE ROLE`` and its grants with psycopg, ``AssumeRoleWithWebIdentity`` with a token signed
by a key of the benchmark's own. Rounds are interleaved; medians are printed.

The figure of interest is the gateway's **overhead per issue**: its median latency minus the
direct call's, and its CPU per issue (from /proc: the policy decision, the lease's intent and
activation, the audit event, the delivery record; for web-identity also the signed token). No
assertions: figures only. Sequential on purpose: at one request at a time the latency
difference is the work the gateway adds, not queueing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.services.waiting import clean_env, free_port, wait_until_serving  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / TICK  # self + reaped children


@dataclass
class Case:
    """One connector type: how to register it, what to issue, and the direct call to compare with."""

    name: str
    type: str
    auth_method: str
    config: dict[str, Any]
    resource: str
    direct: Callable[[], None]
    material: dict[str, str] | None = None  # None: keyless
    cleanup: list[Callable[[], None]] = field(default_factory=list)


class Gateway:
    """``credgate serve`` on SQLite, one worker, its public URL its own address (an OIDC issuer)."""

    def __init__(self, work: Path) -> None:
        credgate = str(Path(sys.executable).parent / "credgate")
        kek = work / "kek"
        subprocess.run([credgate, "keys", "generate", "--out", str(kek)], check=True, capture_output=True, env=clean_env())
        self.token = "cgt_bench_" + secrets.token_urlsafe(32)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        (work / "data").mkdir(mode=0o700)
        env = clean_env(CREDGATE_DATA_DIR=str(work / "data"), CREDGATE_KEK_FILE=str(kek), CREDGATE_WORKERS="1",
                        CREDGATE_BOOTSTRAP_TOKEN=self.token, CREDGATE_PORT=str(port), CREDGATE_PUBLIC_URL=self.url,
                        CREDGATE_RATE_PER_ADDRESS="0", CREDGATE_RATE_PER_PRINCIPAL="0", CREDGATE_LOG_LEVEL="warning")
        self.out = work / "serve.out"
        self.proc = subprocess.Popen([credgate, "serve"], stdout=self.out.open("w"), stderr=subprocess.STDOUT, env=env)
        wait_until_serving(f"{self.url}/readyz", self.proc, 120, log=self.out, name="credgate serve", interval=0.05)
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def register(self, case: Case) -> None:
        body: dict[str, Any] = {"type": case.type, "auth_method": case.auth_method, "config": case.config,
                                "resources": [case.resource]}
        if case.material is not None:
            r = self.admin.put(f"/v1/secrets/local/bench/{case.name}", json={"data": case.material})
            assert r.status_code in (200, 201), r.text[:300]
            body["secret"] = f"local/bench/{case.name}"
        r = self.admin.put(f"/v1/connectors/{case.name}", json=body)
        assert r.status_code in (200, 201), (case.name, r.status_code, r.text[:300])

    def issue(self, case: Case) -> None:
        r = self.admin.post("/v1/credentials", json={"connector": case.name, "resource": case.resource})
        if r.status_code != 200:
            raise RuntimeError(f"{case.name}: {r.status_code} {r.text[:300]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def timed(fn: Callable[[], None], n: int, pid: int | None) -> tuple[float, float]:
    """(median latency ms, CPU ms per call): of process ``pid`` (the gateway), or, for a direct
    call (``pid`` None), of this thread alone (the stand-ins serve from other threads of this
    process; their work is the target's, as moto's and PostgreSQL's is)."""
    fn()  # warm
    lat: list[float] = []
    c0 = cpu_seconds(pid) if pid is not None else time.thread_time()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t0) * 1000)
    c1 = cpu_seconds(pid) if pid is not None else time.thread_time()
    return statistics.median(lat), 1000 * (c1 - c0) / n


# --- cases --------------------------------------------------------------------------------

def aws_cases(stack: list[Callable[[], None]], gw: Gateway) -> list[Case]:
    from tests.services.motoserver import MotoServer
    from tests.standins.sts_oidc import StsOidcStandIn

    moto = MotoServer().start()
    stack.append(moto.stop)
    iam = moto.boto3_client("iam")
    iam.create_user(UserName="bench")
    k = iam.create_access_key(UserName="bench")["AccessKey"]
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {
        "AWS": "arn:aws:iam::123456789012:root"}, "Action": "sts:AssumeRole"}]}
    role = iam.create_role(RoleName="bench", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    sts = moto.boto3_client("sts", aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"])

    def assume() -> None:
        sts.assume_role(RoleArn=role, RoleSessionName="direct", DurationSeconds=3600)

    # web-identity: STS's token checks (the stand-in) in front of moto, trusting the gateway and the
    # benchmark's own issuer (the direct call's tokens), both served over HTTP.
    standin = StsOidcStandIn(moto.endpoint_url).start()
    stack.append(standin.stop)
    standin.register_provider(gw.url, ["sts.amazonaws.com"])
    standin.trust(role, gw.url, ["credgate/*"])
    own = _OwnIssuer().start()
    stack.append(own.stop)
    standin.register_provider(own.url, ["sts.amazonaws.com"])
    own_role = iam.create_role(RoleName="bench-own", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    standin.trust(own_role, own.url, ["direct"])
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    unsigned = boto3.session.Session().client("sts", region_name="us-east-1", endpoint_url=standin.endpoint,
                                              config=Config(signature_version=UNSIGNED))

    def assume_web_identity() -> None:
        unsigned.assume_role_with_web_identity(RoleArn=own_role, RoleSessionName="direct",
                                               WebIdentityToken=own.token("direct", "sts.amazonaws.com"),
                                               DurationSeconds=3600)

    return [
        Case("aws", "aws", "iam-role", {"endpoint_url": moto.endpoint_url, "role_arn": role}, "aws-generic", assume,
             material={"aws_access_key_id": k["AccessKeyId"], "aws_secret_access_key": k["SecretAccessKey"]}),
        Case("aws-web-identity", "aws", "web-identity", {"endpoint_url": standin.endpoint, "role_arn": role},
             "aws-generic", assume_web_identity),
    ]


class _OwnIssuer:
    """The direct call's OIDC issuer: a key of the benchmark's own, its discovery and JWKS on 127.0.0.1."""

    def __init__(self) -> None:
        from joserfc.jwk import RSAKey

        self.key = RSAKey.generate_key(2048, parameters={"kid": "bench", "alg": "RS256", "use": "sig"})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def token(self, sub: str, aud: str) -> str:
        from joserfc import jwt

        now = int(time.time())
        return jwt.encode({"alg": "RS256", "kid": "bench", "typ": "JWT"},
                          {"iss": self.url, "sub": sub, "aud": aud, "iat": now, "nbf": now, "exp": now + 300,
                           "jti": secrets.token_urlsafe(8)}, self.key)

    def start(self) -> _OwnIssuer:
        import threading

        import uvicorn

        doc = json.dumps({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"}).encode()
        keys = json.dumps({"keys": [self.key.as_dict(private=False)]}).encode()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            body = doc if scope["path"].endswith("openid-configuration") else keys
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True


def postgres_cases(stack: list[Callable[[], None]], gw: Gateway) -> list[Case]:
    import psycopg
    from psycopg import sql

    from tests.services.pgcluster import PgCluster

    cluster = PgCluster().start()
    stack.append(cluster.stop)
    dsn = cluster.dsn("postgres")
    roles: list[str] = []

    def direct() -> None:  # what the connector does per credential, from a plain client
        role = "cgdirect_" + secrets.token_hex(6)
        with psycopg.connect(dsn, autocommit=True) as conn:
            (alg,) = conn.execute("SHOW password_encryption").fetchone()  # type: ignore[misc]
            verifier = conn.pgconn.encrypt_password(secrets.token_urlsafe(24).encode(), role.encode(), alg.encode())
            with conn.transaction():
                conn.execute(sql.SQL("; ").join([
                    sql.SQL("SELECT pg_advisory_xact_lock(hashtext('credgate:grant'))"),
                    sql.SQL("CREATE ROLE {} WITH LOGIN PASSWORD {} VALID UNTIL 'infinity'").format(
                        sql.Identifier(role), sql.Literal(verifier.decode())),
                    sql.SQL("GRANT CONNECT ON DATABASE postgres TO {}").format(sql.Identifier(role)),
                    sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)),
                    sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(role))]))
        roles.append(role)

    def drop() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for role in roles:
                conn.execute(sql.SQL("DROP OWNED BY {}; DROP ROLE IF EXISTS {}").format(
                    sql.Identifier(role), sql.Identifier(role)))
        roles.clear()

    return [Case("postgres", "postgres", "password", {}, "postgres", direct, material={"dsn": dsn}, cleanup=[drop])]


def gcp_cases(stack: list[Callable[[], None]], gw: Gateway) -> list[Case]:
    """The gcp connector against tests/standins/gcp_auth.py (a stand-in: no Google here): a
    service-account token (the JWT-bearer grant) beside google-auth's own refresh, and an
    impersonated token beside a direct ``generateAccessToken`` with the broker's token."""
    from google.auth.transport.requests import Request
    from google.oauth2 import service_account

    from tests.standins.gcp_auth import GCPAuthStandIn

    project, target = "credgate-bench", "pipelines@credgate-bench.iam.gserviceaccount.com"
    gcp = GCPAuthStandIn(project).start()
    stack.append(gcp.stop)
    key = gcp.add_service_account(f"broker@{project}.iam.gserviceaccount.com")
    gcp.add_service_account(target)
    gcp.grant_token_creator(target, f"serviceAccount:{key['client_email']}")
    gcp.add_bucket("bench-bucket", {"x": b"x"})
    endpoints = {"iam_endpoint": gcp.endpoint, "sts_endpoint": gcp.endpoint, "storage_endpoint": gcp.endpoint}
    scopes = ["https://www.googleapis.com/auth/cloud-platform"]
    session = httpx.Client(timeout=30)
    stack.append(session.close)

    parsed = service_account.Credentials.from_service_account_info(key)  # the key parsed once, as the connector does

    def refresh() -> service_account.Credentials:
        creds = parsed.with_scopes(scopes)
        creds.refresh(Request())
        return creds

    broker = refresh()

    def generate() -> None:
        r = session.post(f"{gcp.endpoint}/v1/projects/-/serviceAccounts/{target}:generateAccessToken",
                         headers={"Authorization": f"Bearer {broker.token}"},
                         json={"scope": scopes, "lifetime": "900s"})
        r.raise_for_status()

    return [
        Case("gcp-service-account", "gcp", "service-account", endpoints, f"gcp-project:{project}",
             lambda: None if refresh() else None, material=key),
        Case("gcp-impersonation", "gcp", "impersonation", endpoints | {"target_service_account": target},
             f"gcp-project:{project}", generate, material=key),
    ]


def kubernetes_cases(stack: list[Callable[[], None]], gw: Gateway) -> list[Case]:
    """The kubernetes connector against tests/standins/k8s_api.py (a stand-in API server): a
    per-lease Secret and a TokenRequest bound to it, beside the same two calls from httpx."""
    import ssl

    from tests.standins.k8s_api import KubernetesAPIStandin

    api = KubernetesAPIStandin({"team-a": ["pipeline"]}, admin_namespaces={"team-a"}).start()
    stack.append(api.stop)
    client = httpx.Client(base_url=api.url, verify=ssl.create_default_context(cadata=api.ca_pem.decode()),
                          headers={"Authorization": f"Bearer {api.admin_token}"}, timeout=30)
    stack.append(client.close)
    made: list[str] = []

    def direct() -> None:
        name = "direct-" + secrets.token_hex(6)
        secret = client.post("/api/v1/namespaces/team-a/secrets", json={
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque"}).raise_for_status().json()
        client.post("/api/v1/namespaces/team-a/serviceaccounts/pipeline/token", json={
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600, "boundObjectRef": {
                "kind": "Secret", "apiVersion": "v1", "name": name, "uid": secret["metadata"]["uid"]}}}).raise_for_status()
        made.append(name)

    def clean() -> None:
        for name in made:
            client.delete(f"/api/v1/namespaces/team-a/secrets/{name}")
        made.clear()

    return [Case("kubernetes", "kubernetes", "token",
                 {"server": api.url, "certificate_authority": api.ca_pem.decode(), "service_account": "pipeline"},
                 "kubernetes-namespace:team-a", direct, material={"token": api.admin_token}, cleanup=[clean])]


def registry_cases(stack: list[Callable[[], None]], gw: Gateway) -> list[Case]:
    """The registry connector's Docker Registry v2 tokens against tests/standins/registry_v2.py
    (a stand-in registry that verifies every token): the connector signs a token and presents it
    once to ``GET /v2/``; the direct side signs the same claims with the same key (joserfc, the
    chain in ``x5c``) and makes the same check."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from joserfc import jwt
    from joserfc.jwk import ECKey

    from tests.standins.registry_v2 import RegistryV2StandIn, make_chain

    ca, key_pem, chain_pem = make_chain("ec")
    server = RegistryV2StandIn(root_bundle_pem=ca, issuer="bench-issuer", service="registry.bench").start()
    stack.append(server.stop)
    server.put_manifest("team/app", "v1", b"{}")
    key = ECKey.import_key(key_pem)
    x5c = [base64.b64encode(c.public_bytes(Encoding.DER)).decode()
           for c in x509.load_pem_x509_certificates(chain_pem.encode())]
    http = httpx.Client(base_url=server.url, timeout=30)
    stack.append(http.close)

    def direct() -> None:
        now = int(time.time())
        token = jwt.encode({"alg": "ES256", "x5c": x5c, "typ": "JWT"}, {
            "iss": "bench-issuer", "sub": "bench", "aud": "registry.bench", "iat": now, "nbf": now,
            "exp": now + 900, "jti": secrets.token_hex(8),
            "access": [{"type": "repository", "name": "team/app", "actions": ["pull"]}]}, key)
        http.get("/v2/", headers={"Authorization": f"Bearer {token}"}).raise_for_status()

    return [Case("registry-token", "registry", "token",
                 {"registry_url": server.url, "service": "registry.bench", "issuer": "bench-issuer"},
                 "repository:team/app:pull", direct, material={"private_key": key_pem, "certificate_chain": chain_pem})]


def azure_cases(stack: list[Callable[[], None]], gw: Gateway) -> list[Case]:
    """The azure connector's container SAS against tests/standins/entra_storage.py (a stand-in
    for Entra and Azure Storage): the connector's token, user delegation key and SAS, beside
    azure-storage-blob's ``get_user_delegation_key`` and ``generate_container_sas`` on one
    azure-identity credential (which caches its token, as the connector's does)."""
    from datetime import UTC, datetime, timedelta

    from azure.identity import ClientSecretCredential
    from azure.storage.blob import BlobServiceClient, generate_container_sas

    from tests.standins.entra_storage import EntraStorageStandIn

    s = EntraStorageStandIn().start()
    stack.append(s.stop)
    client_id, secret = s.add_secret_app()
    s.grant(client_id, "benchstore", "r")
    s.seed("benchstore", "models", {"x": b"x"})
    credential = ClientSecretCredential(s.tenant_id, client_id, secret, authority=s.authority,
                                        disable_instance_discovery=True, connection_verify=s.ca_file)
    service = BlobServiceClient(s.blob_endpoint().format(account="benchstore"), credential=credential,
                                connection_verify=s.ca_file)

    def direct() -> None:
        now = datetime.now(UTC)
        key = service.get_user_delegation_key(now - timedelta(minutes=5), now + timedelta(hours=1))
        generate_container_sas("benchstore", "models", user_delegation_key=key, permission="r",
                               expiry=now + timedelta(hours=1))

    config = {"tenant_id": s.tenant_id, "client_id": client_id, "authority": s.authority, "ca_bundle": s.ca_file,
              "blob_endpoint": s.blob_endpoint(), "arm_endpoint": s.arm_endpoint}
    return [Case("azure-blob-sas", "azure", "service-principal", config, "blob-container:benchstore/models", direct,
                 material={"client_secret": secret})]


def vault_cases(stack: list[Callable[[], None]], gw: Gateway) -> list[Case]:
    """The vault connector against a real OpenBao whose database engine manages logins on a
    throwaway scram PostgreSQL cluster (tests/connectors/test_vault.py's set-up): a
    ``database/creds/ROLE`` read through the gateway, beside the same read with httpx (what hvac
    sends). The direct side's leases are revoked after each round, unmeasured."""
    from tests.connectors.test_vault import ROLE, vault_stack

    ctx = vault_stack()
    target = ctx.__enter__()
    stack.append(lambda: ctx.__exit__(None, None, None))
    http = httpx.Client(base_url=target.bao.url, headers={"X-Vault-Token": target.token}, timeout=30)
    stack.append(http.close)
    leases: list[str] = []

    def direct() -> None:
        leases.append(http.get(f"/v1/database/creds/{ROLE}").raise_for_status().json()["lease_id"])

    def revoke() -> None:
        for lease in leases:
            http.put("/v1/sys/leases/revoke", json={"lease_id": lease})
        leases.clear()

    return [Case("vault-database", "vault", "token", target.config(), f"vault-role:{ROLE}", direct,
                 material={"token": target.token}, cleanup=[revoke])]


CASES: dict[str, Callable[[list[Callable[[], None]], Gateway], list[Case]]] = {
    "aws": aws_cases,
    "postgres": postgres_cases,
    "gcp": gcp_cases,
    "kubernetes": kubernetes_cases,
    "registry": registry_cases,
    "azure": azure_cases,
    "vault": vault_cases,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--issues", type=int, default=200, help="issues per side per round (default 200)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--types", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    args = ap.parse_args()
    stack: list[Callable[[], None]] = []
    gw = Gateway(Path(tempfile.mkdtemp(prefix="credgate-connector-bench-")))
    stack.append(gw.stop)
    try:
        cases = [c for t in args.types.split(",") for c in CASES[t](stack, gw)]
        for case in cases:
            gw.register(case)
        results: dict[str, list[tuple[float, float, float, float]]] = {c.name: [] for c in cases}
        for rnd in range(args.rounds):
            for case in cases:
                g_lat, g_cpu = timed(lambda: gw.issue(case), args.issues, gw.proc.pid)
                d_lat, d_cpu = timed(case.direct, args.issues, None)
                for clean in case.cleanup:
                    clean()
                results[case.name].append((g_lat, g_cpu, d_lat, d_cpu))
                print(f"round {rnd + 1} {case.name:18s} gateway {g_lat:7.2f} ms ({g_cpu:6.2f} ms CPU)  "
                      f"direct {d_lat:7.2f} ms ({d_cpu:6.2f} ms CPU)", flush=True)
            for case in cases:  # the round's leases go (the postgres roles with them), unmeasured
                gw.admin.post("/v1/leases/revoke", json={"connector": case.name})
        print(f"\nmedians of {args.rounds} rounds of {args.issues} sequential issues; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print("| type | gateway ms/issue | direct ms/call | overhead ms | gateway CPU ms/issue | direct CPU ms/call |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, rows in results.items():
            g, gc, d, dc = (statistics.median(r[i] for r in rows) for i in range(4))
            print(f"| {name} | {g:.2f} | {d:.2f} | {g - d:+.2f} | {gc:.2f} | {dc:.2f} |")
    finally:
        for stop in reversed(stack):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001
                print(f"stopping: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
