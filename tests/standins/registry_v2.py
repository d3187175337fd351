"""A STAND-IN for a Docker Registry (distribution) with token authentication: a subset of the v2 API.

This is not the distribution registry (no registry server can run here, and there is no
official Python registry client: tests drive it with httpx, as a docker client would speak
HTTP). It implements, from the distribution project's public specs ("Docker Registry HTTP
API V2", "Token Authentication Specification", "Token Authentication Implementation",
"Token Scope Documentation"):

- ``GET /v2/``: 200 with ``Docker-Distribution-API-Version: registry/2.0`` for any valid
  token; without one (or with a bad one) 401 with ``WWW-Authenticate: Bearer
  realm="...",service="..."`` (and ``error="invalid_token"`` for a bad one);
- ``GET`` / ``HEAD /v2/<name>/manifests/<reference>`` (action ``pull``) and ``PUT
  /v2/<name>/manifests/<reference>`` (action ``push``): 401 with ``scope="repository:<name>:
  <actions>"`` in the challenge when the token is missing or lacks the action
  (``error="insufficient_scope"``), 404 ``MANIFEST_UNKNOWN`` for a missing manifest;
- ``GET /v2/_catalog`` (access ``registry:catalog:*``).

Every bearer token is VERIFIED as the registry's token access controller does, against the
configured root certificate bundle (``auth.token.rootcertbundle``):

- the header names an algorithm (RS256/384/512, ES256/384/512) and either an ``x5c`` chain,
  which must chain (each certificate signed by the next, all within their validity) to a
  certificate of the bundle, whose leaf's key then verifies the signature; or, without
  ``x5c``, a ``kid`` equal to the libtrust key id of a bundle certificate's public key;
- the signature, with that key only (joserfc, the algorithm pinned to the key type);
- ``iss`` equal to the configured issuer, ``aud`` containing the configured service,
  ``exp`` in the future and ``nbf`` in the past (a minute's leeway, as distribution allows);
- the ``access`` claim: an entry of type ``repository`` (``registry`` for the catalog) with
  exactly this name and the action the request needs.

Not implemented: blobs, uploads, tags/list, deletes, digests checked against content,
content negotiation. Decisions are kept in :attr:`accepted` (claims) and :attr:`rejected`
(reasons).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from tests.standins.serving import Served

LEEWAY = 60
_MANIFEST = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[A-Za-z0-9_.:+-]{1,128})$")


def libtrust_kid(public_key: Any) -> str:
    """libtrust's key id (the stand-in's own copy, not the connector's)."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i:i + 4] for i in range(0, 48, 4))


