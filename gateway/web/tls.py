"""HTTPS for ``credgate serve``, client certificates (mTLS), and who a certificate is.

uvicorn terminates TLS. :func:`uvicorn_options` turns the settings into its
``ssl_*`` options: with ``tls_client_ca_file`` the listener asks every client
for a certificate and verifies it against that CA (``CERT_OPTIONAL``, so token
callers and certificate callers share a listener), with
``tls_require_client_cert`` a client without one fails the handshake
(``CERT_REQUIRED``). A certificate that fails verification always fails the
handshake; the application never sees it.

uvicorn does not tell the application which certificate the peer presented
(its issue #400; PRs #1119, #3132, #3133 are still open). :func:`http_protocol`
fills that gap with the smallest hook there is: a subclass of the HTTP/1.1
protocol class uvicorn would pick anyway (httptools, else h11) whose
``connection_made``, which asyncio calls once the handshake is done, wraps
that connection's app so every request's scope carries the ASGI TLS
extension (version 0.2)::

    scope["extensions"]["tls"] = {
        "server_cert": None,                     # not readable from Python's ssl
        "client_cert_chain": ("-----BEGIN CERTIFICATE-----...",),  # leaf only, or ()
        "client_cert_name": "CN=zenml-server,O=acme",             # or None
        "client_cert_error": None,               # a bad certificate never gets here
        "tls_version": 0x0304,
        "cipher_suite": 0x1302,
    }

It leans on two things every uvicorn HTTP protocol has done since 0.1x (and
still does in 0.54), on the asyncio and the uvloop event loop alike: one
protocol object per connection, and requests run ``self.app``. Should uvicorn
fill the extension itself one day, its entry wins.
Python before 3.13 can only read the leaf certificate, so the chain holds just
that, which the spec allows.

:func:`peer_certificate` reads it back from any scope, whichever server filled
it. A subject is written as RFC 4514, the way ``cryptography``'s
``Name.rfc4514_string()`` writes it: most specific part first
(``CN=zenml-server,O=acme``). ``tls_client_subjects`` maps such subjects to
OAuth2 client ids (:func:`normalize_subject` brings the keys to that form), and
:func:`certificate_principal` makes a request that carries a mapped
certificate and no ``Authorization`` header that client, with its roles and
the policies that name it, exactly as if it had presented an access token from
the ``client_credentials`` grant.

Any CA in ``tls_client_ca_file`` can vouch for any subject: put there only the
CAs you trust to name your services.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from cryptography import x509

from gateway.identity.principal import Principal
from gateway.errors import ConfigurationError, NotFound, Unauthenticated
from gateway.settings import client_subjects, normalize_subject  # noqa: F401 (the subject rules live with the setting)

if TYPE_CHECKING:
    from gateway.runtime import Runtime
    from gateway.settings import Settings

_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


# --- subjects ----------------------------------------------------------------


@dataclass(frozen=True)
class PeerCertificate:
    subject: str  # RFC 4514
    sha256: str  # hex fingerprint of the DER encoding


@lru_cache(maxsize=1024)
def _parse(pem: str) -> PeerCertificate | None:
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        der = ssl.PEM_cert_to_DER_cert(pem)
        return PeerCertificate(cert.subject.rfc4514_string(), hashlib.sha256(der).hexdigest())
    except (ValueError, UnicodeEncodeError):
        return None


def peer_certificate(scope: Mapping[str, Any]) -> PeerCertificate | None:
    """The verified client certificate of this request's connection, if there is one."""
    tls = (scope.get("extensions") or {}).get("tls")
    if not isinstance(tls, Mapping) or tls.get("client_cert_error") is not None:
        return None
    chain = tls.get("client_cert_chain") or ()
    first = next(iter(chain), None)
    return _parse(first) if isinstance(first, str) else None


