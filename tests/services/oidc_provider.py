"""A small but real OpenID Connect provider for tests, built on authlib's server side.

No real identity provider can run on this machine, so the admin sign-in tests
talk to this one: a Flask app served by werkzeug in a background thread on
127.0.0.1, with all state in memory::

    with OIDCProvider() as idp:
        idp.register_client("credgate-cli", public=True)
        # POST {idp.issuer}/device_authorization, show user_code ...
        idp.approve_device(user_code, "alice")   # what the human does in a browser
        # POST {idp.issuer}/token -> access_token + id_token

Endpoints (all advertised in ``/.well-known/openid-configuration``):

==========================================  =====================================================
``GET  /.well-known/openid-configuration``  discovery document
``GET  /jwks``                              the RSA signing key (public part, with ``kid``)
``POST /device_authorization``              RFC 8628 device authorization (``interval`` is 1 s)
``GET  /device``                            the ``verification_uri``; a text page only, approve
                                            with :meth:`OIDCProvider.approve_device`
``GET  /authorize``                         authorization code flow, see below
``POST /token``                             ``device_code``, ``authorization_code`` (+PKCE) and
                                            ``client_credentials`` grants
``GET|POST /userinfo``                      claims of the user behind a bearer access token
==========================================  =====================================================

Which authlib piece does what:

* ``/token`` is authlib's ``AuthorizationServer`` with ``DeviceCodeGrant``,
  ``AuthorizationCodeGrant`` (extended by ``CodeChallenge`` and ``OpenIDCode``)
  and ``ClientCredentialsGrant``; ``/device_authorization`` is its
  ``DeviceAuthorizationEndpoint`` and ``/userinfo`` its ``UserInfoEndpoint``
  behind a ``ResourceProtector``.
* authlib has no OpenID extension for the device grant, so ``OpenIDToken``
  (the part of ``OpenIDCode`` that adds ``id_token`` to a token response) is
  registered on the device grant as well.  A ``nonce`` sent to
  ``/device_authorization`` is copied into that id_token.

OpenID behaviour: an ``id_token`` is issued only when the granted scope
contains ``openid`` (OpenID Connect Core 3.1.3.3).  It carries ``iss``,
``sub`` (the username), ``aud`` (the client id), ``exp``, ``iat``,
``auth_time``, ``at_hash``, ``nonce`` when one was sent, and *all* of the
user's claims (``email``, ``groups``...) whatever the scope.  Access tokens
are opaque random strings, accepted by ``/userinfo`` only.

PKCE: public clients must send ``code_challenge`` with
``code_challenge_method=S256`` (``plain`` is refused) and the matching
``code_verifier``; confidential clients may use PKCE.

Test-only shortcut: nobody can log in at ``/authorize``, so the request names
the user with ``login_hint=<username>`` and the provider redirects at once to
``redirect_uri?code=...&state=...``.  A missing or unknown ``login_hint``
redirects with ``error=login_required``.  Errors found before the client and
``redirect_uri`` are validated (unknown client, unregistered ``redirect_uri``)
are answered with a 400 JSON body instead of a redirect (RFC 6749 4.1.2.1).

Device flow polling follows RFC 8628 3.5: ``authorization_pending`` until
:meth:`~OIDCProvider.approve_device` or :meth:`~OIDCProvider.deny_device`,
``slow_down`` (and the interval grows by 5 s) when a pending code is polled
sooner than its interval after the previous poll, ``access_denied`` after a
denial, ``expired_token`` after ``device_code_ttl``.  An approved code gives
tokens once; polling it again is ``invalid_grant``.

This module does not depend on pytest.
"""

from __future__ import annotations

