"""The gateway run the way deploy/ runs it, and stopped the way Kubernetes stops it.

No Docker engine here, so the image's runtime conditions are rebuilt around the same
code: a private mount namespace (util-linux `unshare`) where every filesystem is
read-only except a fresh tmpfs on /tmp (the image's HOME and, here, its data
directory), the process as uid/gid 10001 with no capabilities and no new privileges
(`setpriv`), and the image's environment read from deploy/Dockerfile. In there:
`credgate db upgrade` (the migration job) and `credgate serve` (a replica), probed
with deploy/healthcheck.py run the same way. A second replica runs beside it on the
same PostgreSQL database.

Then the replica that holds the reaper lock gets SIGTERM while a request is in flight
(its body half sent): it stops accepting connections, finishes that request (200, and
the write is committed), runs the app's shutdown (the reaper stops and unlocks) and
exits, and the other replica takes the reaper lock within two reaper intervals.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.crypto.keyring import new_key_file
from tests.deploy.common import HEALTHCHECK, ROOT, UID
from tests.deploy.test_dockerfile import env_of, final
from tests.services.waiting import clean_env, free_port, wait_until_serving

CREDGATE = str(Path(sys.executable).parent / "credgate")
TOKEN = "cgt_deploy-runtime-test-admin-token-" + "d" * 16
INTERVAL = 0.3
DATA_DIR = "/tmp/credgate-data"  # on the sandbox's /tmp tmpfs
KEK_PATH = "/tmp/kek"

def hidden_ancestor(path: Path) -> Path | None:
    """The outermost directory above `path` that others can't traverse (e.g. /root)."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def outermost(paths: set[Path]) -> list[Path]:
    return sorted(p for p in paths if not any(q != p and q in p.parents for q in paths))


