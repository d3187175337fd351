"""Trusted issuers, OAuth2 clients, the token and revocation endpoints, JWKS and discovery, runs."""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from gateway.audit import trail as audit
from gateway.identity.principal import GATEWAY, TOKEN_PREFIX, Principal
from gateway.identity.runs import decode_page_token, encode_page_token
from gateway.policy.rules import ACTIONS
from gateway.identity.clients import CLIENT_ID, Client, Clients, valid_client_id
from gateway.web.deps import Authenticated, RuntimeDep, requires
from gateway.errors import BadRequest, CredgateError, Forbidden, NotFound
from gateway.identity.issuers import Issuer, utc_from_ts
from gateway.identity.jose import ASYMMETRIC, peek
from gateway.identity.issuer_check import check_issuer, require_usable
from gateway.runtime import Runtime

router = APIRouter(tags=["identity"])

Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.-]{0,62}$")]
Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]{1,1000}$")]


# --- trusted issuers ---------------------------------------------------------


class IssuerPut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    issuer_url: Url
    jwks_url: Url | None = None
    jwks: dict[str, Any] | None = Field(None, description="Inline JWK set, instead of jwks_url.")
    audiences: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(..., min_length=1)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    leeway_seconds: int = Field(30, ge=0, le=60)
    claim_mapping: dict[Literal["subject", "groups", "project", "run"], str] = Field(default_factory=dict)
    role_mapping: dict[str, list[Literal["admin", "operator", "auditor"]]] = Field(
        default_factory=dict, description="Group claim value -> built-in roles."
    )

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ASYMMETRIC]
        if bad:
            raise ValueError(f"only asymmetric algorithms are accepted ({', '.join(ASYMMETRIC)})")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerPut:
        if (self.jwks_url is None) == (self.jwks is None):
            raise ValueError("give exactly one of jwks_url and jwks")
        if self.jwks is not None:
            try:
                keys = KeySet.import_key_set(self.jwks)
            except (JoseError, ValueError, TypeError, KeyError):
                raise ValueError("jwks is not a valid JWK set") from None
            if any(k.is_private for k in keys.keys) or any(k.key_type == "oct" for k in keys.keys):
                raise ValueError("jwks must hold public asymmetric keys only")
        return self


class IssuerOut(IssuerPut):
    name: str


def _issuer_out(row: Issuer) -> IssuerOut:
    return IssuerOut.model_construct(
        name=row.name, issuer_url=row.issuer_url, jwks_url=row.jwks_url, jwks=row.jwks, audiences=row.audiences,
        algorithms=row.algorithms, leeway_seconds=row.leeway_seconds, claim_mapping=row.claim_mapping,
        role_mapping=row.role_mapping,
    )


@router.put(
    "/v1/issuers/{name}",
    responses={201: {"model": IssuerOut, "description": "Created"}}, summary="Trust an issuer's JWTs")
async def put_issuer(
    name: Name, body: IssuerPut, runtime: RuntimeDep, principal: Annotated[Principal, requires("issuers:manage")],
    response: Response,
    check: Annotated[bool, Query(description="Check its JWK set first (as POST .../check); save nothing if it fails.")] = False,
) -> IssuerOut:
    if name == GATEWAY:
        raise BadRequest("'credgate' names the gateway itself.", code="invalid_issuer_name")
    if check:
        require_usable(await check_issuer(name, jwks_url=body.jwks_url, jwks=body.jwks, algorithms=body.algorithms))
    row, created = await runtime.issuers.put(name, body.model_dump())
    response.status_code = 201 if created else 200
    return _issuer_out(row)


class IssuerList(BaseModel):
    items: list[IssuerOut]


@router.get("/v1/issuers", summary="List trusted issuers")
async def list_issuers(runtime: RuntimeDep, principal: Annotated[Principal, requires("issuers:manage")]) -> IssuerList:
    return IssuerList(items=[_issuer_out(r) for r in await runtime.issuers.list()])


