"""Pure-ASGI middleware in front of every route: request ids, body size and media type,
the audit trail, and the confirmation that a credential's response left whole.

Written against the raw ASGI interface (not BaseHTTPMiddleware) so it costs
little on the hot path and can stop an oversized body while it streams in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import (
    BadRequest,
    CredgateError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from gateway.web.errors import HeadersTooLarge, error_response
from gateway.requestid import new_request_id, reset_request_id, set_request_id

log = logging.getLogger("credgate.delivery")

_BODY_METHODS = {b"POST", b"PUT", b"PATCH"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


# The two exceptions to JSON bodies: the OAuth2 token endpoint takes forms (RFC 6749),
# policies may be written in YAML.
_OTHER_MEDIA = {
    "/v1/auth/token": (b"application/x-www-form-urlencoded",),
    "/v1/auth/revoke": (b"application/x-www-form-urlencoded",),  # RFC 7009
    "/v1/policies/": (b"application/yaml", b"application/x-yaml", b"text/yaml"),
    # The web console's forms (gateway/console), and its admin-key sign-in.
    "/console/": (b"application/x-www-form-urlencoded",),
    "/v1/auth/console/key": (b"application/x-www-form-urlencoded",),
}


def _acceptable(path: str, content_type: bytes | None) -> bool:
    if _is_json(content_type):
        return True
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    return any(path.startswith(prefix) and media in types for prefix, types in _OTHER_MEDIA.items())


_MAX_HOPS = 32


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An X-Forwarded-For entry's address (``1.2.3.4``, ``1.2.3.4:80``, ``::1``, ``[::1]:80``), or None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


def client_address(scope: Scope, trusted: tuple = ()) -> str:
    """The address a request comes from, for rate limits and the audit trail.

    The connection's peer, unless the peer is one of the ``trusted`` proxy networks
    (``CREDGATE_TRUSTED_PROXIES``, none by default). Then ``X-Forwarded-For`` is read
    from the right (each proxy appends the address it was connected from), past every
    trusted proxy, to the first address that is not one: the right-most untrusted
    address, the one a trusted proxy saw. Entries to its left were written by the
    caller and are never believed. An entry that is not an IP address ends the walk at
    the last trusted hop."""
    peer = scope.get("client")
    host = str(peer[0]) if peer else "unknown"
    if not trusted:
        return host
    ip = _ip(host)
    if ip is None or not any(ip in net for net in trusted):
        return host
    hops: list[str] = []
    for k, v in scope.get("headers", ()):
        if k == b"x-forwarded-for":
            hops.extend(v.decode("latin-1").split(","))
    for entry in reversed(hops[-_MAX_HOPS:]):
        hop = _ip(entry)
        if hop is None:
            break
        host = str(hop)
        if not any(hop in net for net in trusted):
            break
    return host




class RequestGuard:
    """Assign a request id; refuse bodies over ``max_body`` (413) and non-JSON bodies (415)."""

    def __init__(self, app: ASGIApp, *, max_body: int, max_headers: int = 16384, limiter=None,
                 address_limit=None, trusted_proxies=()) -> None:
        self.app = app
        self.max_body = max_body
        self.max_headers = max_headers
        self.limiter = limiter
        self.address_limit = address_limit
        self.trusted_proxies = tuple(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Every later reader of scope["client"] (the address rate limit, the audit event)
        # sees the resolved caller, never an address a caller merely claims.
        peer = scope.get("client")
        scope["client"] = (client_address(scope, self.trusted_proxies), peer[1] if peer else 0)
        incoming = _header(scope, b"x-request-id")
        rid = new_request_id(incoming.decode("latin-1") if incoming else None)
        token = set_request_id(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            error = self._check(scope)
            if error is not None:
                await self._reject(error, scope, receive, send_with_id)
                return
            await self._guarded(scope, receive, send_with_id)
        finally:
            reset_request_id(token)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count body bytes as they stream in; past the limit, answer 413 ourselves,
        tell the app the client went away, and drop whatever it tries to send."""
        seen = 0
        rejected = False
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    rejected = True
                    if not started:
                        await self._reject(
                            PayloadTooLarge(f"The request body is larger than {self.max_body} bytes."),
                            scope, receive, send,
                        )
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    def _check(self, scope: Scope) -> CredgateError | None:
        if sum(len(k) + len(v) for k, v in scope.get("headers", ())) > self.max_headers:
            return HeadersTooLarge(f"The request headers are larger than {self.max_headers} bytes.")
        if self.limiter is not None and scope["path"] not in ("/healthz", "/readyz"):
            client = scope.get("client") or ("unknown", 0)
            try:
                self.limiter.check(("addr", client[0]), self.address_limit, "from this address")
            except CredgateError as exc:
                return exc
        if _CONTROL.search(scope["path"]):
            return BadRequest("The URL path contains control characters.", code="invalid_path")
        method = scope["method"].encode()
        length = _header(scope, b"content-length")
        chunked = (_header(scope, b"transfer-encoding") or b"").lower() == b"chunked"
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n > self.max_body:
                return PayloadTooLarge(f"The request body is larger than {self.max_body} bytes.")
        else:
            n = 0
        if method in _BODY_METHODS and (n > 0 or chunked) and not _acceptable(scope["path"], _header(scope, b"content-type")):
            return UnsupportedMediaType("Request bodies must be JSON (Content-Type: application/json).")
        return None

    async def _reject(self, error: CredgateError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(error)
        if getattr(error, "retry_after", None):
            response.headers["retry-after"] = str(error.retry_after)
        # Close the connection rather than read an unwanted (maybe huge) body.
        response.headers["connection"] = "close"
        await response(scope, receive, send)




# Requests under /v1/ are audited, but for these read-only discovery endpoints.
_NOT_AUDITED = {"/v1/jwks", "/v1/auth/login-config", "/v1/auth/whoami"}


class AuditTrail:
    """Records one audit event per audited request, *before* its response starts.

    If the event can't be recorded and the request was fail-closed (it hands out
    a credential, a secret or a token, or changes authority), the response is
    replaced by 503 ``audit_unavailable`` and a credential issued for it is
    revoked: nothing leaves the gateway unrecorded. Changes of authority were
    also recorded before the route ran (gateway/web/deps.py ``requires``). Leases a
    request ended in bulk (``audit.note(ended_leases=...)``) get one event each.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/") or path in _NOT_AUDITED:
            await self.app(scope, receive, send)
            return
        from gateway.audit import trail as audit

        ctx, token = audit.begin()
        if path in audit.FAIL_CLOSED_PATHS:
            ctx["fail_closed"] = True
        replaced = False

        async def audited_send(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                runtime = getattr(scope["app"].state, "runtime", None)
                if runtime is not None and _aggregatable(scope, ctx, status):
                    # A refusal that changed nothing: repeats of its kind within the window are counted.
                    await runtime.audit.refusal(
                        _event(scope, ctx, status), kind=_route_kind(scope),
                        window=getattr(runtime.settings, "audit_refusal_window_seconds", 0),
                        cap=getattr(runtime.settings, "audit_refusal_table_size", audit.REFUSAL_TABLE_CAP),
                        first=getattr(runtime.settings, "audit_refusal_first", 1))
                elif runtime is not None:
                    events = [_event(scope, ctx, status)] + _ended_leases(scope, ctx)
                    try:
                        await runtime.audit.record_many(
                            events, fail_closed=bool(ctx.get("fail_closed")) and status < 400,
                            # the request-phase event already waited for the sinks in vain
                            wait_seconds=0 if ctx.get("audit_failed") else None,
                        )
                    except audit.AuditUnavailable:
                        replaced = True
                        lease_id = ctx.get("lease_id")
                        if lease_id:
                            await runtime.credentials.revoke(await runtime.leases.mark_revoking(lease_ids=[lease_id]))
                        # What the caller got instead, for the store at least (the sinks are down).
                        await runtime.audit.record(_event(scope, {**ctx, "error": "audit_unavailable"}, 503),
                                                   fail_closed=False, wait_seconds=0)
                        await self._unavailable(scope, receive, send)
                        return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        finally:
            audit.end(token)

    async def _unavailable(self, scope: Scope, receive: Receive, send: Send) -> None:
        from gateway.errors import Unavailable

        err = Unavailable("The audit trail can't be written; the request was refused and nothing was handed out.",
                          code="audit_unavailable")
        response = error_response(err)
        response.headers["retry-after"] = "5"
        await response(scope, receive, send)


def _aggregatable(scope: Scope, ctx: dict, status: int) -> bool:
    """A refusal that changed nothing (401, 403, 429): no authority touched, no change
    recorded before the route ran, no lease, nothing handed out."""
    from gateway.audit.trail import AGGREGATED_STATUSES, AUTHORITY_ACTIONS

    if status not in AGGREGATED_STATUSES or ctx.get("lease_id") or ctx.get("ended_leases") or ctx.get("audit_failed"):
        return False
    # (A change of authority recorded before the route ran is an AUTHORITY_ACTIONS action: kept whole.)
    action = ctx.get("action") or ""
    return not any(a in AUTHORITY_ACTIONS for a in action.split("|"))


def _route_kind(scope: Scope) -> str:
    """The method and route template (``GET /v1/secrets/{mount}/{path}``): bogus paths under one route are one kind."""
    route = scope.get("route")
    template = getattr(route, "path", None) or scope.get("path", "")
    return f"{scope.get('method')} {template}"


def _event(scope: Scope, ctx: dict, status: int | None) -> dict:
    """The request's event (its fields are bounded where it is recorded: AuditLog.record)."""
    from gateway.audit.trail import request_event

    return request_event(scope, ctx, status)


def _ended_leases(scope: Scope, ctx: dict) -> list[dict]:
    """One event per lease a bulk or run revocation ended: the caller, the lease, the request."""
    from gateway.audit.trail import request_event

    out = []
    details = {"via": ctx.get("action")}
    run_id = (ctx.get("details") or {}).get("run_id")
    if run_id:  # a run's revocation: each lease's event names the run too (GET /v1/audit?run=)
        details["run_id"] = run_id
    for lease_id in dict.fromkeys(ctx.get("ended_leases") or ()):
        event = request_event(scope, {**ctx, "lease_id": lease_id, "details": dict(details)}, None)
        event.update(action="leases:revoke", outcome="lease ended")
        out.append(event)
    return out



# --- delivery -----------------------------------------------------------------

# The leases whose delivery this request's response confirms (DeliveryConfirmation sets the list).
_DELIVERIES: ContextVar[list[str] | None] = ContextVar("credgate_deliveries", default=None)
_CONFIRM_TRIES = 3


def expect_delivery(lease_id: str) -> None:
    """The response about to be sent carries this (undelivered) lease's credential or wrap token:
    once it has been handed to the server whole, record the lease as delivered."""
    pending = _DELIVERIES.get()
    if pending is not None:
        pending.append(lease_id)


def _client_gone(receive: Receive) -> bool:
    """uvicorn (ASGI spec 2.3) silently drops what is sent to a client that went away; its
    request cycle records it (``disconnected``). The cycle is what the server's ``receive`` is
    a method of (Starlette's outermost ServerErrorMiddleware wraps ``send``, never ``receive``).
    A server on spec 2.4 raises OSError from ``send`` instead; any other: assume it went out."""
    return getattr(getattr(receive, "__self__", None), "disconnected", False) is True


class DeliveryConfirmation:
    """Confirms that a credential's response left: after the server's ``send`` of the final body
    chunk returned, for a 2xx answer, with the client still connected, the leases the route named
    (:func:`expect_delivery`) are recorded as delivered (``Credentials.delivered``: one grouped
    write, concurrent confirmations share a commit). It runs after the response, so the client
    does not wait for it; a failure is retried briefly, then logged (lease ids and the error's
    class only) and never changes the answer. A response that never left (the process died, the
    send failed, the client had gone) leaves its lease undelivered: the reaper revokes it at its
    delivery deadline.

    Outermost of the gateway's middleware, so that ``receive`` is the server's own (see
    :func:`_client_gone`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        pending: list[str] = []
        token = _DELIVERIES.set(pending)
        status = 0
        sent = False

        async def confirming_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)  # raises if the server could not take it
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                sent = not _client_gone(receive)

        try:
            await self.app(scope, receive, confirming_send)
        finally:
            _DELIVERIES.reset(token)
            if pending and sent and 200 <= status < 300:
                await self._confirm(scope, pending)

    async def _confirm(self, scope: Scope, lease_ids: list[str]) -> None:
        runtime = getattr(scope["app"].state, "runtime", None)
        if runtime is None:
            return
        for attempt in range(_CONFIRM_TRIES):
            try:
                await runtime.credentials.delivered(lease_ids)
                return
            except Exception as exc:  # noqa: BLE001 - logged; the answer is already out
                if attempt == _CONFIRM_TRIES - 1:
                    log.warning("could not record the delivery of %s (%s): the reaper will revoke %s at the "
                                "delivery deadline although its response was sent", ", ".join(lease_ids),
                                type(exc).__name__, "it" if len(lease_ids) == 1 else "them")
                    return
                await asyncio.sleep(0.2 * 2 ** attempt)
