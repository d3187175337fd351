"""Admin sign-in against a real OpenID provider (tests/services/oidc_provider.py):
`credgate login` (device flow, then token exchange at the gateway) run as a
subprocess against a real `credgate serve --dev` process, and the console's
authorization code + PKCE flow driven over HTTP."""

from __future__ import annotations

import json
import os
import queue
import re
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from gateway.policy.rules import ACTIONS
from tests.gateway.test_cli import CREDGATE
from tests.services.waiting import clean_env, free_port, wait_until_serving
from tests.services.oidc_provider import OIDCProvider

CLIENT_ID = "credgate-cli"
ADMIN = "cgt_login-test-admin-" + "y" * 24
COOKIE = "credgate_login"


class LoginGateway:
    """`credgate serve --dev` signing admins in at ``idp`` (a trusted issuer set up over the API)."""

    def __init__(self, data_dir: Path, idp: OIDCProvider, **settings: str) -> None:
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.callback = f"{self.addr}/v1/auth/console/callback"
        self.out = data_dir.parent / "serve.out"
        env = clean_env(CREDGATE_LOGIN_ISSUER="idp", CREDGATE_LOGIN_CLIENT_ID=CLIENT_ID, CREDGATE_BOOTSTRAP_TOKEN=ADMIN,
                        **settings)
        self.proc = subprocess.Popen(
            [CREDGATE, "serve", "--dev", "--data-dir", str(data_dir), "--port", str(self.port)],
            stdout=self.out.open("w"), stderr=subprocess.STDOUT, env=env,
        )
        try:
            wait_until_serving(f"{self.addr}/readyz", self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.out.read_text()}") from None
        idp.register_client(CLIENT_ID, public=True, redirect_uris=[self.callback])
        r = httpx.put(f"{self.addr}/v1/issuers/idp", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10, json={
            "issuer_url": idp.issuer, "jwks_url": f"{idp.issuer}/jwks", "audiences": [CLIENT_ID],
            "claim_mapping": {"groups": "groups"}, "role_mapping": {"credgate-admins": ["admin"]},
        })
        assert r.status_code == 201, r.text

    def cli(self, *args: str, profile: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        """The CLI as a signed-in admin would run it: no CREDGATE_TOKEN, only the profile."""
        full = clean_env(CREDGATE_ADDR=self.addr, CREDGATE_PROFILE=str(profile), **env)
        res = subprocess.run([CREDGATE, *args], capture_output=True, text=True, env=full, timeout=30, check=False)
        if check:
            assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def idp() -> Iterator[OIDCProvider]:
    with OIDCProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, idp: OIDCProvider) -> Iterator[LoginGateway]:
    g = LoginGateway(tmp_path_factory.mktemp("login") / "data", idp)
    try:
        yield g
    finally:
        g.stop()


