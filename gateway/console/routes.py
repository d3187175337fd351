"""The console's pages (``GET /console/...``) and actions (``POST /console/...``).

Every page asks the API who the session is (``GET /v1/auth/whoami``: subject, roles and the
actions any rule grants, ``may``) and offers only the buttons those actions allow; every
action is an API call the API authorises again. An action answers 303 back to its page with
its result or the API's error (message and code) shown there (post/redirect/get: a reload
repeats nothing). The one exception is the reveal, answered to the page's script as JSON."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import yaml
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from gateway.console import pages
from gateway.console import session as sess
from gateway.console.api import Api, ApiError
from gateway.console.forms import Form, read_form, read_schema_form, schema_fields
from gateway.errors import CredgateError

router = APIRouter(include_in_schema=False)

STATES = ("pending", "active", "revoking", "revoked", "expired")
ROLES = ("admin", "operator", "auditor")
PAGE = 50


class SignInRequired(Exception):
    def __init__(self, text: str = "", code: str | None = None) -> None:
        self.text, self.code = text, code


class Session:
    """One console request's signed-in caller: its API client, who it is, what it may do."""

    def __init__(self, request: Request, token: str, me: dict[str, Any], api: Api) -> None:
        self.request, self.token, self.me, self.api = request, token, me, api
        self.csrf = sess.csrf_token(token)

    def may(self, *actions: str) -> bool:
        return any(a in self.me.get("may", ()) for a in actions)

    def page(self, template: str, active: str, status: int = 200, **context: Any) -> Response:
        url = self.request.url
        context.setdefault("request_path", url.path + (f"?{url.query}" if url.query else ""))
        resp = pages.render(template, status=status, me=self.me, may=self.may, csrf=self.csrf, active=active,
                            flash=sess.take_flash(self.request), **context)
        sess.drop_flash(self.request, resp)
        return resp


async def _session(request: Request) -> Session:
    token = request.cookies.get(sess.COOKIE)
    if not token:
        raise SignInRequired()
    api = Api(request, token)
    try:
        me = await api.get("/v1/auth/whoami")
    except ApiError as exc:
        await api.__aexit__()
        if exc.status == 401:
            raise SignInRequired(f"Your session has ended: {exc.message}", exc.code) from None
        raise
    return Session(request, token, me, api)


def _to_sign_in(request: Request, exc: SignInRequired) -> Response:
    resp = RedirectResponse("/console/login", status_code=303)
    if sess.COOKIE in request.cookies:  # a session that ended; a request without one clears nothing
        sess.clear_session(resp, request)
    if exc.text:
        sess.set_flash(resp, request, "error", exc.text, exc.code)
    return resp


