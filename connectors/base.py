"""The ServiceConnector protocol: how long-lived material becomes a short-lived credential.

This module is the whole contract a connector author needs: what the gateway
constructs and calls, what a connector declares, which errors it may raise, and
the helpers (:class:`ConnectorBase`, :func:`run_sync`, :func:`coerce`,
:func:`role_name`, :func:`privileges_for`) it may use.

A connector *type* (``postgres``, ``mysql``, ``redis``, ``aws``, ``static``)
is a class; a *connector* is a configured instance of it: its non-secret
``config``, one of its ``auth_methods``, and the ``material`` (a map of
strings read from a backend secret at the moment it is needed). The gateway
owns leases, TTLs, policy and audit; a connector only talks to its target.

Writing one
-----------

1. Subclass :class:`ConnectorBase` in ``connectors/<type>.py`` and declare the
   class attributes of :class:`ServiceConnector`: ``type``, ``auth_methods``,
   ``config_model``, ``resource_types``, ``ttl`` and ``capabilities``
   (:class:`ConnectorCapabilities`, data the gateway decides by).
2. Register it in ``gateway/plugins/registry.py`` (``CONNECTOR_TYPES``), with
   the pip extra that brings its SDK; ``tests/contract/test_protocols.py``
   then checks its shape.
3. Implement the methods below; override :meth:`ConnectorBase.sanitize` to
   reduce your SDK's exceptions to what may be shown.

Construction and lifecycle
--------------------------

The gateway builds an instance as ``cls(config, auth_method, material,
name=NAME, pool=PoolLimits(...))``: ``config`` an instance of ``config_model``
(validated), ``auth_method`` one key of ``auth_methods``, ``material`` an
instance of that auth method's model (validated; its ``SecretStr`` fields hold
the secret values), ``name`` the configured connector's name (for messages
only), ``pool`` the operator's bounds on admin connections to the target
(:class:`PoolLimits`; :class:`ConnectorBase` keeps it as ``pool_limits``). That
is all a connector is given: no store, no envelope, no other secret. It raises
:class:`ValidationFailed` (or a plain ``ValueError`` with a sentence of its
own) if the combination can't work. The constructor does no I/O.

An instance is rebuilt whenever its row or material changes, so it must not
hold state that outlives it. After building one the gateway awaits
``start()`` (begin background work, warm a client); it awaits ``aclose()``
when the instance is dropped (replaced by a newer one, or at shutdown). Both
default to no-ops in :class:`ConnectorBase` (``aclose`` closes ``target_pool``
if one is set). Calls may still be in flight on an instance being closed:
``aclose`` must let them finish or fail cleanly.

Keyless auth methods (``web-identity``)
---------------------------------------

Where the target trusts an OIDC issuer, a connector needs no secret at all: the
gateway is that issuer (``/.well-known/openid-configuration``, ``/v1/jwks``).
An auth method whose model is :class:`KeylessMaterial` (or a subclass with no
fields) is *keyless*: a connector using it names no backend secret, and is
built with an empty material. Everything the exchange needs that is not secret
(a role ARN, a workload identity pool provider, a tenant and client id) lives in
``config``. The gateway sets :attr:`ConnectorBase.identity` (a
:class:`WorkloadIdentity`) on every instance before ``start()``; such a
connector asks it for a short-lived token per call (``await self.identity_token(audience, req)``)
and trades it at the target (AWS ``AssumeRoleWithWebIdentity``, a GCP STS token
exchange, an Entra federated client assertion). The token's ``sub`` is the
principal of the issuance (``IssueRequest.principal``, e.g. ``credgate/run:RUN``)
and its ``run`` claim the run, so a cloud's trust policy can match on them; for
``verify``/``list_resources`` the subject is ``connector:<name>``.

Admin connections
-----------------

A connector that logs in to its target (a database server) does not open a
connection per call: it keeps a :class:`TargetPool` as ``target_pool``, bounded
by ``pool_limits`` (a few connections per instance, over every database it
reaches), shared by issue, renew, revoke, verify and list. A burst of requests
then queues in the gateway, within each call's deadline, instead of taking
every connection the target allows from its other clients; a wait that runs
out is a 503 ``target_busy`` with ``Retry-After``. The pool needs four small
driver callables (open, prepare, reusable, close; see :class:`TargetPool`):
a connection goes back only in a clean state, and one whose call raised is
closed, never reused.

A connector whose SDK speaks HTTP keeps its SDK clients on the instance
instead (``aws``: one boto3 session, one client per service): built on first
use, reused by every call, closed by ``aclose``. Building one per call would
cost far more than the call (about 130 ms of CPU for a boto3 client).

The order of an issuance, and why
---------------------------------

1. ``validate_resource(resource)`` names its resource type (pure).
2. ``plan(lease_id, resource)`` returns the **revoke state**: everything
   ``revoke`` will need (e.g. the deterministic role name ``cg_<lease>``, from
   :func:`role_name`). It is pure (no I/O) and the gateway commits it in a
   ``pending`` lease row *before* anything exists at the target.
3. ``issue(request)`` creates the credential at the target under exactly the
   planned names, and returns it with its expiry.
4. ``renew(revoke_state, expires_at)`` moves the target's own expiry. A type
   whose ``capabilities.renewable`` is False is never asked by the gateway, but
   its ``renew`` must still raise :class:`NotRenewable` (409 ``not_renewable``),
   never return silently.
5. ``revoke(revoke_state)`` removes it. It must be **idempotent**: a user or
   role already gone counts as success, so a pending lease left by a crash
   between 2 and 3 can be revoked blindly by its planned name, as often as
   needed. That includes gone *during* the call (dropped out of band, between
   the existence check and the drop): an error that comes from the object no
   longer existing is success too. The gateway makes one revocation of a lease
   at a time (a claim in its store), but not everyone at the target does.
   Called only when ``capabilities.revocability`` is ``revocable``.

Errors a connector may raise (all from :mod:`gateway.errors`, re-exported here)
--------------------------------------------------------------------------------

Anything else escaping a method is reduced to ``sanitize(exc)`` and reported as
a 502 ``target_error``; raise these instead:

- :class:`ResourceNotSupported` (400 ``resource_not_supported``): the resource
  string is not one this type understands (wrong shape, unknown resource
  type, a privilege that can't apply to it). From ``validate_resource``,
  ``plan``, ``list_resources``; before any I/O.
- :class:`ValidationFailed` (422, ``invalid_connector_config``, or
  ``unknown_auth_method`` from :class:`ConnectorBase`): config, auth method and
  material don't fit together (from the constructor). A plain ``ValueError``
  with a sentence of your own becomes 422 ``connector_invalid``.
- :class:`ResourceRejected` (409 ``target_rejected_resource``, with
  ``resource`` and ``reason`` ``not_found``/``not_grantable``): the target
  refused *this resource* (it does not exist there, or may not be granted).
  Only when nothing was left at the target.
- :class:`TargetUnreachable` (503 ``target_unreachable``, always with
  ``Retry-After``): the target did not answer. Codes: ``target_timeout`` for a
  deadline, ``target_too_many_connections`` when the target refused the login
  because its own connection limit is reached (PostgreSQL 53300, MySQL/MariaDB
  1040, 1203 and 1226 for ``max_user_connections``, Redis "max number of clients
  reached"), and ``target_busy`` (raised by :class:`TargetPool`) when every
  admin connection of the connector stayed in use for the call's whole wait.
- :class:`TargetError` (502 ``target_error``): the target answered and
  failed. Codes in use (reuse one that fits before inventing one):
  ``target_auth_failed`` (the material was refused), ``target_permission_denied``
  (the login lacks a privilege), ``target_timeout`` (a statement ran out of
  time), ``credential_exists`` (``issue``: the planned name is taken),
  ``credential_gone`` / ``credential_missing`` (``renew``: it is no longer
  there), ``resource_not_found`` (an object under the resource is missing),
  ``material_incomplete`` (the material lacks what the config names),
  ``invalid_revoke_state`` (the revoke state names nothing this type plans),
  ``sessions_still_open`` (``revoke`` could not end them),
  ``missing_dependency`` (the SDK is not installed).
- :class:`NotRenewable` (409 ``not_renewable``): from ``renew`` of a
  credential that can't be extended.
- :class:`NotFound` / :class:`Conflict`: not raised by connectors today;
  prefer the classes above.

Rules for implementers
----------------------

- Vendor SDKs are imported inside methods (never at module import), so the
  type's metadata is listable without its SDK installed.
- Never put material, passwords or tokens in an exception message or a log
  line; raise one of the errors above with a sentence of your own. Vendor
  error text can quote a statement or a credential: at most its class name and
  a vendor error *code* may be kept, which is what your ``sanitize`` returns.
  Raise outside the ``except`` block (or ``from None``) so the vendor
  exception is not chained.
- Every call to a target has a timeout (``timeout_seconds`` in the request or
  the connector's own default). A synchronous SDK runs through
  :func:`run_sync`, never directly in a coroutine: it would block the event
  loop for every other request.
- Material the auth method's model can't check (a ``static`` connector's
  configured keys) is reported by :meth:`ConnectorBase.missing_keys`, so the
  gateway refuses a connector when it is added, not at first use.
- ``verify`` and ``list_resources`` use the material but never return it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fnmatch
import ipaddress
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.errors import (  # the plugin-facing errors a connector raises (see "Errors" above)
    BadRequest,
    Conflict,
    CredgateError,
    NotFound,
    NotRenewable,
    ResourceNotSupported,
    ResourceRejected,
    TargetError,
    TargetUnreachable,
    ValidationFailed,
    field_errors,
)

__all__ = [
    "BadRequest", "Conflict", "CredgateError", "NotFound", "NotRenewable", "ResourceNotSupported",
    "ResourceRejected", "TargetError", "TargetUnreachable", "ValidationFailed",
    "ConnectorBase", "ConnectorCapabilities", "IssueRequest", "Issued", "PoolLimits", "RESOURCE", "Revocability",
    "ServiceConnector", "TTLLimits", "Verification", "as_utc", "coerce", "generic_sanitize",
    "privileges_for", "role_name", "run_sync", "TargetPool", "KeylessMaterial", "WorkloadIdentity", "is_keyless",
]

_T = TypeVar("_T")


class Revocability(StrEnum):
    REVOCABLE = "revocable"  # the gateway can remove it at the target (drop the role)
    EXPIRY_ONLY = "expiry-only"  # it can only be waited out (an STS token)
    EPOCH = "epoch"  # the target denies everything issued before a time


@dataclass(frozen=True)
class ConnectorCapabilities:
    """What a connector type can do, as data the gateway decides by (never by type name).

    - ``revocability``: ``revocable`` (the gateway calls ``revoke`` when a lease ends),
      ``expiry-only`` (it never does: the credential is waited out) or ``epoch``.
      Recorded on each lease.
    - ``renewable``: the gateway accepts ``POST /v1/leases/{id}/renew`` and calls
      ``renew``; False answers 409 ``not_renewable`` without calling it.
    - ``wrap_only``: credentials are only ever handed out through a single-use wrap
      token (a request without ``--wrap`` is refused, 400 ``wrap_required``).
    - ``creates_at_target``: False only if ``issue`` creates nothing anywhere (it
      hands out material it already has); the gateway then records the lease once,
      active, instead of pending-then-active around the call, and never revokes.
    """

    revocability: Revocability
    renewable: bool
    wrap_only: bool = False
    creates_at_target: bool = True


def generic_sanitize(exc: BaseException) -> str:
    """The fallback sanitizer: the exception's class name, plus the errno of an ``OSError``
    (a number, never text). Knows no vendor; each connector's ``sanitize`` adds its own codes."""
    name = type(exc).__name__
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        return f"{name} ({exc.errno})"
    return name


