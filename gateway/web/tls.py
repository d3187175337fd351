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

Certificates are reloaded live (docs/tls.md). :class:`ServerTLS` holds the
current :class:`ssl.SSLContext`, built whole from the three files. The gateway
puts TLS under each connection itself (:func:`accepting_protocol`: uvicorn
listens without a context, and its protocol factory returns asyncio's own TLS
protocol, made with the context current when the connection is accepted,
around uvicorn's HTTP protocol), so a reload is the swap of one reference: new
connections get the new certificate and client CA, open ones keep the session
they have. A reload is tried on ``SIGHUP`` and when one of the files changes
(checked every ``tls_reload_check_seconds``: device, inode, size and mtime, so
the symlink swap of a Kubernetes Secret volume counts). A new set that does not
load (key not matching, unreadable, a key file group or others may read, an
expired certificate) is refused with one line and the old context keeps
serving. Making the TLS protocol is also what lets the gateway see a refused
handshake (asyncio drops them silently): each is counted by reason and logged
with the peer address, at most one line per reason per ``tls_refused_log_seconds``
(the lines skipped are counted in the next one, or in a line of their own once
the reason has been quiet that long); a connection closed before any TLS (a TCP
check) is counted but logged at debug level only. Handshakes time out after
``HANDSHAKE_TIMEOUT_SECONDS``. The TLS protocol is asyncio's ``sslproto.SSLProtocol``
(its constructor has been the same from Python 3.11 to 3.13), on uvloop too.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import datetime
import hashlib
import logging
import ssl
import stat
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cache, lru_cache, partial
from pathlib import Path
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


def uvicorn_options(settings: Settings, server_tls: ServerTLS | None = None) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``: none without a certificate; else the
    protocol factory that does each connection's handshake with ``server_tls``'s
    current context (:func:`accepting_protocol`; uvicorn gets no ``ssl_*`` option, so
    no context of its own). Loads the files first (unless ``server_tls`` is given),
    so a bad one stops ``serve`` with one line."""
    if settings.tls_cert_file is None:
        return {}
    if server_tls is None:
        server_tls = ServerTLS(settings)
    return {"http": accepting_protocol(server_tls)}


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or "not a PEM certificate and matching key"
    return exc.strerror or type(exc).__name__


# --- live certificates (see the module docstring) ------------------------------

log = logging.getLogger("credgate.tls")

HANDSHAKE_TIMEOUT_SECONDS = 10.0
_MAX_REASONS = 64  # OpenSSL's reasons are a fixed set; this only bounds the bookkeeping


def check_key_file(path: Path, *, group_readable: bool = False) -> None:
    """Refuse a private key file others may read or write, or (unless ``group_readable``,
    for a Kubernetes Secret volume read through the pod's fsGroup) its group may read;
    like the KEK file's check. Follows symlinks: the mode of the file itself counts."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigurationError(f"TLS key file {path} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"can't read the TLS key file {path}: {_why(exc)}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & (0o037 if group_readable else 0o077):
        who, fix = ("others, or its group can write it", "640") if group_readable else ("group or others", "600")
        raise ConfigurationError(
            f"TLS key file {path} is accessible to {who} (mode {mode:04o}); run: chmod {fix} {path}"
        )


def _fingerprint(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int, int] | None, ...]:
    out = []
    for path in paths:
        try:
            st = path.stat()
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True)
class Loaded:
    """One consistent set of the TLS files, ready to serve."""

    context: ssl.SSLContext
    serial: str  # of the leaf, hex as openssl prints it
    subject: str
    not_after: datetime.datetime
    client_ca_not_after: datetime.datetime | None  # the earliest of the bundle's CAs

    def describe(self) -> str:
        text = f"serial {self.serial}, subject {self.subject}, notAfter {self.not_after.isoformat()}"
        if self.client_ca_not_after is not None:
            text += f", client CA notAfter {self.client_ca_not_after.isoformat()}"
        return text


