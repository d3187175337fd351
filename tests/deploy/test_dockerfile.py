"""deploy/Dockerfile, checked statically (no Docker engine here to build or run it):
BuildKit's own parser (the `dockerfile` package) reads it, hadolint lints it, and the
tests assert what the image promises: multi-stage on python:3.11-slim, a non-root
numeric USER, a HEALTHCHECK run with python, exec-form ENTRYPOINT/CMD, no secret in
ENV or ARG, only real CREDGATE_* settings, and a hash-pinned runtime lock that matches
what CI tests. deploy/healthcheck.py, which the HEALTHCHECK runs, is run for real
against local HTTP servers. (tests/deploy/test_runtime.py runs the gateway the way the
image does: uid 10001, read-only root filesystem.)
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import dockerfile
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from gateway.settings import Settings
from tests.deploy.common import DEPLOY, DOCKERFILE, HEALTHCHECK, ROOT, UID

SECRET_NAME = re.compile(r"KEK|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|PRIVATE|DATABASE_URL|API_KEY|_KEY\b", re.IGNORECASE)
SECRET_VALUE = re.compile(r"cgt_|cgs_|cgw_|postgres(ql)?(\+\w+)?://[^/\s]*:[^@\s]*@|-----BEGIN", re.IGNORECASE)


def commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def stages() -> list[list[dockerfile.Command]]:
    out: list[list[dockerfile.Command]] = []
    for cmd in commands():
        if cmd.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(cmd)
    return out


def global_args() -> dict[str, str]:
    args = {}
    for cmd in commands():
        if cmd.cmd == "FROM":
            break
        if cmd.cmd == "ARG":
            name, _, default = cmd.value[0].partition("=")
            args[name] = default
    return args


def env_of(stage: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for cmd in stage:
        if cmd.cmd == "ENV":
            pairs = cmd.value
            env.update(zip(pairs[0::2], pairs[1::2]))
    return env


def final() -> list[dockerfile.Command]:
    return stages()[-1]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed: install requirements/test.lock (README, 'Test it')", pytrace=False)
    proc = subprocess.run(
        [hadolint, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_multi_stage_build_on_python_311_slim() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "a build stage and a runtime stage"
    base = global_args()
    for stage in all_stages:
        image = stage[0].value[0]
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: base[m[1]], image)
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", resolved), resolved
    # The runtime stage copies only the built virtualenv from the build stage.
    from_build = [c for c in final() if c.cmd == "COPY" and any(f.startswith("--from=") for f in c.flags)]
    assert [c.value for c in from_build] == [("/opt/credgate", "/opt/credgate")]
    assert not [c for c in final() if c.cmd == "RUN" and "pip" in c.value[0]], "no pip in the runtime stage"


def test_runs_as_a_non_root_numeric_user() -> None:
    users = [c for c in final() if c.cmd == "USER"]
    assert users, "the runtime stage sets no USER: it would run as root"
    user = users[-1].value[0]
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
    assert uid.isdigit() and gid.isdigit(), user
    assert int(uid) == UID and int(gid) == UID and int(uid) != 0
    # Nothing after USER switches back, and the process is the last thing set up.
    after = [c.cmd for c in final()[final().index(users[-1]) + 1 :]]
    assert "RUN" not in after and "USER" not in after


def test_healthcheck_uses_python_and_the_copied_script() -> None:
    checks = [c for c in final() if c.cmd == "HEALTHCHECK"]
    assert len(checks) == 1
    check = checks[0]
    assert check.json, "exec form: no shell needed"
    kind, *argv = check.value
    assert kind == "CMD"
    assert argv[0] == "python" and "curl" not in argv and "wget" not in argv
    assert argv[1:] == ["/usr/local/lib/credgate/healthcheck.py", "/healthz"]
    copied = {c.value[-1]: c.value[0] for c in final() if c.cmd == "COPY"}
    assert copied[argv[1]] == "deploy/healthcheck.py"
    flags = dict(f.lstrip("-").split("=", 1) for f in check.flags)
    assert set(flags) == {"interval", "timeout", "start-period", "retries"}


def test_exec_form_entrypoint_and_cmd() -> None:
    entry = [c for c in final() if c.cmd == "ENTRYPOINT"]
    cmd = [c for c in final() if c.cmd == "CMD"]
    assert len(entry) == 1 and len(cmd) == 1
    assert entry[0].json and cmd[0].json, "exec form: the gateway is PID 1 and gets SIGTERM itself"
    assert entry[0].value == ("credgate",) and cmd[0].value == ("serve",)
    assert [c.value for c in final() if c.cmd == "STOPSIGNAL"] == [("SIGTERM",)]


def test_no_secret_in_env_or_args() -> None:
    for stage in stages():
        for c in stage:
            if c.cmd == "ENV":
                for name, value in env_of([c]).items():
                    assert not SECRET_NAME.search(name), f"ENV {name}: secrets come at run time, not in the image"
                    assert not SECRET_VALUE.search(value), f"ENV {name} holds what looks like a secret"
            if c.cmd == "ARG":
                name, _, value = c.value[0].partition("=")
                assert not SECRET_NAME.search(name), f"ARG {name}: build arguments end up in the image history"
                assert not SECRET_VALUE.search(value)
    assert not [c for c in commands() if c.cmd == "ADD"], "COPY only: ADD can fetch URLs and unpack archives"
    for c in commands():
        if c.cmd == "RUN":
            assert not re.search(r"\b(curl|wget)\b", c.value[0]), "nothing is downloaded outside pip's hash checks"


def test_environment_works_with_a_read_only_root_filesystem() -> None:
    env = env_of(final())
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp", "HOME must be a writable mount (tmpfs/emptyDir on /tmp)"
    assert env["CREDGATE_HOST"] == "0.0.0.0"
    assert env["CREDGATE_DATA_DIR"] == "/var/lib/credgate"
    assert [c.value for c in final() if c.cmd == "EXPOSE"] == [(env["CREDGATE_PORT"],)]
    assert env["PATH"].startswith("/opt/credgate/bin:")
    # Every CREDGATE_* variable is a real setting (an unknown one would be ignored silently).
    unknown = {k for k in env if k.startswith("CREDGATE_")} - {f"CREDGATE_{n.upper()}" for n in Settings.model_fields}
    assert not unknown
    # The data directory exists in the image, owned by the image's user, private.
    setup = " ".join(c.value[0] for c in final() if c.cmd == "RUN")
    assert f"install -d -o {UID} -g {UID} -m 0700 /var/lib/credgate" in setup


def test_build_context_files_exist_and_secrets_are_ignored() -> None:
    ignore = [
        line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in ("**/.git", "**/.venv", "deploy/kek", "deploy/.env", "tests"):
        assert must in ignore, f"{must} must stay out of the build context"
    for c in commands():
        if c.cmd == "COPY" and not c.flags:
            for src in c.value[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: no such file in the checkout"
                hit = [p for p in ignore if fnmatch.fnmatch(src, p.removeprefix("**/")) or fnmatch.fnmatch(src, p)]
                assert not hit, f"COPY {src} is excluded by {hit}"


# --- the runtime lock -------------------------------------------------------------

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")


def pins(path: Path) -> dict[str, Version]:
    out: dict[str, Version] = {}
    current = None
    hashed: set[str] = set()
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m["name"])
            out[current] = Version(m["version"])
        elif current and line.strip().startswith("--hash=sha256:"):
            hashed.add(current)
    assert out and set(out) == hashed, f"pins without a hash in {path.name}: {set(out) - hashed}"
    return out


def needed(extras: set[str]) -> set[str]:
    """credgate's distributions with `extras`, transitively, from installed metadata."""
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    todo: list[tuple[str, set[str]]] = [("credgate", extras)]
    while todo:
        name, want = todo.pop()
        key = canonicalize_name(name)
        fresh = ({""} | want) - {e for n, e in seen if n == key}
        if not fresh:
            continue
        seen.update((key, e) for e in fresh)
        names.add(key)
        for spec in metadata.distribution(name).requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in fresh):
                todo.append((req.name, set(req.extras)))
    names.discard("credgate")
    return names