@router.get("/v1/issuers/{name}", summary="Show a trusted issuer")
async def get_issuer(name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("issuers:manage")]) -> IssuerOut:
    return _issuer_out(await runtime.issuers.get(name))


class IssuerKeyOut(BaseModel):
    kid: str | None
    kty: str | None
    alg: str | None
    usable: bool
    problem: str | None


class IssuerCheckOut(BaseModel):
    name: str
    source: str = Field(description="The jwks_url fetched, or 'inline JWK set'.")
    ok: bool
    code: str | None = Field(description="Why not ok: jwks_unavailable, jwks_invalid or jwks_no_usable_key.")
    message: str | None
    keys: list[IssuerKeyOut]
    usable_keys: int


@router.post("/v1/issuers/{name}/check", summary="Fetch an issuer's JWK set now and report its usable keys")
async def check_issuer_keys(
    name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("issuers:manage")]
) -> IssuerCheckOut:
    """``ok``, or the ``code`` saying why not (``jwks_unavailable``, ``jwks_invalid``,
    ``jwks_no_usable_key``); fetches nothing but the configured ``jwks_url``."""
    row = await runtime.issuers.get(name)
    return IssuerCheckOut(**await check_issuer(row.name, jwks_url=row.jwks_url, jwks=row.jwks, algorithms=row.algorithms))


@router.delete("/v1/issuers/{name}", status_code=204, summary="Stop trusting an issuer")
async def delete_issuer(name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("issuers:manage")]) -> Response:
    await runtime.issuers.delete(name)
    return Response(status_code=204)


# --- clients -----------------------------------------------------------------


class ClientCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: Name
    roles: list[Literal["admin", "operator", "auditor"]] = Field(default_factory=list)
    token_ttl_seconds: int = Field(900, ge=60, le=86400)
    jwks: dict[str, Any] | None = Field(None, description="Public keys for private_key_jwt; without it a secret is made.")


class ClientOut(BaseModel):
    client_id: str
    roles: list[str]
    token_ttl_seconds: int
    auth_method: str
    created_at: Any
    revoked_at: Any


class ClientCreated(ClientOut):
    client_secret: str | None = Field(None, description="Shown once; only its hash is kept.")


def _client_out(row: Client) -> dict[str, Any]:
    return dict(
        client_id=row.client_id, roles=row.roles, token_ttl_seconds=row.token_ttl_seconds,
        auth_method="private_key_jwt" if row.jwks else "client_secret",
        created_at=row.created_at, revoked_at=row.revoked_at,
    )


@router.post("/v1/clients", status_code=201, summary="Register an OAuth2 client (a service)")
async def create_client(
    body: ClientCreate, runtime: RuntimeDep, principal: Annotated[Principal, requires("clients:manage")]
) -> ClientCreated:
    row, secret = await runtime.clients.create(
        body.client_id, roles=body.roles, token_ttl=timedelta(seconds=body.token_ttl_seconds), jwks=body.jwks
    )
    return ClientCreated(**_client_out(row), client_secret=secret)


class ClientList(BaseModel):
    items: list[ClientOut]


@router.get("/v1/clients", summary="List OAuth2 clients")
async def list_clients(runtime: RuntimeDep, principal: Annotated[Principal, requires("clients:manage")]) -> ClientList:
    return ClientList(items=[ClientOut(**_client_out(r)) for r in await runtime.clients.list()])


@router.post("/v1/clients/{client_id}/revoke", summary="Revoke a client")
async def revoke_client(
    client_id: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("clients:manage")]
) -> ClientOut:
    return ClientOut(**_client_out(await runtime.clients.revoke(client_id)))


# --- the token endpoint (RFC 6749, 7523, 8693) and revocation (RFC 7009) ------

GRANT_CC = "client_credentials"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANTS = (GRANT_CC, GRANT_JWT_BEARER, GRANT_EXCHANGE)
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_EXCHANGED_TTL = timedelta(hours=1)
SUBJECT_TOKEN_TYPES = {
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:access_token",
}
# Parameters these endpoints read; each may appear once (RFC 6749 3.2). Others are ignored.
FORM_PARAMS = frozenset({
    "grant_type", "client_id", "client_secret", "client_assertion_type", "client_assertion", "assertion",
    "subject_token", "subject_token_type", "token", "token_type_hint",
})
MAX_FORM_FIELDS = 50
CLAIM_CHARS = 64  # how much of an unauthenticated caller's claimed client id an audit event keeps


