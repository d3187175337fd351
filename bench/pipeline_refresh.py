"""A pipeline-shaped load: many clients, each holding a short-lived credential and refreshing it.

    .venv/bin/python bench/pipeline_refresh.py [--clients 200] [--ttl 9] [--duration 45] [--write-results]

Starts ``credgate serve`` (not dev mode, SQLite store, rate limits off; bench.run.Gateway) with a
``static`` connector and a service client, then runs ``--clients`` pipeline clients
(:class:`gateway.client.AsyncClient`, each its own instance with its own cache and background
refresher, all in this process) that each ask for a credential with ``--ttl`` every 200 ms for
``--duration`` seconds, as a step that uses its credential continuously would. Reported:

- **issues per second at the gateway**, from the issue times of the leases it recorded
  (``GET /v1/leases``): the steady rate should be clients / (7/12 x TTL) (refresh at 2/3 of
  the lifetime less 0-25 % jitter), proportional to clients/TTL, and its spread per
  second shows whether refreshes bunch up (a thundering herd) or are spread by the jitter;
- **expired credentials handed to a caller**: a credential whose ``expires_at`` is already
  past when ``credentials()`` returns it (the client's safety margin is TTL/6 here); the
  target is zero;
- the latency of ``credentials()`` calls (mostly cache hits) and the client-side counters.

The first TTL is the ramp (every client issues at once: that herd is the start, not a refresh);
the steady state is measured after it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import Gateway  # noqa: E402
from gateway.client import AsyncClient  # noqa: E402


def leases_issued_at(gw: Gateway) -> list[float]:
    out: list[float] = []
    params: dict = {"connector": "vendor", "limit": 1000}
    while True:
        body = gw.call("GET", "/v1/leases", params=params).json()
        out += [datetime.fromisoformat(item["issued_at"].replace("Z", "+00:00")).timestamp() for item in body["items"]]
        token = body.get("next_page_token")
        if not token:
            return out
        params["page_token"] = token


async def pipelines(url: str, jwt: str, clients: int, ttl: int, duration: float) -> dict:
    stop_at = time.monotonic() + duration
    bad: list[float] = []
    latencies: list[float] = []
    stats = Counter()

    async def one(i: int) -> None:
        await asyncio.sleep(i * 0.005)  # the pipelines start over a second, not in one instant
        async with AsyncClient(url, token=jwt, margin=ttl / 6) as client:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                cred = await client.credentials("vendor", "default", ttl=ttl)
                latencies.append((time.perf_counter() - t0) * 1000)
                left = cred.remaining()
                if left <= 0:
                    bad.append(left)
                await asyncio.sleep(0.2)
            stats.update(client.stats)

    await asyncio.gather(*(one(i) for i in range(clients)))
    return {"bad": bad, "latencies": latencies, "stats": dict(stats)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--ttl", type=int, default=9)
    parser.add_argument("--duration", type=float, default=45)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="credgate-bench-pipelines-") as tmp:
        gw = Gateway(Path(tmp), "pipelines")
        gw.start()
        try:
            gw.setup(postgres_target=False)
            gw.call("PUT", "/v1/policies/bench-pipelines", json={"rules": [{
                "description": "pipelines end (revoke) and renew their own leases",
                "principals": {"issuer": "credgate", "subject": "client:bench"},
                "actions": ["leases:revoke"], "connectors": ["*"], "resources": ["*"]}]})
            started = time.time()
            result = asyncio.run(pipelines(gw.url, gw.jwt, args.clients, args.ttl, args.duration))
            ended = min(time.time(), started + args.duration)  # clients stop asking at the duration
            issued = [t for t in leases_issued_at(gw) if t >= started - 1]
        finally:
            gw.stop()
    load_after = os.getloadavg()
    steady_from = started + args.ttl + 1  # after the ramp: every client's first issue
    per_second = Counter(int(t - steady_from) for t in issued if steady_from <= t < ended - 1)
    seconds = max(1, int(ended - 1 - steady_from))
    counts = [per_second.get(s, 0) for s in range(seconds)]
    # Each client refreshes at 2/3 of the lifetime less 0-25 % jitter: on average at 7/12 of it.
    expected = args.clients / (args.ttl * 2 / 3 * (1 - 0.25 / 2))
    mean = statistics.mean(counts) if counts else 0.0
    lat = sorted(result["latencies"])
    lines = [
        f"- clients {args.clients}, TTL {args.ttl} s, {args.duration:g} s, one process (AsyncClient each)",
        f"- leases issued: {len(issued)} in all; steady state ({seconds} s after the first TTL): "
        f"mean {mean:.1f}/s (expected clients / (7/12 TTL) = {expected:.1f}/s), "
        f"min {min(counts, default=0)}/s, max {max(counts, default=0)}/s, stdev {statistics.pstdev(counts) if counts else 0:.1f}",
        f"- per second: {' '.join(str(c) for c in counts)}",
        f"- expired credentials handed to a caller: {len(result['bad'])} of {len(lat)} calls",
        f"- credentials() latency: p50 {lat[len(lat) // 2]:.3f} ms, p99 {lat[int(len(lat) * 0.99)]:.2f} ms, max {lat[-1]:.1f} ms",
        f"- client counters (summed): {result['stats']}",
        f"- load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; command: .venv/bin/python bench/pipeline_refresh.py "
        f"--clients {args.clients} --ttl {args.ttl} --duration {args.duration:g}",
    ]
    print("\n".join(lines))
    if args.write_results:
        (ROOT / "bench" / "PIPELINES.md").write_text(
            "# Pipeline-shaped load: many clients refreshing short-lived credentials\n\n"
            "(Generated by bench/pipeline_refresh.py --write-results.)\n\n" + "\n".join(lines) + "\n")
    return 0 if not result["bad"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
