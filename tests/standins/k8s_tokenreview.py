"""A STAND-IN for the Kubernetes TokenReview API, for OpenBao's ``kubernetes`` auth method.

This is not Kubernetes. No cluster can run on this machine, so the ``vault`` backend's
kubernetes login is tested against a real OpenBao whose kubernetes auth method is pointed
at this server. It implements the one call that auth method makes, written from the
Kubernetes API reference (authentication.k8s.io/v1, TokenReview)::

    POST /apis/authentication.k8s.io/v1/tokenreviews
    Authorization: Bearer <the reviewer's own token>
    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
     "spec": {"token": "<service-account JWT>", "audiences": [...]}}

    201 {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {...},
         "spec": {...}, "status": {"authenticated": true, "audiences": [...],
         "user": {"username": "system:serviceaccount:<ns>:<name>", "uid": "...", "groups": [...]}}}

What it verifies, like an API server would:

- the reviewer's bearer token equals :attr:`reviewer_token` (a service-account JWT it
  issued itself); otherwise 401 with a ``Status`` object (``reason: Unauthorized``);
- the reviewed token: its RS256 signature against this stand-in's own key, ``iss``
  (:attr:`issuer`), ``exp``/``nbf``, that it was not revoked (:meth:`revoke`), and, when the
  request names ``audiences``, that the token's ``aud`` shares one. A token that fails is
  ``status.authenticated: false`` with an ``error`` (still 201, as Kubernetes answers).

It serves HTTPS with a self-signed certificate (SAN ``IP:127.0.0.1``, ``DNS:localhost``)
generated with ``cryptography``; :attr:`ca_pem` is what ``kubernetes_ca_cert`` takes.
Service-account tokens are issued with :meth:`issue` (projected-token claims, including the
``kubernetes.io`` claim the auth method reads the namespace and name from).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.services.managed import ManagedService

__all__ = ["TokenReviewStandin"]

_GROUP_VERSION = "authentication.k8s.io/v1"


def _self_signed() -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) for 127.0.0.1/localhost, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes (credgate test stand-in)")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


class TokenReviewStandin(ManagedService):
    """The stand-in server (see the module docstring). ``url`` is ``https://127.0.0.1:<port>``."""

    host = "127.0.0.1"

    def __init__(self, issuer: str = "https://kubernetes.default.svc.cluster.local") -> None:
        self.issuer = issuer
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex[:16]
        self.ca_pem, self._tls_key_pem = _self_signed()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._revoked: set[str] = set()
        self.reviews: list[dict[str, Any]] = []  # {"authenticated": bool, "username": str|None}
        self.reviewer_token = self.issue("kube-system", "token-reviewer", ttl=86400)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def public_key_pem(self) -> str:
        return self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def issue(
        self, namespace: str, name: str, *, uid: str | None = None, ttl: int = 600,
        audiences: list[str] | None = None, issuer: str | None = None, key: Any = None,
    ) -> str:
        """A projected service-account token for ``namespace``/``name`` (RS256, this
        stand-in's key unless ``key`` is given: a token signed elsewhere is refused)."""
        now = int(time.time())
        uid = uid or str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{namespace}.{name}"))
        claims = {
            "iss": issuer or self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "aud": audiences or ["https://kubernetes.default.svc.cluster.local"],
            "iat": now, "nbf": now, "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
        }
        return jwt.encode(claims, key or self._signing_key, algorithm="RS256", headers={"kid": self.kid})

    def revoke(self, token: str) -> None:
        """Make a token fail review from now on (a deleted service account or secret)."""
        self._revoked.add(token)

    # --- reviewing ---------------------------------------------------------------------

    def _review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        if token in self._revoked:
            return {"authenticated": False, "error": "[invalid bearer token, token has been invalidated]"}
        try:
            claims = jwt.decode(
                token, self._signing_key.public_key(), algorithms=["RS256"], issuer=self.issuer,
                options={"require": ["exp", "iss", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            return {"authenticated": False, "error": "[invalid bearer token, service account token has expired]"}
        except jwt.PyJWTError:
            return {"authenticated": False, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"}
        token_aud = claims.get("aud") or []
        token_aud = [token_aud] if isinstance(token_aud, str) else list(token_aud)
        if audiences and not set(audiences) & set(token_aud):
            return {"authenticated": False, "error": "[invalid bearer token, token audiences is invalid]"}
        k8s = claims.get("kubernetes.io") or {}
        ns, sa = k8s.get("namespace", ""), k8s.get("serviceaccount") or {}
        return {
            "authenticated": True,
            "audiences": audiences or token_aud,
            "user": {
                "username": f"system:serviceaccount:{ns}:{sa.get('name', '')}",
                "uid": sa.get("uid", ""),
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
            },
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                return

            def _send(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": message, "reason": reason, "code": code})

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self.path.split("?")[0] != "/apis/authentication.k8s.io/v1/tokenreviews":
                    return self._status(404, "NotFound", "the server could not find the requested resource")
                auth = self.headers.get("Authorization", "")
                if auth != f"Bearer {standin.reviewer_token}":
                    return self._status(401, "Unauthorized", "Unauthorized")
                try:
                    body = json.loads(raw)
                    spec = body["spec"]
                    token = spec["token"]
                    audiences = list(spec.get("audiences") or [])
                    if body.get("kind", "TokenReview") != "TokenReview" or not isinstance(token, str):
                        raise ValueError
                except (ValueError, KeyError, TypeError):
                    return self._status(400, "BadRequest", "the request body is not a TokenReview")
                status = standin._review(token, audiences)
                standin.reviews.append(
                    {"authenticated": status["authenticated"], "username": (status.get("user") or {}).get("username")}
                )
                self._send(201, {
                    "apiVersion": _GROUP_VERSION, "kind": "TokenReview",
                    "metadata": {"creationTimestamp": None},
                    "spec": {"token": token, **({"audiences": audiences} if audiences else {})},
                    "status": status,
                })

            def do_GET(self) -> None:  # noqa: N802
                self._status(404, "NotFound", "the server could not find the requested resource")

        return Handler

    def start(self) -> TokenReviewStandin:
        if self._server is not None:
            return self
        self._tmp = tempfile.TemporaryDirectory(prefix="credgate-k8s-")
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
        self._thread = threading.Thread(target=server.serve_forever, name="k8s-tokenreview-standin", daemon=True)
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

    def configure_openbao(self, client: Any, mount: str = "kubernetes") -> None:
        """Point an OpenBao kubernetes auth mount (hvac ``client``) at this stand-in."""
        client.auth.kubernetes.configure(
            kubernetes_host=self.url,
            kubernetes_ca_cert=self.ca_pem.decode(),
            token_reviewer_jwt=self.reviewer_token,
            disable_local_ca_jwt=True,
            mount_point=mount,
        )
