"""The web console driven by a real browser: Debian's chromium through its chromedriver
(selenium; nothing is downloaded), against a real `credgate serve --dev` process signing
admins in at a real OpenID provider (tests/services/oidc_provider.py, with its sign-in page),
a real Redis as the connector's target, and the CLI as a subprocess.

Set CREDGATE_CONSOLE_SCREENSHOTS=DIR to keep a screenshot of each page there (docs/console/
is made that way)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import service_missing
from tests.gateway.test_login import ADMIN, LoginGateway
from tests.services.oidc_provider import OIDCProvider
from tests.services.waiting import free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REVEAL_SECONDS = 3
CANARY = "CANARY-console-reveal-7f3a"
SHOTS = os.environ.get("CREDGATE_CONSOLE_SCREENSHOTS")

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoSuchElementException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def new_browser() -> Iterator[Callable[[], object]]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        service_missing("chromium", "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    started = []

    def make():
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000", "--password-store=basic"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.implicitly_wait(0)
        started.append(driver)
        return driver

    yield make
    for driver in started:
        driver.quit()


@pytest.fixture(scope="module")
def idp() -> Iterator[OIDCProvider]:
    with OIDCProvider(login_form=True) as provider:
        yield provider


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, idp: OIDCProvider) -> Iterator[LoginGateway]:
    g = LoginGateway(tmp_path_factory.mktemp("console") / "data", idp,
                     CREDGATE_CONSOLE_REVEAL_SECONDS=str(REVEAL_SECONDS))
    try:
        yield g
    finally:
        g.stop()


def api(gw: LoginGateway, method: str, path: str, token: str = ADMIN, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.addr}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30, **kw)


def cli(gw: LoginGateway, *args: str) -> str:
    import subprocess

    from tests.gateway.test_cli import CREDGATE
    from tests.services.waiting import clean_env

    res = subprocess.run([CREDGATE, *args], capture_output=True, text=True, timeout=60,
                         env=clean_env(CREDGATE_ADDR=gw.addr, CREDGATE_TOKEN=ADMIN))
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res.stdout


def wait(driver, condition, timeout: float = 15):
    return WebDriverWait(driver, timeout).until(condition)


def flash(driver) -> str:
    return wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=flash]"))).text


def shot(driver, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, max(1000, min(height + 140, 2400)))  # the whole page
        driver.save_screenshot(str(Path(SHOTS) / f"{name}.png"))
        driver.set_window_size(1400, 1000)


def submit(driver, element, confirm: bool = False) -> None:
    """Click a submit button and wait for the page that answers it."""
    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    if confirm:
        wait(driver, EC.alert_is_present()).accept()
    wait(driver, EC.staleness_of(page))


def exists(driver, css: str) -> bool:
    try:
        driver.find_element(By.CSS_SELECTOR, css)
        return True
    except NoSuchElementException:
        return False


def sign_in_with_key(driver, gw: LoginGateway, key: str) -> None:
    driver.get(f"{gw.addr}/console/login")
    driver.find_element(By.NAME, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form[action='/v1/auth/console/key'] button").click()
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=whoami]")))


@pytest.fixture(scope="module")
def admin(new_browser, gw: LoginGateway, idp: OIDCProvider):
    """A browser signed in as alice (admin by her group) through the identity provider."""
    driver = new_browser()
    driver.get(f"{gw.addr}/console")
    assert driver.current_url.endswith("/console/login")
    shot(driver, "sign-in")
    driver.find_element(By.CSS_SELECTOR, "[data-testid=idp-login]").click()
    wait(driver, EC.presence_of_element_located((By.ID, "username"))).send_keys("alice")
    driver.find_element(By.ID, "sign-in").click()
    wait(driver, EC.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-testid=whoami]"), "alice"))
    return driver


@pytest.fixture(scope="module")
def target(gw: LoginGateway, redis_server: str) -> str:
    """The Redis the connector manages, its admin URL in a secret of the local backend."""
    cli(gw, "secret", "put", "local/targets/cache", f"url={redis_server}")
    return redis_server


def test_sign_in_through_the_identity_provider_sets_a_strict_httponly_session(admin, gw: LoginGateway) -> None:
    assert admin.current_url == f"{gw.addr}/console"
    cookies = {c["name"]: c for c in admin.get_cookies()}
    session = cookies["credgate_console"]
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/console"
    assert "credgate_login" not in cookies  # the PKCE state is spent
    assert admin.execute_script("return document.cookie") == ""  # no script reads the session
    assert "alice" in admin.find_element(By.CSS_SELECTOR, "[data-testid=whoami]").text
    for card in ("gateway-health", "keys", "backend-health", "lease-summary", "audit-status", "issuance-chart"):
        assert admin.find_element(By.CSS_SELECTOR, f"[data-testid={card}]").is_displayed(), card
    submit(admin, admin.find_element(By.CSS_SELECTOR, "[data-testid=verify-audit]"))
    assert "verified" in flash(admin)


def test_add_a_backend_and_a_connector_from_their_schema_forms(admin, gw: LoginGateway, target: str) -> None:
    admin.get(f"{gw.addr}/console/backends")
    Select(admin.find_element(By.NAME, "type")).select_by_value("local")
    listing = admin.find_element(By.CSS_SELECTOR, "[data-testid=backends]")
    admin.find_element(By.XPATH, "//button[text()='Show its settings']").click()
    wait(admin, EC.staleness_of(listing))
    form = wait(admin, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=backend-form]")))
    form.find_element(By.NAME, "name").send_keys("team")
    submit(admin, form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    assert "Backend team (local) saved" in flash(admin)
    submit(admin, admin.find_element(By.CSS_SELECTOR, "[data-testid=check-team]"))
    assert "Backend team: healthy" in flash(admin)
    shot(admin, "backends")

    admin.get(f"{gw.addr}/console/connectors?type=redis")
    Select(admin.find_element(By.NAME, "auth_method")).select_by_value("password")
    before = admin.find_element(By.CSS_SELECTOR, "[data-testid=connector-form]")
    admin.find_element(By.XPATH, "//button[text()='Show its settings']").click()
    wait(admin, EC.staleness_of(before))
    form = wait(admin, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=connector-form]")))
    form.find_element(By.NAME, "name").send_keys("cache")
    form.find_element(By.NAME, "secret").send_keys("local/targets/cache")
    form.find_element(By.NAME, "config.categories").send_keys("+@read")
    form.find_element(By.NAME, "resources").send_keys("features")
    form.find_element(By.NAME, "max_ttl_seconds").send_keys("600")
    shot(admin, "connector-form")
    submit(admin, form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    assert "Connector cache (redis, password) saved" in flash(admin)
    row = api(gw, "GET", "/v1/connectors/cache").json()
    assert row["config"]["categories"] == ["+@read"] and row["resources"] == ["features"] and row["max_ttl_seconds"] == 600

    admin.find_element(By.LINK_TEXT, "cache").click()
    submit(admin, admin.find_element(By.CSS_SELECTOR, "[data-testid=verify]"))
    assert "Connector cache verified" in flash(admin)
    shot(admin, "connector")


def lease_row(driver, lease_id: str):
    try:
        return driver.find_element(By.CSS_SELECTOR, f"tr[data-lease='{lease_id}']")
    except NoSuchElementException:
        return None


def issue(gw: LoginGateway) -> dict:
    return json.loads(cli(gw, "cred", "issue", "cache", "features", "--format", "json"))


def test_a_credential_issued_and_revoked_from_the_cli_appears_and_disappears(admin, gw: LoginGateway, target: str) -> None:
    issued = issue(gw)
    lease_id = issued["lease_id"]
    active = f"{gw.addr}/console/leases?connector=cache&state=active"
    admin.get(active)
    row = lease_row(admin, lease_id)
    assert row is not None and "active" in row.text and "features" in row.text
    shot(admin, "leases")
    cli(gw, "lease", "revoke", lease_id)
    admin.get(active)
    assert lease_row(admin, lease_id) is None
    admin.get(f"{gw.addr}/console/leases?connector=cache&state=revoked")
    assert "revoked" in lease_row(admin, lease_id).text


def test_a_lease_revoked_in_the_console_is_refused_by_the_target(admin, gw: LoginGateway, target: str) -> None:
    import redis

    issued = issue(gw)
    url = issued["credential"]["url"] if "credential" in issued else issued["data"]["url"]
    assert redis.Redis.from_url(url).get("features:x") is None  # the credential works
    admin.get(f"{gw.addr}/console/leases?connector=cache&state=active")
    submit(admin, admin.find_element(By.CSS_SELECTOR, f"[data-testid=revoke-{issued['lease_id']}]"), confirm=True)
    assert f"Lease {issued['lease_id']} revoked" in flash(admin)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(url).get("features:x")


def test_bulk_revocation_says_how_many_before_it_revokes(admin, gw: LoginGateway, target: str) -> None:
    ids = {issue(gw)["lease_id"] for _ in range(2)}
    admin.get(f"{gw.addr}/console/leases?connector=cache")
    submit(admin, admin.find_element(By.XPATH, "//button[contains(text(), 'Count and confirm')]"))
    count = wait(admin, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=bulk-count]")))
    assert "2 live leases" in count.text and "cache" in count.text
    shot(admin, "bulk-confirm")
    assert {lease["state"] for lease in api(gw, "GET", "/v1/leases?connector=cache&state=active").json()["items"]} == {"active"}
    submit(admin, admin.find_element(By.CSS_SELECTOR, "[data-testid=bulk-confirm]"))
    assert "2 leases matched, 2 revoked" in flash(admin)
    states = {i["lease_id"]: i["state"] for i in api(gw, "GET", "/v1/leases?connector=cache").json()["items"]}
    assert all(states[i] == "revoked" for i in ids)


def test_a_policy_with_an_error_is_shown_in_place_then_corrected(admin, gw: LoginGateway) -> None:
    admin.get(f"{gw.addr}/console/policies")
    admin.find_element(By.NAME, "name").send_keys("ml")
    admin.find_element(By.XPATH, "//button[text()='Write it']").click()
    editor = wait(admin, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=policy-yaml]")))
    bad = ("rules:\n  - principals: {subject: \"client:etl\"}\n    actions: [credentials:issue, credentials:fly]\n"
           "    connectors: [cache]\n")
    editor.clear()
    editor.send_keys(bad)
    submit(admin, admin.find_element(By.CSS_SELECTOR, "[data-testid=policy-form] button[type=submit]"))
    error = wait(admin, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=policy-error]")))
    assert "rules.0.actions.1" in error.text and "line 3" in error.text
    assert admin.find_element(By.CSS_SELECTOR, "[data-testid=policy-yaml]").get_attribute("value") == bad  # kept as typed
    assert admin.find_elements(By.CSS_SELECTOR, ".gutter li.err")
    shot(admin, "policy-error")
    assert api(gw, "GET", "/v1/policies/ml").status_code == 404

    editor = admin.find_element(By.CSS_SELECTOR, "[data-testid=policy-yaml]")
    editor.clear()
    editor.send_keys(bad.replace(", credentials:fly", ""))
    submit(admin, admin.find_element(By.CSS_SELECTOR, "[data-testid=policy-form] button[type=submit]"))
    assert "Policy ml saved" in flash(admin)
    assert api(gw, "GET", "/v1/policies/ml").json()["document"]["rules"][0]["actions"] == ["credentials:issue"]


def test_the_explain_tester_names_the_deciding_rule(admin, gw: LoginGateway) -> None:
    if api(gw, "GET", "/v1/policies/ml").status_code == 404:
        api(gw, "PUT", "/v1/policies/ml", json={"rules": [{"principals": {"subject": "client:etl"},
                                                            "actions": ["credentials:issue"], "connectors": ["cache"]}]})
    admin.get(f"{gw.addr}/console/policies")

    def ask(connector: str) -> str:
        form = admin.find_element(By.CSS_SELECTOR, "[data-testid=explain] form")
        for name, value in (("subject", "client:etl"), ("connector", connector), ("resource", "features")):
            field = form.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)
        Select(form.find_element(By.NAME, "action")).select_by_value("credentials:issue")
        submit(admin, form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
        return wait(admin, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=decision]"))).text

    allowed = ask("cache")
    assert allowed.startswith("allow") and "ml" in allowed
    shot(admin, "policies")
    assert ask("warehouse").startswith("deny")


def test_a_revealed_value_is_shown_for_a_while_then_gone_from_the_dom(admin, gw: LoginGateway) -> None:
    cli(gw, "secret", "put", "local/ml/db", f"password={CANARY}", "user=etl")
    admin.get(f"{gw.addr}/console/secrets?backend=local&prefix=ml/")
    admin.find_element(By.LINK_TEXT, "ml/db").click()
    assert CANARY not in admin.page_source
    url = admin.current_url
    before = api(gw, "GET", "/v1/audit?subject=alice&limit=1000").json()["items"]
    admin.find_element(By.CSS_SELECTOR, "[data-testid=reveal-1]").click()
    box = wait(admin, EC.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-testid=revealed-box]"), CANARY))
    assert box and admin.current_url == url  # nothing in the address or the history
    shot(admin, "secret-revealed")
    wait(admin, lambda d: CANARY not in d.page_source, timeout=REVEAL_SECONDS + 5)
    assert not admin.find_element(By.CSS_SELECTOR, "[data-testid=revealed-box]").is_displayed()
    after = api(gw, "GET", "/v1/audit?subject=alice&limit=1000").json()["items"]
    reveals = [e for e in after[len(before):] if (e.get("details") or {}).get("reveal")]
    assert reveals and reveals[-1]["subject"] == "alice" and reveals[-1]["target"].endswith("/local/ml/db")
    admin.refresh()
    assert CANARY not in admin.page_source


def test_an_operator_sees_no_reveal_and_an_auditor_no_revoke(new_browser, gw: LoginGateway, target: str) -> None:
    keys = {role: api(gw, "POST", "/v1/admin-keys", json={"name": f"console-{role}", "role": role}).json()["token"]
            for role in ("operator", "auditor")}
    if api(gw, "GET", "/v1/secrets/local/ml/db").status_code == 404:
        cli(gw, "secret", "put", "local/ml/db", f"password={CANARY}")
    lease_id = issue(gw)["lease_id"]

    operator = new_browser()
    sign_in_with_key(operator, gw, keys["operator"])
    operator.get(f"{gw.addr}/console/secrets/local/ml/db")
    assert exists(operator, "[data-testid=versions]") and not exists(operator, "[data-reveal]")
    # The API refuses anyway: the reveal asked for by hand, with the page's own CSRF token.
    csrf = operator.find_element(By.NAME, "csrf").get_attribute("value")
    answer = operator.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/console/reveal', {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'},"
        " body: new URLSearchParams({csrf: arguments[0], backend: 'local', path: 'ml/db', version: '1'})})"
        ".then(r => r.json().then(b => done([r.status, b])));", csrf)
    assert answer[0] == 403 and answer[1]["error"]["code"] == "permission_denied"
    assert CANARY not in json.dumps(answer)

    auditor = new_browser()
    sign_in_with_key(auditor, gw, keys["auditor"])
    auditor.get(f"{gw.addr}/console/leases?connector=cache&state=active")
    assert lease_row(auditor, lease_id) is not None
    assert not exists(auditor, f"[data-testid=revoke-{lease_id}]") and not exists(auditor, "form[action='/console/leases/bulk']")
    shot(auditor, "leases-auditor")
    # and the action posted by hand is refused by the API (403), the lease untouched
    csrf = auditor.find_element(By.NAME, "csrf").get_attribute("value")
    auditor.execute_script(
        "const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
        "const i = document.createElement('input'); i.name = 'csrf'; i.value = arguments[1]; f.append(i);"
        "document.body.append(f); f.submit();", f"/console/leases/{lease_id}/revoke", csrf)
    wait(auditor, EC.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-testid=flash]"), "permission_denied"))
    assert api(gw, "GET", f"/v1/leases/{lease_id}").json()["state"] == "active"


class _Attacker(BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: object) -> None:
        pass


def test_a_cross_site_form_post_is_refused(admin, gw: LoginGateway, target: str) -> None:
    lease_id = issue(gw)["lease_id"]
    admin.get(f"{gw.addr}/console/leases")
    csrf = admin.find_element(By.NAME, "csrf").get_attribute("value")  # even knowing the token does not help
    _Attacker.page = (
        f'<!doctype html><form id="f" method="post" action="{gw.addr}/console/leases/{lease_id}/revoke">'
        f'<input name="csrf" value="{csrf}"></form><script>document.getElementById("f").submit()</script>'
    ).encode()
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        admin.get(f"http://localhost:{port}/")  # another site (localhost is not 127.0.0.1)
        wait(admin, lambda d: d.current_url.startswith(gw.addr))
        time.sleep(0.5)
    finally:
        server.shutdown()
    assert "csrf_failed" in admin.page_source  # refused before the session is even looked at
    assert api(gw, "GET", f"/v1/leases/{lease_id}").json()["state"] == "active"
    admin.get(f"{gw.addr}/console")  # the session survived (the strict cookie was only withheld)
    assert "alice" in admin.find_element(By.CSS_SELECTOR, "[data-testid=whoami]").text


def test_every_page_renders_for_an_admin(admin, gw: LoginGateway, target: str) -> None:
    for path, name in (("/console", "overview"), ("/console/runs", "runs"), ("/console/identity", "identity"), ("/console/audit", "audit"),
                       ("/console/secrets?backend=local", "secrets"), ("/console/connectors", "connectors")):
        admin.get(gw.addr + path)
        assert not exists(admin, "[data-testid=error]"), (path, admin.page_source[:2000])
        shot(admin, name)
    admin.get(gw.addr + "/console/identity")
    submit(admin, admin.find_element(By.CSS_SELECTOR, "[data-testid=check-issuer-idp]"))
    assert "usable keys" in flash(admin)


def test_signing_out_ends_the_session(new_browser, gw: LoginGateway) -> None:
    driver = new_browser()
    sign_in_with_key(driver, gw, ADMIN)
    session = next(c["value"] for c in driver.get_cookies() if c["name"] == "credgate_console")
    submit(driver, driver.find_element(By.XPATH, "//button[text()='Sign out']"))
    assert "Signed out" in flash(driver)
    assert api(gw, "GET", "/v1/auth/whoami", token=session).status_code == 401  # revoked, not only forgotten
    driver.get(f"{gw.addr}/console/leases")
    assert driver.current_url.endswith("/console/login")


def test_a_refused_idp_sign_in_is_shown_in_words(new_browser, gw: LoginGateway) -> None:
    driver = new_browser()
    driver.get(f"{gw.addr}/console/login")
    driver.find_element(By.CSS_SELECTOR, "[data-testid=idp-login]").click()
    wait(driver, EC.presence_of_element_located((By.ID, "username"))).send_keys("mallory")  # unknown at the IdP
    driver.find_element(By.ID, "sign-in").click()
    error = wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=error]")))
    assert "login_denied" in error.text and "refused the sign-in" in error.text
    assert not any(c["name"] == "credgate_console" for c in driver.get_cookies())
    driver.find_element(By.LINK_TEXT, "Sign in again").click()
    assert driver.current_url.endswith("/console/login")
