"""FastAPI dependencies: the runtime and the authenticated principal."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from gateway.audit import trail as audit
from gateway.web import tls
from gateway.identity.principal import Principal, bearer_token
from gateway.errors import Forbidden, Unavailable
from gateway.web.ratelimit import Limit
from gateway.runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="An admin API key: `Authorization: Bearer cgt_...`")


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain-def dependency in a worker thread, a hand-off per request.
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


_PRINCIPAL = "credgate.principal"  # the scope key of the request's principal, once resolved


async def authenticate(request: Request) -> Principal:
    """The caller, from its bearer token or its client certificate; resolved (and its rate
    limit counted) once per request, however many dependencies ask.

    A plain ``Request`` parameter, not a tree of dependencies: FastAPI solves every
    sub-dependency again on every request (a third of a cached secret read's CPU went there).
    The OpenAPI document still declares the bearer scheme (:func:`declare_bearer`)."""
    principal = request.scope.get(_PRINCIPAL)
    if principal is not None:
        return principal
    runtime: Runtime = request.app.state.runtime
    authorization = request.headers.get("authorization")
    if authorization is None:  # no token: a client certificate mapped to a client will do (gateway/web/tls.py)
        principal = await tls.certificate_principal(runtime, request.scope)
    if principal is None:
        principal = await runtime.authenticator.authenticate(bearer_token(authorization))
    s = runtime.settings
    request.app.state.limiter.check(
        ("principal", principal.issuer, principal.subject), Limit(s.rate_per_principal, s.burst_per_principal),
        f"for {principal.subject}",
    )
    request.scope[_PRINCIPAL] = principal
    return principal


def requires(action: str) -> Any:
    """A dependency that authenticates and checks ``action`` (no connector or resource
    yet) before the body is validated, so a caller without the right gets 403, not 422.
    The action is kept on the function: the authorization-matrix test reads it."""

    async def check(request: Request) -> Principal:
        principal = await authenticate(request)
        runtime: Runtime = request.app.state.runtime
        # Coarse gate: does any rule grant this action to the caller at all? The route
        # decides again with the connector and resource it is about.
        per_action = runtime.settings.rate_per_action
        for a in action.split("|"):
            if a in per_action:
                rate, burst = (per_action[a] + [per_action[a][0]])[:2]
                request.app.state.limiter.check(
                    ("action", principal.issuer, principal.subject, a), Limit(rate, burst), f"of {a} for {principal.subject}"
                )
        decisions = [principal.decide(a) for a in action.split("|")]  # "a|b": either will do
        decision = next((d for d in decisions if d.allowed), decisions[0])
        audit.note(issuer=principal.issuer, subject=principal.subject, action=action,
                   decision="allow" if decision.allowed else "deny", rule=decision.rule)
        if not decision.allowed:
            raise Forbidden(f"{principal.subject} may not {action}: {decision.reason}.", code="permission_denied")
        if authority and request.method not in _READS:
            await _record_before(request, runtime)
        return principal

    authority = any(a in audit.AUTHORITY_ACTIONS for a in action.split("|"))
    check.action = action  # type: ignore[attr-defined]
    return Depends(check)


_READS = frozenset({"GET", "HEAD", "OPTIONS"})


async def _record_before(request: Request, runtime: Runtime) -> None:
    """Vault's rule for a change of authority: its audit event is written before the
    change is made, and if it can't be, the request fails (503 audit_unavailable,
    Retry-After) with nothing changed. The response's event is fail-closed too."""
    audit.note(fail_closed=True)
    try:
        await runtime.audit.record(audit.request_event(request.scope, audit.noted(), None), fail_closed=True)
    except audit.AuditUnavailable:
        audit.note(audit_failed=True)
        err = Unavailable("The audit trail can't be written; the change was not made.", code="audit_unavailable")
        err.retry_after = 5  # type: ignore[attr-defined]
        raise err from None


async def _authenticated(request: Request) -> Principal:
    principal = await authenticate(request)
    audit.note(issuer=principal.issuer, subject=principal.subject, action="authenticated", decision="allow")
    return principal


_authenticated.action = "authenticated"  # type: ignore[attr-defined]
Authenticated = Annotated[Principal, Depends(_authenticated)]
"""Any authenticated caller (the route decides finer)."""


def declare_bearer(app: FastAPI) -> None:
    """Declare the bearer scheme in the OpenAPI document, on every operation that authenticates
    (its dependencies call :func:`authenticate`), as a ``Security(HTTPBearer)`` dependency would,
    without solving one on every request."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        name = _bearer.scheme_name
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[name] = _bearer.model.model_dump(
            mode="json", by_alias=True, exclude_none=True)
        for route in _endpoints(app.routes):
            if _authenticates(route.dependant):
                for method in route.methods or ():
                    operation = schema.get("paths", {}).get(route.path_format, {}).get(method.lower())
                    if operation is not None:
                        operation["security"] = [{name: []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _endpoints(items: Any) -> list[Any]:
    """Every endpoint, whether FastAPI keeps them flat or behind included-router wrappers."""
    out = []
    for item in items:
        if hasattr(item, "effective_candidates"):
            out.extend(_endpoints(item.effective_candidates()))
        elif isinstance(item, APIRoute) or (hasattr(item, "dependant") and hasattr(item, "methods")):
            out.append(item)
    return out


def _authenticates(dependant: Any) -> bool:
    stack = list(dependant.dependencies)
    while stack:
        dep = stack.pop()
        if dep.call is authenticate or getattr(dep.call, "action", None) is not None:
            return True
        stack.extend(dep.dependencies)
    return False
