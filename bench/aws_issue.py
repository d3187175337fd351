"""AWS STS issuance against moto: the aws connector vs. a plain boto3 ``assume_role`` loop.

::

    .venv/bin/python bench/aws_issue.py --duration 10 --concurrency 8 [--gateway]

Starts its own moto server (tests/services/motoserver.py), creates an IAM user, its
access key and a role, then runs, for ``--duration`` seconds each, at ``--concurrency``:

- ``plain``: one boto3 STS client shared by N threads, each calling ``assume_role`` in a loop
  (the reference of issue 15);
- ``connector``: one ``AWSConnector`` instance, N asyncio tasks calling ``issue`` (what a
  live gateway instance does per credential, without the HTTP, store and audit work);
- ``compared`` (with ``--compare FILE``): ``connector`` with the AWSConnector of another version
  of connectors/aws.py (e.g. ``git show main:connectors/aws.py > /tmp/aws_main.py``);
- ``fresh client`` (with ``--fresh``): a new instance, so a new boto3 session and client, per
  issuance: the cost the connector avoids by keeping its clients;
- ``gateway`` (with ``--gateway``): ``credgate serve`` on SQLite with an ``aws`` connector,
  N concurrent ``POST /v1/credentials`` over httpx.

For each: issues per second, and CPU milliseconds per issue of the process doing the work
(this one for plain/connector, the gateway's for gateway; from /proc) and of moto. Rounds
are interleaved (``--rounds``); the median round is printed. No assertions: figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.services.motoserver import MotoServer  # noqa: E402
from tests.services.waiting import clean_env, free_port, wait_until_serving  # noqa: E402

TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {
    "AWS": "arn:aws:iam::123456789012:root"}, "Action": "sts:AssumeRole"}]}
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def plain(moto: MotoServer, key: tuple[str, str], role: str, n: int, duration: float) -> int:
    sts = moto.boto3_client("sts", aws_access_key_id=key[0], aws_secret_access_key=key[1])
    sts.assume_role(RoleArn=role, RoleSessionName="warm")
    done = [0] * n
    stop = time.monotonic() + duration

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            sts.assume_role(RoleArn=role, RoleSessionName=f"plain-{i}", DurationSeconds=3600)
            done[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


async def connector(moto: MotoServer, key: tuple[str, str], role: str, n: int, duration: float,
                    fresh: bool = False, module: str = "connectors.aws") -> int:
    import importlib

    from connectors.base import IssueRequest

    aws = importlib.import_module(module)
    AWSConfig, AWSConnector, AWSKeysMaterial = aws.AWSConfig, aws.AWSConnector, aws.AWSKeysMaterial

    def build() -> AWSConnector:
        return AWSConnector(
            AWSConfig(endpoint_url=moto.endpoint_url, role_arn=role), "iam-role",
            AWSKeysMaterial(aws_access_key_id=key[0], aws_secret_access_key=key[1]), name="bench")

    conn = build()

    def request() -> IssueRequest:
        lease_id = "lease_" + secrets.token_hex(12)
        return IssueRequest(lease_id=lease_id, resource="aws-generic", ttl=timedelta(hours=1),
                            expires_at=datetime.now(UTC) + timedelta(hours=1),
                            revoke_state=conn.plan(lease_id, "aws-generic"), timeout_seconds=30)

    await conn.issue(request())
    stop = time.monotonic() + duration
    count = 0

    async def loop() -> None:
        nonlocal count
        while time.monotonic() < stop:
            if fresh:  # what a client built per issuance costs: a new instance each time
                one = build()
                await one.issue(request())
                await one.aclose()
            else:
                await conn.issue(request())
            count += 1

    await asyncio.gather(*(loop() for _ in range(n)))
    await conn.aclose()
    return count


class Gateway:
    def __init__(self, work: Path, moto: MotoServer, key: tuple[str, str], role: str, extra: dict[str, str]) -> None:
        py = sys.executable
        credgate = str(Path(py).parent / "credgate")
        kek = work / "kek"
        subprocess.run([credgate, "keys", "generate", "--out", str(kek)], check=True, capture_output=True, env=clean_env())
        self.token = "cgt_bench_" + secrets.token_urlsafe(32)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        (work / "data").mkdir(mode=0o700)
        env = clean_env(CREDGATE_DATA_DIR=str(work / "data"), CREDGATE_KEK_FILE=str(kek),
                        CREDGATE_BOOTSTRAP_TOKEN=self.token, CREDGATE_PORT=str(port),
                        CREDGATE_RATE_PER_ADDRESS="0", CREDGATE_RATE_PER_PRINCIPAL="0", CREDGATE_LOG_LEVEL="warning", **extra)
        self.out = work / "serve.out"
        self.proc = subprocess.Popen([credgate, "serve"], stdout=self.out.open("w"), stderr=subprocess.STDOUT, env=env)
        wait_until_serving(f"{self.url}/readyz", self.proc, 120, log=self.out, name="credgate serve", interval=0.05)
        admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)
        for method, path, body in [
            ("PUT", "/v1/secrets/local/aws/admin", {"data": {"aws_access_key_id": key[0], "aws_secret_access_key": key[1]}}),
            ("PUT", "/v1/connectors/awsbench", {
                "type": "aws", "auth_method": "iam-role", "secret": "local/aws/admin", "resources": ["aws-generic"],
                "config": {"endpoint_url": moto.endpoint_url, "role_arn": role}}),
            ("PUT", "/v1/policies/awsbench", {"rules": [{
                "principals": {"issuer": "credgate", "subject": "client:awsbench"},
                "actions": ["credentials:issue"], "connectors": ["awsbench"], "resources": ["*"],
                "max_ttl_seconds": 3600}]}),
        ]:
            r = admin.request(method, path, json=body)
            assert r.status_code in (200, 201), (path, r.status_code, r.text[:300])
        secret = admin.post("/v1/clients", json={"client_id": "awsbench", "token_ttl_seconds": 7200}).json()["client_secret"]
        r = httpx.post(f"{self.url}/v1/auth/token", data={"grant_type": "client_credentials", "client_id": "awsbench",
                                                          "client_secret": secret}, timeout=30)
        r.raise_for_status()
        self.jwt = r.json()["access_token"]

    async def run(self, n: int, duration: float) -> int:
        body = {"connector": "awsbench", "resource": "aws-generic", "ttl_seconds": 900}
        headers = {"Authorization": f"Bearer {self.jwt}"}
        count, errors = 0, 0
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60,
                                     limits=httpx.Limits(max_connections=n)) as client:
            r = await client.post("/v1/credentials", json=body)
            assert r.status_code in (200, 201), (r.status_code, r.text[:300])
            stop = time.monotonic() + duration

            async def loop() -> None:
                nonlocal count, errors
                while time.monotonic() < stop:
                    r = await client.post("/v1/credentials", json=body)
                    if r.status_code in (200, 201):
                        count += 1
                    else:
                        errors += 1

            await asyncio.gather(*(loop() for _ in range(n)))
        if errors:
            print(f"  gateway: {errors} non-2xx answers", flush=True)
        return count

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gateway", action="store_true", help="also measure through `credgate serve`")
    ap.add_argument("--fresh", action="store_true", help="also: a new connector instance (new client) per issuance")
    ap.add_argument("--compare", metavar="FILE", help="also: the connector from another version of connectors/aws.py")
    ap.add_argument("--env", action="append", default=[], metavar="CREDGATE_X=V", help="a setting for the gateway")
    ap.add_argument("--py-spy", metavar="FILE", help="profile the gateway's first round with py-spy (collapsed stacks)")
    args = ap.parse_args()
    moto = MotoServer().start()
    gw = None
    try:
        iam = moto.boto3_client("iam")
        iam.create_user(UserName="bench")
        k = iam.create_access_key(UserName="bench")["AccessKey"]
        key = (k["AccessKeyId"], k["SecretAccessKey"])
        role = iam.create_role(RoleName="bench", AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]["Arn"]
        assert moto._proc is not None
        moto_pid = moto._proc.pid
        scenarios: dict[str, tuple[int, callable]] = {
            "plain boto3": (os.getpid(), lambda: plain(moto, key, role, args.concurrency, args.duration)),
            "connector": (os.getpid(), lambda: asyncio.run(connector(moto, key, role, args.concurrency, args.duration))),
        }
        if args.compare:
            import importlib.util

            spec = importlib.util.spec_from_file_location("connectors.aws_compared", args.compare)
            assert spec is not None and spec.loader is not None
            sys.modules[spec.name] = mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            scenarios["compared"] = (os.getpid(), lambda: asyncio.run(
                connector(moto, key, role, args.concurrency, args.duration, module=spec.name)))
        if args.fresh:
            scenarios["fresh client"] = (os.getpid(), lambda: asyncio.run(
                connector(moto, key, role, args.concurrency, args.duration, fresh=True)))
        if args.gateway:
            gw = Gateway(Path(tempfile.mkdtemp(prefix="credgate-aws-bench-")), moto, key, role, dict(e.split("=", 1) for e in args.env))
            scenarios["gateway"] = (gw.proc.pid, lambda: asyncio.run(gw.run(args.concurrency, args.duration)))
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in scenarios}
        for rnd in range(args.rounds):
            for name, (pid, fn) in scenarios.items():
                spy = None
                if name == "gateway" and args.py_spy and rnd == 0:
                    spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid),
                                            "-d", str(int(args.duration)), "-r", "200", "--format", "raw",
                                            "-o", args.py_spy], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                c0, m0, t0 = cpu_seconds(pid), cpu_seconds(moto_pid), time.monotonic()
                count = fn()
                if spy is not None:
                    spy.wait(30)
                wall = time.monotonic() - t0
                c1, m1 = cpu_seconds(pid), cpu_seconds(moto_pid)
                rows[name].append((count / wall, 1000 * (c1 - c0) / max(count, 1), 1000 * (m1 - m0) / max(count, 1)))
                print(f"round {rnd + 1} {name:12s} {count / wall:8.1f}/s  {rows[name][-1][1]:7.2f} ms CPU/issue  "
                      f"moto {rows[name][-1][2]:6.2f} ms/issue", flush=True)
        print(f"\nmedian of {args.rounds} rounds, {args.duration:g} s each, {args.concurrency} concurrent; "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        base = statistics.median(r[0] for r in rows["plain boto3"])
        for name, rs in rows.items():
            rate = statistics.median(r[0] for r in rs)
            print(f"{name:12s} {rate:8.1f}/s  ({rate / base:4.2f}x plain)  "
                  f"{statistics.median(r[1] for r in rs):7.2f} ms CPU/issue (worker)  "
                  f"{statistics.median(r[2] for r in rs):6.2f} ms CPU/issue (moto)")
    finally:
        if gw is not None:
            gw.stop()
        moto.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