def page(active: str) -> Callable[[Callable[..., Awaitable[Response]]], Callable[..., Awaitable[Response]]]:
    """A GET page: signed in (else to the sign-in form); an API refusal renders as the page's error."""

    def wrap(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        async def run(request: Request) -> Response:
            kwargs = dict(request.path_params)
            try:
                s = await _session(request)
            except SignInRequired as exc:
                return _to_sign_in(request, exc)
            except ApiError as exc:
                return _retry_after(pages.render("error.html", status=_status(exc), error=exc, me=None), exc)
            async with s.api:
                try:
                    return await fn(s, **kwargs)
                except SignInRequired as exc:
                    return _to_sign_in(request, exc)
                except (ApiError, CredgateError) as exc:
                    err = exc if isinstance(exc, ApiError) else ApiError(exc.status, exc.code, exc.message)
                    if err.status == 401:
                        return _to_sign_in(request, SignInRequired(f"Your session has ended: {err.message}", err.code))
                    return _retry_after(s.page("error.html", active, status=_status(err), error=err), err)

        run.__name__ = run.__qualname__ = fn.__name__  # FastAPI passes ``request`` only; path params are read from it
        return run

    return wrap


def _retry_after(resp: Response, err: ApiError) -> Response:
    if err.status == 503:  # a fault the gateway recovers from by itself: say when to come back
        resp.headers["Retry-After"] = err.retry_after or "5"
    return resp


def _status(err: ApiError) -> int:
    return err.status if 400 <= err.status < 600 else 502


def _back(form: Form, default: str) -> str:
    back = form.text("back")
    return back if back.startswith("/console") and "//" not in back and "\\" not in back else default


def action(default_back: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Response]]]:
    """A POST action: same-origin and CSRF-checked, then ``fn(session, form, **path)``; its
    result (a sentence, or a Response to send as it is) or its error is shown on the page it
    came from."""

    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Response]]:
        async def run(request: Request) -> Response:
            kwargs = dict(request.path_params)
            try:
                if not sess.same_origin(request):  # before anything else: a forged post learns nothing
                    sess.check_csrf(request, None, None)
                form = await read_form(request)
                s = await _session(request)
            except SignInRequired as exc:
                return _to_sign_in(request, exc)
            except (ApiError, CredgateError) as exc:
                return _refused(exc.status, exc.code, exc.message)
            back = _back(form, default_back.format(**kwargs))
            async with s.api:
                try:
                    sess.check_csrf(request, form.one("csrf"), s.csrf)
                    result = await fn(s, form, **kwargs)
                except CredgateError as exc:
                    if exc.code == "csrf_failed":
                        return _refused(403, exc.code, exc.message)
                    result = ApiError(exc.status, exc.code, exc.message)
                except ApiError as exc:
                    result = exc
            if isinstance(result, Response):
                return result
            resp = RedirectResponse(back, status_code=303)
            if isinstance(result, ApiError):
                if result.status == 401:
                    return _to_sign_in(request, SignInRequired(f"Your session has ended: {result.message}", result.code))
                details = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in (result.details or [])[:3])
                sess.set_flash(resp, request, "error", result.message + (f" [{details}]" if details and
                               details not in result.message else ""), result.code)
            elif result:
                sess.set_flash(resp, request, "ok", str(result))
            return resp

        run.__name__ = run.__qualname__ = fn.__name__  # FastAPI passes ``request`` only; path params are read from it
        return run

    return wrap


def _q(value: str) -> str:
    return quote(value, safe="")


def _secret(backend: str, path: str) -> str:
    """``BACKEND/PATH`` quoted for a URL: the path's '/' kept, nothing else of it read as URL syntax
    (a crafted ``?reveal=true`` in a path stays part of the path)."""
    return f"{_q(backend)}/{quote(path, safe='/')}"


