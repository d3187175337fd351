"""What a metadata server and a pipeline do with credgate, in one runnable script.

    export CREDGATE_ADDR=http://127.0.0.1:8765 CREDGATE_TOKEN=<the admin token `credgate serve --dev` printed>
    python examples/pipeline.py setup --postgres-dsn postgresql://postgres@127.0.0.1:5432/postgres
    python examples/pipeline.py run --ttl 20 --duration 90

``setup`` (a security admin, once): stores the database's admin DSN in credgate and adds a
``warehouse`` connector (type postgres) that makes a login role per lease, at most
``--max-ttl`` seconds long. Without ``--postgres-dsn`` it adds a ``demo`` static connector
instead (works with nothing but the gateway).

``run``:
1. **The metadata server** (holding an admin key or a client with ``runs:delegate``) mints a
   run token for one pipeline run, scoped to the connector and resource the run needs
   (``POST /v1/runs/{run_id}/token``). It hands the pipeline only that token.
2. **The pipeline** (``Client(run_token=...)``) asks for its credential in a loop for
   ``--duration`` seconds and uses it each time (for postgres: connects as the issued role
   and runs ``SELECT current_user``). The client keeps the credential fresh in the
   background: it renews the lease at about two thirds of its lifetime and issues a new one
   when the lease reaches its cap; a credential within ``margin`` of expiry is never handed
   out; if the gateway is unreachable for a moment (a restart), the cached credential keeps
   being served while it is valid.
3. **The pipeline ends**: closing the client revokes its leases; then the metadata server
   ends the run (``POST /v1/runs/{run_id}/revoke``) and the run token stops working.

It prints a line per new lease and a summary, and exits 1 if any use failed or a credential
was expired when handed out. ``--json`` prints the summary as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import uuid
from typing import Any

from gateway.client import Client, CredgateError


def setup(args: argparse.Namespace) -> int:
    with Client() as admin:
        if args.postgres_dsn:
            admin.request("PUT", "/v1/secrets/local/examples/warehouse", json={"data": {"dsn": args.postgres_dsn}})
            admin.request("PUT", "/v1/connectors/warehouse", json={
                "type": "postgres", "auth_method": "password", "secret": "local/examples/warehouse",
                "resources": [args.database], "max_ttl_seconds": args.max_ttl,
            })
            print(f"connector warehouse: postgres, database {args.database}, leases of at most {args.max_ttl} s")
        else:
            admin.request("PUT", "/v1/secrets/local/examples/demo",
                          json={"data": {"api_key": "demo-" + secrets.token_hex(8)}})
            admin.request("PUT", "/v1/connectors/demo", json={
                "type": "static", "auth_method": "static", "secret": "local/examples/demo",
                "resources": ["default"], "max_ttl_seconds": args.max_ttl,
            })
            print("connector demo: static, resource default")
    return 0


def use(cred: Any) -> str:
    """What a step does with the credential; returns who it acted as."""
    if cred.type == "postgres":
        import psycopg

        with psycopg.connect(cred.dsn, connect_timeout=5) as conn:
            return conn.execute("SELECT current_user").fetchone()[0]
    return f"{cred.type} lease {cred.lease_id}"


def run(args: argparse.Namespace) -> int:
    connector, resource = args.connector, args.resource
    run_id = args.run_id or f"run-{uuid.uuid4().hex[:12]}"
    margin = max(1.0, args.ttl / 4)

    # 1. The metadata server mints the run's token (it never hands out its own credential).
    with Client() as server:
        minted = server.run_token(run_id, [connector], [resource], ttl=max(60, int(args.duration * 2)))
    run_token = minted.token
    print(f"metadata server: run {run_id} token minted for {connector}/{resource}, valid {minted.expires_in} s")

    # 2. The pipeline: credentials with the run token only, used in a loop.
    summary: dict[str, Any] = {"run_id": run_id, "uses": 0, "errors": [], "expired_when_handed_out": 0, "leases": [],
                               "acted_as": []}
    started = time.monotonic()
    pipeline = Client(run_token=run_token, ttl=args.ttl, margin=margin)
    try:
        while time.monotonic() - started < args.duration:
            try:
                cred = pipeline.credentials(connector, resource)
                if cred.remaining() <= 0:
                    summary["expired_when_handed_out"] += 1
                who = use(cred)
                summary["uses"] += 1
                if cred.lease_id not in summary["leases"]:
                    summary["leases"].append(cred.lease_id)
                    summary["acted_as"].append(who)
                    print(f"pipeline t={time.monotonic() - started:5.1f}s: lease {cred.lease_id} as {who}, "
                          f"expires in {cred.remaining():.0f} s")
            except Exception as exc:  # noqa: BLE001 - a step reports and carries on
                code = getattr(exc, "code", type(exc).__name__)
                summary["errors"].append(code)
                print(f"pipeline t={time.monotonic() - started:5.1f}s: use failed: {code}", file=sys.stderr)
            time.sleep(args.every)
        summary["renewals"], summary["reissues"] = pipeline.stats["renewals"], pipeline.stats["reissues"]
    finally:
        pipeline.close()  # revokes the leases it issued

    # 3. The run ends: the metadata server revokes it; its token is refused from now on.
    with Client() as server:
        ended = server.end_run(run_id)
    with Client(run_token=run_token, retries=0) as late:
        try:
            late.credentials(connector, resource)
            summary["after_end"] = "still issued"
        except CredgateError as exc:
            summary["after_end"] = exc.code
    print(f"metadata server: run {run_id} ended ({ended['leases_revoked']} leases revoked at the end); "
          f"its token now gets {summary['after_end']}")
    ok = not summary["errors"] and not summary["expired_when_handed_out"] and summary["after_end"] != "still issued"
    print(f"{summary['uses']} uses over {len(summary['leases'])} leases ({summary['renewals']} renewals, "
          f"{summary['reissues']} re-issues), {len(summary['errors'])} errors, "
          f"{summary['expired_when_handed_out']} expired credentials: {'OK' if ok else 'FAILED'}")
    if args.json:
        print(json.dumps(summary))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="add the example's connector (as an admin)")
    s.add_argument("--postgres-dsn", help="an admin DSN of a PostgreSQL server (else a static connector)")
    s.add_argument("--database", default="postgres", help="the database the connector serves")
    s.add_argument("--max-ttl", type=int, default=60, help="the longest a lease may live, renewals included")
    r = sub.add_parser("run", help="a metadata server and a pipeline run")
    r.add_argument("--connector", default=None, help="default: warehouse if it exists, else demo")
    r.add_argument("--resource", default=None, help="default: postgres for warehouse, default for demo")
    r.add_argument("--run-id", default=None)
    r.add_argument("--ttl", type=int, default=20, help="the credential lifetime asked for, in seconds")
    r.add_argument("--duration", type=float, default=90, help="how long the pipeline runs, in seconds")
    r.add_argument("--every", type=float, default=1.0, help="seconds between two uses")
    r.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            return setup(args)
        if args.connector is None:
            with Client() as admin:
                names = {c["name"] for c in admin.request("GET", "/v1/connectors")["items"]}
            args.connector = "warehouse" if "warehouse" in names else "demo"
        if args.resource is None:
            args.resource = "postgres" if args.connector == "warehouse" else "default"
        return run(args)
    except CredgateError as exc:
        print(f"credgate: {exc.code}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