import base64
import copy
import html
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from authlib.integrations.flask_oauth2 import AuthorizationServer, ResourceProtector
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import (
    ClientMixin,
    InvalidGrantError,
    InvalidRequestError,
    TokenMixin,
    UnauthorizedClientError,
    grants,
    list_to_scope,
    scope_to_list,
)
from authlib.oauth2.rfc6750 import BearerTokenValidator, InvalidTokenError
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc8628 import (
    DEVICE_CODE_GRANT_TYPE,
    DeviceAuthorizationEndpoint,
    DeviceCodeGrant,
    DeviceCredentialDict,
)
from authlib.oidc.core import UserInfo, UserInfoEndpoint
from authlib.oidc.core.errors import LoginRequiredError
from authlib.oidc.core.grants import OpenIDCode, OpenIDToken
from flask import Flask, Response, request
from joserfc import jwt
from joserfc.jwk import RSAKey
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from .managed import ManagedService
from .pgcluster import free_port

__all__ = ["DEFAULT_USERS", "SCOPES_SUPPORTED", "OIDCProvider"]

DEFAULT_USERS: dict[str, dict[str, Any]] = {
    "alice": {"email": "alice@example.com", "groups": ["credgate-admins"]},
    "bob": {"groups": ["ml-team"]},
}

SCOPES_SUPPORTED = ["openid", "profile", "email", "groups"]
TOKEN_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}

# Claims the provider sets itself; a user's claims never override them.
_RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "auth_time", "nonce", "at_hash", "azp"})


# --------------------------------------------------------------------------- storage models


@dataclass(frozen=True)
class User:
    username: str
    claims: Mapping[str, Any]

    def get_user_id(self) -> str:
        return self.username

    def id_claims(self) -> dict[str, Any]:
        """The user's own claims plus ``sub``; reserved JWT claims are dropped."""
        claims = {k: copy.deepcopy(v) for k, v in self.claims.items() if k not in _RESERVED_CLAIMS}
        claims["sub"] = self.username
        return claims


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str | None
    redirect_uris: list[str]
    grant_types: list[str]
    public: bool
    scope: str = " ".join(SCOPES_SUPPORTED)

    @property
    def token_endpoint_auth_method(self) -> str:
        return "none" if self.public else "client_secret_basic"

    @property
    def client_metadata(self) -> dict[str, Any]:
        return {
            "redirect_uris": list(self.redirect_uris),
            "grant_types": list(self.grant_types),
            "response_types": ["code"] if "authorization_code" in self.grant_types else [],
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "scope": self.scope,
        }

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if self.redirect_uris else None

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return ""
        allowed = set(self.scope.split())
        return list_to_scope([s for s in scope_to_list(scope) if s in allowed])

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        if self.client_secret is None:
            return False
        return secrets.compare_digest(self.client_secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.public:
            return method == "none"
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass
class AuthorizationCode:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: User
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    auth_time: int
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None

    def is_expired(self) -> bool:
        return self.expires_at < time.time()


@dataclass
class Token(TokenMixin):
    access_token: str
    client: Client
    user: User | None
    scope: str
    expires_at: float
    revoked: bool = False

    def check_client(self, client: ClientMixin) -> bool:
        return client.get_client_id() == self.client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int(self.expires_at - time.time()))

    def is_expired(self) -> bool:
        return self.expires_at < time.time()

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> User | None:
        return self.user

    def get_client(self) -> Client:
        return self.client


