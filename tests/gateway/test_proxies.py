"""The client address behind (and without) reverse proxies: `X-Forwarded-For` is
believed only from CREDGATE_TRUSTED_PROXIES (none by default), in a real
`credgate serve` process (uvicorn's own proxy handling is off) and in the resolver."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.test_cli import CREDGATE
from tests.services.waiting import clean_env, free_port, wait_until_serving


class Served:
    def __init__(self, tmp: Path, **env: str) -> None:
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True)
        self.out = tmp / "serve.out"
        self.proc = subprocess.Popen(
            [CREDGATE, "serve", "--dev", "--data-dir", str(tmp / "data"), "--port", str(self.port)],
            stdout=self.out.open("w"), stderr=subprocess.STDOUT,
            env=clean_env(CREDGATE_RATE_PER_ADDRESS="2", CREDGATE_BURST_PER_ADDRESS="5", **env),
        )
        wait_until_serving(f"{self.addr}/healthz", self.proc)
        self.token = re.findall(r"^CREDGATE_TOKEN=(\S+)$", self.out.read_text(), re.M)[0]

    def statuses(self, forwarded: list[str]) -> list[int]:
        with httpx.Client(base_url=self.addr) as c:
            return [c.get("/v1/backends", headers={"X-Forwarded-For": f}).status_code for f in forwarded]

    def audited_addresses(self) -> list[str]:
        time.sleep(1.1)  # the loopback's own bucket refills
        r = httpx.get(f"{self.addr}/v1/audit?limit=1000", headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == 200, r.text
        return [e["client_addr"] for e in r.json()["items"] if e["target"] == "GET /v1/backends"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[callable]:
    procs: list[Served] = []

    def start(**env: str) -> Served:
        procs.append(Served(tmp_path / str(len(procs)), **env))
        return procs[-1]

    yield start
    for p in procs:
        p.proc.terminate()
        p.proc.wait(timeout=20)


def test_a_local_caller_cannot_choose_its_address_by_default(served) -> None:
    gw = served()
    codes = gw.statuses([f"10.{i}.0.1" for i in range(30)])
    # One bucket (burst 5, 2/s): without the fix every request got through as a new address.
    assert codes.count(401) <= 8 and codes.count(429) >= 22, codes
    assert set(gw.audited_addresses()) == {"127.0.0.1"}


def test_behind_a_trusted_proxy_each_caller_has_its_own_address_and_bucket(served) -> None:
    gw = served(CREDGATE_TRUSTED_PROXIES="127.0.0.1")
    callers = [f"203.0.113.{i}" for i in range(30)]
    assert gw.statuses(callers) == [401] * 30
    hammering = gw.statuses(["6.6.6.6, 198.51.100.9"] * 12)
    assert hammering.count(429) >= 4, hammering
    audited = gw.audited_addresses()
    assert audited[:30] == callers and set(audited[30:]) == {"198.51.100.9"}


@pytest.mark.parametrize(
    "peer,xff,expected",
    [
        ("127.0.0.1", "6.6.6.6", "127.0.0.1"),  # not a configured proxy: the header is ignored
        ("10.0.0.5", None, "10.0.0.5"),  # a proxy that sent no header is the caller
        ("10.0.0.5", "203.0.113.1", "203.0.113.1"),
        ("10.0.0.5", "203.0.113.1:4711", "203.0.113.1"),
        ("10.0.0.5", "[2001:db8::1]:443", "2001:db8::1"),
        ("10.0.0.5", "not-an-ip, 10.0.0.9", "10.0.0.9"),  # garbage ends the walk at the last trusted hop
        ("10.0.0.5", "203.0.113.1, " + "x" * 5000, "10.0.0.5"),  # never a caller-chosen string
        ("10.0.0.5", "10.0.0.7, 10.0.0.8", "10.0.0.7"),  # every hop a proxy: the left-most
        ("::ffff:10.0.0.5", "203.0.113.2", "203.0.113.2"),  # an IPv4-mapped peer
    ],
)
def test_client_address_resolution(peer: str, xff: str | None, expected: str) -> None:
    from gateway.web.middleware import client_address

    headers = [(b"x-forwarded-for", xff.encode())] if xff is not None else []
    trusted = (ipaddress.ip_network("10.0.0.0/24"),)
    assert client_address({"client": (peer, 1), "headers": headers}, trusted) == expected
    assert client_address({"client": (peer, 1), "headers": headers}) == peer  # nothing trusted