async def certificate_principal(runtime: Runtime, scope: Mapping[str, Any]) -> Principal | None:
    """The client the peer's certificate maps to (``tls_client_subjects``); None if
    there is no certificate or its subject is not mapped. 401 if it maps to a client
    that does not exist or is revoked."""
    subjects = runtime.settings.tls_client_subjects
    cert = peer_certificate(scope) if subjects else None
    client_id = subjects.get(cert.subject) if cert else None
    if cert is None or client_id is None:
        return None
    try:
        row = await runtime.clients.get(client_id)
    except NotFound:
        row = None
    if row is None or row.revoked_at is not None:
        raise Unauthenticated(
            "The client certificate maps to a client that does not exist or is revoked.", code="invalid_client"
        )
    # The shape Tokens.verify gives a client_credentials access token: subject client:<id>.
    principal = Principal("client", f"x509:{cert.sha256[:32]}", row.client_id, roles=frozenset(row.roles), claims={})
    return replace(principal, policy=await runtime.policies.current())


# --- the server side ---------------------------------------------------------


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``: none without a certificate; else the
    ``ssl_*`` options and the protocol class that reports client certificates.
    Loads the files once first, so a bad one stops ``serve`` with one line."""
    if settings.tls_cert_file is None:
        return {}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"can't load the TLS certificate {settings.tls_cert_file} with key {settings.tls_key_file}: {_why(exc)}"
        ) from None
    if settings.tls_client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=settings.tls_client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"can't load the client CA file {settings.tls_client_ca_file}: {_why(exc)}") from None
    if settings.tls_require_client_cert:
        cert_reqs = ssl.CERT_REQUIRED
    elif settings.tls_client_ca_file is not None:
        cert_reqs = ssl.CERT_OPTIONAL
    else:
        cert_reqs = ssl.CERT_NONE
    return {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
        "ssl_ca_certs": str(settings.tls_client_ca_file) if settings.tls_client_ca_file else None,
        "ssl_cert_reqs": cert_reqs,
        "http": http_protocol(),
    }


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or "not a PEM certificate and matching key"
    return exc.strerror or type(exc).__name__


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension entry for one connection, after its handshake."""
    der = None
    if ssl_object.context.verify_mode != ssl.CERT_NONE:  # only then was a certificate asked for and verified
        der = ssl_object.getpeercert(binary_form=True)
    chain = (ssl.DER_cert_to_PEM_cert(der),) if der else ()
    parsed = _parse(chain[0]) if chain else None
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": parsed.subject if parsed else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_suite(ssl_object),
    }


def _cipher_suite(ssl_object: ssl.SSLObject) -> int | None:
    current = ssl_object.cipher()
    if not current:
        return None
    return _cipher_ids(ssl_object.context).get(current[0])


_CIPHER_IDS: weakref.WeakKeyDictionary[ssl.SSLContext, dict[str, int]] = weakref.WeakKeyDictionary()


def _cipher_ids(ctx: ssl.SSLContext) -> dict[str, int]:
    ids = _CIPHER_IDS.get(ctx)
    if ids is None:  # one server context per process: computed once
        ids = _CIPHER_IDS[ctx] = {c["name"]: c["id"] & 0xFFFF for c in ctx.get_ciphers()}
    return ids


class _WithTLS:
    """One connection's app: adds that connection's TLS entry to each request's scope.
    (A WebSocket upgrade gets uvicorn's app, not this one; the gateway serves none.)"""

    __slots__ = ("app", "tls")

    def __init__(self, app: Any, tls: dict[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            extensions = scope.get("extensions")
            if extensions is None:
                extensions = scope["extensions"] = {}
            if "tls" not in extensions:
                extensions["tls"] = dict(self.tls)
        await self.app(scope, receive, send)


class _ReportsTLS:
    """Mixin for a uvicorn HTTP protocol class (see the module docstring)."""

    app: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _WithTLS(self.app, tls_extension(ssl_object))


@cache
def http_protocol(base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """A uvicorn HTTP/1.1 protocol class (default: the one its ``http="auto"`` picks)
    that reports the peer's certificate; pass it to uvicorn as ``http=``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    return type(f"TLSReporting{base.__name__}", (_ReportsTLS, base), {})