class Login:
    """`credgate login` running in the background; its stderr read line by line."""

    def __init__(self, gw: LoginGateway, profile: Path) -> None:
        env = clean_env(CREDGATE_ADDR=gw.addr, CREDGATE_PROFILE=str(profile))
        self.proc = subprocess.Popen([CREDGATE, "login"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def user_code(self, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if m := re.search(r"enter the code: (\S+)$", line):
                return m.group(1)
        self.proc.kill()
        raise AssertionError(f"no user code shown: {''.join(self.stderr)}")

    def finish(self, timeout: float = 20) -> tuple[int, str, str]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.05)  # let the reader thread take the last lines
        return rc, out, "".join(self.stderr)


def sign_in(gw: LoginGateway, idp: OIDCProvider, profile: Path, username: str) -> str:
    login = Login(gw, profile)
    code = login.user_code()
    idp.approve_device(code, username)
    rc, out, err = login.finish()
    assert rc == 0, (out, err)
    assert f"{idp.issuer}/device" in err and "user_code=" in err  # verification_uri(_complete)
    return out


def test_device_login_whoami_admin_command_logout(gw: LoginGateway, idp: OIDCProvider, tmp_path: Path) -> None:
    profile = tmp_path / "cfg" / "profile.json"
    out = sign_in(gw, idp, profile, "alice")
    assert f"signed in to {gw.addr} as alice (admin)" in out

    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    assert stat.S_IMODE(profile.parent.stat().st_mode) == 0o700
    stored = json.loads(profile.read_text())
    assert set(stored) == {"addr", "access_token", "expires_at"} and stored["addr"] == gw.addr
    assert 3000 < stored["expires_at"] - time.time() <= 3600
    assert stored["access_token"] not in out  # the token is never printed

    me = gw.cli("whoami", profile=profile).stdout
    assert "subject:  alice" in me and "roles:    admin" in me and "kind:     workload" in me and "issuer:   idp" in me
    assert "local" in gw.cli("backend", "list", profile=profile).stdout  # admin-only

    # CREDGATE_TOKEN and --token still win over the profile.
    env_wins = gw.cli("whoami", profile=profile, check=False, CREDGATE_TOKEN="cgt_not-a-key")
    assert env_wins.returncode == 1 and env_wins.stderr.startswith("credgate: invalid_token:")
    assert "kind:     admin_key" in gw.cli("whoami", "--token", ADMIN, profile=profile).stdout
    # ... and the profile's token goes only to the address it was issued for (same server, other name).
    elsewhere = gw.cli("whoami", "--addr", f"http://localhost:{gw.port}", profile=profile, check=False)
    assert elsewhere.returncode == 1 and elsewhere.stderr.startswith("credgate: missing_token:")

    token = stored["access_token"]
    out = gw.cli("logout", profile=profile).stdout
    assert out.startswith(f"signed out: token revoked at {gw.addr}, removed ") and token not in out
    assert not profile.exists()
    after = gw.cli("whoami", profile=profile, check=False)
    assert after.returncode == 1 and after.stderr.startswith("credgate: missing_token:")
    # The token itself is revoked at the gateway, not only forgotten here.
    r = httpx.get(f"{gw.addr}/v1/auth/whoami", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_revoked"


def test_the_sign_in_ends_when_its_mapping_or_signing_key_changes(
    gw: LoginGateway, idp: OIDCProvider, tmp_path: Path
) -> None:
    """The login token derives from the issuer's mapping and is signed by the gateway's key:
    changing either refuses it (and a new sign-in works)."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    issuer = httpx.get(f"{gw.addr}/v1/issuers/idp", headers=admin, timeout=10).json()
    body = {k: v for k, v in issuer.items() if k != "name"}

    def whoami(profile: Path) -> tuple[int, str]:
        res = gw.cli("whoami", profile=profile, check=False)
        return res.returncode, res.stderr

    idp.users["carol"] = {"email": "carol@example.com", "groups": ["credgate-admins"]}
    profile = tmp_path / "carol.json"
    sign_in(gw, idp, profile, "carol")
    assert whoami(profile)[0] == 0
    # The role mapping that granted the admin role is removed.
    r = httpx.put(f"{gw.addr}/v1/issuers/idp", headers=admin, timeout=10, json={**body, "role_mapping": {}})
    assert r.status_code == 200, r.text
    try:
        code, err = whoami(profile)
        assert code == 1 and err.startswith("credgate: issuer_changed: ") and err.count("\n") == 1
    finally:
        assert httpx.put(f"{gw.addr}/v1/issuers/idp", headers=admin, timeout=10, json=body).status_code == 200
    sign_in(gw, idp, profile, "carol")
    assert whoami(profile)[0] == 0
    # The signing key is rotated (after a compromise: no grace).
    assert gw.cli("keys", "rotate-signing", "--token", ADMIN, profile=profile).returncode == 0
    code, err = whoami(profile)
    assert code == 1 and err.startswith("credgate: token_kid_unknown:")
    # Logging out still works: the gateway answers 200 for a token it no longer accepts.
    assert "signed out" in gw.cli("logout", profile=profile).stdout and not profile.exists()


def test_logout_keeps_the_profile_when_the_gateway_cant_revoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli.main import main

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"addr": f"http://127.0.0.1:{free_port()}", "access_token": "x.y.z",
                                   "expires_at": int(time.time()) + 600}))
    for name in [k for k in os.environ if k.startswith("CREDGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CREDGATE_PROFILE", str(profile))
    with pytest.raises(SystemExit) as exc:
        main(["logout"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("credgate: revoke_failed: ") and err.count("\n") == 1, err
    assert "--forget" in err and "x.y.z" not in err and profile.exists()
    main(["logout", "--forget"])
    assert capsys.readouterr().out.startswith("signed out: removed ") and not profile.exists()
    # An expired or broken profile has nothing to revoke: it is removed.
    profile.write_text("{not json")
    main(["logout"])
    assert not profile.exists()


def test_a_user_without_a_mapped_role_is_refused_admin_actions(
    gw: LoginGateway, idp: OIDCProvider, tmp_path: Path
) -> None:
    profile = tmp_path / "bob.json"
    assert "as bob (no roles)" in sign_in(gw, idp, profile, "bob")
    me = gw.cli("whoami", profile=profile).stdout
    assert "subject:  bob" in me and "roles:    -" in me
    denied = gw.cli("backend", "list", profile=profile, check=False)
    assert denied.returncode == 1 and denied.stderr.startswith("credgate: permission_denied:")
    assert denied.stderr.count("\n") == 1


def test_a_denied_device_code_fails_in_one_line(gw: LoginGateway, idp: OIDCProvider, tmp_path: Path) -> None:
    profile = tmp_path / "denied.json"
    login = Login(gw, profile)
    idp.deny_device(login.user_code())
    rc, out, err = login.finish()
    assert rc == 1 and out == ""
    last = err.splitlines()[-1]
    assert last.startswith("credgate: access_denied: ") and "Traceback" not in err
    assert not profile.exists()


def test_login_against_a_gateway_without_sign_in_fails_in_one_line(tmp_path: Path) -> None:
    from tests.gateway.test_cli import Server

    plain = Server(tmp_path / "plain")
    try:
        res = subprocess.run([CREDGATE, "login"], capture_output=True, text=True, timeout=30, check=False,
                             env=clean_env(CREDGATE_ADDR=plain.addr, CREDGATE_PROFILE=str(tmp_path / "p.json")))
    finally:
        plain.stop()
    assert res.returncode == 1 and res.stderr.startswith("credgate: login_not_configured:")
    assert res.stderr.count("\n") == 1


class FakeClock:
    """Stands in for the `time` module inside gateway.cli: sleeping only advances the clock."""

    def __init__(self, on_sleep=None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(self)

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


def test_device_polling_honours_slow_down_and_expiry(
    idp: OIDCProvider, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Polls really reach the IdP back to back, so it answers slow_down; the CLI must
    then wait 5 s longer each time (RFC 8628 3.5), and give up when the code expires."""
    from gateway.cli import login as cli
    from gateway.cli.login import LoginFailed, _device_flow

    idp.register_client("cli-unit", public=True)
    config = {"issuer_url": idp.issuer, "client_id": "cli-unit", "scopes": "openid groups"}

    def approve_on_third_sleep(clock: FakeClock) -> None:
        if len(clock.sleeps) == 3:
            code = re.search(r"enter the code: (\S+)", capsys.readouterr().err).group(1)
            idp.approve_device(code, "alice")

    clock = FakeClock(approve_on_third_sleep)
    monkeypatch.setattr(cli, "time", clock)
    with httpx.Client(timeout=10) as http:
        id_token = _device_flow(http, config)
    assert clock.sleeps == [1, 1, 6]  # interval 1; pending; slow_down (+5); approved
    assert id_token.count(".") == 2

    clock = FakeClock()
    monkeypatch.setattr(cli, "time", clock)
    with httpx.Client(timeout=10) as http, pytest.raises(LoginFailed) as exc:
        _device_flow(http, config)
    assert exc.value.code == "expired_token" and 300 < sum(clock.sleeps) < 400
    assert clock.sleeps[:4] == [1, 1, 6, 11]


@pytest.mark.parametrize(
    ("content", "exit_code", "start"),
    [
        ({"addr": "http://127.0.0.1:9", "access_token": "x.y.z", "expires_at": 1}, 1, "credgate: login_expired: "),
        ("{not json", 2, "credgate: the profile "),
        ({"token": "x"}, 2, "credgate: the profile "),
    ],
)
def test_expired_or_broken_profile_is_one_line(
    content: object, exit_code: int, start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.cli.main import main

    profile = tmp_path / "profile.json"
    profile.write_text(content if isinstance(content, str) else json.dumps(content))
    for name in [k for k in os.environ if k.startswith("CREDGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CREDGATE_PROFILE", str(profile))
    with pytest.raises(SystemExit) as exc:
        main(["whoami"])  # refused before any request: in-process is enough
    err = capsys.readouterr().err
    assert exc.value.code == exit_code and err.startswith(start) and err.count("\n") == 1, err
    if exit_code == 1:
        assert "credgate login" in err


# --- the console: authorization code + PKCE ------------------------------------------


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def start_console_login(gw: LoginGateway, idp: OIDCProvider, username: str) -> tuple[str, str]:
    """The browser's part: /login -> IdP /authorize (login_hint signs in) -> the callback URL."""
    r = httpx.get(f"{gw.addr}/v1/auth/console/login", follow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    cookie = r.cookies[COOKIE]
    set_cookie = r.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie and "path=/v1/auth/console" in set_cookie
    assert "max-age=600" in set_cookie and "secure" not in set_cookie  # http gateway in tests

    authorize = r.headers["location"]
    assert authorize.startswith(f"{idp.issuer}/authorize?")
    q = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
    assert q["response_type"] == "code" and q["client_id"] == CLIENT_ID and q["redirect_uri"] == gw.callback
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert q["state"] and q["nonce"] and "openid" in q["scope"].split()
    assert q["code_challenge"] not in cookie  # the cookie holds the verifier, never just the challenge

    r = httpx.get(with_query(authorize, login_hint=username), follow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    callback = r.headers["location"]
    assert callback.startswith(gw.callback + "?") and "code=" in callback
    return callback, cookie


def callback(url: str, cookie: str | None) -> httpx.Response:
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
    return httpx.get(url, headers=headers, follow_redirects=False, timeout=10)


def error_code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def test_console_code_flow_with_pkce(gw: LoginGateway, idp: OIDCProvider) -> None:
    url, cookie = start_console_login(gw, idp, "alice")

    tampered = callback(with_query(url, state="not-the-state"), cookie)
    assert tampered.status_code == 400 and error_code(tampered) == "login_state_invalid"
    no_cookie = callback(url, None)
    assert no_cookie.status_code == 400 and error_code(no_cookie) == "login_state_invalid"

    r = callback(url, cookie)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["subject"] == "alice" and body["roles"] == ["admin"]
    assert 3000 < body["expires_in"] <= 3600
    assert r.headers["cache-control"] == "no-store"
    assert f'{COOKIE}=""' in r.headers["set-cookie"] and "max-age=0" in r.headers["set-cookie"].lower()

    me = httpx.get(f"{gw.addr}/v1/auth/whoami", headers={"Authorization": f"Bearer {body['access_token']}"}, timeout=10)
    assert me.status_code == 200
    assert me.json() == {"kind": "workload", "subject": "alice", "issuer": "idp", "roles": ["admin"], "run_id": None,
                         "may": sorted(ACTIONS)}

    replay = callback(url, cookie)
    assert replay.status_code == 400 and error_code(replay) == "login_state_used"


def test_console_login_cookie_is_no_bearer_token_and_no_token_is_a_cookie(gw: LoginGateway, idp: OIDCProvider) -> None:
    url, cookie = start_console_login(gw, idp, "bob")
    as_bearer = httpx.get(f"{gw.addr}/v1/auth/whoami", headers={"Authorization": f"Bearer {cookie}"}, timeout=10)
    assert as_bearer.status_code == 401

    # A gateway access token (same signing key) is not a login cookie.
    run = httpx.post(f"{gw.addr}/v1/runs/r1/token", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10,
                     json={"connectors": ["c"], "resources": ["r"]})
    forged = callback(url, run.json()["token"])
    assert forged.status_code == 400 and error_code(forged) == "login_state_invalid"
    tampered = callback(url, cookie[:-4] + ("AAAA" if not cookie.endswith("AAAA") else "BBBB"))
    assert tampered.status_code == 400 and error_code(tampered) == "login_state_invalid"

    r = callback(url, cookie)  # the real one still works: refusals did not spend it
    assert r.status_code == 200 and r.json()["subject"] == "bob" and r.json()["roles"] == []


def test_console_idp_error_and_unknown_user(gw: LoginGateway, idp: OIDCProvider) -> None:
    r = httpx.get(f"{gw.addr}/v1/auth/console/login", follow_redirects=False, timeout=10)
    cookie = r.cookies[COOKIE]
    r = httpx.get(with_query(r.headers["location"], login_hint="mallory"), follow_redirects=False, timeout=10)
    back = r.headers["location"]
    assert "error=login_required" in back
    denied = callback(back, cookie)
    assert denied.status_code == 400 and error_code(denied) == "login_denied"