def _refused(status: int, code: str, message: str) -> JSONResponse:
    """A refusal answered before any page (to a forged post, or to the reveal's script)."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


# --- sign-in ---------------------------------------------------------------------------


@router.get("/console/login")
async def login(request: Request) -> Response:
    pre = sess.new_pre_token()
    idp = None
    async with Api(request, None) as api:
        try:
            idp = await api.get("/v1/auth/login-config")
        except ApiError:
            idp = None
    resp = pages.render("login.html", pre=pre, idp=idp, me=None, flash=sess.take_flash(request))
    sess.drop_flash(request, resp)
    resp.set_cookie(sess.PRE_COOKIE, pre, max_age=600, path=sess.KEY_SIGN_IN, httponly=True, samesite="strict",
                    secure=sess.secure(request))
    return resp


@router.post("/console/logout")
async def logout(request: Request) -> Response:
    form = await read_form(request)
    token = request.cookies.get(sess.COOKIE)
    resp = RedirectResponse("/console/login", status_code=303)
    if not sess.same_origin(request):  # no other site signs anyone out
        return _refused(403, "csrf_failed", "This request came from another site.")
    if token:
        try:
            sess.check_csrf(request, form.one("csrf"), sess.csrf_token(token))
        except CredgateError as exc:
            return _refused(403, exc.code, exc.message)
        async with Api(request, token) as api:
            try:  # RFC 7009 as the token's own bearer: the session can't be replayed after this
                await api.call("POST", "/v1/auth/revoke", content=f"token={_q(token)}".encode(),
                               content_type="application/x-www-form-urlencoded")
            except ApiError:
                pass
    sess.clear_session(resp, request)
    sess.set_flash(resp, request, "ok", "Signed out.")
    return resp


# --- overview --------------------------------------------------------------------------


async def _maybe(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except ApiError as exc:
        return exc


@router.get("/console")
@page("overview")
async def overview(s: Session) -> Response:
    api = s.api
    ready = await api.readiness()
    backends = await _maybe(api.get("/v1/backends")) if s.may("backends:read") else None
    keys = await _maybe(api.get("/v1/keys/status")) if s.may("keys:read") else None
    jwks = await _maybe(api.get("/v1/jwks"))
    summary = await _maybe(api.get("/v1/leases/summary")) if s.may("leases:read") else None
    issuance = await _maybe(api.get("/v1/leases/issuance", hours=24)) if s.may("leases:read") else None
    chart = _chart(issuance["buckets"]) if isinstance(issuance, dict) else None
    return s.page("overview.html", "overview", ready=ready, backends=backends, keys=keys, jwks=jwks,
                  summary=summary, chart=chart, issuance=issuance)


def _chart(buckets: list[dict[str, Any]]) -> dict[str, Any]:
    """Bars for an inline SVG (attributes only: no inline style or script under the CSP)."""
    width, height, gap = 720, 160, 2
    top = max([b["count"] for b in buckets] + [1])
    bar = (width - gap * len(buckets)) / max(len(buckets), 1)
    bars = []
    for i, b in enumerate(buckets):
        h = round(b["count"] / top * (height - 20), 1)
        bars.append({"x": round(i * (bar + gap), 1), "y": round(height - h, 1), "w": round(bar, 1), "h": h,
                     "label": f"{pages.when(b['start'])}: {b['count']}", "count": b["count"]})
    return {"width": width, "height": height, "bars": bars, "top": top, "total": sum(b["count"] for b in buckets),
            "first": buckets[0]["start"] if buckets else None, "last": buckets[-1]["start"] if buckets else None}


@router.post("/console/audit/verify")
@action("/console/audit")
async def audit_verify(s: Session, form: Form) -> str:
    out = await s.api.get("/v1/audit/verify", full="true" if form.one("full") else None)
    walked = f"{out['walked']:,} events walked from #{out['from_seq']}" + (
        " (after the last checkpoint verified clean)" if out.get("incremental") else "")
    if out.get("ok"):
        return (f"The audit chain verified: {out['events']:,} events, {out['checkpoints']:,} checkpoints; {walked}; "
                "no problem found.")
    raise ApiError(200, "audit_chain_broken",
                   f"The audit chain did NOT verify: {out.get('problem') or 'a break'} at event #{out.get('first_bad_seq')}"
                   f" ({len(out.get('problems') or [])} problems found); {walked}.")


# --- backends --------------------------------------------------------------------------


async def _new_name(s: Session, form: Form, collection: str, what: str) -> str:
    """The form's ``name`` for something to add: given, and not the name of one that exists (the
    API's PUT would replace it; the console adds, it does not overwrite by surprise)."""
    name = form.text("name")
    if not name:
        raise ApiError(400, "invalid_form", f"Name the {what}.")
    try:
        await s.api.get(f"{collection}/{_q(name)}")
    except ApiError as exc:
        if exc.status == 404:
            return name
        raise
    raise ApiError(409, f"{what}_exists", f"A {what} named {name} exists already; choose another name.")


def _type_of(types: list[dict[str, Any]], name: str | None) -> dict[str, Any] | None:
    return next((t for t in types if t.get("type") == name and t.get("available")), None)


@router.get("/console/backends")
@page("backends")
async def backends(s: Session) -> Response:
    items = (await s.api.get("/v1/backends"))["items"]
    types, chosen, fields = [], None, []
    if s.may("backends:manage"):
        types = (await s.api.get("/v1/backend-types"))["items"]
        chosen = _type_of(types, s.request.query_params.get("type"))
        fields = schema_fields(chosen["config_schema"]) if chosen else []
    return s.page("backends.html", "backends", items=items, types=types, chosen=chosen, fields=fields)


@router.post("/console/backends")
@action("/console/backends")
async def backend_add(s: Session, form: Form) -> str:
    types = (await s.api.get("/v1/backend-types"))["items"]
    chosen = _type_of(types, form.text("type"))
    if chosen is None:
        raise ApiError(400, "unknown_backend_type", "Choose an available backend type.")
    name = await _new_name(s, form, "/v1/backends", "backend")
    config = read_schema_form(form, schema_fields(chosen["config_schema"]), "config")
    await s.api.put(f"/v1/backends/{_q(name)}", {"type": chosen["type"], "config": config})
    return f"Backend {name} ({chosen['type']}) saved."


