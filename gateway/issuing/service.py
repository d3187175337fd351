"""Issuing, renewing and revoking credentials: the request path's core.

Issuance, in order (see connectors/base.py for the connector's side):

1. :meth:`Credentials.plan`: check the resource against the connector's patterns
   and decide the TTL, once, into an :class:`~gateway.issuing.plan.IssuePlan`
   that everything below derives from (the lease row, the connector's
   ``IssueRequest``, the response);
2. replay if the Idempotency-Key was seen before;
3. read the connector's material, ``plan`` the revoke state, and commit a
   ``pending`` lease holding it, *before* the target is touched;
4. ``issue`` at the target; on failure, revoke by the planned names at once
   (the reaper retries if that fails too);
5. mark the lease ``active`` with a conditional update: if the reaper took a
   too-slow pending lease meanwhile, the fresh credential is revoked, not
   handed out. A revocable lease is activated *undelivered* (``delivery_due_at``,
   the delivery deadline): the web layer confirms its delivery once the
   response has been handed to the server whole (:meth:`Credentials.delivered`),
   and the reaper revokes it if that never happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from connectors.base import Revocability, TargetError, generic_sanitize
from gateway.identity.principal import Principal
from gateway.plugins.connectors import Catalog
from gateway.crypto.envelope import Envelope
from gateway.errors import BadRequest, Conflict, CredgateError, Gone, Unavailable
from gateway.issuing.leases import (
    ACTIVE,
    EXPIRED,
    PENDING,
    REVOKED,
    REVOKING,
    Leases,
    TTLDecision,
    calculate_ttl,
    new_lease_id,
    transition_statement,
)
from gateway.plugins.registry import connector_class
from gateway.store import Store
from gateway.store.models import ConnectorRow, LeaseRow, utcnow
from gateway.store.sealed import lease_context
from gateway.issuing.plan import IssueParams, Issuance, IssuePlan
from gateway.issuing.wrapping import WrapTokens

log = logging.getLogger("credgate.credentials")

# How much longer than the call to the target a revocation's claim on its lease holds
# (the store writes around the call); a claim whose holder died lapses after it.
CLAIM_MARGIN_SECONDS = 5.0


@dataclass(frozen=True)
class RevokePolicy:
    timeout: float = 30.0  # per call to a target
    backoff_base: float = 1.0
    backoff_cap: float = 300.0


def describe(exc: BaseException, connector_type: str | None = None) -> str:
    """What may be recorded about a failure: our own sentence, or the vendor's class and code
    as the connector type's own ``sanitize`` gives them (the generic class name without one)."""
    if isinstance(exc, CredgateError):
        return f"{exc.code}: {exc.message}"[:300]
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout: the target did not answer in time"
    sanitize = generic_sanitize
    if connector_type is not None:
        try:
            sanitize = connector_class(connector_type).sanitize
        except CredgateError:  # unknown type or its SDK missing: the generic form
            pass
    return sanitize(exc)[:300]


def run_cap(principal: Principal) -> timedelta | None:
    """A run token's own cap on its credentials' lifetime (``max_credential_ttl_seconds``)."""
    return principal.scope.max_ttl if principal.scope is not None else None


def ttl_for(
    row: ConnectorRow, requested_seconds: int | None, *, policy_max: timedelta | None, run_max: timedelta | None
) -> TTLDecision:
    """:func:`~gateway.issuing.leases.calculate_ttl` with a connector's and its type's limits:
    issuance and renewal both decide a lease's TTL through it."""
    cls = connector_class(row.type)
    return calculate_ttl(
        requested_seconds,
        default=timedelta(seconds=row.default_ttl_seconds),
        maximum=timedelta(seconds=row.max_ttl_seconds),
        type_min=cls.ttl.min,
        type_max=cls.ttl.max,
        policy_max=policy_max,
        run_max=run_max,
    )


def lease_view(row: LeaseRow) -> dict[str, Any]:
    return {
        "lease_id": row.id,
        "connector": row.connector,
        "connector_type": row.connector_type,
        "resource": row.resource,
        "principal": row.principal,
        "run_id": row.run_id,
        "state": row.state,
        "revocability": row.revocability,
        "renewable": row.renewable,
        "wrapped": row.wrapped,
        "issued_at": row.issued_at,
        "expires_at": row.expires_at,
        "max_expires_at": row.max_expires_at,
        "revoked_at": row.revoked_at,
        "attempts": row.attempts,
        "last_error": row.last_error,
    }