IMAGE_BACKENDS = ("vault", "aws", "gcp", "azure")  # the image runs every backend type and KEK source


def test_runtime_lock_is_hashed_complete_and_the_tested_versions() -> None:
    lock = DEPLOY / "requirements.lock"
    runtime = pins(lock)
    tested = pins(ROOT / "requirements" / "test.lock")
    header = lock.read_text().splitlines()[1]
    assert "--extra server --extra postgres" + "".join(f" --extra {e}" for e in IMAGE_BACKENDS) in header, (
        "the lock's header names the command that made it"
    )
    # Every requirement of credgate, its server, postgres and backend extras (the customer's
    # own secret stores and KMS: vault, aws, gcp, azure), in range.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for spec in project["dependencies"] + [s for e in ("server", "postgres", *IMAGE_BACKENDS) for s in extras[e]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in runtime, f"{req} is not pinned in {lock.name}"
        assert req.specifier.contains(runtime[name], prereleases=True), f"{req} pinned at {runtime[name]}"
    # Transitively complete (the image installs with --no-deps).
    missing = needed({"server", "postgres", *IMAGE_BACKENDS}) - set(runtime)
    assert not missing, f"{lock.name} misses {sorted(missing)}: regenerate it (deploy/README.md)"
    # The image runs the versions CI tests.
    drift = {n: f"{v} in the image, {tested[n]} tested" for n, v in runtime.items() if tested.get(n) != v}
    assert not drift, f"regenerate {lock.name} against requirements/test.lock (deploy/README.md): {drift}"


