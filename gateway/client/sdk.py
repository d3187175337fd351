"""The pipeline client: typed, cached, refreshed credentials (sync :class:`Client`, async
:class:`AsyncClient`).

Both run one implementation: each operation is a generator that yields what it needs done
(send this request, sleep this long) and receives the result; :class:`Client` drives it with
httpx.Client and time.sleep, :class:`AsyncClient` with httpx.AsyncClient and asyncio.sleep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Union

import httpx

from gateway.client.auth import Auth, auth_from
from gateway.client.credentials import Credential, credential_from
from gateway.client.errors import (
    BadRequest, CredgateError, GatewayUnreachable, Gone, NotFound, RateLimited, RequestFailed, Unauthenticated,
    Unavailable,
)
from gateway.client.helpers import ClientHelpers
from gateway.client.http import failure
from gateway.client.urls import DEFAULT_ADDR, seg

__all__ = ["AsyncClient", "Client", "RunToken"]

log = logging.getLogger("credgate.client")

Key = tuple[str, str]


@dataclass
class _Sleep:
    seconds: float


Step = Union[httpx.Request, _Sleep]
Op = Generator[Step, Any, Any]


@dataclass(frozen=True, repr=False)
class RunToken:
    """A run token minted for one pipeline run (what a metadata server hands the run)."""

    run_id: str
    token: str
    expires_in: int
    connectors: tuple[str, ...]
    resources: tuple[str, ...]
    max_credential_ttl_seconds: int | None = None

    def __repr__(self) -> str:
        return (f"<RunToken run={self.run_id} connectors={list(self.connectors)} resources={list(self.resources)} "
                f"expires_in={self.expires_in} (token redacted)>")

    __str__ = __repr__


@dataclass
class _Entry:
    credential: Credential
    ttl: int | None
    refresh_at: float
    span: float = 0.0  # the lease's lifetime when issued
    failures: int = 0
    reissue: bool = False  # renewal no longer extends it enough: issue a new one


class _Core:
    """Configuration, cache and every decision; no I/O."""

    def __init__(self, addr: str | None, auth: Auth, *, margin: float, retries: int, max_retry_wait: float,
                 revoke_on_close: bool, refresh_fraction: float, jitter: float, default_ttl: int | None) -> None:
        self.addr = (addr or os.environ.get("CREDGATE_ADDR") or DEFAULT_ADDR).rstrip("/")
        self.auth = auth
        self.margin = margin
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.revoke_on_close = revoke_on_close
        self.refresh_fraction = refresh_fraction
        self.jitter = jitter
        self.default_ttl = default_ttl
        self.cache: dict[Key, _Entry] = {}
        self.issued: dict[str, float] = {}  # lease id -> expiry (epoch seconds), for close()
        self.wrapped: set[str] = set()  # connectors that hand out only wrapped
        self.renewals = 0
        self.reissues = 0
        self.misses = 0  # credentials() calls that had to issue (not served from the cache)

    # --- decisions -------------------------------------------------------------

    def usable(self, cred: Credential, now: float) -> bool:
        return cred.remaining(now) > self.margin

    def cached(self, key: Key, now: float) -> Credential | None:
        entry = self.cache.get(key)
        return entry.credential if entry is not None and self.usable(entry.credential, now) else None

    def schedule(self, cred: Credential, now: float) -> float:
        """When to refresh: about two thirds through what is left, minus some jitter, and
        always before it comes within the margin."""
        left = cred.remaining(now)
        at = now + left * self.refresh_fraction * (1 - random.uniform(0, self.jitter))
        return min(at, now + max(0.0, left - self.margin - 0.5))

    def remember(self, key: Key, cred: Credential, ttl: int | None, now: float) -> None:
        self.cache[key] = _Entry(cred, ttl, self.schedule(cred, now), span=cred.remaining(now))
        self.issued[cred.lease_id] = cred.expires_at.timestamp()

    def due(self, now: float) -> list[Key]:
        return [k for k, e in self.cache.items() if e.refresh_at <= now]

    def next_wake(self, now: float) -> float:
        if not self.cache:
            return 5.0
        return max(0.0, min(5.0, min(e.refresh_at for e in self.cache.values()) - now))

    def retry_wait(self, attempt: int, hinted: float | None) -> float:
        base = hinted if hinted is not None else min(8.0, 0.25 * 2**attempt) * random.uniform(0.8, 1.2)
        return min(self.max_retry_wait, base)

    # --- operations (generators) ----------------------------------------------

    def _authorize(self) -> Op:
        form = self.auth.token_form(time.time())
        if form is not None:
            body = yield from self.send("POST", "/v1/auth/token", form=form, authenticated=False)
            self.auth.accept(body, time.time())

    def send(self, method: str, path: str, *, json: Any = None, form: dict[str, str] | None = None,
             params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
             authenticated: bool = True) -> Op:
        """One API call: authenticated, retried on 429/503 (Retry-After honoured, bounded) and
        on no answer, a refused bearer fetched again once. Returns the JSON answer."""
        reauthed = False
        attempt = 0
        while True:
            hdrs = {"User-Agent": "credgate-client", **(headers or {})}
            if authenticated:
                yield from self._authorize()
                bearer = self.auth.bearer()
                if bearer:
                    hdrs["Authorization"] = f"Bearer {bearer}"
            req = httpx.Request(method, self.addr + path, json=json, data=form, params=params, headers=hdrs)
            try:
                resp: httpx.Response = yield req
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise GatewayUnreachable(
                        f"can't reach the gateway at {self.addr} ({type(exc).__name__})") from None
                yield _Sleep(self.retry_wait(attempt, None))
                attempt += 1
                continue
            if resp.status_code < 400:
                return resp.json() if resp.content and resp.status_code != 204 else None
            err = failure(resp)
            if isinstance(err, (RateLimited, Unavailable)) and attempt < self.retries:
                wait = self.retry_wait(attempt, err.retry_after)
                log.info("credgate: %s (%s), retrying in %.1fs", err.status, err.code, wait)
                yield _Sleep(wait)
                attempt += 1
                continue
            if isinstance(err, Unauthenticated) and authenticated and not reauthed and self.auth.invalidate():
                reauthed = True
                continue
            raise err

    def issue(self, connector: str, resource: str, ttl: int | None) -> Op:
        body: dict[str, Any] = {"connector": connector, "resource": resource}
        if ttl is not None:
            body["ttl_seconds"] = ttl
        if connector not in self.wrapped:
            try:
                out = yield from self.issue_once(body)
                return credential_from(out)
            except BadRequest as exc:
                if exc.code != "wrap_required":
                    raise
                self.wrapped.add(connector)
        wrapped = yield from self.issue_once({**body, "wrap": True})
        out = yield from self.send("POST", "/v1/unwrap", json={"wrap_token": wrapped["wrap_token"]}, authenticated=False)
        return credential_from(out)

    def issue_once(self, body: dict[str, Any]) -> Op:
        """``POST /v1/credentials`` under one Idempotency-Key, so a retry after no answer is not a
        second lease. If the retry finds that lease ended (410 ``lease_ended``: the gateway revoked
        it because the first answer never reached us, past its delivery deadline), issue anew."""
        key = {"Idempotency-Key": uuid.uuid4().hex}
        try:
            return (yield from self.send("POST", "/v1/credentials", json=body, headers=key))
        except Gone as exc:
            if exc.code != "lease_ended":
                raise
            log.info("credgate: the lease of an unanswered request was revoked as undelivered; issuing anew")
            return (yield from self.send("POST", "/v1/credentials", json=body,
                                         headers={"Idempotency-Key": uuid.uuid4().hex}))

    def credentials(self, connector: str, resource: str, ttl: int | None) -> Op:
        ttl = ttl if ttl is not None else self.default_ttl
        now = time.time()
        key = (connector, resource)
        hit = self.cached(key, now)
        if hit is not None:
            return hit
        self.misses += 1
        cred = yield from self.issue(connector, resource, ttl)
        now = time.time()
        if not self.usable(cred, now):
            raise CredgateError(
                f"The gateway issued a credential for {connector}/{resource} that expires within the client's "
                f"margin ({self.margin:g}s): ask a longer ttl or a smaller margin.", code="ttl_below_margin")
        self.remember(key, cred, ttl, now)
        return cred

    def refresh(self, key: Key) -> Op:
        """Renew (a renewable lease) or re-issue one cached credential; on failure keep the
        cached one and try again soon."""
        entry = self.cache.get(key)
        if entry is None:
            return
        old = entry.credential
        try:
            fresh: Credential | None = None
            if old.renewable and not entry.reissue:
                try:
                    lease = yield from self.send("POST", f"/v1/leases/{seg(old.lease_id)}/renew",
                                                 json={"ttl_seconds": entry.ttl} if entry.ttl else None)
                    renewed = credential_from({**lease, "credential": dict(old.fields)})
                    fresh = old.with_expiry(renewed.expires_at, issued_at=None)
                    self.renewals += 1
                    self.issued[old.lease_id] = fresh.expires_at.timestamp()
                    if fresh.remaining() < max(self.margin * 2, entry.span * 0.5):
                        entry.reissue = True  # capped: next time a new lease
                        if not self.usable(fresh, time.time()):
                            fresh = None
                except (BadRequest, NotFound, RequestFailed) as exc:
                    if isinstance(exc, (RateLimited, Unavailable, Unauthenticated)):
                        raise
                    log.info("credgate: renewing lease %s refused (%s); issuing a new one", old.lease_id, exc.code)
            if fresh is None:
                fresh = yield from self.issue(key[0], key[1], entry.ttl)
                self.reissues += 1
                self.issued[fresh.lease_id] = fresh.expires_at.timestamp()
            now = time.time()
            same = fresh.lease_id == old.lease_id
            self.cache[key] = _Entry(fresh, entry.ttl, self.schedule(fresh, now),
                                     span=entry.span if same else fresh.remaining(now), reissue=entry.reissue and same)
        except CredgateError as exc:
            entry.failures += 1
            now = time.time()
            left = old.remaining(now)
            entry.refresh_at = now + max(0.2, min(self.retry_wait(entry.failures, None), left / 4))
            log.warning("credgate: refreshing %s/%s failed (%s); serving the cached credential while it is valid",
                        key[0], key[1], exc.code)

    def run_token(self, run_id: str, connectors: list[str], resources: list[str], ttl: int | None) -> Op:
        body: dict[str, Any] = {"connectors": list(connectors), "resources": list(resources)}
        if ttl is not None:
            body["ttl_seconds"] = ttl
        out = yield from self.send("POST", f"/v1/runs/{seg(run_id)}/token", json=body)
        return RunToken(run_id=out["run_id"], token=out["token"], expires_in=int(out["expires_in"]),
                        connectors=tuple(out["connectors"]), resources=tuple(out["resources"]),
                        max_credential_ttl_seconds=out.get("max_credential_ttl_seconds"))

    def end_run(self, run_id: str) -> Op:
        return (yield from self.send("POST", f"/v1/runs/{seg(run_id)}/revoke"))

    def revoke_all(self) -> Op:
        now = time.time()
        for lease_id, expires in list(self.issued.items()):
            if expires <= now:
                continue
            try:
                yield from self.send("POST", f"/v1/leases/{seg(lease_id)}/revoke")
            except CredgateError as exc:
                log.warning("credgate: revoking lease %s failed (%s)", lease_id, exc.code)
        self.issued.clear()
        self.cache.clear()


def _core(addr: str | None, kw: dict[str, Any]) -> _Core:
    auth = auth_from(kw.pop("token", None), run_token=kw.pop("run_token", None), client_id=kw.pop("client_id", None),
                     client_secret=kw.pop("client_secret", None), token_file=kw.pop("token_file", None),
                     auth=kw.pop("auth", None))
    core = _Core(addr, auth, margin=kw.pop("margin", 30.0), retries=kw.pop("retries", 4),
                 max_retry_wait=kw.pop("max_retry_wait", 30.0), revoke_on_close=kw.pop("revoke_on_close", True),
                 refresh_fraction=kw.pop("refresh_fraction", 2 / 3), jitter=kw.pop("jitter", 0.25),
                 default_ttl=kw.pop("ttl", None))
    if kw:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(kw))}")
    return core


class _Facade:
    """What both clients show of their core."""

    _core: _Core

    @property
    def addr(self) -> str:
        return self._core.addr

    @property
    def auth(self) -> Auth:
        return self._core.auth

    @property
    def stats(self) -> dict[str, int]:
        return {"renewals": self._core.renewals, "reissues": self._core.reissues, "misses": self._core.misses,
                "cached": len(self._core.cache)}


_DOC = """
    Arguments (each optional; the environment fills in the rest):

    - ``addr``: the gateway (``CREDGATE_ADDR``, default ``http://127.0.0.1:8765``).
    - one authentication: ``token`` (admin key or gateway token, ``CREDGATE_TOKEN``),
      ``run_token`` (``CREDGATE_RUN_TOKEN``), ``client_id`` + ``client_secret``
      (``CREDGATE_CLIENT_ID``/``CREDGATE_CLIENT_SECRET``), ``token_file``
      (``CREDGATE_TOKEN_FILE``), or ``auth`` (an :class:`~gateway.client.auth.Auth`).
    - ``margin``: a credential is never handed out within this many seconds of its expiry (30).
    - ``ttl``: the default ttl_seconds asked for.
    - ``retries`` (4) and ``max_retry_wait`` (30 s): 429/503 and no-answer retries.
    - ``revoke_on_close`` (True): close() revokes the leases this client issued.
    - ``refresh``: renew/re-issue cached credentials in the background (True).
"""


class Client(ClientHelpers, _Facade):
    __doc__ = "Synchronous client (a background thread refreshes cached credentials)." + _DOC

    def __init__(self, addr: str | None = None, *, refresh: bool = True, timeout: float = 30.0, verify: Any = True,
                 transport: httpx.BaseTransport | None = None, **kw: Any) -> None:
        self._core = _core(addr, kw)
        self._http = httpx.Client(timeout=timeout, verify=verify, transport=transport)
        self._lock = threading.RLock()  # the cache and the auth state
        self._keys: dict[Key, threading.Lock] = {}
        self._refresh = refresh
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False


    def _run(self, op: Op) -> Any:
        try:
            step = next(op)
            while True:
                if isinstance(step, _Sleep):
                    self._stop.wait(step.seconds)  # cut short by close()
                    step = op.send(None)
                    continue
                try:
                    resp = self._http.send(step)
                    resp.read()
                except httpx.TransportError as exc:
                    step = op.throw(exc)
                    continue
                step = op.send(resp)
        except StopIteration as stop:
            return stop.value

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """Any API call, authenticated and retried; the JSON answer."""
        return self._run(self._core.send(method, path, json=json, params=params))

    def run_token(self, run_id: str, connectors: list[str], resources: list[str], ttl: int | None = None) -> RunToken:
        """Mint a token for one pipeline run, scoped to ``connectors`` x ``resources`` (a subset
        of this client's rights; needs ``runs:delegate``). Hand the run ``.token`` only."""
        return self._run(self._core.run_token(run_id, connectors, resources, ttl))

    def end_run(self, run_id: str) -> dict[str, Any]:
        """End a run: its token stops working and its leases are revoked (idempotent)."""
        return self._run(self._core.end_run(run_id))

    def credentials(self, connector: str, resource: str, ttl: int | None = None) -> Credential:
        """A credential for ``resource`` through ``connector``: from the cache while it is valid
        beyond the margin, else issued now (and then kept fresh in the background)."""
        if self._closed:
            raise CredgateError("The client is closed.", code="client_closed")
        key = (connector, resource)
        hit = self._core.cached(key, time.time())  # never waits on the gateway
        if hit is not None:
            return hit
        with self._lock:
            lock = self._keys.setdefault(key, threading.Lock())
        with lock:
            cred = self._run(self._core.credentials(connector, resource, ttl))
        self._start()
        return cred

    def refresh_now(self) -> None:
        """Refresh every cached credential that is due (what the background thread does)."""
        with self._lock:
            due = self._core.due(time.time())
        for key in due:
            with self._lock:
                lock = self._keys.setdefault(key, threading.Lock())
            with lock:
                self._run(self._core.refresh(key))

    def _start(self) -> None:
        if self._refresh and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="credgate-refresh", daemon=True)
            self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            wait = self._core.next_wake(time.time())
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh_now()
            except Exception as exc:  # noqa: BLE001 - the thread must live on; no secret in the type name
                log.warning("credgate: background refresh failed (%s)", type(exc).__name__)

    def close(self) -> None:
        """Stop refreshing and revoke the leases this client issued (unless revoke_on_close=False)."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._stop.clear()
        try:
            if self._core.revoke_on_close:
                self._run(self._core.revoke_all())
        finally:
            self._closed = True
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<credgate.Client {self.addr} auth={self._core.auth!r}>"


class AsyncClient(_Facade):
    __doc__ = "Asynchronous client (an asyncio task refreshes cached credentials)." + _DOC

    def __init__(self, addr: str | None = None, *, refresh: bool = True, timeout: float = 30.0, verify: Any = True,
                 transport: httpx.AsyncBaseTransport | None = None, **kw: Any) -> None:
        self._core = _core(addr, kw)
        self._http = httpx.AsyncClient(timeout=timeout, verify=verify, transport=transport)
        self._locks: dict[Key, asyncio.Lock] = {}
        self._refresh = refresh
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False


    def _locked(self, key: Key) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def _run(self, op: Op) -> Any:
        try:
            step = next(op)
            while True:
                if isinstance(step, _Sleep):
                    await asyncio.sleep(step.seconds)
                    step = op.send(None)
                    continue
                try:
                    resp = await self._http.send(step)
                    await resp.aread()
                except httpx.TransportError as exc:
                    step = op.throw(exc)
                    continue
                step = op.send(resp)
        except StopIteration as stop:
            return stop.value

    async def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return await self._run(self._core.send(method, path, json=json, params=params))

    async def run_token(self, run_id: str, connectors: list[str], resources: list[str],
                        ttl: int | None = None) -> RunToken:
        return await self._run(self._core.run_token(run_id, connectors, resources, ttl))

    async def end_run(self, run_id: str) -> dict[str, Any]:
        return await self._run(self._core.end_run(run_id))

    async def credentials(self, connector: str, resource: str, ttl: int | None = None) -> Credential:
        if self._closed:
            raise CredgateError("The client is closed.", code="client_closed")
        key = (connector, resource)
        hit = self._core.cached(key, time.time())  # never waits on the gateway
        if hit is not None:
            return hit
        async with self._locked(key):
            cred = await self._run(self._core.credentials(connector, resource, ttl))
        self._start()
        return cred

    async def refresh_now(self) -> None:
        for key in self._core.due(time.time()):
            async with self._locked(key):
                await self._run(self._core.refresh(key))

    def _start(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._refresh and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="credgate-refresh")
        self._wake.set()

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            until = time.monotonic() + self._core.next_wake(time.time())
            while not self._wake.is_set() and time.monotonic() < until:
                await asyncio.sleep(min(0.1, max(0.0, until - time.monotonic())))
            self._wake.clear()
            try:
                await self.refresh_now()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("credgate: background refresh failed (%s)", type(exc).__name__)

    async def aclose(self) -> None:
        """Stop refreshing and revoke the leases this client issued (unless revoke_on_close=False)."""
        if self._closed:
            return
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        try:
            if self._core.revoke_on_close:
                await self._run(self._core.revoke_all())
        finally:
            self._closed = True
            await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<credgate.AsyncClient {self.addr} auth={self._core.auth!r}>"