class Credentials:
    def __init__(
        self,
        store: Store,
        envelope: Envelope,
        catalog: Catalog,
        leases: Leases,
        wraps: WrapTokens,
        policy: RevokePolicy | None = None,
        *,
        delivery_deadline: timedelta | None = None,
    ) -> None:
        self._store = store
        self._envelope = envelope
        self._catalog = catalog
        self.leases = leases
        self._wraps = wraps
        self.policy = policy or RevokePolicy()
        # How long a revocable credential may wait for its response to be confirmed sent
        # before the reaper revokes it as undelivered (None: not tracked).
        self.delivery_deadline = delivery_deadline
        # Revocations of one lease are made one at a time: the attempts this process is
        # making now (by lease id), and the name its claims in the store carry.
        self._running: dict[str, asyncio.Future[bool | None]] = {}
        self._actor = f"{socket.gethostname()[:48]}:{os.getpid()}:{secrets.token_hex(4)}"
        # A claim outlives the longest attempt (the call to the target is cut at policy.timeout).
        self._claim_for = timedelta(seconds=self.policy.timeout + CLAIM_MARGIN_SECONDS)

    # --- issue -------------------------------------------------------------

    async def plan(
        self,
        principal: Principal,
        params: IssueParams,
        *,
        idempotency_key: str | None = None,
        run_id: str | None = None,
        policy_max: timedelta | None = None,
        decided_by: str | None = None,
    ) -> IssuePlan:
        """Decide an issuance (after the policy decision): the connector, the resource (its
        grammar and the connector's patterns, checked here and only here), wrapping and the TTL.
        Errors, in order: 404 connector_not_found, 400 invalid_resource, 403
        resource_not_allowed, 400 wrap_required, the TTL's own."""
        row = await self._catalog.get(params.connector)
        self._catalog.check_resource(row, params.resource)
        cls = connector_class(row.type)
        if cls.wrap_only and not params.wrap:
            raise BadRequest(
                f"Connector type {row.type} hands out long-lived material only wrapped: send \"wrap\": true.",
                code="wrap_required",
            )
        return IssuePlan(
            row=row,
            connector_type=cls,
            resource=params.resource,
            ttl=ttl_for(row, params.ttl_seconds, policy_max=policy_max, run_max=run_cap(principal)),
            wrap=params.wrap,
            wrap_ttl=timedelta(seconds=params.wrap_ttl_seconds) if params.wrap_ttl_seconds else None,
            owner=principal.owner,
            run_id=run_id,
            idempotency_key=idempotency_key,
            request_hash=params.digest(),
            decided_by=decided_by,
        )

    async def issue(self, plan: IssuePlan) -> Issuance:
        """Carry out a plan (see the module docstring for the order); what is handed back."""
        if plan.idempotency_key:
            existing = await self.leases.find_idempotent(plan.owner, plan.idempotency_key)
            if existing is not None:
                return await self._replay(existing, plan)

        connector = await self._catalog.instance(plan.row)
        connector.validate_resource(plan.resource)  # the connector's own grammar (e.g. "db/schema")
        lease_id = new_lease_id()
        lease = plan.lease(lease_id, utcnow(), connector.plan(lease_id, plan.resource))
        if not plan.creates_at_target:
            # Nothing comes into being anywhere but in this response: no intent to record
            # first. The lease, made active, and its wrap token are one transaction.
            return await self._issue_locally(connector, lease, plan)
        replayed = await self._record_new(lease, plan)
        if replayed is not None:
            return replayed

        try:
            issued = await asyncio.wait_for(
                connector.issue(plan.request(lease, self.policy.timeout)), timeout=self.policy.timeout
            )
        except BaseException as exc:
            await self._abort(lease_id, exc, plan.row.type)
            if isinstance(exc, CredgateError):
                raise
            if isinstance(exc, asyncio.TimeoutError):
                raise TargetError("The target did not answer in time.", code="target_timeout") from None
            if isinstance(exc, Exception):
                raise TargetError(f"The target refused the request ({describe(exc, plan.row.type)}).") from None
            raise
        lease.expires_at = expires_at = min(issued.expires_at, lease.expires_at)
        secret_part, wrap_row = self._hand_out(lease, plan, issued.credential)
        now = utcnow()
        values: dict[str, Any] = {"state": ACTIVE, "expires_at": expires_at, "updated_at": now}
        if issued.revoke_state:  # what only the target's answer told (a Vault lease id)
            values["revoke_state"] = {**lease.revoke_state, **issued.revoke_state}
        deadline = self._delivery_deadline(lease)
        if deadline is not None:
            values["delivery_due_at"] = now + deadline
        if plan.idempotency_key:
            values.update(self._sealed_response(lease_id, secret_part))

        def activate(s: Any) -> bool:
            res = s.execute(
                update(LeaseRow).where(LeaseRow.id == lease_id, LeaseRow.state == PENDING).values(**values)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:
                if "revoke_state" in values:  # taken by the reaper: its next attempt needs it too
                    s.execute(
                        update(LeaseRow).where(LeaseRow.id == lease_id).values(revoke_state=values["revoke_state"])
                        .execution_options(synchronize_session=False)
                    )
                return True
            if wrap_row is not None:
                s.add(wrap_row)
            return False

        taken = await self._store.grouped(activate)
        if taken:
            # The reaper judged this issuance dead and is revoking it: never hand it out, and
            # revoke again what this call made (the reaper's attempt may predate it).
            await self._revoke_after_takeover(lease_id)
            raise Unavailable("Issuing took too long and was rolled back; retry.", code="issue_rolled_back")
        lease.state = ACTIVE
        return Issuance.of(lease, plan.ttl, secret_part, awaiting_delivery=deadline is not None)

    def _delivery_deadline(self, lease: LeaseRow) -> timedelta | None:
        """How long this lease may stay undelivered, or None when it is not activated undelivered:
        delivery is not tracked, or the reaper could not take the credential back (only a revocable
        type's is; an expiry-only one would only be marked revoked)."""
        if lease.revocability != str(Revocability.REVOCABLE):
            return None
        return self.delivery_deadline

    async def delivered(self, lease_ids: list[str]) -> None:
        """The responses carrying these leases' credentials (or wrap tokens) have been handed to
        the server whole: they are no longer undelivered. Called by the web layer after the send."""
        await self.leases.delivered(lease_ids)

    async def _issue_locally(self, connector: Any, lease: LeaseRow, plan: IssuePlan) -> Issuance:
        """Issuance for a connector that creates nothing at a target (``creates_at_target`` False)."""
        issued = await connector.issue(plan.request(lease, self.policy.timeout))
        lease.expires_at = min(issued.expires_at, lease.expires_at)
        lease.state = ACTIVE
        secret_part, wrap_row = self._hand_out(lease, plan, issued.credential)
        if lease.idempotency_key:
            sealed = self._sealed_response(lease.id, secret_part)
            lease.kek_version, lease.wrapped_dek, lease.ciphertext = (
                sealed["kek_version"], sealed["wrapped_dek"], sealed["ciphertext"]
            )
        replayed = await self._record_new(lease, plan, wrap_row)
        return replayed if replayed is not None else Issuance.of(lease, plan.ttl, secret_part)

    async def _record_new(self, lease: LeaseRow, plan: IssuePlan, wrap_row: Any = None) -> Issuance | None:
        """Insert a new lease (and its wrap token) through the group commit. None once recorded; the
        earlier response if a concurrent request with the same Idempotency-Key won the insert."""

        def record(s: Any) -> None:
            s.add(lease)
            if wrap_row is not None:
                s.add(wrap_row)

        try:
            await self._store.grouped(record)
        except IntegrityError:
            existing = await self.leases.find_idempotent(plan.owner, plan.idempotency_key or "")
            if existing is None:
                raise
            return await self._replay(existing, plan)
        return None

    def _hand_out(self, lease: LeaseRow, plan: IssuePlan, credential: dict[str, str]) -> tuple[dict[str, Any], Any]:
        """The response's secret part: the credential, or a wrap token for it (and its unsaved row)."""
        if not plan.wrap:
            return {"credential": credential}, None
        wrap_ttl = plan.wrap_ttl or plan.ttl.ttl
        wrap_expires = min(lease.issued_at + wrap_ttl, lease.expires_at)
        body = Issuance.of(lease, plan.ttl, {"credential": credential}).wire()
        token, wrap_row = self._wraps.new(lease.id, body, wrap_expires)
        return {"wrap_token": token, "wrap_expires_at": wrap_expires.isoformat()}, wrap_row

    def _sealed_response(self, lease_id: str, secret_part: dict[str, Any]) -> dict[str, Any]:
        """The response's secret part sealed on the lease, for an Idempotency-Key replay."""
        sealed = self._envelope.seal(json.dumps(secret_part).encode(), lease_context(lease_id))
        return {"kek_version": sealed.kek_version, "wrapped_dek": sealed.wrapped_dek, "ciphertext": sealed.ciphertext}

    async def _replay(self, existing: LeaseRow, plan: IssuePlan) -> Issuance:
        """The earlier response for this Idempotency-Key. If that response was never confirmed
        sent (the lease is undelivered), this one may deliver it: its deadline starts again first,
        and the web layer confirms this response's delivery as it does a new issuance's."""
        if existing.request_hash != plan.request_hash:
            raise Conflict(
                "This Idempotency-Key was used for a different request.", code="idempotency_key_reused"
            )
        if existing.state == PENDING:
            raise Conflict("The first request with this Idempotency-Key is still in progress.", code="request_in_progress")
        if existing.state != ACTIVE or existing.sealed is None:
            raise Gone(f"Lease {existing.id} issued for this Idempotency-Key has ended ({existing.state}).", code="lease_ended")
        undelivered = existing.delivery_due_at is not None
        if undelivered and self.delivery_deadline is not None:
            if not await self.leases.redeliver(existing.id, utcnow() + self.delivery_deadline):
                raise Gone(f"Lease {existing.id} issued for this Idempotency-Key has ended (its response was never "
                           "delivered, and it was revoked): issue a new credential.", code="lease_ended")
        secret_part = json.loads(self._envelope.open(existing.sealed, lease_context(existing.id)))
        return Issuance.of(existing, plan.ttl, secret_part, replayed=True, awaiting_delivery=undelivered)

    async def _abort(self, lease_id: str, exc: BaseException, connector_type: str | None = None) -> None:
        """Issuance failed: whatever may exist under the planned names is revoked now."""
        mine = await self.leases.transition(
            lease_id, (PENDING,), REVOKING, next_attempt_at=utcnow(), last_error=describe(exc, connector_type)
        )
        if not mine:  # the reaper took it first (a stale pending lease): its attempt may predate ours
            await self._revoke_after_takeover(lease_id)
            return
        try:
            await self.attempt_revoke(await self.leases.get(lease_id))
        except Exception:  # the reaper will retry
            log.warning("clean-up of failed issuance %s deferred to the reaper", lease_id)

    async def _revoke_after_takeover(self, lease_id: str) -> None:
        """The reaper moved a still-pending lease to ``revoking`` (pending_timeout_seconds passed)
        while its issuance was still creating at the target. Its attempt may have found nothing
        yet and ended ``revoked``, leaving what the issuance then created orphaned: wait out any
        attempt in flight, then open the lease to one more attempt, made now that the issuance is
        over (a name already gone counts as revoked, so a second pass costs one round trip)."""
        try:
            await self.attempt_revoke(await self.leases.get(lease_id))
            await self.leases.transition(lease_id, (REVOKED, REVOKING), REVOKING, next_attempt_at=utcnow(),
                                         revoked_at=None, last_error="issuance finished after the reaper took it")
            await self.attempt_revoke(await self.leases.get(lease_id))
        except Exception:  # the reaper will retry
            log.warning("clean-up of late issuance %s deferred to the reaper", lease_id)

    # --- renew -------------------------------------------------------------

    async def renew(
        self, lease_id: str, ttl_seconds: int | None, *, policy_max: timedelta | None, run_max: timedelta | None = None
    ) -> LeaseRow:
        """Set an active lease's expiry to now + a TTL decided like issuance's (:func:`ttl_for`),
        under the caps the caller's authority allows *now* (``policy_max``, ``run_max``: the route
        decides them), and never past ``max_expires_at`` nor issue time + today's cap. The
        resource must still be inside the connector's patterns."""
        lease = await self.leases.get(lease_id)
        if lease.state != ACTIVE:
            raise Conflict(f"Lease {lease_id} is {lease.state}, not active.", code="lease_not_active")
        if not lease.renewable:
            raise Conflict(
                f"Leases of connector type {lease.connector_type} can't be renewed; issue a new credential.",
                code="not_renewable",
            )
        row = await self._catalog.get(lease.connector)
        self._catalog.check_resource(row, lease.resource)
        decision = ttl_for(row, ttl_seconds, policy_max=policy_max, run_max=run_max)
        now = utcnow()
        until = min(lease.max_expires_at, lease.issued_at + decision.cap)
        wanted = min(now + decision.ttl, until)
        if wanted <= now:
            raise Conflict(
                f"Lease {lease_id} has reached its maximum lifetime ({until.isoformat()}); issue a new credential.",
                code="lease_max_ttl_reached",
            )
        connector = await self._catalog.instance(row)
        try:
            new_expiry = await asyncio.wait_for(connector.renew(lease.revoke_state, wanted), self.policy.timeout)
        except CredgateError:
            raise
        except Exception as exc:
            raise TargetError(f"The target refused the renewal ({describe(exc, row.type)}).") from None
        done = await self.leases.transition(
            lease_id, (ACTIVE,), ACTIVE, expires_at=min(new_expiry, wanted), max_expires_at=until
        )
        if not done:
            raise Conflict(f"Lease {lease_id} ended while it was being renewed.", code="lease_not_active")
        return await self.leases.get(lease_id)

    # --- revoke ------------------------------------------------------------

    async def revoke(self, lease_ids: list[str]) -> list[str]:
        """Try once now to revoke leases already marked revoking; return those still
        revoking (the reaper keeps retrying them). A lease another actor is revoking
        at this moment is waited for (bounded), not revoked a second time."""
        sem = asyncio.Semaphore(8)  # attempts at the targets at once; waits for others' are not counted

        async def one(lease_id: str) -> bool:
            return bool(await self.attempt_revoke(await self.leases.get(lease_id), limit=sem))

        done = await asyncio.gather(*(one(i) for i in lease_ids))
        return [lease_id for lease_id, ok in zip(lease_ids, done) if not ok]

    async def revoke_one(self, lease_id: str) -> dict[str, Any]:
        """Revoke one lease now (a caller's single revocation) and return its view after.

        The short way of ``mark_revoking`` then :meth:`revoke` for one lease: marking it and
        claiming its attempt are one statement, the outcome and the end of its wrap payloads
        one more, both in group commits. When the claim isn't to be had (another actor holds
        it, or the lease is over) it goes the long way, which waits for that actor."""
        if lease_id not in self._running:
            future: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
            self._running[lease_id] = future
            mine: bool | None = None
            ended: dict[str, Any] = {}
            try:
                now = utcnow()
                lease = await self.leases.revoke_and_claim(lease_id, self._actor, now, now + self._claim_for)
                if lease is not None:
                    mine = await self._revoke_claimed(lease_id, lease, ended=ended)
            finally:
                del self._running[lease_id]
                future.set_result(mine)
            if lease is not None:  # this call's attempt: revoked, or failed and recorded for the reaper
                return {**lease_view(lease), **ended} if mine else await self.leases.view(lease_id)
        await self.revoke(await self.leases.mark_revoking(lease_ids=[lease_id]))
        return await self.leases.view(lease_id)

    async def attempt_revoke(
        self, lease: LeaseRow, *, wait: bool = True, limit: asyncio.Semaphore | None = None
    ) -> bool | None:
        """One revocation attempt of a ``revoking`` lease, by one actor at a time.

        True when the lease is revoked (by this attempt or the one it waited for); False
        when it is still revoking (the attempt failed and was recorded with its backoff,
        or the wait ran out). An attempt another actor is making (a request or the reaper
        in this process, another replica through the store's claim) is not repeated:
        with ``wait`` its outcome is awaited, at most until its claim lapses; without
        (the reaper), None is answered at once, as it is for a lease that another actor
        ended since it was read. ``limit`` bounds this caller's own attempts at once (its
        slot is held from the claim to the outcome, never while waiting for another's)."""
        if lease.state != REVOKING:
            return lease.state in (REVOKED, EXPIRED)
        running = self._running.get(lease.id)
        if running is not None:  # this process is revoking it already
            if not wait:
                return None
            outcome = await asyncio.shield(running)
            return outcome if outcome is not None else bool(await self._await_claim(lease.id))
        future: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._running[lease.id] = future
        mine: bool | None = False
        try:
            mine = await self._claim_and_revoke(lease, wait, limit)
        finally:
            del self._running[lease.id]
            future.set_result(mine)  # a result, never an exception: nobody need be waiting
        return mine

    async def _claim_and_revoke(self, lease: LeaseRow, wait: bool, limit: asyncio.Semaphore | None) -> bool | None:
        for _ in range(2):  # a second try only after a holder's claim lapsed (it died)
            async with limit if limit is not None else contextlib.nullcontext():
                now = utcnow()
                if await self.leases.claim(lease.id, self._actor, now, now + self._claim_for):
                    return await self._revoke_claimed(lease.id)
            # Another replica holds the claim, or the lease ended since it was read:
            # either way not this caller's attempt (the reaper records nothing for it).
            if not wait:
                return None
            outcome = await self._await_claim(lease.id)
            if outcome is not None:
                return outcome
        return False

    async def _revoke_claimed(
        self, lease_id: str, lease: LeaseRow | None = None, *, ended: dict[str, Any] | None = None
    ) -> bool:
        """The attempt itself, by the claim's holder: the target, then the outcome, committed.
        ``lease``: the claimed row when the claim returned it (else it is read); ``ended``
        receives what the outcome changed in the lease's view (state, revoked_at, last_error)."""
        if lease is None:
            lease = await self.leases.get(lease_id)  # the claimed row: its attempts as of now
        if lease.state != REVOKING:
            return lease.state in (REVOKED, EXPIRED)
        if lease.revocability == str(Revocability.REVOCABLE):
            try:
                row = await self._catalog.get(lease.connector)
                connector = await self._catalog.instance(row)
                await asyncio.wait_for(connector.revoke(lease.revoke_state), self.policy.timeout)
            except Exception as exc:
                attempts = lease.attempts + 1
                delay = min(self.policy.backoff_cap, self.policy.backoff_base * 2 ** (attempts - 1))
                delay *= random.uniform(0.8, 1.2)
                await self.leases.revoke_failed(
                    lease.id, self._actor,
                    attempts=attempts, next_attempt_at=utcnow() + timedelta(seconds=delay),
                    last_error=describe(exc, lease.connector_type),
                )
                log.warning("revoking %s failed (attempt %d): %s", lease.id, attempts, describe(exc, lease.connector_type))
                return False
        # Committed before anyone is answered, in one group commit: the state (the claim goes
        # with it: transition_values) and the end of the lease's unconsumed wrap payloads.
        outcome = {"state": REVOKED, "revoked_at": utcnow(), "last_error": None}
        to_revoked = transition_statement(lease.id, (REVOKING,), REVOKED, **outcome)
        wraps_end = self._wraps.end_statement(lease.id, "revoked")

        def finish(s: Any) -> None:
            s.execute(to_revoked)
            s.execute(wraps_end)

        await self._store.grouped(finish)
        if ended is not None:
            ended.update(outcome)
        return True

    async def _await_claim(self, lease_id: str) -> bool | None:
        """Wait for another actor's attempt on a lease: True once it is revoked (or ended),
        False when that attempt failed (it released its claim, leaving the lease revoking:
        the failure is its to record) or the wait has lasted as long as a claim may, None
        when the claim lapsed unreleased (its holder died: the lease may be claimed again)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._claim_for.total_seconds()
        pause = 0.02
        while True:
            progress = await self.leases.revoke_progress(lease_id)
            if progress is None or progress[0] != REVOKING:
                return progress is not None and progress[0] in (REVOKED, EXPIRED)
            claimed_until = progress[1]
            if claimed_until is None:
                return False
            if claimed_until <= utcnow():
                return None
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 0.25)

    # --- unwrap ------------------------------------------------------------

    async def unwrap(self, token: str) -> dict[str, Any]:
        lease_id, payload = await self._wraps.unwrap(token)
        lease = await self.leases.get(lease_id)
        if lease.state not in (ACTIVE,):
            raise Gone(f"The lease behind this wrap token has ended ({lease.state}).", code="wrap_token_revoked")
        if lease.delivery_due_at is not None:
            # Its wrap token was delivered (it is being unwrapped) though that was not recorded yet.
            try:
                await self.leases.delivered([lease_id])
            except Exception as exc:  # the reaper may revoke it at its deadline; the unwrap goes on
                log.warning("could not record the delivery of lease %s at unwrap (%s)", lease_id, type(exc).__name__)
        return payload