@dataclass
class _Store:
    """Everything the provider remembers; guarded by ``lock``."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    clients: dict[str, Client] = field(default_factory=dict)
    codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    devices: dict[str, DeviceCredentialDict] = field(default_factory=dict)  # by device_code
    user_grants: dict[str, tuple[User | None, bool]] = field(default_factory=dict)  # by user_code
    used_nonces: set[tuple[str, str]] = field(default_factory=set)


def _normalize_user_code(user_code: str) -> str:
    return user_code.strip().upper()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --------------------------------------------------------------------------- the provider


class OIDCProvider(ManagedService):
    """An in-memory OpenID provider on ``http://127.0.0.1:<port>`` (see the module docstring).

    Args:
        users: username -> claims (``email``, ``groups``...); defaults to
            :data:`DEFAULT_USERS` (alice in ``credgate-admins``, bob in ``ml-team``).
        device_interval: the ``interval`` returned by ``/device_authorization``.
        device_code_ttl: lifetime of a device code in seconds (``expires_in``).
        token_ttl: lifetime of access tokens and id_tokens in seconds.

    Attributes:
        host: always ``"127.0.0.1"``.
        port: the TCP port (set by :meth:`start`, 0 when stopped).
        issuer: ``http://127.0.0.1:<port>`` (set by :meth:`start`).
        kid: the ``kid`` of the signing key (set by :meth:`start`).
        users: the users, by username (change freely between requests).
        login_form: ``/authorize`` without ``login_hint`` shows a sign-in page (a username
            field that resubmits the request with ``login_hint``), for a browser to fill in.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        users: dict[str, dict[str, Any]] | None = None,
        *,
        device_interval: int = 1,
        device_code_ttl: int = 300,
        token_ttl: int = 3600,
        login_form: bool = False,
    ) -> None:
        self.login_form = login_form
        self.users: dict[str, dict[str, Any]] = copy.deepcopy(DEFAULT_USERS if users is None else users)
        self.device_interval = device_interval
        self.device_code_ttl = device_code_ttl
        self.token_ttl = token_ttl
        self.port: int = 0
        self.issuer: str = ""
        self.kid: str = ""
        self._key: RSAKey | None = None
        self._store = _Store()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> OIDCProvider:
        """Generate the signing key, bind a free port and serve; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("OIDCProvider already started")
        self._key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, auto_kid=True)
        self.kid = str(self._key.kid)
        app = self._build_app()
        last_error: OSError | None = None
        for _ in range(5):  # free_port() can race with another process
            port = free_port(self.host)
            try:
                server = make_server(self.host, port, app, threaded=True, request_handler=_QuietHandler)
                break
            except OSError as exc:
                last_error = exc
        else:
            raise RuntimeError(f"OIDCProvider could not bind a port on {self.host}: {last_error!r}")
        self._server = server
        self.port = port
        self.issuer = f"http://{self.host}:{port}"
        self._guard_exit()
        self._thread = threading.Thread(target=server.serve_forever, name=f"oidc-provider-{port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and forget all state but the users. Idempotent."""
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        try:
            if server is not None:
                server.shutdown()
                server.server_close()
            if thread is not None:
                thread.join(timeout=5)
        finally:
            self.port = 0
            self.issuer = ""
            self._store = _Store()
            self._release_exit_guard()

    @property
    def running(self) -> bool:
        return self._server is not None

    def __repr__(self) -> str:
        return f"<OIDCProvider {self.issuer or 'stopped'}>"

    # ----------------------------------------------------------------- test controls

    def register_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        redirect_uris: Iterable[str] = (),
        grant_types: Iterable[str] | None = None,
        public: bool = False,
    ) -> None:
        """Register (or replace) a client.

        A public client (``public=True``) has no secret and authenticates with
        ``token_endpoint_auth_method=none``; it must use PKCE in the code flow.
        A confidential client needs ``secret`` and may send it with HTTP Basic
        or in the form (``client_secret_post``).  ``grant_types`` defaults to
        the device and code grants, plus ``client_credentials`` for a
        confidential client.
        """
        if public and secret is not None:
            raise ValueError("a public client has no secret")
        if not public and not secret:
            raise ValueError("a confidential client needs a secret")
        if grant_types is None:
            grant_types = [DEVICE_CODE_GRANT_TYPE, "authorization_code"]
            if not public:
                grant_types.append("client_credentials")
        grant_types = list(grant_types)
        if public and "client_credentials" in grant_types:
            raise ValueError("client_credentials is for confidential clients only (RFC 6749 4.4)")
        client = Client(
            client_id=client_id,
            client_secret=secret,
            redirect_uris=list(redirect_uris),
            grant_types=grant_types,
            public=public,
        )
        with self._store.lock:
            self._store.clients[client_id] = client

    def approve_device(self, user_code: str, username: str) -> None:
        """Approve a pending device code as ``username``, as the user would in a browser.

        Raises :class:`KeyError` for an unknown user code or username.
        """
        user = self._user(username)
        if user is None:
            raise KeyError(f"unknown user {username!r}")
        self._decide_device(user_code, user, approved=True)

    def deny_device(self, user_code: str) -> None:
        """Deny a pending device code; the next poll answers ``access_denied``."""
        self._decide_device(user_code, None, approved=False)

    def _decide_device(self, user_code: str, user: User | None, *, approved: bool) -> None:
        code = _normalize_user_code(user_code)
        with self._store.lock:
            credential = next((c for c in self._store.devices.values() if c.get_user_code() == code), None)
            if credential is None:
                raise KeyError(f"unknown or already used user code {user_code!r}")
            credential["auth_time"] = int(time.time())
            self._store.user_grants[code] = (user, approved)

    # ----------------------------------------------------------------- keys and tokens

    def signing_jwk_public(self) -> dict[str, Any]:
        """The public signing key as a JWK (``kty``, ``n``, ``e``, ``kid``, ``use``, ``alg``)."""
        return dict(self._signing_key().as_dict(private=False))

    def jwks(self) -> dict[str, Any]:
        """The document served at ``/jwks``: ``{"keys": [signing_jwk_public()]}``."""
        return {"keys": [self.signing_jwk_public()]}

    def sign(
        self,
        claims: dict[str, Any],
        *,
        kid: str | None = None,
        alg: str = "RS256",
        headers: dict[str, Any] | None = None,
    ) -> str:
        """Sign ``claims`` exactly as given (nothing is added) with this issuer's key.

        The header is ``{"typ": "JWT", "alg": alg, "kid": kid or self.kid}``
        updated with ``headers``; a header whose value is ``None`` is left out
        (``headers={"kid": None}`` makes a token without ``kid``).

        ``alg`` may be any RSA algorithm (``RS256``..``PS512``, signed with the
        provider's private key) or, for negative tests, ``none`` (an unsecured
        JWT with an empty signature) or ``HS256``/``HS384``/``HS512`` keyed
        with the PEM of the provider's *public* key: the classic
        algorithm-confusion forgery a verifier must refuse.
        """
        header: dict[str, Any] = {"typ": "JWT", "alg": alg, "kid": kid or self.kid}
        header.update(headers or {})
        header = {k: v for k, v in header.items() if v is not None}
        if alg in RSA_ALGORITHMS:
            return jwt.encode(header, claims, self._signing_key(), algorithms=[alg], default_type=None)
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        if alg == "none":
            return signing_input + "."
        if alg in HMAC_HASHES:
            secret = self._signing_key().as_pem(private=False)
            mac = hmac.new(secret, signing_input.encode("ascii"), HMAC_HASHES[alg]).digest()
            return signing_input + "." + _b64url(mac)
        raise ValueError(f"unsupported alg {alg!r}")

    def id_token_claims(self, username: str, client_id: str, *, lifetime: int = 300, **extra: Any) -> dict[str, Any]:
        """A valid id_token claim set for ``username`` and audience ``client_id``.

        Meant as the starting point for :meth:`sign` in negative tests; ``extra``
        claims are added last and override the rest.
        """
        user = self._user(username)
        if user is None:
            raise KeyError(f"unknown user {username!r}")
        now = int(time.time())
        claims = user.id_claims()
        claims.update(iss=self.issuer, aud=client_id, iat=now, exp=now + lifetime, auth_time=now)
        claims.update(extra)
        return claims

    # ----------------------------------------------------------------- internals

    def _signing_key(self) -> RSAKey:
        if self._key is None:
            raise RuntimeError("OIDCProvider is not started")
        return self._key

    def _user(self, username: str | None) -> User | None:
        if not username or username not in self.users:
            return None
        return User(username, copy.deepcopy(self.users[username]))

    def _discovery(self) -> dict[str, Any]:
        base = self.issuer
        return {
            "issuer": base,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "device_authorization_endpoint": f"{base}/device_authorization",
            "userinfo_endpoint": f"{base}/userinfo",
            "jwks_uri": f"{base}/jwks",
            "scopes_supported": list(SCOPES_SUPPORTED),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", DEVICE_CODE_GRANT_TYPE, "client_credentials"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": list(TOKEN_AUTH_METHODS),
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "at_hash", "email", "groups"],
        }

    def _build_app(self) -> Flask:
        provider = self
        store = self._store
        app = Flask(__name__)
        app.config.update(
            OAUTH2_SCOPES_SUPPORTED=list(SCOPES_SUPPORTED),
            OAUTH2_TOKEN_EXPIRES_IN={
                "authorization_code": self.token_ttl,
                DEVICE_CODE_GRANT_TYPE: self.token_ttl,
                "client_credentials": self.token_ttl,
            },
        )

        def query_client(client_id: str) -> Client | None:
            with store.lock:
                return store.clients.get(client_id)

        def save_token(token: dict[str, Any], req: Any) -> None:
            record = Token(
                access_token=token["access_token"],
                client=req.client,
                user=req.user,
                scope=token.get("scope", ""),
                expires_at=time.time() + int(token.get("expires_in") or provider.token_ttl),
            )
            with store.lock:
                store.tokens[record.access_token] = record

        server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
        openid_token = _OpenIDToken(provider)
        server.register_grant(
            _AuthorizationCodeGrant.bound(store),
            [_S256CodeChallenge(required=True), _OpenIDCode(provider, require_nonce=False)],
        )
        server.register_grant(_DeviceCodeGrant.bound(provider), [openid_token])
        server.register_grant(_ClientCredentialsGrant)
        server.register_endpoint(_DeviceAuthorizationEndpoint.bound(provider))

        protector = ResourceProtector()
        protector.register_token_validator(_BearerTokenValidator(store))
        server.register_endpoint(_UserInfoEndpoint(resource_protector=protector))

        @app.get("/.well-known/openid-configuration")
        def discovery() -> Any:
            return provider._discovery()

        @app.get("/jwks")
        def jwks() -> Any:
            return provider.jwks()

        @app.post("/device_authorization")
        def device_authorization() -> Any:
            return server.create_endpoint_response(_DeviceAuthorizationEndpoint.ENDPOINT_NAME)

        @app.get("/device")
        def device_page() -> Any:
            user_code = request.args.get("user_code", "")
            text = (
                "credgate test identity provider: nobody can sign in here.\n"
                "Tests approve a device code with OIDCProvider.approve_device(user_code, username).\n"
                f"user_code: {user_code}\n"
            )
            return Response(text, mimetype="text/plain")

        @app.post("/token")
        def token() -> Any:
            return server.create_token_response()

        @app.get("/authorize")
        def authorize() -> Any:
            if provider.login_form and request.args.get("login_hint") is None:
                hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                                 for k, v in request.args.items())
                page = ('<!doctype html><title>Test IdP: sign in</title><h1>Test IdP</h1>'
                        f'<form method="get" action="/authorize">{hidden}<label>Username '
                        '<input name="login_hint" id="username"></label> <button id="sign-in">Sign in</button></form>')
                return Response(page, mimetype="text/html")
            # Test-only shortcut: login_hint names the user who "signs in".
            user = provider._user(request.args.get("login_hint"))
            try:
                grant = server.get_consent_grant(end_user=user)
            except OAuth2Error as error:
                return server.handle_error_response(None, error)
            if user is None:
                error = LoginRequiredError(
                    description="test provider: pass login_hint=<known username>",
                    redirect_uri=grant.redirect_uri,
                    state=request.args.get("state"),
                )
                return server.handle_error_response(None, error)
            return server.create_authorization_response(grant=grant, grant_user=user)

        @app.route("/userinfo", methods=["GET", "POST"])
        def userinfo() -> Any:
            return server.create_endpoint_response(_UserInfoEndpoint.ENDPOINT_NAME)

        return app