class OAuthFailure(Exception):
    """An RFC 6749 section 5.2 error for the token and revocation endpoints."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


def oauth_error(status: int, error: str, description: str) -> JSONResponse:
    """Token endpoint errors use RFC 6749 section 5.2's shape, which OAuth2 clients parse."""
    audit.note(error=error)
    headers = {"Cache-Control": "no-store"}
    if error == "invalid_client":
        headers["WWW-Authenticate"] = 'Basic realm="credgate"'
    return JSONResponse({"error": error, "error_description": description}, status_code=status, headers=headers)


def _basic(header: str | None) -> tuple[str, str] | None:
    """``(client_id, secret)`` of ``Authorization: Basic``; None without one; 400 if malformed."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raw = ""
    cid, sep, secret = raw.partition(":")
    if not sep:
        raise OAuthFailure(400, "invalid_request", "The Basic credentials are malformed.")
    return unquote(cid), unquote(secret)


async def _form(request: Request) -> dict[str, str]:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise OAuthFailure(400, "invalid_request", "The body must be application/x-www-form-urlencoded.")
    try:
        pairs = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=MAX_FORM_FIELDS)
    except ValueError:
        raise OAuthFailure(400, "invalid_request", f"The form has more than {MAX_FORM_FIELDS} fields.") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name not in FORM_PARAMS:
            continue
        if name in form:
            raise OAuthFailure(400, "invalid_request", f"The parameter {name} appears more than once.")
        form[name] = value
    return form


class ClientAuth:
    """The client authentication of a request, checked for shape before anything is looked up:
    at most one method (RFC 6749 2.3), a well-formed client id, and one client named."""

    def __init__(self, form: dict[str, str], authorization: str | None) -> None:
        self.form = form
        self.basic = _basic(authorization)
        methods = [m for m, present in (
            ("client_secret_basic", self.basic is not None),
            ("client_secret_post", "client_secret" in form),
            ("private_key_jwt", "client_assertion" in form or "client_assertion_type" in form),
        ) if present]
        if len(methods) > 1:
            raise OAuthFailure(400, "invalid_request", f"Use one client authentication method, not {' and '.join(methods)}.")
        self.method = methods[0] if methods else None
        form_id = form.get("client_id")
        if form_id is not None and not valid_client_id(form_id):
            raise OAuthFailure(400, "invalid_request", "client_id is 1-63 characters of a-z, 0-9, '_', '.' and '-'.")
        if self.basic is not None:
            if not valid_client_id(self.basic[0]):
                raise OAuthFailure(401, "invalid_client", "Client authentication failed.")
            if form_id is not None and form_id != self.basic[0]:
                raise OAuthFailure(400, "invalid_request", "client_id names another client than the Basic credentials.")
        if self.method == "private_key_jwt":
            if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
                raise OAuthFailure(400, "invalid_request", f"private_key_jwt needs client_assertion_type={ASSERTION_TYPE} "
                                   "and a client_assertion.")
            try:
                sub = peek(form["client_assertion"])[1].get("sub")
            except CredgateError:
                raise OAuthFailure(401, "invalid_client", "The client assertion is not a JWT.") from None
            if form_id is not None and form_id != sub:
                raise OAuthFailure(400, "invalid_request", "client_id names another client than the client assertion.")
        if self.method == "client_secret_post" and form_id is None:
            raise OAuthFailure(400, "invalid_request", "client_secret_post needs a client_id.")

    async def authenticate(self, clients: Clients, endpoint: str) -> Client | None:
        """The authenticated client (401 ``invalid_client`` on failure); None if none was presented."""
        if self.method is None:
            return None
        try:
            if self.method == "private_key_jwt":
                row = await clients.with_assertion(self.form["client_assertion"], endpoint)
            elif self.basic is not None:
                row = await clients.with_secret(*self.basic)
            else:
                row = await clients.with_secret(self.form["client_id"], self.form["client_secret"])
        except CredgateError as exc:
            raise OAuthFailure(401, "invalid_client", exc.message) from None
        audit.note(issuer=GATEWAY, subject=f"client:{row.client_id}", details={"authenticated": True})
        return row


def _note_claim(form: dict[str, str], authorization: str | None) -> None:
    """An attempt that authenticated no one: its event has no subject, only the client id
    the caller claimed, bounded and marked as a claim."""
    if audit.noted().get("subject"):
        return
    claim = form.get("client_id")
    if claim is None:
        try:
            claim = (_basic(authorization) or (None,))[0]
        except OAuthFailure:
            claim = None
    audit.note(details={"authenticated": False, **({"claimed_client_id": claim[:CLAIM_CHARS]} if claim else {})})


class OAuthError(BaseModel):
    """RFC 6749 section 5.2."""

    error: str
    error_description: str | None = None


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    issued_token_type: str | None = None


TOKEN_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["grant_type"],
    "properties": {
        "grant_type": {"type": "string", "enum": list(GRANTS)},
        "client_id": {"type": "string", "pattern": CLIENT_ID.pattern},
        "client_secret": {"type": "string"},
        "client_assertion_type": {"type": "string", "enum": [ASSERTION_TYPE]},
        "client_assertion": {"type": "string"},
        "assertion": {"type": "string"},
        "subject_token": {"type": "string"},
        "subject_token_type": {"type": "string", "enum": sorted(SUBJECT_TOKEN_TYPES)},
    },
}


@router.post(
    "/v1/auth/token",
    summary="OAuth2 token endpoint: client_credentials, jwt-bearer, token-exchange",
    response_model=TokenOut,
    responses={400: {"model": OAuthError}, 401: {"model": OAuthError}},
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"application/x-www-form-urlencoded": {"schema": TOKEN_FORM}}}},
)
async def token(request: Request, runtime: RuntimeDep) -> JSONResponse:
    audit.note(action="auth:token")
    authorization = request.headers.get("authorization")
    form: dict[str, str] = {}
    try:
        form = await _form(request)
        grant = form.get("grant_type")
        audit.note(details={"grant_type": grant if grant in GRANTS else "unsupported"})
        auth = ClientAuth(form, authorization)
        secret = form.get("client_secret") or (auth.basic[1] if auth.basic else None)
        if secret:
            audit.note(details={"client_secret": runtime.audit.hmac(secret)})
        body = await _grant(runtime, grant, form, auth)
    except OAuthFailure as exc:
        return oauth_error(exc.status, exc.error, exc.description)
    finally:
        _note_claim(form, authorization)
    # A bearer credential leaves the gateway only if its event is recorded.
    audit.note(fail_closed=True)
    return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def _grant(runtime: Runtime, grant: str | None, form: dict[str, str], auth: ClientAuth) -> dict[str, Any]:
    endpoint = f"{runtime.settings.issuer_url}/v1/auth/token"
    if grant == GRANT_CC:
        client = await auth.authenticate(runtime.clients, endpoint)
        if client is None:
            raise OAuthFailure(401, "invalid_client", "No client authentication was given.")
        ttl = timedelta(seconds=client.token_ttl_seconds)
        access = await runtime.tokens.mint_access(
            kind="client", name=f"client:{client.client_id}", issuer=GATEWAY, roles=frozenset(client.roles),
            claims={}, ttl=ttl, source=(f"client:{client.client_id}",),
        )
        return {"access_token": access, "token_type": "Bearer", "expires_in": int(ttl.total_seconds())}
    if grant not in (GRANT_JWT_BEARER, GRANT_EXCHANGE):
        raise OAuthFailure(400, "unsupported_grant_type", "Supported: client_credentials, jwt-bearer, token-exchange.")
    subject_token = form.get("assertion") if grant == GRANT_JWT_BEARER else form.get("subject_token")
    if not subject_token:
        raise OAuthFailure(400, "invalid_request", "The subject token (or assertion) is missing.")
    if grant == GRANT_EXCHANGE and form.get("subject_token_type") not in SUBJECT_TOKEN_TYPES:
        raise OAuthFailure(400, "invalid_request", "subject_token_type must name a JWT, an id_token or an access token.")
    try:
        if peek(subject_token)[1].get("iss") == runtime.tokens.issuer_url:
            raise OAuthFailure(400, "invalid_grant", "A gateway token can't be exchanged for another.")
        principal = await runtime.authenticator.authenticate(subject_token)
    except CredgateError as exc:
        raise OAuthFailure(400, "invalid_grant", exc.message) from None
    if principal.kind != "workload":
        raise OAuthFailure(400, "invalid_grant", "Only tokens from a trusted issuer can be exchanged.")
    audit.note(issuer=principal.issuer, subject=principal.subject, details={"authenticated": True})
    remaining = int(principal.claims.get("exp", 0)) - int(time.time())
    if remaining <= 0:
        raise OAuthFailure(400, "invalid_grant", "The subject token has expired.")
    ttl = min(MAX_EXCHANGED_TTL, timedelta(seconds=remaining))
    access = await runtime.tokens.mint_access(
        kind="workload", name=principal.name, issuer=principal.issuer, roles=principal.roles,
        claims={k: v for k, v in principal.claims.items() if k in ("subject", "groups", "project", "run", "email")},
        ttl=ttl, source=principal.source,
    )
    body = {"access_token": access, "token_type": "Bearer", "expires_in": int(ttl.total_seconds())}
    if grant == GRANT_EXCHANGE:
        body["issued_token_type"] = "urn:ietf:params:oauth:token-type:access_token"
    return body


REVOKE_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["token"],
    "properties": {
        "token": {"type": "string"},
        "token_type_hint": {"type": "string", "enum": ["access_token"]},
        "client_id": {"type": "string", "pattern": CLIENT_ID.pattern},
        "client_secret": {"type": "string"},
        "client_assertion_type": {"type": "string", "enum": [ASSERTION_TYPE]},
        "client_assertion": {"type": "string"},
    },
}


@router.post(
    "/v1/auth/revoke",
    summary="OAuth2 token revocation (RFC 7009): a gateway token, and every run token delegated with it",
    responses={200: {"description": "Revoked, or nothing to revoke (an unknown, invalid or expired token)",
                     "content": {"application/json": {"schema": {"type": "object", "maxProperties": 0}}}},
               400: {"model": OAuthError}, 401: {"model": OAuthError}},
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"application/x-www-form-urlencoded": {"schema": REVOKE_FORM}}}},
)
async def revoke_token(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Who may revoke: the client a token was issued to (authenticated as at the token
    endpoint; run tokens it delegated too), or the token's own bearer (``Authorization:
    Bearer`` with the same token, as ``credgate logout`` does). An unknown, invalid or
    expired token is answered 200, as RFC 7009 asks; an admin key is not revoked here."""
    audit.note(action="auth:revoke")
    authorization = request.headers.get("authorization")
    form: dict[str, str] = {}
    try:
        form = await _form(request)
        token = form.get("token")
        if not token:
            raise OAuthFailure(400, "invalid_request", "The token to revoke is missing.")
        bearer = authorization[:7].lower() == "bearer " if authorization else False
        auth = None if bearer else ClientAuth(form, authorization)
        if bearer:
            presented = authorization[7:].strip()  # type: ignore[index]
            if not hmac.compare_digest(presented.encode(), token.encode()):
                raise OAuthFailure(400, "unauthorized_client", "A bearer may revoke only the token it presents.")
        elif auth is None or auth.method is None:
            raise OAuthFailure(401, "invalid_client",
                               "Authenticate as the client the token was issued to, or present the token as the bearer.")
        if token.startswith(TOKEN_PREFIX):
            raise OAuthFailure(400, "unsupported_token_type", "Admin keys are revoked with POST /v1/admin-keys/{id}/revoke.")
        client = await auth.authenticate(runtime.clients, f"{runtime.settings.issuer_url}/v1/auth/token") if auth else None
        try:
            principal = await runtime.tokens.verify(token)
            exp = peek(token)[1]["exp"]  # verified above
        except CredgateError:
            return _revoked()  # not a live gateway token: nothing to do (RFC 7009 2.2)
        if client is not None and f"client:{client.client_id}" not in principal.source:
            raise OAuthFailure(400, "unauthorized_client", f"This token was not issued to client {client.client_id}.")
        if client is None:
            audit.note(issuer=principal.issuer, subject=principal.subject, details={"authenticated": True})
        asker = f"client:{client.client_id}" if client else principal.subject
        revoked = await runtime.authenticator.revocation.revoke(principal.id, utc_from_ts(exp), by=asker)
        audit.note(details={"token_kind": principal.kind, "jti": principal.id, "revoked": revoked})
    except OAuthFailure as exc:
        return oauth_error(exc.status, exc.error, exc.description)
    finally:
        _note_claim(form, authorization)
    return _revoked()


