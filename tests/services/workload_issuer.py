"""A real OIDC issuer that implements ``connectors.base.WorkloadIdentity``, for connector-level tests.

In the gateway, ``WorkloadIdentity`` is the gateway itself (its signing keys, its public URL).
A connector test has no gateway, so this plays that part with a real RSA key: it serves
``/.well-known/openid-configuration`` and ``/jwks`` over HTTP on 127.0.0.1 (a stdlib server in a
thread), and :meth:`token` signs RS256 JWTs with the claims the protocol promises (``iss``,
``sub``, ``aud``, ``iat``, ``nbf``, ``exp``, ``jti``, ``run``/``lease`` when given). A relying
party (a stand-in) fetches the keys and verifies real signatures. Every token minted is kept in
:attr:`minted` (its claims). ``forge_with`` makes :meth:`token` sign with another key under the
same ``kid``: what an attacker without the issuer's key could produce.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


class LocalIssuer:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(8)
        self.minted: list[dict[str, Any]] = []
        self.forge_with: rsa.RSAPrivateKey | None = None
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.issuer, "jwks_uri": f"{issuer.issuer}/jwks",
                            "id_token_signing_alg_values_supported": ["RS256"],
                            "response_types_supported": ["id_token"], "subject_types_supported": ["public"]}
                elif self.path == "/jwks":
                    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer.key.public_key()))
                    body = {"keys": [{**jwk, "kid": issuer.kid, "use": "sig", "alg": "RS256"}]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="local-issuer")
        self._thread.start()

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    async def token(
        self, *, audience: str, subject: str, run_id: str | None = None, lease_id: str | None = None,
        ttl: timedelta = timedelta(minutes=5),
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "sub": subject, "aud": audience, "iat": now, "nbf": now,
                                  "exp": now + int(ttl.total_seconds()), "jti": secrets.token_hex(8)}
        if run_id is not None:
            claims["run"] = run_id
        if lease_id is not None:
            claims["lease"] = lease_id
        self.minted.append(claims)
        return jwt.encode(claims, self.forge_with or self.key, algorithm="RS256", headers={"kid": self.kid})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