def make_chain(kind: str = "ec", *, ca_name: str = "test registry token CA") -> tuple[str, str, str]:
    """Test PKI: ``(root CA PEM, leaf private key PEM, leaf+root chain PEM)``; the leaf signs tokens."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    def new_key() -> Any:
        return ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)

    now = datetime.now(UTC)
    ca_key, leaf_key = new_key(), new_key()
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token signer")]))
            .issuer_name(ca_subject).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return ca.public_bytes(pem).decode(), key_pem, (leaf.public_bytes(pem) + ca.public_bytes(pem)).decode()


class Refused(Exception):
    def __init__(self, reason: str, error: str = "invalid_token") -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


class RegistryV2StandIn:
    """The stand-in as a real HTTP server on 127.0.0.1 (uvicorn in a thread)."""

    host = "127.0.0.1"

    def __init__(self, *, root_bundle_pem: str, issuer: str, service: str,
                 realm: str = "https://auth.invalid/token") -> None:
        from cryptography import x509

        self.roots = x509.load_pem_x509_certificates(root_bundle_pem.encode())
        self.issuer, self.service, self.realm = issuer, service, realm
        self._served = Served(self._asgi, "registry v2 stand-in")
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.accepted: list[dict[str, Any]] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self._served.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def put_manifest(self, name: str, ref: str, body: bytes,
                     media_type: str = "application/vnd.oci.image.manifest.v1+json") -> None:
        self.manifests[(name, ref)] = (media_type, body)

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> RegistryV2StandIn:
        self._served.start()
        return self

    def stop(self) -> None:
        self._served.stop()

    # --- the checks ------------------------------------------------------------------

    def _signing_key(self, header: dict[str, Any]) -> Any:
        """The public key that must have signed the token, from a chain the bundle trusts."""
        from cryptography import x509

        now = datetime.now(UTC)
        if header.get("x5c"):
            try:
                chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in header["x5c"]]
            except (ValueError, TypeError):
                raise Refused("x5c is not base64 DER certificates") from None
            for cert in chain:
                if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                    raise Refused("a certificate of x5c is outside its validity")
            for child, parent in zip(chain, chain[1:]):
                try:
                    child.verify_directly_issued_by(parent)
                except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and friends
                    raise Refused("x5c does not chain") from None
            last = chain[-1]
            trusted = any(last == root for root in self.roots)
            if not trusted:
                for root in self.roots:
                    try:
                        last.verify_directly_issued_by(root)
                    except Exception:  # noqa: BLE001
                        continue
                    if root.not_valid_before_utc <= now <= root.not_valid_after_utc:
                        trusted = True
                        break
            if not trusted:
                raise Refused("x5c does not chain to the root certificate bundle")
            return chain[0].public_key()
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise Refused("the token has neither x5c nor kid")
        for root in self.roots:
            if libtrust_kid(root.public_key()) == kid:
                return root.public_key()
        raise Refused("no certificate of the root bundle has the token's kid")

    def verify(self, token: str, need: tuple[str, str, str] | None) -> dict[str, Any]:
        """The token's claims if it is valid and grants ``need`` ((type, name, action)); else Refused."""
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from joserfc import jwt
        from joserfc.errors import JoseError
        from joserfc.jwk import ECKey, RSAKey
        from joserfc.jws import JWSRegistry

        try:  # unverified: only to find the key
            segment = token.split(".")[0]
            header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
            if not isinstance(header, dict):
                raise ValueError
        except Exception:  # noqa: BLE001
            raise Refused("not a JWT") from None
        key = self._signing_key(header)
        alg = header.get("alg")
        if isinstance(key, rsa.RSAPublicKey) and alg in ("RS256", "RS384", "RS512"):
            jwk: Any = RSAKey.import_key(key)
        elif isinstance(key, ec.EllipticCurvePublicKey) and alg in ("ES256", "ES384", "ES512"):
            jwk = ECKey.import_key(key)
        else:
            raise Refused("the algorithm does not fit the key")
        try:
            registry = JWSRegistry(algorithms=[alg])
            registry.max_header_length = 16384  # an x5c chain is far above joserfc's 512-byte default
            claims = dict(jwt.decode(token, jwk, registry=registry).claims)
        except (JoseError, ValueError):
            raise Refused("bad signature") from None
        now = time.time()
        if claims.get("iss") != self.issuer:
            raise Refused("wrong issuer")
        aud = claims.get("aud")
        if self.service not in (aud if isinstance(aud, list) else [aud]):
            raise Refused("wrong audience")
        if not isinstance(claims.get("exp"), int) or claims["exp"] < now - LEEWAY:
            raise Refused("expired")
        if not isinstance(claims.get("nbf"), int) or claims["nbf"] > now + LEEWAY:
            raise Refused("not yet valid")
        if need is not None:
            kind, name, action = need
            access = claims.get("access")
            if not isinstance(access, list) or not any(
                isinstance(a, dict) and a.get("type") == kind and a.get("name") == name
                and isinstance(a.get("actions"), list) and (action in a["actions"] or "*" in a["actions"])
                for a in access
            ):
                raise Refused(f"access does not grant {kind}:{name}:{action}", "insufficient_scope")
        return claims

    # --- ASGI --------------------------------------------------------------------------

    def _challenge(self, scope: str | None, error: str | None) -> bytes:
        parts = [f'realm="{self.realm}"', f'service="{self.service}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return ("Bearer " + ",".join(parts)).encode()

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status, out, extra = self._handle(method, path, headers, body)
        base = [(b"docker-distribution-api-version", b"registry/2.0")]
        if "content-type" not in {k for k, _ in extra}:
            base.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": status,
                    "headers": base + [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in extra]})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else out})

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, list]:
        need: tuple[str, str, str] | None
        if path in ("/v2/", "/v2") and method in ("GET", "HEAD"):
            need, scope = None, None
        elif path == "/v2/_catalog" and method == "GET":
            need, scope = ("registry", "catalog", "*"), "registry:catalog:*"
        else:
            m = _MANIFEST.match(path)
            if m is None or method not in ("GET", "HEAD", "PUT"):
                return 404, _errors("NAME_UNKNOWN" if m is None else "UNSUPPORTED", "not served by the stand-in"), []
            action = "push" if method == "PUT" else "pull"
            need = ("repository", m["name"], action)
            scope = f"repository:{m['name']}:{'pull,push' if action == 'push' else 'pull'}"
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return 401, _errors("UNAUTHORIZED", "authentication required"), [
                ("www-authenticate", self._challenge(scope, None))]
        try:
            claims = self.verify(auth[len("Bearer "):], need)
        except Refused as exc:
            with self._lock:
                self.rejected.append(exc.reason)
            code = "DENIED" if exc.error == "insufficient_scope" else "UNAUTHORIZED"
            return 401, _errors(code, exc.reason), [("www-authenticate", self._challenge(scope, exc.error))]
        with self._lock:
            self.accepted.append(claims)
        if need is None:
            return 200, b"{}", []
        if need[0] == "registry":
            names = sorted({n for n, _ in self.manifests})
            return 200, json.dumps({"repositories": names}).encode(), []
        name, ref = _MANIFEST.match(path).group("name", "ref")  # type: ignore[union-attr]
        if method == "PUT":
            media = headers.get("content-type", "application/vnd.oci.image.manifest.v1+json")
            self.manifests[(name, ref)] = (media, body)
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            return 201, b"", [("location", f"/v2/{name}/manifests/{digest}"), ("docker-content-digest", digest)]
        found = self.manifests.get((name, ref))
        if found is None:
            return 404, _errors("MANIFEST_UNKNOWN", "manifest unknown"), []
        media, content = found
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        return 200, content, [("content-type", media), ("docker-content-digest", digest),
                              ("content-length", str(len(content)))]


def _errors(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()