def _revoked() -> JSONResponse:
    return JSONResponse({}, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


@router.get("/v1/jwks", summary="The gateway's public signing keys")
async def jwks(runtime: RuntimeDep) -> dict[str, Any]:
    return runtime.signing.jwks()


@router.get("/.well-known/openid-configuration", summary="Discovery document of the gateway as a token issuer")
async def discovery(runtime: RuntimeDep) -> dict[str, Any]:
    base = runtime.settings.issuer_url
    return {
        "issuer": base,
        "jwks_uri": f"{base}/v1/jwks",
        "token_endpoint": f"{base}/v1/auth/token",
        "grant_types_supported": [GRANT_CC, GRANT_JWT_BEARER, GRANT_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ASYMMETRIC,
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
    }


class LoginConfig(BaseModel):
    issuer_url: str
    client_id: str
    scopes: str


@router.get("/v1/auth/login-config", summary="Where admins sign in (anonymous): the IdP and credgate's client id there")
async def login_config(runtime: RuntimeDep) -> LoginConfig:
    settings = runtime.settings
    if not settings.login_issuer or not settings.login_client_id:
        raise NotFound("Sign-in is not configured (CREDGATE_LOGIN_ISSUER, CREDGATE_LOGIN_CLIENT_ID).",
                       code="login_not_configured")
    try:
        row = await runtime.issuers.get(settings.login_issuer)
    except NotFound:
        raise NotFound(
            f"Sign-in names issuer {settings.login_issuer!r}, which is not registered (credgate issuer add).",
            code="login_not_configured",
        ) from None
    return LoginConfig(issuer_url=row.issuer_url, client_id=settings.login_client_id, scopes=settings.login_scopes)


class WhoAmI(BaseModel):
    kind: str
    subject: str
    issuer: str
    roles: list[str]
    run_id: str | None
    may: list[str] = Field(description=(
        "Every action the policy allows this caller on some connector and resource (the coarse decision, "
        "sorted): what a client may offer. Each request is still decided on its own connector and resource."
    ))


@router.get("/v1/auth/whoami", summary="Who the presented token says you are, and which actions it may take")
async def whoami(principal: Authenticated) -> WhoAmI:
    may = sorted(action for action in ACTIONS if principal.decide(action).allowed)
    return WhoAmI(kind=principal.kind, subject=principal.subject, issuer=principal.issuer,
                  roles=sorted(principal.roles), run_id=principal.run_id, may=may)


# --- runs --------------------------------------------------------------------

RunId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]


class RunTokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    connectors: list[Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^?\[\]]+$")]] = Field(..., min_length=1, max_length=50)
    resources: list[Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^?\[\]]+$")]] = Field(..., min_length=1, max_length=100)
    ttl_seconds: int = Field(3600, ge=60, le=86400)


class RunTokenOut(BaseModel):
    run_id: str
    token: str
    expires_in: int
    connectors: list[str]
    resources: list[str]
    max_credential_ttl_seconds: int | None


class RunRevokeOut(BaseModel):
    run_id: str
    revoked: bool
    leases_revoked: int
    leases_still_revoking: list[str]


class RunLeaseCounts(BaseModel):
    pending: int
    active: int
    revoking: int
    revoked: int
    expired: int


class RunOut(BaseModel):
    run_id: str
    created_by: str = Field(description="The delegator's owner key, ISSUER/SUBJECT.")
    created_at: datetime
    revoked_at: datetime | None
    leases: RunLeaseCounts = Field(description="The run's leases by state.")


class RunList(BaseModel):
    items: list[RunOut]
    next_page_token: str | None


@router.get("/v1/runs", summary="List runs, newest first, with their lease counts by state")
async def list_runs(
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("runs:delegate|leases:read")],
    state: Annotated[Literal["live", "revoked"] | None, Query(
        description="live: not revoked; revoked: ended by POST /v1/runs/RUN/revoke.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many runs.")] = 100,
    page_token: Annotated[str | None, Query(
        max_length=256, description="The next_page_token of the previous page.")] = None,
) -> RunList:
    """A caller allowed ``leases:read`` sees every run; one allowed only ``runs:delegate`` sees
    the runs it delegated (``created_by`` is its owner key). The lease counts of a page come
    from one grouped query."""
    after = decode_page_token(page_token) if page_token else None
    mine = None if principal.can("leases:read") else principal.owner
    rows, nxt = await runtime.runs.page(created_by=mine, state=state, after=after, limit=limit)
    counts = await runtime.leases.counts_by_run([r.run_id for r in rows])
    items = [RunOut(run_id=r.run_id, created_by=r.created_by, created_at=r.created_at, revoked_at=r.revoked_at,
                    leases=RunLeaseCounts(**counts[r.run_id])) for r in rows]
    return RunList(items=items, next_page_token=encode_page_token(nxt) if nxt else None)


