"""A STAND-IN for a slice of the Kubernetes API server, for the ``kubernetes`` connector.

This is not Kubernetes. No cluster can run on this machine, so the connector is tested
against this small HTTPS server, written from the Kubernetes API reference (core/v1 Secret,
ConfigMap and Namespace; authentication.k8s.io/v1 TokenRequest, TokenReview and
SelfSubjectReview). It serves exactly these calls::

    GET    /api/v1/namespaces                                    NamespaceList
    POST   /api/v1/namespaces/{ns}/secrets                       201 Secret (409 AlreadyExists)
    GET    /api/v1/namespaces/{ns}/secrets/{name}                Secret (404 NotFound)
    DELETE /api/v1/namespaces/{ns}/secrets/{name}                Secret; DeleteOptions.preconditions.uid (409)
    POST   /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token    201 TokenRequest
    GET    /api/v1/namespaces/{ns}/configmaps                    ConfigMapList
    POST   /apis/authentication.k8s.io/v1/tokenreviews           201 TokenReview
    POST   /apis/authentication.k8s.io/v1/selfsubjectreviews     201 SelfSubjectReview

What it verifies, like an API server would, on every request:

- Authentication (else 401 ``Status`` reason ``Unauthorized``): the bearer token is either
  the admin token (:attr:`admin_token`, an opaque static token, compared in constant time)
  or a service-account JWT this stand-in issued: RS256 signature against its own key (a
  token signed with any other key fails), ``iss``, ``exp``/``nbf``, an ``aud`` shared with
  the API server's audiences (:attr:`api_audiences`), the service account still existing
  with the token's uid, and, for a token bound to a Secret, that Secret still existing with
  the uid in the token (deleting the Secret kills the token at once).
- Authorization (else 403 reason ``Forbidden``), a small RBAC table: the admin may create
  ``serviceaccounts/token`` and create/get/delete ``secrets`` only in
  :attr:`admin_namespaces`, list namespaces and create TokenReviews; a service-account token
  may only list ``configmaps`` in its own namespace. Any authenticated user may create a
  SelfSubjectReview.
- TokenRequest: ``expirationSeconds`` at least 600 (less: 422 reason ``Invalid``; absent:
  3600), ``audiences`` (empty: the API server's), ``boundObjectRef`` of kind Secret: the
  Secret must exist in the namespace (404) and its uid match the one given (409 Conflict);
  the service account must exist (404). The token carries the projected-token claims,
  including ``kubernetes.io.secret`` {name, uid}.
- TokenReview: ``status.authenticated`` false (with an ``error``) once the bound Secret is
  deleted, the token expired, or its signature, issuer or audiences are wrong.

It serves HTTPS with a self-signed certificate (SAN ``IP:127.0.0.1``, ``DNS:localhost``;
reused from :mod:`tests.standins.k8s_tokenreview`); :attr:`ca_pem` is the CA bundle.
:attr:`calls` records ``(method, path, username or None, status)`` of every request.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import re
import secrets
import ssl
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.services.managed import ManagedService
from tests.standins.k8s_tokenreview import _self_signed

__all__ = ["KubernetesAPIStandin", "ADMIN_USER"]

ADMIN_USER = "credgate-admin"
MIN_EXPIRATION = 600
_AUTHN = "authentication.k8s.io/v1"


def _rfc3339(epoch: float) -> str:
    return dt.datetime.fromtimestamp(int(epoch), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Fail(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class KubernetesAPIStandin(ManagedService):
    """The stand-in server (see the module docstring). ``url`` is ``https://127.0.0.1:<port>``.

    ``namespaces`` maps each namespace to its service accounts; each namespace gets one
    ConfigMap named ``settings`` (data ``{"namespace": NS}``)."""

    host = "127.0.0.1"

    def __init__(
        self, namespaces: dict[str, list[str]], admin_namespaces: set[str], *,
        issuer: str = "https://kubernetes.default.svc.cluster.local",
        api_audiences: tuple[str, ...] = ("https://kubernetes.default.svc.cluster.local",),
    ) -> None:
        self.issuer = issuer
        self.api_audiences = list(api_audiences)
        self.admin_namespaces = set(admin_namespaces)
        self.admin_token = "admin-" + secrets.token_urlsafe(32)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex[:16]
        self.ca_pem, self._tls_key_pem = _self_signed()
        self.port = 0
        self._lock = threading.Lock()
        self.service_accounts: dict[tuple[str, str], str] = {
            (ns, sa): str(uuid.uuid4()) for ns, sas in namespaces.items() for sa in sas
        }
        self.namespaces = set(namespaces)
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.configmaps: dict[str, list[dict[str, Any]]] = {
            ns: [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": ns,
                                                                          "uid": str(uuid.uuid4())},
                  "data": {"namespace": ns}}] for ns in namespaces
        }
        self.token_requests: list[dict[str, Any]] = []  # (namespace, sa, spec) of each granted TokenRequest
        self.calls: list[tuple[str, str, str | None, int]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    # --- tokens -----------------------------------------------------------------------

    def mint(
        self, namespace: str, name: str, *, ttl: int = 3600, audiences: list[str] | None = None,
        secret: tuple[str, str] | None = None, key: Any = None,
    ) -> str:
        """A service-account token as TokenRequest issues it (``secret``: bound to (name, uid)).
        ``key`` signs with another key (a forgery); a negative ``ttl`` makes it expired."""
        now = int(time.time())
        k8s: dict[str, Any] = {"namespace": namespace, "serviceaccount": {
            "name": name, "uid": self.service_accounts.get((namespace, name), str(uuid.uuid4()))}}
        if secret is not None:
            k8s["secret"] = {"name": secret[0], "uid": secret[1]}
        claims = {
            "iss": self.issuer, "sub": f"system:serviceaccount:{namespace}:{name}",
            "aud": audiences or list(self.api_audiences), "iat": min(now, now + ttl), "nbf": min(now, now + ttl),
            "exp": now + ttl, "jti": str(uuid.uuid4()), "kubernetes.io": k8s,
        }
        return jwt.encode(claims, key or self._key, algorithm="RS256", headers={"kid": self.kid})

    def _check_sa_token(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """The user a service-account token authenticates as, or _Fail(401) with the reason."""
        try:
            claims = jwt.decode(token, self._key.public_key(), algorithms=["RS256"], issuer=self.issuer,
                                options={"require": ["exp", "iss", "sub", "aud"], "verify_aud": False})
        except jwt.ExpiredSignatureError:
            raise _Fail(401, "Unauthorized", "service account token has expired") from None
        except jwt.PyJWTError:
            raise _Fail(401, "Unauthorized", "invalid bearer token") from None
        aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if not set(aud) & set(audiences):
            raise _Fail(401, "Unauthorized", "token audiences is invalid")
        k8s = claims.get("kubernetes.io") or {}
        ns, sa = k8s.get("namespace"), (k8s.get("serviceaccount") or {})
        with self._lock:
            if self.service_accounts.get((ns, sa.get("name"))) != sa.get("uid"):
                raise _Fail(401, "Unauthorized", "service account has been deleted")
            bound = k8s.get("secret")
            if bound is not None:
                obj = self.secrets.get((ns, bound.get("name")))
                if obj is None or obj["metadata"]["uid"] != bound.get("uid"):
                    raise _Fail(401, "Unauthorized", "bound secret has been deleted")
        return {"username": f"system:serviceaccount:{ns}:{sa['name']}", "uid": sa["uid"], "namespace": ns,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"]}

    def authenticate(self, authorization: str) -> dict[str, Any]:
        if not authorization.startswith("Bearer "):
            raise _Fail(401, "Unauthorized", "Unauthorized")
        token = authorization[len("Bearer "):]
        if hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return {"username": ADMIN_USER, "uid": "admin", "namespace": None, "groups": ["system:authenticated"]}
        try:
            return self._check_sa_token(token, self.api_audiences)
        except _Fail:
            raise _Fail(401, "Unauthorized", "Unauthorized") from None

    def authorize(self, user: dict[str, Any], verb: str, resource: str, namespace: str | None) -> None:
        """The RBAC table (see the module docstring); _Fail(403) when not allowed."""
        if resource == "selfsubjectreviews":
            return
        if user["username"] == ADMIN_USER:
            if resource in ("secrets", "serviceaccounts/token") and namespace in self.admin_namespaces:
                if (resource, verb) in {("secrets", "create"), ("secrets", "get"), ("secrets", "delete"),
                                        ("serviceaccounts/token", "create")}:
                    return
            if (resource, verb) in {("namespaces", "list"), ("tokenreviews", "create")}:
                return
        elif resource == "configmaps" and verb == "list" and namespace == user["namespace"]:
            return
        where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        raise _Fail(403, "Forbidden", f'{resource} is forbidden: User "{user["username"]}" cannot {verb} '
                                      f'resource "{resource}"{where}')

    # --- operations ---------------------------------------------------------------------

    def _namespace_exists(self, ns: str) -> None:
        if ns not in self.namespaces:
            raise _Fail(404, "NotFound", f'namespaces "{ns}" not found')

    def create_secret(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        self._namespace_exists(ns)
        meta = body.get("metadata") or {}
        name = meta.get("name")
        if body.get("kind", "Secret") != "Secret" or not isinstance(name, str) or not re.fullmatch(
                r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name) or meta.get("namespace", ns) != ns:
            raise _Fail(422, "Invalid", "Secret is invalid")
        with self._lock:
            if (ns, name) in self.secrets:
                raise _Fail(409, "AlreadyExists", f'secrets "{name}" already exists')
            obj = {"apiVersion": "v1", "kind": "Secret", "type": body.get("type") or "Opaque",
                   "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()),
                                "labels": dict(meta.get("labels") or {}),
                                "annotations": dict(meta.get("annotations") or {}),
                                "creationTimestamp": _rfc3339(time.time())},
                   "data": dict(body.get("data") or {})}
            self.secrets[(ns, name)] = obj
            return obj

    def get_secret(self, ns: str, name: str) -> dict[str, Any]:
        self._namespace_exists(ns)
        with self._lock:
            obj = self.secrets.get((ns, name))
        if obj is None:
            raise _Fail(404, "NotFound", f'secrets "{name}" not found')
        return obj

    def delete_secret(self, ns: str, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        self._namespace_exists(ns)
        want = ((body or {}).get("preconditions") or {}).get("uid")
        with self._lock:
            obj = self.secrets.get((ns, name))
            if obj is None:
                raise _Fail(404, "NotFound", f'secrets "{name}" not found')
            if want is not None and want != obj["metadata"]["uid"]:
                raise _Fail(409, "Conflict", "Precondition failed: UID in precondition does not match the object")
            return self.secrets.pop((ns, name))

    def token_request(self, ns: str, sa: str, body: dict[str, Any]) -> dict[str, Any]:
        self._namespace_exists(ns)
        if body.get("kind", "TokenRequest") != "TokenRequest" or not isinstance(body.get("spec"), dict):
            raise _Fail(400, "BadRequest", "the request body is not a TokenRequest")
        spec = body["spec"]
        seconds = spec.get("expirationSeconds", 3600)
        if not isinstance(seconds, int) or seconds < MIN_EXPIRATION:
            raise _Fail(422, "Invalid", "spec.expirationSeconds: may not specify a duration less than 10 minutes")
        if seconds > 2**32:
            raise _Fail(422, "Invalid", "spec.expirationSeconds: may not specify a duration larger than 2^32 seconds")
        audiences = list(spec.get("audiences") or self.api_audiences)
        if (ns, sa) not in self.service_accounts:
            raise _Fail(404, "NotFound", f'serviceaccounts "{sa}" not found')
        ref, bound = spec.get("boundObjectRef"), None
        if ref is not None:
            if ref.get("kind") != "Secret" or ref.get("apiVersion", "v1") != "v1" or not ref.get("name"):
                raise _Fail(422, "Invalid", "spec.boundObjectRef: this stand-in binds to Secrets only")
            obj = self.get_secret(ns, ref["name"])
            if ref.get("uid") and ref["uid"] != obj["metadata"]["uid"]:
                raise _Fail(409, "Conflict", "the UID in the bound object reference does not match the UID in record")
            bound = (ref["name"], obj["metadata"]["uid"])
        token = self.mint(ns, sa, ttl=seconds, audiences=audiences, secret=bound)
        with self._lock:
            self.token_requests.append({"namespace": ns, "service_account": sa, "spec": json.loads(json.dumps(spec))})
        return {"apiVersion": _AUTHN, "kind": "TokenRequest",
                "metadata": {"name": sa, "namespace": ns, "creationTimestamp": None},
                "spec": {**spec, "audiences": audiences, "expirationSeconds": seconds},
                "status": {"token": token, "expirationTimestamp": _rfc3339(time.time() + seconds)}}

    def token_review(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = body.get("spec") or {}
        token = spec.get("token")
        if body.get("kind", "TokenReview") != "TokenReview" or not isinstance(token, str):
            raise _Fail(400, "BadRequest", "the request body is not a TokenReview")
        audiences = list(spec.get("audiences") or self.api_audiences)
        try:
            user = self._check_sa_token(token, audiences)
            status: dict[str, Any] = {"authenticated": True, "audiences": audiences, "user": {
                "username": user["username"], "uid": user["uid"], "groups": user["groups"]}}
        except _Fail as fail:
            status = {"authenticated": False, "error": f"[invalid bearer token, {fail.message}]"}
        return {"apiVersion": _AUTHN, "kind": "TokenReview", "metadata": {"creationTimestamp": None},
                "spec": {k: v for k, v in spec.items() if k != "token"}, "status": status}

    # --- HTTP ---------------------------------------------------------------------------

    def route(self, method: str, path: str, authorization: str, body: dict[str, Any] | None) -> tuple[int, Any, str | None]:
        user = self.authenticate(authorization)
        parts = [p for p in path.split("?")[0].split("/") if p]
        if parts[:2] == ["api", "v1"] and parts[2:3] == ["namespaces"]:
            rest = parts[3:]
            if not rest and method == "GET":
                self.authorize(user, "list", "namespaces", None)
                items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
                         for n in sorted(self.namespaces)]
                return 200, {"apiVersion": "v1", "kind": "NamespaceList", "items": items}, user["username"]
            ns = rest[0] if rest else ""
            if rest[1:] == ["secrets"] and method == "POST":
                self.authorize(user, "create", "secrets", ns)
                return 201, self.create_secret(ns, body or {}), user["username"]
            if len(rest) == 3 and rest[1] == "secrets" and method in ("GET", "DELETE"):
                self.authorize(user, "get" if method == "GET" else "delete", "secrets", ns)
                if method == "GET":
                    return 200, self.get_secret(ns, rest[2]), user["username"]
                return 200, self.delete_secret(ns, rest[2], body), user["username"]
            if len(rest) == 4 and rest[1] == "serviceaccounts" and rest[3] == "token" and method == "POST":
                self.authorize(user, "create", "serviceaccounts/token", ns)
                return 201, self.token_request(ns, rest[2], body or {}), user["username"]
            if rest[1:] == ["configmaps"] and method == "GET":
                self.authorize(user, "list", "configmaps", ns)
                self._namespace_exists(ns)
                return 200, {"apiVersion": "v1", "kind": "ConfigMapList", "items": self.configmaps[ns]}, user["username"]
        if parts[:3] == ["apis", "authentication.k8s.io", "v1"] and method == "POST":
            if parts[3:] == ["tokenreviews"]:
                self.authorize(user, "create", "tokenreviews", None)
                return 201, self.token_review(body or {}), user["username"]
            if parts[3:] == ["selfsubjectreviews"]:
                self.authorize(user, "create", "selfsubjectreviews", None)
                info = {k: user[k] for k in ("username", "uid", "groups")}
                return 201, {"apiVersion": _AUTHN, "kind": "SelfSubjectReview",
                             "metadata": {"creationTimestamp": None}, "status": {"userInfo": info}}, user["username"]
        raise _Fail(404, "NotFound", "the server could not find the requested resource")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                return

            def _send(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                username: str | None = None
                try:
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        raise _Fail(400, "BadRequest", "the body is not JSON") from None
                    status, out, username = standin.route(
                        self.command, self.path, self.headers.get("Authorization", ""), body)
                except _Fail as fail:
                    status, out = fail.code, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                              "status": "Failure", "message": fail.message,
                                              "reason": fail.reason, "code": fail.code}
                with standin._lock:
                    standin.calls.append((self.command, self.path, username, status))
                self._send(status, out)

            do_GET = do_POST = do_DELETE = _handle  # noqa: N815 - http.server's names

        return Handler

    def start(self) -> KubernetesAPIStandin:
        if self._server is not None:
            return self
        self._tmp = tempfile.TemporaryDirectory(prefix="credgate-k8s-api-")
        cert, key = Path(self._tmp.name, "tls.crt"), Path(self._tmp.name, "tls.key")
        cert.write_bytes(self.ca_pem)
        key.write_bytes(self._tls_key_pem)
        key.chmod(0o600)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server = ThreadingHTTPServer((self.host, 0), self._handler())
        server.daemon_threads = True
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        self._guard_exit()
        self._thread = threading.Thread(target=server.serve_forever, name="k8s-api-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._release_exit_guard()