_POOLS: dict[str, ThreadPoolExecutor] = {}
POOL_THREADS = 8  # per pool: a store that hangs holds at most this many threads


def _pool(name: str) -> ThreadPoolExecutor:
    pool = _POOLS.get(name)
    if pool is None:
        pool = _POOLS.setdefault(name, ThreadPoolExecutor(POOL_THREADS, thread_name_prefix=f"credgate-{name}"))
    return pool


async def run_sync(fn: Callable[..., _T], *args: Any, timeout: float, pool: str = "plugins") -> _T:
    """Call a synchronous (blocking) SDK function without blocking the event loop:
    ``fn(*args)`` runs in a worker thread under ``timeout`` seconds. On timeout raises
    :class:`TimeoutError` (``asyncio.TimeoutError``) to the caller, which maps it to
    :class:`TargetUnreachable` (``code="target_timeout"``). The thread itself can't be
    cancelled: give the SDK its own connect/read timeouts too, so an abandoned call ends
    on its own. Exceptions from ``fn`` propagate as is.

    The threads are not asyncio's default pool (which the gateway's own work uses), and
    ``pool`` names a bounded pool of its own (e.g. ``f"backend:{self.name}"``): a store that
    hangs fills only its pool; further calls to it queue there and time out, while every
    other backend, connector and the gateway itself go on."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await asyncio.wait_for(loop.run_in_executor(_pool(pool), ctx.run, fn, *args), timeout)


TARGET_BUSY_RETRY_AFTER = 2  # seconds: the Retry-After of a 503 target_busy


@dataclass(frozen=True)
class PoolLimits:
    """How a connector instance shares admin connections to its target (:class:`TargetPool`).

    - ``size``: at most this many admin connections open at once (in use, idle, being
      opened or closed), over every database the connector connects to; the gateway sets
      it from ``target_pool_size``.
    - ``wait_seconds``: how long a call waits for one of them before it is refused with a
      503 ``target_busy`` (``target_pool_wait_seconds``); never longer than its own deadline
      allows (the wait ends at the latest ``min(1 s, 10%)`` before the call's timeout).
    - ``idle_seconds``: an idle connection is closed after this long unused.
    """

    size: int = 4
    wait_seconds: float = 10.0
    idle_seconds: float = 60.0


_C = TypeVar("_C")


class TargetPool(Generic[_C]):
    """A bounded pool of admin connections to one target, shared by every call of one
    connector instance (issue, renew, revoke, verify, list), so a burst of requests queues
    here instead of opening a connection each and exhausting the target's own limit.

    The connector supplies the driver, as four callables:

    - ``open(key, timeout)``: a new connection (``key`` says where to: a database name,
      or None); raise the connector's own :class:`TargetError` when it fails.
    - ``prepare(conn, timeout)``: make a connection ready for one call, from a clean state
      (reset whatever a session can carry: role, search path, settings; set this call's
      statement timeout). It is also the liveness check of an idle connection: if it
      raises, that connection is closed and a fresh one opened in its place, transparently.
    - ``reusable(conn)``: whether a connection whose call succeeded may go back to the pool
      (open, no transaction left open). A connection whose call raised anything
      (an error, a timeout, a cancellation) is never reused: it is closed.
    - ``close(conn)``: close it (errors are ignored).

    ``size`` bounds the connections open at once over all keys: a call for a key with no
    idle connection closes an idle one of another key if the bound is reached. A call that
    finds every connection in use waits its turn (first come, first served) for at most
    ``wait_seconds``, and less if its own ``timeout`` is shorter; then it is refused with
    :class:`TargetUnreachable` code ``target_busy`` (503, ``Retry-After``). After
    :meth:`aclose` (the instance was replaced, or the gateway stops) the idle connections
    are closed and those in use are closed when their call ends; a call that still arrives
    is served on a connection closed after it.

    A synchronous driver runs its work through :meth:`run_sync`: a call that times out
    while its thread still uses the connection keeps its slot until the thread ends, so
    the bound holds for abandoned threads too."""

    def __init__(
        self,
        what: str,
        *,
        open: Callable[[Any, float], Awaitable[_C]],
        prepare: Callable[[_C, float], Awaitable[None]],
        reusable: Callable[[_C], bool],
        close: Callable[[_C], Awaitable[None]],
        limits: PoolLimits | None = None,
    ) -> None:
        self.what = what
        self.limits = limits or PoolLimits()
        self._open, self._prepare, self._reusable, self._close = open, prepare, reusable, close
        self._idle: dict[Any, list[tuple[_C, float]]] = {}  # key -> [(connection, idle since)], newest last
        self._free = self.limits.size  # slots held by no call (a held slot: a connection in use, opening or closing)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._holds: dict[int, asyncio.Future[Any]] = {}  # id(conn) -> a thread still using it
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.counts: dict[str, int] = dict.fromkeys(("opened", "reused", "replaced", "discarded", "busy"), 0)

    # -- what tests and metrics read ------------------------------------------

    def stats(self) -> dict[str, int]:
        """Slots in use, idle connections, waiting calls, and the counters since start."""
        idle = sum(len(v) for v in self._idle.values())
        return {"size": self.limits.size, "in_use": self.limits.size - self._free, "idle": idle,
                "waiting": sum(1 for f in self._waiters if not f.done()), **self.counts}

    # -- the one way in -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self, key: Any, timeout: float) -> AsyncIterator[_C]:
        """A prepared connection for ``key`` for one call of at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        wait = max(0.0, min(self.limits.wait_seconds, timeout - min(1.0, timeout / 10)))
        await self._acquire(wait)
        try:
            conn = await self._checkout(key, max(0.1, timeout - (loop.time() - started)))
        except BaseException:
            self._release()
            raise
        ok = False
        try:
            yield conn
            ok = True
        finally:
            self._checkin(key, conn, ok)

    async def run_sync(self, conn: _C, fn: Callable[..., _T], *args: Any, timeout: float, pool: str = "plugins") -> _T:
        """:func:`run_sync` for a blocking driver's work on ``conn`` (inside :meth:`connection`).
        On a timeout or cancellation the thread can't be stopped: ``conn`` is then closed only
        once the thread has finished with it, and its slot stays taken until then."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        fut = loop.run_in_executor(_pool(pool), ctx.run, fn, conn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except BaseException:
            if not fut.done():
                self._holds[id(conn)] = fut
            raise

    async def aclose(self) -> None:
        """Close the idle connections now; those in use close when their call ends."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle = [conn for conns in self._idle.values() for conn, _ in conns]
        self._idle.clear()
        await asyncio.gather(*(self._close_quietly(conn) for conn in idle))
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- slots ----------------------------------------------------------------

    async def _acquire(self, wait: float) -> None:
        if self._free > 0 and not any(not f.done() for f in self._waiters):
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(wait):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._release()  # handed over just as this call gave up: pass it on
            else:
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                self.counts["busy"] += 1
                raise TargetUnreachable(
                    f"Every admin connection of this connector to {self.what} ({self.limits.size}) stayed in use "
                    f"for {wait:g} s; retry shortly.",
                    code="target_busy",
                    retry_after=TARGET_BUSY_RETRY_AFTER,
                ) from None
            raise

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the first waiter
                return
        self._free += 1

    # -- connections ----------------------------------------------------------

    async def _checkout(self, key: Any, timeout: float) -> _C:
        now = time.monotonic()
        idle = self._idle.get(key)
        while idle:
            conn, since = idle.pop()
            if now - since > self.limits.idle_seconds:
                await self._close_quietly(conn)
                continue
            try:
                await self._prepare(conn, timeout)
            except Exception:  # noqa: BLE001 - broken while idle (the server ended it): open another
                self.counts["replaced"] += 1
                await self._close_quietly(conn)
                continue
            except BaseException:  # cancelled (the call's deadline) in the middle: closed, not awaited here
                self._spawn(self._close_quietly(conn))
                raise
            self.counts["reused"] += 1
            return conn
        # None idle for this key: make room by closing idle connections of other keys.
        spare = sum(len(v) for v in self._idle.values()) - self._free
        for other in list(self._idle):
            while spare > 0 and self._idle[other]:
                conn, _ = self._idle[other].pop(0)
                spare -= 1
                await self._close_quietly(conn)
        conn = await self._open(key, timeout)
        self.counts["opened"] += 1
        try:
            await self._prepare(conn, timeout)
        except BaseException:
            self._spawn(self._close_quietly(conn))
            raise
        return conn

    def _checkin(self, key: Any, conn: _C, ok: bool) -> None:
        """Back to the pool, or closed (then the slot is freed once it is). Never raises, never awaits."""
        hold = self._holds.pop(id(conn), None)
        try:
            reuse = ok and hold is None and not self._closed and self._reusable(conn)
        except Exception:  # noqa: BLE001 - a driver that can't tell: don't reuse
            reuse = False
        if reuse:
            self._idle.setdefault(key, []).append((conn, time.monotonic()))
            self._schedule_sweep()
            self._release()
            return
        self.counts["discarded"] += 1
        self._spawn(self._discard(conn, hold))

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` (a close) in a task of its own, awaited by :meth:`aclose`."""
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _discard(self, conn: _C, hold: asyncio.Future[Any] | None) -> None:
        try:
            if hold is not None:
                await asyncio.wait([hold])  # the thread that still uses it finishes first
            await self._close_quietly(conn)
        finally:
            self._release()

    async def _close_quietly(self, conn: _C) -> None:
        try:
            await asyncio.wait_for(self._close(conn), 5.0)
        except Exception:  # noqa: BLE001 - closing a broken connection may fail: it is gone either way
            pass

    def _schedule_sweep(self) -> None:
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self.limits.idle_seconds / 2, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than ``idle_seconds`` (a quiet connector holds none)."""
        self._sweeper = None
        cutoff = time.monotonic() - self.limits.idle_seconds
        for conns in self._idle.values():
            while conns and conns[0][1] < cutoff:
                conn, _ = conns.pop(0)
                self._spawn(self._close_quietly(conn))
        if any(self._idle.values()):
            self._schedule_sweep()


def privileges_for(config: Any, resource: str) -> list[str]:
    """The privileges a per-resource connector grants on ``resource``: the first of
    ``config.resource_privileges`` (fnmatch pattern -> privileges) whose pattern matches,
    else ``config.privileges``; duplicates dropped, order kept."""
    chosen = config.privileges
    for pattern, privileges in config.resource_privileges.items():
        if fnmatch.fnmatchcase(resource, pattern):
            chosen = privileges
            break
    return list(dict.fromkeys(chosen))


@dataclass(frozen=True)
class IssueRequest:
    lease_id: str
    resource: str
    ttl: timedelta
    expires_at: datetime  # computed by the gateway: now + ttl
    revoke_state: Mapping[str, Any]  # what plan() returned, as committed
    timeout_seconds: float = 30.0
    principal: str = ""  # who the credential is for (an owner key, ``ISSUER/SUBJECT``): a web-identity token's sub
    run_id: str | None = None  # the run it is for, if any: a web-identity token's ``run`` claim


class KeylessMaterial(BaseModel):
    """The material of an auth method that holds no secret (``web-identity``): nothing. A
    connector using such an auth method names no backend secret (see "Keyless auth methods")."""

    model_config = ConfigDict(extra="forbid")


def is_keyless(model: type[BaseModel]) -> bool:
    """Whether an auth method's material model is keyless: a :class:`KeylessMaterial` with no fields."""
    return issubclass(model, KeylessMaterial) and not model.model_fields


class WorkloadIdentity(Protocol):
    """The gateway as an OIDC issuer, as a connector sees it: tokens signed with the gateway's
    active signing key, verifiable by anyone through ``{issuer}/.well-known/openid-configuration``
    and its ``jwks_uri``. Never a long-lived secret: a token lives minutes."""

    @property
    def issuer(self) -> str:
        """The ``iss`` of every token (the gateway's public URL): what a cloud's trust is set up for."""
        ...

    async def token(
        self, *, audience: str, subject: str, run_id: str | None = None, lease_id: str | None = None,
        ttl: timedelta = timedelta(minutes=5),
    ) -> str:
        """A signed JWT: ``iss``, ``sub``, ``aud``, ``iat``, ``nbf``, ``exp`` (``ttl``, at most an
        hour), ``jti``, and ``run`` / ``lease`` when given. Raises :class:`TargetError`
        ``oidc_issuer_unconfigured`` when the gateway has no public URL to be an issuer at."""
        ...


@dataclass(frozen=True)
class Issued:
    """A fresh credential. ``credential`` values are secret; ``expires_at`` is
    the target's own expiry (it may be earlier than requested, never later).

    ``revoke_state``: what ``revoke`` needs that only the target's answer told (a Vault
    lease id), never secret; the gateway merges it into the planned revoke state when it
    activates the lease. A crash between the target's answer and that activation leaves
    only the planned state: ``revoke`` must still succeed with it (see the connector's docs
    for what then outlives the lease)."""

    credential: dict[str, str]
    expires_at: datetime
    revoke_state: Mapping[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Issued(keys={sorted(self.credential)}, expires_at={self.expires_at.isoformat()})"


@dataclass(frozen=True)
class Verification:
    ok: bool
    message: str
    identity: str | None = None  # who the material authenticates as (an IAM ARN, a DB user)
    reachable: dict[str, list[str]] = field(default_factory=dict)  # resource type -> resources seen


@dataclass(frozen=True)
class TTLLimits:
    default: timedelta
    min: timedelta
    max: timedelta


@runtime_checkable
class ServiceConnector(Protocol):
    """What the gateway calls. Declared as class attributes: ``type``, ``auth_methods``,
    ``config_model``, ``resource_types``, ``ttl``, ``capabilities``. ``revocability``,
    ``renewable``, ``wrap_only`` and ``creates_at_target`` are read-only mirrors of
    ``capabilities`` that :class:`ConnectorBase` sets; declare them only there."""

    type: ClassVar[str]
    # auth method name -> pydantic model of the *material* it needs from the backend secret
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]]
    config_model: ClassVar[type[BaseModel]]  # non-secret settings (host, port, region, grants...)
    resource_types: ClassVar[Sequence[str]]  # what validate_resource returns and list_resources takes
    ttl: ClassVar[TTLLimits]  # the type's own limits; a connector's configured TTLs sit inside them
    capabilities: ClassVar[ConnectorCapabilities]
    revocability: ClassVar[Revocability]  # = capabilities.revocability
    renewable: ClassVar[bool]  # = capabilities.renewable
    wrap_only: ClassVar[bool]  # = capabilities.wrap_only
    creates_at_target: ClassVar[bool]  # = capabilities.creates_at_target

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        """See "Construction and lifecycle" in the module docstring. No I/O."""
        ...

    async def start(self) -> None:
        """Begin background work, once, after construction (default: nothing)."""
        ...

    async def aclose(self) -> None:
        """Stop background work and release clients when the instance is dropped (default: nothing)."""
        ...

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """What may be shown of an exception this type's SDK raised: its class name and a
        vendor error *code* (SQLSTATE, AWS error code, errno), never its message. The gateway
        records it for any non-credgate exception that escapes a method."""
        ...

    def validate_resource(self, resource: str) -> str:
        """Return the resource type of ``resource`` or raise ResourceNotSupported. Pure."""
        ...

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        """The revoke state for a lease (JSON-serialisable), decided before anything is created.
        Pure. Raises ResourceNotSupported like ``validate_resource``."""
        ...

    async def issue(self, req: IssueRequest) -> Issued:
        """Create the credential under the planned names (``req.revoke_state``). Raises
        ResourceRejected, TargetUnreachable or TargetError; the gateway then revokes the
        planned names (when revocable) before answering."""
        ...

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        """Move the target's own expiry to ``expires_at``; return the expiry now in force.
        A credential that can't be extended raises NotRenewable (409 ``not_renewable``)."""
        ...

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        """Remove the credential; already gone is success. Raises TargetUnreachable or
        TargetError when it could not be sure it is gone (the gateway retries with backoff)."""
        ...

    async def verify(self) -> Verification:
        """Whether the material works against the target, as data (a failure is
        ``ok=False`` with a sentence, not an exception)."""
        ...

    async def list_resources(self, resource_type: str) -> list[str]:
        """Resources of one type the material can see. ResourceNotSupported for an unknown type."""
        ...


def coerce(model: type[BaseModel], value: Any, what: str) -> Any:
    """``value`` (a model or a mapping) as an instance of ``model``; a validation
    error names the fields at fault, never their values (they may be material)."""
    if isinstance(value, model):
        return value
    data = value.model_dump() if isinstance(value, BaseModel) else value
    if not isinstance(data, Mapping):
        raise ValidationFailed(f"The {what} must be an object.", code="invalid_connector_config")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        fields = ", ".join(e["field"] or what for e in field_errors(exc.errors()))
        raise ValidationFailed(f"Invalid {what} at: {fields}.", code="invalid_connector_config") from None


def as_utc(when: datetime) -> datetime:
    """A datetime in UTC (a naive one is taken to be UTC already)."""
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


class ConnectorBase:
    """The base every connector shares: the constructor (the auth method must be one of
    the type's; config and material are validated against their models, errors name
    fields, never values), the no-op lifecycle, the generic sanitizer, and the mirrors of
    ``capabilities``. Subclasses call ``super().__init__``, then add their own."""

    type: ClassVar[str]
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]]
    config_model: ClassVar[type[BaseModel]]
    resource_types: ClassVar[Sequence[str]]
    ttl: ClassVar[TTLLimits]
    capabilities: ClassVar[ConnectorCapabilities]
    revocability: ClassVar[Revocability]
    renewable: ClassVar[bool]
    wrap_only: ClassVar[bool]
    creates_at_target: ClassVar[bool]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        caps = cls.__dict__.get("capabilities")
        if caps is not None:  # the mirrors follow the one declaration
            cls.revocability = caps.revocability
            cls.renewable = caps.renewable
            cls.wrap_only = caps.wrap_only
            cls.creates_at_target = caps.creates_at_target

    target_pool: TargetPool[Any] | None = None  # set by a connector that keeps admin connections
    identity: WorkloadIdentity | None = None  # set by the gateway before start(): see "Keyless auth methods"

    async def identity_token(
        self, audience: str, req: IssueRequest | None = None, *, ttl: timedelta | None = None
    ) -> str:
        """A web-identity token for one call: for ``req``'s principal, run and lease, or (no
        request: verify, list) for ``connector:<name>``; lives ``ttl`` (default 5 minutes)."""
        if self.identity is None:
            raise TargetError(
                "This gateway is not set up as an OIDC issuer (no public URL), so web-identity can't be used.",
                code="oidc_issuer_unconfigured",
            )
        if req is None:
            return await self.identity.token(audience=audience, subject=f"connector:{self.name}",
                                             ttl=ttl or timedelta(minutes=5))
        return await self.identity.token(
            audience=audience, subject=req.principal or f"connector:{self.name}", run_id=req.run_id,
            lease_id=req.lease_id, ttl=ttl or timedelta(minutes=5),
        )

    def __init__(
        self, config: Any, auth_method: str, material: Any, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        if auth_method not in self.auth_methods:
            raise ValidationFailed(
                f"Connector type {self.type} has no auth method {auth_method!r}; "
                f"it has: {', '.join(sorted(self.auth_methods))}.",
                code="unknown_auth_method",
            )
        self.name = name
        self.pool_limits = pool or PoolLimits()
        self.auth_method = auth_method
        self.config = coerce(self.config_model, config, f"{self.type} config")
        self._material = coerce(self.auth_methods[auth_method], material, f"{self.type} material")

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        """Close :attr:`target_pool` if the connector keeps one (calls in flight finish first)."""
        if self.target_pool is not None:
            await self.target_pool.aclose()

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """The generic fallback (:func:`generic_sanitize`); a connector with an SDK overrides it."""
        return generic_sanitize(exc)

    def missing_keys(self) -> list[str]:
        """Names of keys the configuration needs from the material that it lacks (never
        values). The auth method's model already checks its own fields; override only when
        the configuration names more (a ``static`` connector's ``keys``)."""
        return []


RESOURCE = re.compile(r"^[A-Za-z0-9._:/@*+=-]{1,256}$")


def endpoint_url(value: str, what: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    """A target's endpoint as configured (``what``: the field, for the message): a URL of one of
    ``schemes`` with a host, no credentials, query or fragment; returned without a trailing '/'.
    A ValueError otherwise (pydantic turns it into the 422 naming the field)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{what} is not a valid URL") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"{what} must be an {' or '.join(f'{s}://' for s in schemes)} URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{what} must not carry credentials, a query or a fragment")
    return value.rstrip("/")


def is_ipv4(name: str) -> bool:
    """True for a dotted IPv4 address (which a bucket name may not be, at AWS and at Google)."""
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def role_name(lease_id: str, prefix: str = "cg_") -> str:
    """The deterministic target-side name of a lease's user or role."""
    return prefix + re.sub(r"[^a-z0-9]", "", lease_id.lower())[-24:]