@router.post("/console/backends/{name}/check")
@action("/console/backends")
async def backend_check(s: Session, form: Form, name: str) -> str:
    out = await s.api.post(f"/v1/backends/{_q(name)}/check")
    report = out.get("last_check") or out.get("health", {}).get("last_check") or out
    ok = report.get("ok")
    text = f"Backend {name}: {'healthy' if ok else 'NOT healthy'}: {report.get('message', '')}"
    if not ok and report.get("problem"):
        raise ApiError(200, str(report["problem"]), text)
    return text


@router.post("/console/backends/{name}/delete")
@action("/console/backends")
async def backend_delete(s: Session, form: Form, name: str) -> str:
    await s.api.delete(f"/v1/backends/{_q(name)}")
    return f"Backend {name} removed (a vendor store's secrets stay in it)."


# --- secrets ---------------------------------------------------------------------------


@router.get("/console/secrets")
@page("secrets")
async def secrets(s: Session) -> Response:
    q = s.request.query_params
    mounts = [b["name"] for b in (await s.api.get("/v1/backends"))["items"]] if s.may("backends:read") else []
    backend = q.get("backend") or (mounts[0] if mounts else "")
    prefix = q.get("prefix", "")
    listing = None
    if backend:
        listing = await s.api.get(f"/v1/secrets/{_q(backend)}", prefix=prefix, limit=PAGE, page_token=q.get("page_token"))
    return s.page("secrets.html", "secrets", mounts=mounts, backend=backend, prefix=prefix, listing=listing)


@router.get("/console/secrets/{backend}/{path:path}")
@page("secrets")
async def secret(s: Session, backend: str, path: str) -> Response:
    meta = await s.api.get(f"/v1/secrets/{_secret(backend, path)}")
    return s.page("secret.html", "secrets", meta=meta, backend=backend, path=path,
                  reveal_seconds=None)