@router.post("/v1/runs/{run_id}/token", summary="A token for one pipeline run, scoped to a subset of the caller's rights")
async def run_token(
    run_id: RunId, body: RunTokenIn, runtime: RuntimeDep, principal: Annotated[Principal, requires("runs:delegate")]
) -> RunTokenOut:
    audit.note(details={"run_id": run_id})  # GET /v1/audit?run= finds the event by it
    token, scope, ttl = await runtime.runs.mint(
        principal, run_id, body.connectors, body.resources, timedelta(seconds=body.ttl_seconds)
    )
    audit.note(fail_closed=True)  # a bearer credential leaves only if its event is recorded
    return RunTokenOut(
        run_id=run_id, token=token, expires_in=int(ttl.total_seconds()), connectors=list(scope.connectors),
        resources=list(scope.resources),
        max_credential_ttl_seconds=int(scope.max_ttl.total_seconds()) if scope.max_ttl else None,
    )


@router.post("/v1/runs/{run_id}/revoke", summary="End a run: its token stops working and its leases are revoked")
async def revoke_run(
    run_id: RunId, runtime: RuntimeDep, principal: Annotated[Principal, requires("runs:delegate|leases:revoke")]
) -> RunRevokeOut:
    audit.note(details={"run_id": run_id})  # GET /v1/audit?run= finds the event by it
    run = await runtime.runs.get(run_id)
    if run is None:
        raise NotFound(f"Run {run_id} does not exist.", code="run_not_found")
    own = run.created_by == principal.owner and principal.can("runs:delegate")
    if not (own or principal.can("leases:revoke")):
        raise Forbidden(f"{principal.subject} may not revoke run {run_id}.", code="permission_denied")
    await runtime.runs.mark_revoked(run_id)
    ids = await runtime.leases.mark_revoking(run_id=run_id)
    audit.note(ended_leases=ids)  # one audit event per lease ended
    still = await runtime.credentials.revoke(ids)
    return RunRevokeOut(run_id=run_id, revoked=True, leases_revoked=len(ids) - len(still), leases_still_revoking=still)

