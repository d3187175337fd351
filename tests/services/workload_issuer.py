"""A test OIDC issuer implementing connectors.base.WorkloadIdentity, for connector-level tests.

Not the gateway (its own issuer is tested in tests/gateway/test_web_identity.py): a real RSA key
(joserfc) signs the tokens, and a real HTTP server on 127.0.0.1 serves
``/.well-known/openid-configuration`` and ``/jwks`` so a party that trusts the issuer (a
stand-in for a cloud's STS) verifies real signatures the way the cloud does. The claims are
those the gateway's tokens carry (``iss``, ``sub``, ``aud``, ``iat``, ``nbf``, ``exp``, ``jti``,
``run``, ``lease``). ``rogue = True`` signs with a second key that the JWKS does not publish
(same ``kid``): a verifier that checks signatures must refuse those tokens.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import timedelta
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.standins.serving import Served


class WorkloadIssuer:
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.kid = "wi-" + secrets.token_hex(4)
        self._key = RSAKey.generate_key(2048, parameters={"kid": self.kid, "use": "sig", "alg": "RS256"}, private=True)
        self._rogue_key = RSAKey.generate_key(2048, parameters={"kid": self.kid}, private=True)
        self.rogue = False
        self._served = Served(self._asgi, "workload issuer")
        self.issued: list[dict[str, Any]] = []  # claims of every token signed

    @property
    def port(self) -> int:
        return self._served.port

    @property
    def issuer(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def token(
        self, *, audience: str, subject: str, run_id: str | None = None, lease_id: str | None = None,
        ttl: timedelta = timedelta(minutes=5),
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "sub": subject, "aud": audience, "iat": now, "nbf": now,
                                  "exp": now + int(min(ttl, timedelta(hours=1)).total_seconds()),
                                  "jti": secrets.token_hex(8)}
        if run_id is not None:
            claims["run"] = run_id
        if lease_id is not None:
            claims["lease"] = lease_id
        self.issued.append(claims)
        key = self._rogue_key if self.rogue else self._key
        return jwt.encode({"alg": "RS256", "kid": self.kid, "typ": "JWT"}, claims, key)

    # --- HTTP: discovery and keys ------------------------------------------------------------

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/.well-known/openid-configuration":
            status, body = 200, {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks",
                                 "id_token_signing_alg_values_supported": ["RS256"],
                                 "response_types_supported": ["id_token"], "subject_types_supported": ["public"]}
        elif scope["path"] == "/jwks":
            status, body = 200, {"keys": [self._key.as_dict(private=False)]}
        else:
            status, body = 404, {"error": "not_found"}
        raw = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    def start(self) -> WorkloadIssuer:
        self._served.start()
        return self

    def stop(self) -> None:
        self._served.stop()
