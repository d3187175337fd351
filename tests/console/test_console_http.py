"""The console's security over plain HTTP (the in-process app): headers on every page, the
session cookie, CSRF and origin checks, sign-in and sign-out, re-authorisation of a reveal,
and that no page or template loads anything from outside the gateway or runs inline script.
The browser drives the same console in tests/console/test_console_browser.py."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from gateway.console import session as sess
from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN

TEMPLATES = Path(__file__).parents[2] / "gateway" / "console" / "templates"
STATIC = Path(__file__).parents[2] / "gateway" / "console" / "static"
BASE = "http://gateway"
CANARY = "CANARY-console-http-91b2"


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"  # the console is store-agnostic: one store is enough


def browser(gateway) -> httpx.AsyncClient:
    """A client without a bearer token (the console's only credential is its cookie), sending
    the Origin a browser would."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url=BASE,
                             headers={"Origin": BASE}, follow_redirects=False)


async def sign_in(client: httpx.AsyncClient, key: str = ADMIN_TOKEN) -> httpx.Response:
    page = await client.get("/console/login")
    pre = re.search(r'name="pre" value="([^"]+)"', page.text).group(1)
    return await client.post(sess.KEY_SIGN_IN, data={"pre": pre, "key": key})


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


async def test_every_console_response_carries_the_security_headers(gateway) -> None:
    async with browser(gateway) as c:
        r = await sign_in(c)
        assert r.status_code == 303 and r.headers["location"] == "/console"
        for path in ("/console", "/console/login", "/console/leases", "/console/static/console.js", "/console/nope"):
            r = await c.get(path)
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, path
            assert "unsafe-inline" not in csp and r.headers["x-frame-options"] == "DENY", path
            assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff", path
        api = await gateway.client.get("/v1/leases")
        assert "content-security-policy" not in api.headers  # the API's own answers are untouched


async def test_the_session_cookie_is_httponly_strict_and_never_the_admin_key(gateway) -> None:
    async with browser(gateway) as c:
        r = await sign_in(c)
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(sess.COOKIE + "="))
        low = cookie.lower()
        assert "httponly" in low and "samesite=strict" in low and "path=/console" in low and "max-age=3600" in low
        token = cookie.split(";")[0].split("=", 1)[1]
        assert ADMIN_TOKEN not in cookie and token.count(".") == 2  # a gateway token, not the key
        me = await gateway.as_token(token).get("/v1/auth/whoami")
        assert me.json()["subject"] == "admin_key:bootstrap" and me.json()["kind"] == "admin_key"
    events = (await gateway.client.get("/v1/audit", params={"action": "auth:console"})).json()["items"]
    assert events and events[-1]["subject"] == "admin_key:bootstrap" and events[-1]["decision"] == "allow"
    assert ADMIN_TOKEN not in str(events)


async def test_a_wrong_key_or_a_forged_sign_in_form_is_refused_in_words(gateway) -> None:
    async with browser(gateway) as c:
        r = await sign_in(c, "cgt_not-a-key-" + "x" * 30)
        assert r.status_code == 303 and r.headers["location"] == "/console/login"
        assert sess.COOKIE + "=" not in "".join(r.headers.get_list("set-cookie")).replace(sess.COOKIE + '=""', "")
        page = await c.get("/console/login")
        assert "invalid_token" in page.text and "not valid" in page.text
        # no pre-session cookie (a form posted from elsewhere): refused
        async with browser(gateway) as other:
            r = await other.post(sess.KEY_SIGN_IN, data={"pre": "guess", "key": ADMIN_TOKEN})
            assert r.status_code == 303 and sess.COOKIE + "=ey" not in "".join(r.headers.get_list("set-cookie"))