def load_files(settings: Settings, *, reload: bool = False) -> Loaded:
    """Build a complete server context from the files; ConfigurationError in one line if
    they don't make one. On a reload an expired certificate is refused too."""
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    cert_file, key_file, ca_file = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    check_key_file(key_file, group_readable=settings.tls_key_group_readable)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file)
        leaf = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    except (OSError, ssl.SSLError, ValueError) as exc:
        why = _why(exc) if isinstance(exc, OSError) else "not a PEM certificate"
        raise ConfigurationError(f"can't load the TLS certificate {cert_file} with key {key_file}: {why}") from None
    not_after = leaf.not_valid_after_utc
    if reload and not_after <= datetime.datetime.now(datetime.UTC):
        raise ConfigurationError(
            f"the TLS certificate {cert_file} (serial {leaf.serial_number:X}) expired at {not_after.isoformat()}"
        )
    ca_not_after = None
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=ca_file)
            cas = x509.load_pem_x509_certificates(ca_file.read_bytes())
        except (OSError, ssl.SSLError, ValueError) as exc:
            why = _why(exc) if isinstance(exc, OSError) else "no PEM certificate in it"
            raise ConfigurationError(f"can't load the client CA file {ca_file}: {why}") from None
        ca_not_after = min(c.not_valid_after_utc for c in cas)
    if settings.tls_require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif ca_file is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return Loaded(ctx, f"{leaf.serial_number:X}", leaf.subject.rfc4514_string(), not_after, ca_not_after)


class ServerTLS:
    """The gateway's current TLS context, reloaded live; counts for the metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = tuple(p for p in (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) if p)
        self._seen = _fingerprint(self.paths)
        self.loaded = load_files(settings)  # raises: a bad file at start stops serve
        if self.loaded.not_after <= datetime.datetime.now(datetime.UTC):
            log.warning("the TLS certificate %s expired at %s", settings.tls_cert_file, self.loaded.not_after.isoformat())
        self.reloads = {"ok": 0, "refused": 0}
        self.refused: dict[str, int] = {}  # handshakes refused, by reason
        self._lines: dict[str, float] = {}  # reason -> when its last line was written
        self._skipped: dict[str, tuple[int, str]] = {}  # reason -> (lines not written since, the last peer)

    @property
    def context(self) -> ssl.SSLContext:
        return self.loaded.context

    # reloads

    def reload(self, why: str) -> bool:
        """Load the files again; swap them in if they make a context, else keep the old one."""
        self._seen = _fingerprint(self.paths)
        try:
            new = load_files(self.settings, reload=True)
        except ConfigurationError as exc:
            self.reloads["refused"] += 1
            log.error("TLS reload (%s) refused, still serving serial %s: %s", why, self.loaded.serial, exc)
            return False
        if _fingerprint(self.paths) != self._seen:
            # Written to while we read: whatever we got may mix two versions; the next check loads it again.
            self._seen = ()
            self.reloads["refused"] += 1
            log.warning("TLS reload (%s) skipped: the files changed while being read; tried again at the next check "
                        "or SIGHUP", why)
            return False
        old, self.loaded = self.loaded, new
        self.reloads["ok"] += 1
        log.info("TLS certificate reloaded (%s): %s (was serial %s)", why, new.describe(), old.serial)
        return True

    def check_files(self) -> bool:
        """Reload if a file changed since the last load (or attempt); True if it reloaded."""
        if _fingerprint(self.paths) == self._seen:
            return False
        return self.reload("file change")

    async def watch(self, interval: float) -> None:
        """Check the files every ``interval`` seconds; every second, write the refusal
        counts held back whose reason has been quiet long enough."""
        next_check = time.monotonic() + interval
        while True:
            await asyncio.sleep(min(interval, 1.0))
            try:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + interval
                    self.check_files()
                self.flush_refusals()
            except Exception:  # noqa: BLE001 - the watcher must outlive anything one check does
                log.exception("TLS file check failed")

    # refused handshakes

    def handshake_refused(self, exc: BaseException, peer: Any) -> None:
        reason, detail = _reason(exc)
        if reason not in self.refused and len(self.refused) >= _MAX_REASONS:
            reason = "OTHER"
        self.refused[reason] = self.refused.get(reason, 0) + 1
        where = _peer(peer)
        if reason == "CLOSED":  # a TCP check or a scanner: no TLS was tried
            log.debug("TLS connection from %s closed before the handshake finished", where)
            return
        now = time.monotonic()
        last = self._lines.get(reason)
        if last is not None and now - last < self.settings.tls_refused_log_seconds:
            skipped, _ = self._skipped.get(reason, (0, ""))
            self._skipped[reason] = (skipped + 1, where)
            return
        self._lines[reason] = now
        skipped, _ = self._skipped.pop(reason, (0, ""))
        more = f" ({skipped} more refused for this reason were not logged)" if skipped else ""
        log.warning("TLS handshake refused from %s: %s%s", where, detail, more)

    def flush_refusals(self) -> None:
        """Write the count of lines held back for a reason once its quiet period is over."""
        now = time.monotonic()
        for reason, (skipped, where) in list(self._skipped.items()):
            if now - self._lines.get(reason, 0.0) >= self.settings.tls_refused_log_seconds:
                del self._skipped[reason]
                self._lines[reason] = now
                log.warning("TLS handshakes refused: %d more for %s were not logged (the last from %s)",
                            skipped, reason, where)

    # handshakes

    def wrap(self, app: asyncio.Protocol) -> asyncio.Protocol:
        """The protocol a new connection gets: TLS with the context current now, then ``app``."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        protocol = _ServerSide(loop, app, self.context, waiter, server_side=True, call_connection_made=True,
                               ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS)
        waiter.add_done_callback(partial(self._handshake_done, protocol))
        return protocol

    def _handshake_done(self, protocol: _ServerSide, waiter: asyncio.Future[None]) -> None:
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is not None:
            self.handshake_refused(exc, protocol.peer)


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "unknown")