def sandbox_script(work: Path) -> str:
    """A shell script (run as root in a new mount namespace) that makes every filesystem
    read-only, puts a fresh tmpfs on /tmp, keeps the interpreter, the virtualenv and the
    checkout reachable (read-only) for uid 10001 even when they sit under a private
    directory like /root or under /tmp, writes the KEK (from $1) to /tmp/kek for uid
    10001, and execs the rest of its arguments as uid/gid 10001 without capabilities.

    Each new tmpfs is assembled at a staging point in `work` (kept paths bound into it,
    read-only) and then moved over its target, /tmp last (it hides `work`). `mount -n`:
    the mount table files are read-only by then."""
    keep = outermost({Path(sys.base_prefix).resolve(), Path(sys.prefix).absolute(), ROOT})
    overlays: dict[Path, str] = {}
    for path in keep:
        hidden = hidden_ancestor(path)
        if hidden is not None and Path("/tmp") not in (hidden, *hidden.parents):
            overlays[hidden] = "0755"
    overlays[Path("/tmp")] = "1777"  # last
    q = shlex.quote
    lines = [
        "set -eu",
        'kek_content=$(cat "$1"); shift',
        "mount -n --make-rprivate /",
        r"awk '{print $2}' /proc/self/mounts | grep -Ev '^/(proc|sys|dev)(/|$)' | while read -r mp; do",
        '  mount -n -o remount,bind,ro "$mp" 2>/dev/null || true',
        "done",
    ]
    for i, (overlay, mode) in enumerate(overlays.items()):
        stage = work / f"overlay-{i}"
        stage.mkdir()
        lines.append(f"mount -n -t tmpfs -o mode={mode},size=64m tmpfs {q(str(stage))}")
        for path in keep:
            if overlay in path.parents:
                inner = q(str(stage / path.relative_to(overlay)))
                lines += [f"mkdir -p {inner}", f"mount -n --bind {q(str(path))} {inner}",
                          f"mount -n -o remount,bind,ro {inner}"]
        lines.append(f"mount -n --move {q(str(stage))} {q(str(overlay))}")
    for probe in (Path("/"), ROOT, Path(sys.prefix).absolute()):
        target = q(str(probe / ".credgate-rw-probe"))
        lines.append(f'if touch {target} 2>/dev/null; then echo "sandbox: {probe} is writable" >&2; exit 97; fi')
    lines += [
        "umask 077",
        f'printf "%s\\n" "$kek_content" > {KEK_PATH}',
        f"mkdir {DATA_DIR}",
        f"chown {UID}:{UID} {KEK_PATH} {DATA_DIR}",
        f'exec setpriv --reuid {UID} --regid {UID} --clear-groups --inh-caps=-all --no-new-privs -- "$@"',
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def sandbox_ok() -> None:
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("util-linux unshare/setpriv are not installed")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here (needs root): {probe.stderr.strip()}")


def sandboxed(tmp_path: Path, kek: Path, argv: list[str]) -> list[str]:
    work = tmp_path / f"sandbox-{len(list(tmp_path.glob('sandbox-*')))}"
    work.mkdir()
    return ["unshare", "--mount", "sh", "-c", sandbox_script(work), "sandbox", str(kek), *argv]


def image_env(port: int, db_url: str, **extra: str) -> dict[str, str]:
    """deploy/Dockerfile's environment (PATH aside), for this test's port and database."""
    env = clean_env()
    for k, v in env_of(final()).items():
        if k != "PATH":
            env[k] = v
    env.update(
        CREDGATE_HOST="127.0.0.1",  # the image binds 0.0.0.0; the test stays on the loopback
        CREDGATE_PORT=str(port),
        CREDGATE_DATA_DIR=DATA_DIR,
        CREDGATE_KEK_FILE=KEK_PATH,
        CREDGATE_DATABASE_URL=db_url,
        CREDGATE_BOOTSTRAP_TOKEN=TOKEN,
        CREDGATE_REAPER_INTERVAL_SECONDS=str(INTERVAL),
        CREDGATE_PUBLIC_URL="http://credgate.test",
    )
    env.update(extra)
    return env


def leader(addr: str) -> bool:
    r = httpx.get(f"{addr}/v1/leases/summary", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    r.raise_for_status()
    return r.json()["reaper_leader"]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def read_response(sock: socket.socket) -> bytes:
    sock.settimeout(15)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_read_only_non_root_replica_drains_and_hands_over_the_reaper(
    tmp_path: Path, postgres_url: str, sandbox_ok: None
) -> None:
    db_url = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)  # as deploy/ documents it
    kek = tmp_path / "kek"
    new_key_file(kek)
    port_a, port_b = free_port(), free_port()
    addr_a, addr_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"

    # The migration job: credgate db upgrade, read-only, as uid 10001.
    migrate = subprocess.run(
        sandboxed(tmp_path, kek, [CREDGATE, "db", "upgrade"]), env=image_env(port_a, db_url),
        capture_output=True, text=True, timeout=120, cwd="/", check=False,
    )
    assert migrate.returncode == 0, migrate.stderr
    assert "store at revision" in migrate.stdout

    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = subprocess.Popen(
        sandboxed(tmp_path, kek, [CREDGATE, "serve"]), env=image_env(port_a, db_url),
        stdout=log_a.open("w"), stderr=subprocess.STDOUT, cwd="/",
    )
    procs = [a]
    try:
        wait_until_serving(f"{addr_a}/readyz", a)
        for path in ("/healthz", "/readyz"):
            check = subprocess.run(
                sandboxed(tmp_path, kek, [sys.executable, str(HEALTHCHECK), path]),
                env=image_env(port_a, db_url), capture_output=True, text=True, timeout=60, cwd="/", check=False,
            )
            assert check.returncode == 0, check.stderr
        assert wait_for(lambda: leader(addr_a), INTERVAL * 10), "the first replica should run the reaper"

        # A second replica on the same database (outside the sandbox: only the lock matters here).
        b = subprocess.Popen(
            [CREDGATE, "serve", "--port", str(port_b), "--data-dir", str(tmp_path / "b")],
            env=image_env(port_b, db_url, CREDGATE_KEK_FILE=str(kek), CREDGATE_DATA_DIR=str(tmp_path / "b")),
            stdout=log_b.open("w"), stderr=subprocess.STDOUT,
        )
        procs.append(b)
        wait_until_serving(f"{addr_b}/readyz", b)
        time.sleep(INTERVAL * 3)
        assert leader(addr_a) and not leader(addr_b), "exactly one replica runs the reaper"

        # A request in flight on A: headers sent, body half sent.
        body = b'{"data": {"drained": "yes"}}'
        head = (
            "PUT /v1/secrets/local/deploy/drain HTTP/1.1\r\nHost: credgate.test\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port_a), timeout=5) as sock:
            sock.sendall(head + body[:10])
            time.sleep(0.5)  # the app has the request and waits for the rest of the body
            a.send_signal(signal.SIGTERM)
            assert wait_for(lambda: refuses_connections(port_a), 5), "after SIGTERM no new connection is accepted"
            assert a.poll() is None, "the replica must wait for the request in flight"
            sock.sendall(body[10:])
            response = read_response(sock)
        status_line = response.split(b"\r\n", 1)[0]
        assert status_line == b"HTTP/1.1 200 OK", response[:500]
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly: the exit
        # status is "terminated by SIGTERM" (143 in a container), after a full shutdown.
        assert a.wait(timeout=15) in (0, -signal.SIGTERM), log_a.read_text()[-3000:]
        stopped = time.monotonic()
        log = log_a.read_text()
        assert log.index("Shutting down") < log.index('"PUT /v1/secrets/local/deploy/drain HTTP/1.1\\" 200')
        assert "Application shutdown complete" in log, "the app's shutdown (reaper stop, lock release) ran"

        # The other replica takes the reaper lock within two intervals of the stop.
        assert wait_for(lambda: leader(addr_b), INTERVAL * 2 + 1.0), "the reaper lock was not handed over"
        assert time.monotonic() - stopped < INTERVAL * 2 + 1.0
        # The drained request's write was committed.
        got = httpx.get(f"{addr_b}/v1/secrets/local/deploy/drain", params={"reveal": "true"},
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert got.status_code == 200 and got.json()["data"] == {"drained": "yes"}
        assert "Traceback" not in log and "Read-only file system" not in log, log[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