# --------------------------------------------------------------------------- authlib glue


class _QuietHandler(WSGIRequestHandler):
    """werkzeug's handler without the per-request access log (errors still log)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class _OpenIDToken(OpenIDToken):
    """Adds ``id_token`` to token responses of a grant whose scope has ``openid``.

    Used directly on the device grant (authlib ships no OpenID extension for
    it) and, through :class:`_OpenIDCode`, on the code grant.
    """

    def __init__(self, provider: OIDCProvider) -> None:
        self.provider = provider

    def resolve_client_private_key(self, client: Client) -> RSAKey:
        return self.provider._signing_key()

    def get_client_algorithm(self, client: Client) -> str:
        return "RS256"

    def get_encode_header(self, client: Client) -> dict[str, str]:
        return {"alg": "RS256", "kid": self.provider.kid}

    def get_client_claims(self, client: Client) -> dict[str, Any]:
        now = int(time.time())
        return {"iss": self.provider.issuer, "aud": client.get_client_id(), "exp": now + self.provider.token_ttl}

    def get_compatible_claims(self, request: Any) -> dict[str, Any]:
        claims = super().get_compatible_claims(request)
        credential = request.credential  # set by the device grant only
        if isinstance(credential, DeviceCredentialDict):
            if nonce := credential.get_nonce():
                claims["nonce"] = nonce
            if auth_time := credential.get_auth_time():
                claims["auth_time"] = auth_time
        return claims

    def generate_user_info(self, user: User, scope: str) -> UserInfo:
        return UserInfo(user.id_claims())


class _OpenIDCode(_OpenIDToken, OpenIDCode):
    def __init__(self, provider: OIDCProvider, require_nonce: bool = False) -> None:
        _OpenIDToken.__init__(self, provider)
        OpenIDCode.__init__(self, require_nonce=require_nonce)

    def exists_nonce(self, nonce: str, request: Any) -> bool:
        store = self.provider._store
        with store.lock:
            return (request.payload.client_id, nonce) in store.used_nonces


class _S256CodeChallenge(CodeChallenge):
    """PKCE with S256 only, and mandatory for public clients at ``/authorize``.

    authlib's ``CodeChallenge`` accepts a missing challenge at the
    authorization endpoint (it only refuses a missing ``code_verifier`` later)
    and an omitted method means ``plain`` (RFC 7636 4.3); here both are
    refused up front.
    """

    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        super().validate_code_challenge(grant, redirect_uri)
        data = grant.request.payload.data
        challenge = data.get("code_challenge")
        client: Client = grant.request.client
        if client.public and not challenge:
            raise InvalidRequestError("Public clients must send 'code_challenge' (PKCE, S256).")
        if challenge and data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("Only code_challenge_method=S256 is supported.")


class _AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = list(TOKEN_AUTH_METHODS)
    CODE_LIFETIME = 120
    store: _Store

    @classmethod
    def bound(cls, store: _Store) -> type[_AuthorizationCodeGrant]:
        return type(cls.__name__, (cls,), {"store": store})

    def save_authorization_code(self, code: str, request: Any) -> None:
        data = request.payload.data
        nonce = data.get("nonce")
        record = AuthorizationCode(
            code=code,
            client_id=request.client.get_client_id(),
            redirect_uri=request.payload.redirect_uri or "",
            scope=request.scope or "",
            user=request.user,
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
            nonce=nonce,
            auth_time=int(time.time()),
            expires_at=time.time() + self.CODE_LIFETIME,
        )
        with self.store.lock:
            self.store.codes[code] = record
            if nonce:
                self.store.used_nonces.add((record.client_id, nonce))

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        with self.store.lock:
            record = self.store.codes.get(code)
        if record is None or record.client_id != client.get_client_id() or record.is_expired():
            return None
        return record

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        with self.store.lock:
            self.store.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User:
        return authorization_code.user


class _DeviceAuthorizationEndpoint(DeviceAuthorizationEndpoint):
    provider: OIDCProvider

    @classmethod
    def bound(cls, provider: OIDCProvider) -> type[_DeviceAuthorizationEndpoint]:
        return type(
            cls.__name__,
            (cls,),
            {"provider": provider, "INTERVAL": provider.device_interval, "EXPIRES_IN": provider.device_code_ttl},
        )

    def authenticate_client(self, request: Any) -> Client:
        client = super().authenticate_client(request)
        if not client.check_grant_type(DEVICE_CODE_GRANT_TYPE):
            raise UnauthorizedClientError("The client is not allowed to use the device grant.")
        return client

    def get_verification_uri(self) -> str:
        return f"{self.provider.issuer}/device"

    def save_device_credential(self, client_id: str, scope: str | None, data: dict[str, Any]) -> None:
        credential = DeviceCredentialDict(
            client_id=client_id,
            scope=scope,
            device_code=data["device_code"],
            user_code=_normalize_user_code(data["user_code"]),
            expires_at=time.time() + data["expires_in"],
            interval=data["interval"],
            nonce=request.form.get("nonce"),
            last_poll=None,
        )
        store = self.provider._store
        with store.lock:
            store.devices[credential["device_code"]] = credential


class _DeviceCodeGrant(DeviceCodeGrant):
    provider: OIDCProvider

    @classmethod
    def bound(cls, provider: OIDCProvider) -> type[_DeviceCodeGrant]:
        return type(cls.__name__, (cls,), {"provider": provider})

    def query_device_credential(self, device_code: str) -> DeviceCredentialDict:
        with self.provider._store.lock:
            credential = self.provider._store.devices.get(device_code)
        if credential is None:
            # authlib would answer invalid_request; RFC 6749 5.2 says invalid_grant.
            raise InvalidGrantError("Unknown or already used 'device_code'.")
        return credential

    def query_user_grant(self, user_code: str) -> tuple[User | None, bool] | None:
        with self.provider._store.lock:
            return self.provider._store.user_grants.get(user_code)

    def should_slow_down(self, credential: DeviceCredentialDict) -> bool:
        """RFC 8628 3.5: polled sooner than ``interval`` after the previous poll."""
        now = time.monotonic()
        with self.provider._store.lock:
            last, credential["last_poll"] = credential["last_poll"], now
            if last is not None and now - last < credential["interval"]:
                credential["interval"] += 5
                return True
            return False

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        result = super().create_token_response()
        credential = self.request.credential
        with self.provider._store.lock:  # a device code gives tokens once
            self.provider._store.devices.pop(credential["device_code"], None)
            self.provider._store.user_grants.pop(credential.get_user_code(), None)
        return result


class _ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["client_secret_basic", "client_secret_post"]


class _BearerTokenValidator(BearerTokenValidator):
    def __init__(self, store: _Store) -> None:
        super().__init__()
        self.store = store

    def authenticate_token(self, token_string: str) -> Token | None:
        with self.store.lock:
            return self.store.tokens.get(token_string)


class _UserInfoEndpoint(UserInfoEndpoint):
    def generate_user_info(self, user: User | None, scope: str) -> UserInfo:
        if user is None:  # a client_credentials token has no user
            raise InvalidTokenError(description="The access token does not belong to a user.")
        return UserInfo(user.id_claims())