def _data(form: Form) -> dict[str, str]:
    """``KEY=VALUE`` lines (a value may hold '='; a line without one is an error naming its key)."""
    data: dict[str, str] = {}
    for n, line in enumerate((form.one("data") or "").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ApiError(400, "invalid_form", f"Line {n} is not KEY=VALUE.")
        data[key.strip()] = value
    if not data:
        raise ApiError(400, "invalid_form", "Give at least one KEY=VALUE line.")
    return data


@router.post("/console/secrets")
@action("/console/secrets")
async def secret_write(s: Session, form: Form) -> Any:
    """A new version (or a new secret): its values travel in this POST's body only and are never
    shown back; with ``cas`` (the version the page showed) a write that lost a race is refused."""
    backend, path = form.text("backend"), form.text("path")
    if not backend or not path:
        raise ApiError(400, "invalid_form", "Give the secret's backend and path.")
    body: dict[str, Any] = {"data": _data(form)}
    if form.text("cas").isdigit():
        body["cas"] = int(form.text("cas"))
    meta = await s.api.put(f"/v1/secrets/{_secret(backend, path)}", body)
    done = RedirectResponse(f"/console/secrets/{_secret(backend, path)}", status_code=303)
    sess.set_flash(done, s.request, "ok", f"{backend}/{path}: version {meta['current_version']} written "
                                          f"(keys {', '.join(meta['keys'])}).")
    return done


@router.post("/console/secrets/delete")
@action("/console/secrets")
async def secret_delete(s: Session, form: Form) -> str:
    backend, path = form.text("backend"), form.text("path")
    await s.api.delete(f"/v1/secrets/{_secret(backend, path)}")
    return f"{backend}/{path} deleted (soft: its versions are kept and it can be restored)."


@router.post("/console/reveal")
async def reveal(request: Request) -> Response:
    """A secret's values for the page's script to show for a while: POST only (never a URL
    in the history), re-authorised by the API at that moment (``secrets:reveal``), audited
    there fail-closed, ``Cache-Control: no-store``; refused when the sign-in is older than
    ``CREDGATE_CONSOLE_REAUTH_SECONDS`` (401 ``reauth_required``: sign in again)."""

    try:
        form = await read_form(request)
        s = await _session(request)
    except SignInRequired as exc:
        return _refused(401, exc.code or "signed_out", exc.text or "Sign in again.")
    except (ApiError, CredgateError) as exc:
        return _refused(exc.status, exc.code, exc.message)
    settings = request.app.state.runtime.settings
    async with s.api:
        try:
            sess.check_csrf(request, form.one("csrf"), s.csrf)
        except CredgateError as exc:
            return _refused(403, exc.code, exc.message)
        age = sess.token_age(s.token)
        if age is None or age > settings.console_reauth_seconds:
            return _refused(401, "reauth_required",
                          "Revealing a value needs a recent sign-in: sign out and sign in again, then reveal.")
        backend, path, version = form.text("backend"), form.text("path"), form.text("version")
        try:
            out = await s.api.get(f"/v1/secrets/{_secret(backend, path)}", reveal="true",
                                  version=version if version.isdigit() else None)
        except ApiError as exc:
            return _refused(_status(exc), exc.code, exc.message)
    return JSONResponse({"data": out.get("data") or {}, "version": out.get("version"),
                         "seconds": settings.console_reveal_seconds})


# --- connectors ------------------------------------------------------------------------


@router.get("/console/connectors")
@page("connectors")
async def connectors(s: Session) -> Response:
    items = (await s.api.get("/v1/connectors"))["items"]
    types, chosen, fields, methods, method = [], None, [], [], None
    if s.may("connectors:manage"):
        types = (await s.api.get("/v1/connector-types"))["items"]
        chosen = _type_of(types, s.request.query_params.get("type"))
        if chosen:
            fields = schema_fields(chosen["config_schema"])
            methods = list(chosen.get("auth_methods", {}))
            method = s.request.query_params.get("auth_method")
            method = method if method in methods else (methods[0] if methods else None)
    return s.page("connectors.html", "connectors", items=items, types=types, chosen=chosen, fields=fields,
                  methods=methods, method=method)


def _int_or_none(form: Form, name: str) -> int | None:
    raw = form.text(name)
    if not raw:
        return None
    if not raw.isdigit():
        raise ApiError(400, "invalid_form", f"{name.replace('_', ' ')}: not a whole number.")
    return int(raw)


@router.post("/console/connectors")
@action("/console/connectors")
async def connector_add(s: Session, form: Form) -> str:
    types = (await s.api.get("/v1/connector-types"))["items"]
    chosen = _type_of(types, form.text("type"))
    if chosen is None:
        raise ApiError(400, "unknown_connector_type", "Choose an available connector type.")
    name = await _new_name(s, form, "/v1/connectors", "connector")
    body: dict[str, Any] = {
        "type": chosen["type"], "auth_method": form.text("auth_method"),
        "config": read_schema_form(form, schema_fields(chosen["config_schema"]), "config"),
        "resources": [r.strip() for r in form.text("resources").splitlines() if r.strip()],
        "default_ttl_seconds": _int_or_none(form, "default_ttl_seconds"),
        "max_ttl_seconds": _int_or_none(form, "max_ttl_seconds"),
    }
    if form.text("secret"):
        body["secret"] = form.text("secret")
    await s.api.put(f"/v1/connectors/{_q(name)}", body)
    return f"Connector {name} ({chosen['type']}, {body['auth_method']}) saved."


@router.get("/console/connectors/{name}")
@page("connectors")
async def connector(s: Session, name: str) -> Response:
    row = await s.api.get(f"/v1/connectors/{_q(name)}")
    types = (await s.api.get("/v1/connector-types"))["items"]
    info = next((t for t in types if t.get("type") == row["type"]), {})
    rtype = s.request.query_params.get("resource_type")
    resources = None
    if rtype:
        try:
            resources = await s.api.get(f"/v1/connectors/{_q(name)}/resources", type=rtype)
        except ApiError as exc:
            resources = exc
    return s.page("connector.html", "connectors", row=row, info=info, rtype=rtype, resources=resources)


@router.post("/console/connectors/{name}/verify")
@action("/console/connectors/{name}")
async def connector_verify(s: Session, form: Form, name: str) -> str:
    out = await s.api.post(f"/v1/connectors/{_q(name)}/verify")
    reach = "; ".join(f"{k}: {', '.join(v[:5])}" for k, v in (out.get("reachable") or {}).items())
    text = f"Connector {name} {'verified' if out['ok'] else 'did NOT verify'}: {out['message']}" + (
        f" (as {out['identity']})" if out.get("identity") else "") + (f". Reaches {reach}" if reach else "")
    if not out["ok"]:
        raise ApiError(200, "connector_unverified", text)
    return text


@router.post("/console/connectors/{name}/delete")
@action("/console/connectors")
async def connector_delete(s: Session, form: Form, name: str) -> str:
    await s.api.delete(f"/v1/connectors/{_q(name)}", revoke_leases="true" if form.one("revoke_leases") else None)
    return f"Connector {name} deleted."


# --- credentials and leases ------------------------------------------------------------


def _lease_filters(q: Any) -> dict[str, str]:
    return {k: q.get(k, "") for k in ("connector", "principal", "run", "state")}


@router.get("/console/leases")
@page("leases")
async def leases(s: Session) -> Response:
    q = s.request.query_params
    filters = _lease_filters(q)
    if filters["state"] and filters["state"] not in STATES:
        raise ApiError(400, "invalid_filter", f"State must be one of {', '.join(STATES)}.")
    # Only the keyset page (indexed at any size): the counts by state are the overview's, a
    # scan of every lease (about 100 ms at 1,000,000: bench/CONSOLE.md).
    listing = await s.api.get("/v1/leases", limit=PAGE, page_token=q.get("page_token"), **filters)
    connectors = [c["name"] for c in (await s.api.get("/v1/connectors"))["items"]] if s.may("connectors:read") else []
    return s.page("leases.html", "leases", listing=listing, filters=filters, states=STATES, connectors=connectors)


@router.post("/console/leases/{lease_id}/renew")
@action("/console/leases")
async def lease_renew(s: Session, form: Form, lease_id: str) -> str:
    ttl = _int_or_none(form, "ttl_seconds")
    out = await s.api.post(f"/v1/leases/{_q(lease_id)}/renew", {"ttl_seconds": ttl} if ttl else {})
    return f"Lease {lease_id} renewed: it now expires at {pages.when(out.get('expires_at'))}."


@router.post("/console/leases/{lease_id}/revoke")
@action("/console/leases")
async def lease_revoke(s: Session, form: Form, lease_id: str) -> str:
    out = await s.api.post(f"/v1/leases/{_q(lease_id)}/revoke")
    state = (out or {}).get("state", "revoking")
    if state == "revoked":
        return f"Lease {lease_id} revoked: its credential no longer works at the target."
    return f"Lease {lease_id} is {state}: the target could not be reached yet; the gateway keeps trying."


@router.post("/console/leases/bulk")
@action("/console/leases")
async def lease_bulk(s: Session, form: Form) -> Any:
    """Step one of a bulk revocation: count what it would revoke (nothing is revoked yet) and
    ask for a confirmation that says how many."""
    body = {"connector": form.text("connector") or None, "principal": form.text("principal") or None}
    out = await s.api.post("/v1/leases/revoke", {**body, "dry_run": True})
    return s.page("confirm_bulk.html", "leases", body=body, matched=out["matched"])


@router.post("/console/leases/bulk/confirm")
@action("/console/leases")
async def lease_bulk_confirm(s: Session, form: Form) -> str:
    body = {"connector": form.text("connector") or None, "principal": form.text("principal") or None}
    out = await s.api.post("/v1/leases/revoke", body)
    still = len(out.get("still_revoking") or ())
    return (f"Bulk revocation: {out['matched']} leases matched, {out['revoked']} revoked"
            + (f", {still} still revoking (the gateway keeps trying)." if still else "."))


# --- runs ------------------------------------------------------------------------------


@router.get("/console/runs")
@page("runs")
async def runs(s: Session) -> Response:
    q = s.request.query_params
    state = q.get("state") if q.get("state") in ("live", "revoked") else ""
    listing = await s.api.get("/v1/runs", limit=PAGE, page_token=q.get("page_token"), state=state)
    return s.page("runs.html", "runs", listing=listing, state=state)


@router.post("/console/runs/{run_id}/revoke")
@action("/console/runs")
async def run_revoke(s: Session, form: Form, run_id: str) -> str:
    out = await s.api.post(f"/v1/runs/{_q(run_id)}/revoke")
    still = len(out.get("leases_still_revoking") or ())
    return (f"Run {run_id} revoked: its token is refused; {out['leases_revoked']} leases revoked"
            + (f", {still} still revoking." if still else "."))


# --- policies --------------------------------------------------------------------------

EXAMPLE_POLICY = """description: Who may do what (edit me)
rules:
  - description: the ML team's pipelines read the warehouse
    principals: {issuer: credgate, subject: "client:*"}
    actions: [credentials:issue]
    connectors: ["warehouse"]
    resources: ["*"]
"""


@router.get("/console/policies")
@page("policies")
async def policies(s: Session) -> Response:
    items = (await s.api.get("/v1/policies"))["items"]
    return s.page("policies.html", "policies", items=items, actions=_actions(), explained=None, asked=None)


def _actions() -> list[str]:
    from gateway.policy.rules import ACTIONS  # the policy vocabulary (no service is touched)

    return list(ACTIONS)


@router.get("/console/policy-new")
async def policy_new(request: Request) -> Response:
    name = request.query_params.get("name", "").strip()
    return RedirectResponse(f"/console/policies/{_q(name)}?new=1" if name else "/console/policies", status_code=303)


@router.get("/console/policies/{name}")
@page("policies")
async def policy(s: Session, name: str) -> Response:
    if s.request.query_params.get("new"):
        text, exists = EXAMPLE_POLICY, False
    else:
        row = await s.api.get(f"/v1/policies/{_q(name)}")
        text, exists = yaml.safe_dump(row["document"], sort_keys=False, allow_unicode=True), True
    return s.page("policy.html", "policies", name=name, text=text, exists=exists, errors=[], problem=None)


@router.post("/console/policies/{name}")
@action("/console/policies/{name}")
async def policy_save(s: Session, form: Form, name: str) -> Any:
    """Save the YAML as it was typed; on an error the editor comes back with the text kept and
    each error shown beside the line it is about."""
    text = form.one("document") or ""
    problem = pages.yaml_problem(text)
    if problem is not None:
        return s.page("policy.html", "policies", status=400, name=name, text=text, exists=False, errors=[],
                      problem={"message": problem[0], "line": problem[1], "code": "invalid_yaml"})
    try:
        await s.api.call("PUT", f"/v1/policies/{_q(name)}", content=text.encode(), content_type="application/yaml")
    except ApiError as exc:
        if exc.status in (400, 422):
            return s.page("policy.html", "policies", status=exc.status, name=name, text=text, exists=False,
                          errors=pages.yaml_lines(text, exc.details or []),
                          problem={"message": exc.message, "line": None, "code": exc.code})
        raise
    return f"Policy {name} saved; it applies to the next request."


@router.post("/console/policies/{name}/delete")
@action("/console/policies")
async def policy_delete(s: Session, form: Form, name: str) -> str:
    await s.api.delete(f"/v1/policies/{_q(name)}")
    return f"Policy {name} deleted."


@router.post("/console/explain")
@action("/console/policies")
async def explain(s: Session, form: Form) -> Any:
    asked = {
        "principal": {"issuer": form.text("issuer") or "credgate", "subject": form.text("subject"),
                      "roles": [r.strip() for r in form.text("roles").split(",") if r.strip()]},
        "action": form.text("action"),
        "connector": form.text("connector") or None,
        "resource": form.text("resource") or None,
    }
    explained = await s.api.post("/v1/policies/explain", asked)
    items = (await s.api.get("/v1/policies"))["items"]
    return s.page("policies.html", "policies", items=items, actions=_actions(), explained=explained, asked=asked)


# --- identity --------------------------------------------------------------------------


@router.get("/console/identity")
@page("identity")
async def identity(s: Session) -> Response:
    return await _identity(s)


async def _identity(s: Session, created: dict[str, Any] | None = None) -> Response:
    """The identity page; ``created``: a new client's or admin key's secret, shown on this
    response only (no-store; never in a cookie or a URL)."""
    issuers = await _maybe(s.api.get("/v1/issuers")) if s.may("issuers:manage") else None
    clients = await _maybe(s.api.get("/v1/clients")) if s.may("clients:manage") else None
    keys = await _maybe(s.api.get("/v1/admin-keys")) if s.may("admin_keys:manage") else None
    return s.page("identity.html", "identity", issuers=issuers, clients=clients, keys=keys, roles=ROLES, created=created)


@router.post("/console/identity/issuers/{name}/check")
@action("/console/identity")
async def issuer_check(s: Session, form: Form, name: str) -> str:
    out = await s.api.post(f"/v1/issuers/{_q(name)}/check")
    kids = ", ".join(k.get("kid") or "?" for k in out.get("keys", [])[:10])
    if not out.get("ok"):
        raise ApiError(200, out.get("code") or "jwks_unusable", f"Issuer {name}: {out.get('message', 'JWKS not usable')}")
    return f"Issuer {name}: its JWK set at {out.get('source')} has usable keys ({kids})."


@router.post("/console/identity/clients")
@action("/console/identity")
async def client_add(s: Session, form: Form) -> Any:
    body = {"client_id": form.text("client_id"), "roles": [r for r in form.all("roles") if r in ROLES],
            "token_ttl_seconds": _int_or_none(form, "token_ttl_seconds") or 900}
    out = await s.api.post("/v1/clients", body)
    return await _identity(s, {"what": "client", "name": out["client_id"], "secret": out.get("client_secret")})


@router.post("/console/identity/clients/{client_id}/revoke")
@action("/console/identity")
async def client_revoke(s: Session, form: Form, client_id: str) -> str:
    await s.api.post(f"/v1/clients/{_q(client_id)}/revoke")
    return f"Client {client_id} revoked: its tokens are refused from now on."


@router.post("/console/identity/admin-keys")
@action("/console/identity")
async def admin_key_add(s: Session, form: Form) -> Any:
    out = await s.api.post("/v1/admin-keys", {"name": form.text("name"), "role": form.text("role") or "admin"})
    return await _identity(s, {"what": "admin key", "name": f"{out['name']} ({out['role']}, {out['id']})",
                                 "secret": out["token"]})


@router.post("/console/identity/admin-keys/{key_id}/revoke")
@action("/console/identity")
async def admin_key_revoke(s: Session, form: Form, key_id: str) -> str:
    out = await s.api.post(f"/v1/admin-keys/{_q(key_id)}/revoke")
    return f"Admin key {out.get('name', key_id)} revoked (and every console session signed in with it)."


# --- audit -----------------------------------------------------------------------------

AUDIT_FILTERS = ("subject", "action", "lease_id", "run", "connector", "decision", "since", "until", "hmac")


def _audit_filters(q: Any) -> dict[str, str]:
    return {k: q.get(k, "").strip() for k in AUDIT_FILTERS}


@router.get("/console/audit")
@page("audit")
async def audit(s: Session) -> Response:
    q = s.request.query_params
    filters = _audit_filters(q)
    order = "asc" if q.get("order") == "asc" else "desc"  # newest first unless asked
    cursor = {"after": q.get("after")} if order == "asc" else {"before": q.get("before")}
    listing = await s.api.get("/v1/audit", limit=PAGE, order=order, **cursor, **filters)
    return s.page("audit.html", "audit", listing=listing, filters=filters, order=order)


@router.post("/console/audit/hash")
@action("/console/audit")
async def audit_hash(s: Session, form: Form) -> Any:
    """Search by a value (a wrap token, a client secret): the value travels in this POST's body
    only; the page's URL carries its keyed hash."""
    out = await s.api.post("/v1/audit/hash", {"value": form.one("value") or ""})
    return RedirectResponse("/console/audit" + pages.query({}, hmac=out["hmac"]), status_code=303)


@router.get("/console/audit/export")
@page("audit")
async def audit_export(s: Session) -> Response:
    """Every event matching the filters, as JSON lines, paged from the API as it streams."""
    filters = _audit_filters(s.request.query_params)
    first = await s.api.get("/v1/audit", limit=1000, **filters)  # refused here, before the download starts
    request, token = s.request, s.token

    async def lines():
        page_ = first
        async with Api(request, token) as api:
            while True:
                for event in page_["items"]:
                    yield json.dumps(event, separators=(",", ":")) + "\n"
                if page_.get("next_after") is None:
                    return
                page_ = await api.get("/v1/audit", limit=1000, after=page_["next_after"], **filters)

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="credgate-audit.jsonl"'})