# --- deploy/healthcheck.py ----------------------------------------------------------


class Probe(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, int]] = {"/healthz": 200, "/readyz": 503}

    def do_GET(self) -> None:
        self.send_response(self.answers.get(self.path, 404))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # A proxy that does not exist: the check must not go through it.
    base = {"PATH": "/usr/bin:/bin", "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    return subprocess.run(
        [sys.executable, "-I", str(HEALTHCHECK), *args], env=base | env, capture_output=True, text=True, timeout=30,
        check=False,
    )


def test_healthcheck_script_exit_codes(probe_server: int) -> None:
    port = str(probe_server)
    ok = run_healthcheck(CREDGATE_PORT=port)  # /healthz by default
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    not_ready = run_healthcheck("/readyz", CREDGATE_PORT=port)
    assert not_ready.returncode == 1 and "503" in not_ready.stderr
    url = run_healthcheck(HEALTHCHECK_URL=f"http://127.0.0.1:{port}/healthz")
    assert url.returncode == 0, url.stderr
    probe_server_gone = run_healthcheck(CREDGATE_PORT="1")
    assert probe_server_gone.returncode == 1 and "unhealthy" in probe_server_gone.stderr


def test_healthcheck_script_follows_the_tls_setting() -> None:
    spec = importlib.util.spec_from_file_location("credgate_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.probe_url("/healthz", {}) == "http://127.0.0.1:8765/healthz"
    assert mod.probe_url("/readyz", {"CREDGATE_PORT": "9000", "CREDGATE_TLS_CERT_FILE": "/x.pem"}) == (
        "https://127.0.0.1:9000/readyz"
    )
    assert mod.probe_url("/healthz", {"HEALTHCHECK_URL": "https://gw:1/healthz"}) == "https://gw:1/healthz"
    # The loopback health listener (docs/tls.md) wins over the TLS port: no client certificate needed.
    listener = {"CREDGATE_HEALTH_LISTEN": "127.0.0.1:8766", "CREDGATE_TLS_CERT_FILE": "/x.pem", "CREDGATE_PORT": "9000"}
    assert mod.probe_url("/readyz", listener) == "http://127.0.0.1:8766/readyz"
    assert mod.probe_url("/readyz", listener | {"HEALTHCHECK_URL": "http://h:1/readyz"}) == "http://h:1/readyz"