def _reason(exc: BaseException) -> tuple[str, str]:
    """(a short key, a one-line description) for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "CERTIFICATE_VERIFY_FAILED", f"client certificate not accepted ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return reason, "no client certificate (tls_require_client_cert)"
        if reason in ("HTTP_REQUEST", "WRONG_VERSION_NUMBER"):
            return reason, f"not TLS ({reason}: plain HTTP to the HTTPS port?)"
        if isinstance(exc, ssl.SSLEOFError) or reason.startswith("UNEXPECTED_EOF"):
            return "CLOSED", "closed"
        if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_")):
            return reason, f"the client ended it with the alert {reason} (it may not trust this server's certificate)"
        return reason, f"{reason} ({exc.library or 'ssl'})"
    if isinstance(exc, ConnectionAbortedError) and "longer" in str(exc):
        return "HANDSHAKE_TIMEOUT", f"no handshake within {HANDSHAKE_TIMEOUT_SECONDS:g} s"
    if isinstance(exc, TimeoutError):
        return "HANDSHAKE_TIMEOUT", f"no handshake within {HANDSHAKE_TIMEOUT_SECONDS:g} s"
    if isinstance(exc, (ConnectionError, EOFError)):
        return "CLOSED", "closed"
    return type(exc).__name__, type(exc).__name__


class _ServerSide(sslproto.SSLProtocol):
    """asyncio's own TLS protocol (what ``create_server(ssl=...)`` puts under each
    connection, on asyncio's loop; uvloop has a copy of it), made by the gateway so
    that the context is chosen per connection and a failed handshake is seen. It
    remembers the peer's address for the refusal's log line."""

    peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer = transport.get_extra_info("peername")
        super().connection_made(transport)


def accepting_protocol(server_tls: ServerTLS, base: type[asyncio.Protocol] | None = None) -> Callable[..., asyncio.Protocol]:
    """A protocol factory to pass to uvicorn as ``http=`` (with no ``ssl`` context): TLS by
    ``server_tls``'s current context, then :func:`http_protocol` (certificate reporting)."""
    cls = http_protocol(base)

    def make(**kwargs: Any) -> asyncio.Protocol:
        return server_tls.wrap(cls(**kwargs))

    return make


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