async def test_state_changing_posts_need_the_csrf_token_and_the_same_origin(gateway) -> None:
    async with browser(gateway) as c:
        await sign_in(c)
        page = await c.get("/console/policies")
        token = csrf_of(page.text)
        url = "/console/policies/p1/delete"
        await gateway.client.put("/v1/policies/p1", json={"rules": [{"principals": {"subject": "x"}, "actions": ["leases:read"]}]})
        for data, headers in (
            ({"x": "1"}, {}),  # no token
            ({"csrf": "0" * 64}, {}),  # a wrong one
            ({"csrf": token}, {"Origin": "http://evil.example"}),  # the right one, from another origin
            ({"csrf": token}, {"Sec-Fetch-Site": "cross-site"}),
            ({"csrf": token}, {"Origin": "null"}),
        ):
            r = await c.post(url, data=data, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed", (data, headers)
            assert (await gateway.client.get("/v1/policies/p1")).status_code == 200
        r = await c.post(url, data={"csrf": token})
        assert r.status_code == 303
        assert (await gateway.client.get("/v1/policies/p1")).status_code == 404
        page = await c.get("/console/policies")
        assert "Policy p1 deleted." in page.text


async def test_a_token_of_another_session_is_no_csrf_token(gateway) -> None:
    async with browser(gateway) as a, browser(gateway) as b:
        await sign_in(a)
        await sign_in(b)
        theirs = csrf_of((await b.get("/console/policies")).text)
        r = await a.post("/console/leases/bulk", data={"csrf": theirs, "connector": "x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"


async def test_signing_out_revokes_the_session_and_revoking_the_key_ends_it(gateway) -> None:
    async with browser(gateway) as c:
        await sign_in(c)
        token = c.cookies[sess.COOKIE]
        r = await c.post("/console/logout", data={"csrf": csrf_of((await c.get("/console")).text)})
        assert r.status_code == 303 and r.headers["location"] == "/console/login"
        assert (await gateway.as_token(token).get("/v1/auth/whoami")).status_code == 401

    created = (await gateway.client.post("/v1/admin-keys", json={"name": "temp", "role": "admin"})).json()
    async with browser(gateway) as c:
        await sign_in(c, created["token"])
        assert (await c.get("/console")).status_code == 200
        await gateway.client.post(f"/v1/admin-keys/{created['id']}/revoke")
        r = await c.get("/console")
        assert r.status_code == 303 and r.headers["location"] == "/console/login"
        assert "admin_key_revoked" in (await c.get("/console/login")).text


async def test_a_reveal_is_post_only_no_store_audited_and_needs_a_recent_sign_in(gateway, monkeypatch) -> None:
    await gateway.client.put("/v1/secrets/local/ml/db", json={"data": {"password": CANARY}})
    async with browser(gateway) as c:
        await sign_in(c)
        page = await c.get("/console/secrets/local/ml/db")
        assert page.status_code == 200 and CANARY not in page.text and "data-reveal" in page.text
        token = csrf_of(page.text)
        assert (await c.get("/console/reveal")).status_code in (404, 405)
        r = await c.post("/console/reveal", data={"csrf": token, "backend": "local", "path": "ml/db", "version": "1"})
        assert r.status_code == 200 and r.json()["data"] == {"password": CANARY} and r.headers["cache-control"] == "no-store"
        bad = await c.post("/console/reveal", data={"csrf": "x", "backend": "local", "path": "ml/db"})
        assert bad.status_code == 403 and CANARY not in bad.text
        # an old sign-in must sign in again before a value is shown
        age = sess.token_age(c.cookies[sess.COOKIE])
        assert age is not None and 0 <= age < 60
        monkeypatch.setattr(sess, "token_age", lambda token, real=sess.token_age: real(token) + 3600)
        r = await c.post("/console/reveal", data={"csrf": token, "backend": "local", "path": "ml/db", "version": "1"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "reauth_required" and CANARY not in r.text
    reveals = [e for e in (await gateway.client.get("/v1/audit", params={"limit": 1000})).json()["items"]
               if (e.get("details") or {}).get("reveal") is True]
    assert len(reveals) == 1 and reveals[0]["subject"] == "admin_key:bootstrap"


async def test_api_errors_are_shown_with_their_code_never_a_500(gateway) -> None:
    async with browser(gateway) as c:
        await sign_in(c)
        for path, code in (("/console/secrets/nope/x", "backend_not_found"), ("/console/connectors/nope", "connector_not_found"),
                           ("/console/leases?state=bogus", "invalid_filter"), ("/console/audit?since=yesterday", "validation_failed")):
            r = await c.get(path)
            assert 400 <= r.status_code < 500 and code in r.text, (path, r.status_code, r.text[-800:])
        token = csrf_of((await c.get("/console")).text)
        r = await c.post("/console/connectors", data={"csrf": token, "type": "redis", "auth_method": "password", "name": "c1",
                                                      "secret": "local/none", "resources": "x"})
        assert r.status_code == 303
        shown = (await c.get("/console/connectors")).text
        assert 'class="flash error"' in shown and "<code>" in shown


async def test_the_console_can_be_turned_off(settings_factory) -> None:
    app = create_app(settings_factory(console=False))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
            assert (await c.get("/console")).status_code == 404
            assert (await c.get("/console/static/console.js")).status_code == 404


def test_no_template_loads_from_outside_or_runs_inline_script() -> None:
    for path in [*TEMPLATES.glob("*.html"), *STATIC.glob("*")]:
        text = path.read_text()
        assert not re.search(r"""(src|href|action)=["']?(https?:)?//""", text), path  # nothing from elsewhere
        assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", text), path
        if path.suffix == ".html":
            assert not re.search(r"<script(?![^>]*\ssrc=)", text), path  # every script is a file of the gateway
            assert not re.search(r"\son[a-z]+\s*=", text), path  # no inline handlers
            assert not re.search(r"\sstyle\s*=|<style", text), path  # no inline style (style-src 'self')
            assert "javascript:" not in text, path
            title = re.search(r"\{% block title %\}(.*?)\{% endblock %\}", text, re.S)
            assert title is None or "<" not in title.group(1), path  # a title is text, one line


async def test_the_runs_page_lists_a_run_with_its_leases_and_revokes_both(gateway) -> None:
    c0 = gateway.client
    await c0.put("/v1/secrets/local/vendor/key", json={"data": {"api_key": CANARY}})
    r = await c0.put("/v1/connectors/vendor", json={"type": "static", "auth_method": "static",
                                                     "secret": "local/vendor/key", "resources": ["default"]})
    assert r.status_code in (200, 201), r.text
    run = (await c0.post("/v1/runs/train-42/token", json={"connectors": ["vendor"], "resources": ["default"]})).json()
    issued = await gateway.as_token(run["token"]).post("/v1/runs/train-42/credentials",
                                                       json={"connector": "vendor", "resource": "default", "wrap": True})
    assert issued.status_code == 200, issued.text
    async with browser(gateway) as c:
        await sign_in(c)
        page = await c.get("/console/runs")
        assert "train-42" in page.text and "1 active" in page.text and "revoke-run-train-42" in page.text
        leases = await c.get("/console/leases", params={"run": "train-42"})
        assert issued.json()["lease_id"] in leases.text and CANARY not in leases.text
        r = await c.post("/console/runs/train-42/revoke", data={"csrf": csrf_of(page.text)})
        assert r.status_code == 303 and r.headers["location"] == "/console/runs"
        shown = (await c.get("/console/runs")).text
        assert "Run train-42 revoked" in shown and "1 leases revoked" in shown and "revoke-run-train-42" not in shown
    assert (await gateway.as_token(run["token"]).get("/v1/auth/whoami")).status_code == 401
    assert (await c0.get(f"/v1/leases/{issued.json()['lease_id']}")).json()["state"] == "revoked"


async def test_the_menu_offers_only_what_the_role_may_use(gateway) -> None:
    created = (await gateway.client.post("/v1/admin-keys", json={"name": "op", "role": "operator"})).json()
    async with browser(gateway) as c:
        await sign_in(c, created["token"])
        nav = re.search(r"<nav>(.*?)</nav>", (await c.get("/console")).text, re.S).group(1)
        assert "/console/leases" in nav and "/console/secrets" in nav
        assert "/console/policies" not in nav and "/console/audit" not in nav and "/console/identity" not in nav
        r = await c.get("/console/audit")  # and the API refuses it anyway
        assert r.status_code == 403 and "permission_denied" in r.text


async def test_a_crafted_secret_link_cannot_turn_into_a_reveal(gateway) -> None:
    await gateway.client.put("/v1/secrets/local/ml/db", json={"data": {"password": CANARY}})
    async with browser(gateway) as c:
        await sign_in(c)
        for crafted in ("/console/secrets/local/ml/db%3Freveal%3Dtrue", "/console/secrets/local/ml/db%23x%3Freveal=true"):
            r = await c.get(crafted)
            assert r.status_code in (400, 404) and CANARY not in r.text, (crafted, r.status_code)
    events = (await gateway.client.get("/v1/audit", params={"limit": 1000})).json()["items"]
    assert not [e for e in events if (e.get("details") or {}).get("reveal") is True]


async def test_a_backend_that_is_down_is_a_503_page_with_retry_after(gateway) -> None:
    r = await gateway.client.put("/v1/backends/away", json={"type": "vault", "config": {
        "url": "http://127.0.0.1:9", "timeout": 1, "auth": {"token": {"token": "x"}}}})
    assert r.status_code in (200, 201), r.text
    async with browser(gateway) as c:
        await sign_in(c)
        page = await c.get("/console/secrets", params={"backend": "away"})
        assert page.status_code == 503 and page.headers["retry-after"] and "backend_unavailable" in page.text


async def test_the_verify_button_says_whether_the_chain_holds(gateway) -> None:
    from sqlalchemy import update

    from gateway.store.models import AuditEventRow

    async with browser(gateway) as c:
        await sign_in(c)
        token = csrf_of((await c.get("/console")).text)
        await c.post("/console/audit/verify", data={"csrf": token, "back": "/console"})
        assert "The audit chain verified" in (await c.get("/console")).text
        async with gateway.runtime.store.write() as s:  # someone edits the trail behind the gateway's back
            await s.execute(update(AuditEventRow).where(AuditEventRow.seq == 2).values(outcome="403 tampered"))
        await c.post("/console/audit/verify", data={"csrf": token, "full": "1"})
        shown = (await c.get("/console/audit")).text
        assert "did NOT verify" in shown and "audit_chain_broken" in shown and "#2" in shown


async def test_no_other_site_can_sign_anyone_out(gateway) -> None:
    async with browser(gateway) as c:
        await sign_in(c)
        token = c.cookies[sess.COOKIE]
        r = await c.post("/console/logout", data={"csrf": "x"}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "set-cookie" not in r.headers
        assert (await gateway.as_token(token).get("/v1/auth/whoami")).status_code == 200


async def test_a_new_admin_key_or_client_secret_is_shown_once_and_works(gateway) -> None:
    async with browser(gateway) as c:
        await sign_in(c)
        token = csrf_of((await c.get("/console/identity")).text)
        page = await c.post("/console/identity/admin-keys", data={"csrf": token, "name": "ops-2", "role": "auditor"})
        assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
        key = re.search(r'data-testid="created-secret">(cgt_[^<]+)<', page.text).group(1)
        assert key not in (await c.get("/console/identity")).text  # never again
        assert (await gateway.as_token(key).get("/v1/auth/whoami")).json()["roles"] == ["auditor"]
        page = await c.post("/console/identity/clients", data={"csrf": token, "client_id": "etl", "roles": "operator",
                                                               "token_ttl_seconds": "600"})
        secret = re.search(r'data-testid="created-secret">([^<]+)<', page.text).group(1)
        r = await gateway.client.post("/v1/auth/token", data={"grant_type": "client_credentials", "client_id": "etl",
                                                              "client_secret": secret}, headers={"Authorization": ""})
        assert r.status_code == 200, r.text
        events = (await gateway.client.get("/v1/audit", params={"limit": 1000})).json()["items"]
        assert key not in str(events) and secret not in str(events)


async def test_the_audit_page_shows_the_newest_first_and_pages_back(gateway) -> None:
    for i in range(60):  # more than a page (50)
        await gateway.client.put(f"/v1/secrets/local/many/{i}", json={"data": {"k": "v"}})
    async with browser(gateway) as c:
        await sign_in(c)
        first = (await c.get("/console/audit", params={"action": "secrets:write"})).text
        seqs = [int(x) for x in re.findall(r"<tr><td>(\d+)</td>", first)]
        assert len(seqs) == 50 and seqs == sorted(seqs, reverse=True)
        older = re.search(r'href="([^"]+)" data-testid="next-page">Older events', first).group(1).replace("&amp;", "&")
        rest = [int(x) for x in re.findall(r"<tr><td>(\d+)</td>", (await c.get("/console/audit" + older)).text)]
        assert rest and max(rest) < min(seqs) and len(set(rest + seqs)) == len(rest) + len(seqs) >= 60
        oldest = (await c.get("/console/audit", params={"action": "secrets:write", "order": "asc"})).text
        asc = [int(x) for x in re.findall(r"<tr><td>(\d+)</td>", oldest)]
        assert asc == sorted(asc) and asc[0] == min(rest)  # the oldest one, first


@pytest.fixture
async def impatient_gateway(settings_factory):
    """A gateway that gives up on a target after a second (not the default 10-30 s)."""
    from tests.conftest import Gateway

    app = create_app(settings_factory(target_timeout_seconds=2, target_pool_wait_seconds=1))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            yield Gateway(app, client)


async def test_a_revocation_the_target_refuses_is_shown_as_stuck_with_its_error(impatient_gateway, redis_server: str) -> None:
    from urllib.parse import urlsplit

    from tests.services.tcpproxy import TcpProxy

    gateway = impatient_gateway

    target = urlsplit(redis_server)
    proxy = TcpProxy((target.hostname, target.port))
    try:
        c0 = gateway.client
        await c0.put("/v1/secrets/local/targets/cache",
                     json={"data": {"url": f"redis://127.0.0.1:{proxy.address[1]}{target.path or '/0'}"}})
        r = await c0.put("/v1/connectors/cache", json={"type": "redis", "auth_method": "password",
                                                        "secret": "local/targets/cache", "resources": ["features"],
                                                        "config": {"categories": ["+@read"]}})
        assert r.status_code in (200, 201), r.text
        lease_id = (await c0.post("/v1/credentials", json={"connector": "cache", "resource": "features"})).json()["lease_id"]
        proxy.mode = "refuse"  # the target goes away before the revocation
        async with browser(gateway) as c:
            await sign_in(c)
            page = await c.get("/console/leases", params={"state": "active"})
            r = await c.post(f"/console/leases/{lease_id}/revoke", data={"csrf": csrf_of(page.text)})
            assert r.status_code == 303
            shown = (await c.get("/console/leases", params={"state": "revoking"})).text
            assert f"Lease {lease_id} is revoking" in shown and "keeps trying" in shown
            row = re.search(rf'<tr data-lease="{lease_id}">(.*?)</tr>', shown, re.S).group(1)
            assert "1 attempts" in row and 'class="bad"' in row
        proxy.mode = "pass"
        await gateway.runtime.credentials.revoke([lease_id])
        assert (await c0.get(f"/v1/leases/{lease_id}")).json()["state"] == "revoked"
    finally:
        proxy.stop()


async def test_secrets_are_written_and_deleted_from_the_console_and_their_values_never_shown(gateway) -> None:
    async with browser(gateway) as c:
        await sign_in(c)
        token = csrf_of((await c.get("/console/secrets", params={"backend": "local"})).text)
        r = await c.post("/console/secrets", data={"csrf": token, "backend": "local", "path": "ml/new", "cas": "0",
                                                   "data": f"user=etl\npassword={CANARY}=x"})
        assert r.status_code == 303 and r.headers["location"] == "/console/secrets/local/ml/new"
        page = (await c.get(r.headers["location"])).text
        assert "version 1 written" in page and CANARY not in page
        assert (await gateway.client.get("/v1/secrets/local/ml/new?reveal=true")).json()["data"] == {
            "user": "etl", "password": f"{CANARY}=x"}
        # the same page posted twice: the second write lost the race (cas) and says so
        for expected in ("version 2 written", "cas_mismatch"):
            r = await c.post("/console/secrets", data={"csrf": token, "backend": "local", "path": "ml/new", "cas": "1",
                                                       "data": "user=etl2"})
            shown = (await c.get(r.headers["location"])).text
            assert expected in shown and CANARY not in shown
        r = await c.post("/console/secrets", data={"csrf": token, "backend": "local", "path": "ml/new", "data": "novalue"})
        assert "invalid_form" in (await c.get(r.headers["location"])).text
        r = await c.post("/console/secrets/delete", data={"csrf": token, "backend": "local", "path": "ml/new"})
        assert "deleted" in (await c.get(r.headers["location"])).text
        assert (await gateway.client.get("/v1/secrets/local/ml/new")).status_code in (404, 410)


async def test_a_connector_with_leases_is_deleted_only_with_them_and_the_builtin_backend_is_kept(gateway) -> None:
    c0 = gateway.client
    await c0.put("/v1/secrets/local/vendor/key", json={"data": {"api_key": CANARY}})
    await c0.put("/v1/connectors/vendor", json={"type": "static", "auth_method": "static",
                                               "secret": "local/vendor/key", "resources": ["default"]})
    lease = (await c0.post("/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})).json()
    async with browser(gateway) as c:
        await sign_in(c)
        page = await c.get("/console/connectors/vendor")
        token = csrf_of(page.text)
        r = await c.post("/console/connectors/vendor/delete", data={"csrf": token, "back": "/console/connectors/vendor"})
        assert "connector_has_leases" in (await c.get(r.headers["location"])).text
        r = await c.post("/console/connectors/vendor/delete", data={"csrf": token, "revoke_leases": "true"})
        assert "Connector vendor deleted" in (await c.get(r.headers["location"])).text
        assert (await c0.get(f"/v1/leases/{lease['lease_id']}")).json()["state"] == "revoked"
        r = await c.post("/console/backends/local/delete", data={"csrf": token})
        assert "backend_builtin" in (await c.get(r.headers["location"])).text  # the store itself stays


async def test_adding_never_overwrites_and_a_blank_name_is_refused_in_words(gateway) -> None:
    async with browser(gateway) as c:
        await sign_in(c)
        token = csrf_of((await c.get("/console/backends")).text)
        for data, code in (({"type": "local", "name": ""}, "invalid_form"), ({"type": "local", "name": "local"}, "backend_exists"),
                           ({"type": "nope", "name": "x"}, "unknown_backend_type")):
            r = await c.post("/console/backends", data={"csrf": token, **data})
            assert code in (await c.get(r.headers["location"])).text, data
        r = await c.post("/console/secrets", data={"csrf": token, "backend": "local", "path": "", "data": "k=v"})
        assert "invalid_form" in (await c.get(r.headers["location"])).text
