"""The audit trail: one event per decision, in a keyed chain, checkpointed in and out of the store.

Each event holds who (issuer and subject), what (action and target), the
decision and the rule that made it, the outcome, the lease, the request id
and the client address. Never a secret value, password or token: sensitive
identifiers (a wrap token, a client secret) are recorded as HMAC-SHA256 under
a per-deployment key, so an investigator holding a value can find it
(``POST /v1/audit/hash``) while the log itself reveals nothing. Every field is
bounded to its column where the event is recorded (:func:`bound_event`), so no
caller input can make an audit write fail.

Tamper evidence: event *n* stores ``hash_n = HMAC-SHA256(chain key, prev_hash
|| canonical JSON of event n)``. The chain key is derived (HKDF) from the
sealed per-deployment audit key, so write access to the database alone can't
recompute the chain after an edit. Events written before the keyed chain
existed (``seq < chain_from``, recorded in ``audit_keys.chain_from`` by
migration 0008) keep their plain SHA-256 links; the first keyed event links to
the last plain one, and a checkpoint certifies the switch.

Checkpoints (the head's sequence and hash, MAC'd under the chain key, so they
verify whatever happens to the token-signing keys) are written every
``checkpoint_every`` events, every ``checkpoint_seconds`` while new events
arrive, and at shutdown; each is also written as a line into every sink, so a
copy lives outside the store. :meth:`AuditLog.verify` names every modified,
missing or reordered event, every checkpoint that is forged or points past
the end of the store, and the events no checkpoint covers; given the
checkpoint and event lines of a sink file (``credgate audit verify --against
FILE``), it detects a truncated tail even when its checkpoints were deleted
from the store too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets as _secrets
import sys
import time as _time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import delete, func, insert, select, text, update

from gateway.audit.search import Filter, Page, search
from gateway.tasks import cancel_and_wait
from gateway.throttle import LogThrottle

GENESIS = "0" * 64
FIELDS = (
    "seq", "time", "request_id", "issuer", "subject", "action", "target", "decision", "rule", "outcome",
    "lease_id", "client_addr", "details",
)
CHECKPOINT_TYPE = "audit-checkpoint"
PRUNE_ACTION = "audit:prune"
# Refusals that change nothing, and only those, may be folded into one event per window.
AGGREGATED_STATUSES = frozenset({401, 403, 429})
REFUSAL_TABLE_CAP = 10_000

# Non-GET requests for these actions change who may do what (or hand out a bearer
# credential): an event is recorded *before* the route runs, and if it can't be
# written the request is refused with 503 audit_unavailable and nothing changes.
AUTHORITY_ACTIONS = frozenset({
    "admin_keys:manage", "clients:manage", "issuers:manage", "policies:manage", "keys:manage",
    "runs:delegate", "connectors:manage", "backends:manage", "secrets:bind",
})
# Requests that hand out a bearer credential without an authenticated caller: their
# response event is fail-closed (the token endpoint answers 503 rather than unrecorded).
FAIL_CLOSED_PATHS = frozenset({"/v1/auth/token", "/v1/auth/console/callback", "/v1/auth/console/key"})


def canonical(event: Mapping[str, Any]) -> bytes:
    body = {k: (event[k].isoformat() if isinstance(event.get(k), datetime) else event.get(k)) for k in FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(prev_hash: str, event: Mapping[str, Any], key: bytes | None = None) -> str:
    """The link of ``event``: HMAC-SHA256 under the chain key, or (``key`` None: events
    from before the keyed chain) plain SHA-256."""
    data = prev_hash.encode() + b"\n" + canonical(event)
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def keyed_hash(key: bytes, value: str) -> str:
    """HMAC-SHA256 of a sensitive identifier, for the log and for searching it."""
    return "hmac-sha256:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def derive_chain_key(audit_key: bytes) -> bytes:
    """The chain's MAC key: its own key, derived from the sealed audit key (which
    hashes sensitive values), so one key never serves two purposes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"credgate audit chain v1").derive(audit_key)


def _utc_text(t: datetime | str) -> str:
    if isinstance(t, str):
        t = datetime.fromisoformat(t.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def checkpoint_mac(key: bytes, seq: int, head_hash: str, time: datetime | str, chain_from: int) -> str:
    body = json.dumps({"typ": CHECKPOINT_TYPE, "seq": seq, "hash": head_hash, "time": _utc_text(time),
                       "chain_from": chain_from}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str | None = None
    problems: tuple[tuple[int, str], ...] = ()  # every break found, in order


class ChainWalk:
    """:func:`verify_chain` one event at a time, so a walk over millions of events can
    read them in batches (:meth:`AuditLog.verify`) instead of holding them all."""

    def __init__(self, *, start_seq: int = 1, start_hash: str = GENESIS, key: bytes | None = None,
                 chain_from: int = 1) -> None:
        self.expected_seq, self.prev, self.n = start_seq, start_hash, 0
        self.key, self.chain_from = key, chain_from
        self.problems: list[tuple[int, str]] = []

    def feed(self, event: Mapping[str, Any]) -> None:
        self.n += 1
        seq, expected_seq, problems = event["seq"], self.expected_seq, self.problems
        if seq != expected_seq:
            if seq > expected_seq:
                gap = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}-{seq - 1}"
                problems.append((expected_seq, f"event {gap} is missing (deleted)"))
            else:
                problems.append((seq, f"event {seq} is out of order or duplicated"))
        elif event["prev_hash"] != self.prev:
            problems.append((seq, f"event {seq} does not link to the event before it"))
        link_key = self.key if self.key is not None and seq >= self.chain_from else None
        if not hmac.compare_digest(str(event["hash"]), chain_hash(event["prev_hash"], event, link_key)):
            problems.append((seq, f"event {seq} was modified"))
        self.prev, self.expected_seq = event["hash"], max(expected_seq, seq + 1)

    def report(self) -> ChainReport:
        if not self.problems:
            return ChainReport(True, self.n)
        first = self.problems[0]
        return ChainReport(False, self.n, first[0], first[1], tuple(self.problems))


def verify_chain(events: Iterable[Mapping[str, Any]], *, start_seq: int = 1, start_hash: str = GENESIS,
                 key: bytes | None = None, chain_from: int = 1) -> ChainReport:
    """Walk events in storage order and report every break, the first one first.

    With ``key``, events from ``chain_from`` on must carry HMAC links under it
    (earlier ones plain SHA-256); without, every link is plain SHA-256. After a
    break the walk re-synchronises on the event that broke it, so a modified
    event *and* a later deleted one are both named. ``events`` are mappings with
    every field of :data:`FIELDS` plus ``prev_hash`` and ``hash``.
    """
    walk = ChainWalk(start_seq=start_seq, start_hash=start_hash, key=key, chain_from=chain_from)
    for event in events:
        walk.feed(event)
    return walk.report()


VERIFIED_TYPE = "audit-verified"
VERIFY_BATCH = 5000  # events read per query by a verification walk


def verified_mac(key: bytes, seq: int, head_hash: str, chain_from: int, floor: int, events: int) -> str:
    """The MAC of a verification mark: a walk found the chain clean from ``floor`` + 1 up to
    checkpoint ``seq`` (``events`` stored events in that range)."""
    body = json.dumps({"typ": VERIFIED_TYPE, "seq": seq, "hash": head_hash, "chain_from": chain_from,
                       "floor": floor, "events": events}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def _parse_mark(mark: str) -> tuple[int, int, str] | None:
    parts = mark.split(":")
    if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[1]), int(parts[2]), parts[3]


# --- bounding ------------------------------------------------------------------

CUT = "...[cut]"
DETAILS_MAX = 4000  # characters of the details' JSON
_DETAIL_STRING_MAX = 512
_DETAIL_ITEMS_MAX = 50
_DETAIL_DEPTH_MAX = 4


def _column_limits() -> dict[str, int]:
    from sqlalchemy import String

    from gateway.store.models import AuditEventRow

    return {c.name: c.type.length for c in AuditEventRow.__table__.columns
            if c.name in FIELDS and isinstance(c.type, String) and c.type.length}


_LIMITS: dict[str, int] = {}


def clean_text(value: Any, limit: int) -> str:
    """``value`` as text the store accepts (no NUL, no lone surrogate), at most
    ``limit`` characters; a longer one is cut and ends with ``...[cut]``."""
    s = value if isinstance(value, str) else str(value)
    if "\x00" in s:
        s = s.replace("\x00", "?")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
    if len(s) > limit:
        s = s[: max(0, limit - len(CUT))] + CUT
    return s


def _clean_detail(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if depth >= _DETAIL_DEPTH_MAX:
        return CUT
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i == _DETAIL_ITEMS_MAX:
                out["_cut"] = f"{len(value) - i} more keys"
                break
            out[clean_text(k, 64)] = _clean_detail(v, depth + 1)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        out_list = [_clean_detail(v, depth + 1) for v in items[:_DETAIL_ITEMS_MAX]]
        if len(items) > _DETAIL_ITEMS_MAX:
            out_list.append(f"{CUT} {len(items) - _DETAIL_ITEMS_MAX} more")
        return out_list
    return clean_text(value, _DETAIL_STRING_MAX)


def bound_details(details: Any) -> dict[str, Any] | None:
    """Details as a JSON object of at most :data:`DETAILS_MAX` characters."""
    if details is None:
        return None
    if not isinstance(details, Mapping):
        details = {"value": details}
    cleaned = _clean_detail(details)
    size = len(json.dumps(cleaned, sort_keys=True))
    if size <= DETAILS_MAX:
        return cleaned
    keys = [k for k in sorted(cleaned) if k != "_cut"][:20]
    return {"_cut": f"details of {size} characters were over {DETAILS_MAX}", "keys": keys}


def bound_event(event: dict[str, Any]) -> dict[str, Any]:
    """Bound every field of ``event`` (in place) to what its column holds. The one
    place every event passes through before it is written, whoever built it."""
    if event.get("_bounded"):
        return event
    if not _LIMITS:
        _LIMITS.update(_column_limits())
    for name, limit in _LIMITS.items():
        if event.get(name) is not None:
            event[name] = clean_text(event[name], limit)
    event["details"] = bound_details(event.get("details"))
    event["_bounded"] = True
    return event


# --- recording -----------------------------------------------------------------

log = logging.getLogger("credgate.audit")
# A sink down fails every request's event: one line per 10 s with the count of the rest.
_unrecorded_log = LogThrottle(log, seconds=10.0, level=logging.ERROR)
_current: ContextVar[dict[str, Any] | None] = ContextVar("credgate_audit", default=None)
_PG_AUDIT_LOCK = 0x6175646974  # "audit"


def begin() -> tuple[dict[str, Any], Any]:
    """Start collecting facts about the current request (called by the middleware)."""
    ctx: dict[str, Any] = {}
    return ctx, _current.set(ctx)


def end(token: Any) -> None:
    _current.reset(token)


def note(**fields: Any) -> None:
    """Add facts to the current request's audit event (no-op outside a request).

    ``ended_leases=[ids]`` (bulk and run revocations) adds one event per lease."""
    ctx = _current.get()
    if ctx is not None:
        details = fields.pop("details", None)
        ended = fields.pop("ended_leases", None)
        ctx.update({k: v for k, v in fields.items() if v is not None})
        if details:
            ctx.setdefault("details", {}).update(details)
        if ended:
            ctx.setdefault("ended_leases", []).extend(ended)


def noted() -> dict[str, Any]:
    return _current.get() or {}


def request_event(scope: Mapping[str, Any], ctx: Mapping[str, Any], status: int | None) -> dict[str, Any]:
    """The event of one request: at its response (``status``), or before the route
    runs (``status`` None: outcome ``request``, for changes of authority)."""
    from gateway.requestid import current_request_id

    client = scope.get("client") or ("", 0)
    if status is None:
        decision, outcome = ctx.get("decision"), "request"
    else:
        decision = ctx.get("decision") or ("deny" if status in (401, 403) else None)
        outcome = str(status) + (f" {ctx['error']}" if ctx.get("error") else "")
    return {
        "request_id": current_request_id(),
        "issuer": ctx.get("issuer"),
        "subject": ctx.get("subject"),
        "action": ctx.get("action"),
        "target": f"{scope.get('method')} {scope.get('path')}",
        "decision": decision,
        "rule": ctx.get("rule"),
        "outcome": outcome,
        "lease_id": ctx.get("lease_id"),
        "client_addr": client[0] if client else None,
        "details": ctx.get("details"),
    }


def gateway_event(action: str, *, subject: str, lease_id: str | None = None, outcome: str = "ok",
                  details: Mapping[str, Any] | None = None, request_id: str | None = None) -> dict[str, Any]:
    """An event of the gateway's own doing (the reaper, a lease ended by a bulk revocation)."""
    return {
        "request_id": request_id, "issuer": "credgate", "subject": subject, "action": action, "target": None,
        "decision": "allow", "rule": None, "outcome": outcome, "lease_id": lease_id, "client_addr": None,
        "details": dict(details) if details else None,
    }


class AuditUnavailable(Exception):
    pass


@dataclass
class SinkHealth:
    ok: bool = True
    error: str | None = None


class FileSink:
    """JSON lines appended to a file; each write flushed and fsync'd before it counts."""

    def __init__(self, path: Path, required: bool = True) -> None:
        self.name = f"file:{path}"
        self.path = path
        self.required = required

    async def write(self, line: bytes) -> None:
        def append() -> None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

        await asyncio.to_thread(append)

    def tail(self, size: int = 256 * 1024) -> list[dict[str, Any]]:
        """The last complete JSON lines of the file (empty if it can't be read)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                f.seek(max(0, end - size))
                raw = f.read()
        except OSError:
            return []
        lines = raw.splitlines()
        if end > size and lines:
            lines = lines[1:]  # the first one may be cut
        return parse_lines(lines)


def parse_lines(lines: Iterable[bytes | str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


class StdoutSink:
    def __init__(self, required: bool = False) -> None:
        self.name = "stdout"
        self.required = required

    async def write(self, line: bytes) -> None:
        sys.stdout.write(line.decode())
        sys.stdout.flush()


def build_sinks(config: list[dict[str, Any]]) -> list[Any]:
    sinks: list[Any] = []
    for entry in config:
        kind = entry.get("type")
        if kind == "file":
            sinks.append(FileSink(Path(entry["path"]).expanduser(), bool(entry.get("required", True))))
        elif kind == "stdout":
            sinks.append(StdoutSink(bool(entry.get("required", False))))
        elif kind != "store":
            from gateway.errors import ConfigurationError

            raise ConfigurationError(f"unknown audit sink type {kind!r} (store, file, stdout)")
    return sinks


def _line(item: Mapping[str, Any]) -> bytes:
    return (json.dumps({k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in item.items()
                        if not k.startswith("_")}, sort_keys=True) + "\n").encode()


def split_lines(items: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Sink lines as (checkpoints, events)."""
    checkpoints, events = [], []
    for item in items:
        if item.get("type") == CHECKPOINT_TYPE:
            checkpoints.append(dict(item))
        elif "seq" in item and "hash" in item:
            events.append(dict(item))
    return checkpoints, events


class AuditLog:
    """Writes events to the store (the chain) and to the configured sinks."""

    def __init__(self, store: Any, envelope: Any, signing: Any, sinks: list[Any], *,
                 wait_seconds: float = 2.0, checkpoint_every: int = 100, checkpoint_seconds: float = 5.0) -> None:
        self._store = store
        self._envelope = envelope
        self._signing = signing
        self.sinks = sinks
        self.wait_seconds = wait_seconds
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._key: bytes | None = None
        self._chain_key: bytes | None = None
        self.chain_from = 1
        # The highest sequence number this process wrote or saw certified: the store's
        # head falling below it means its tail was deleted, and no checkpoint then
        # certifies the shorter chain.
        self._high = 0
        self._checkpointed = 0  # the last head this process checkpointed
        self.truncated: list[tuple[int, int, str]] = []  # (head found, highest known, known by whom)
        self.health: dict[str, SinkHealth] = {"store": SinkHealth(), **{s.name: SinkHealth() for s in sinks}}
        # Refusals of one kind within a window (see refusal): kind -> entry, least recently seen first.
        self._refusals: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self._refusal_timer: asyncio.Task[None] | None = None
        self._retention_task: asyncio.Task[None] | None = None

    # --- keys, start and stop --------------------------------------------------

    async def start(self) -> None:
        """Load (or create) the audit key, fix where the keyed chain starts, and give
        checkpoints from before it a MAC. (The checkpoint timer starts with the first event.)"""
        from gateway.crypto.envelope import context
        from gateway.store.models import AuditCheckpointRow, AuditEventRow, AuditKeyRow, utcnow

        async with self._store.write() as s:
            if self._store.dialect == "postgresql":
                await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
            head = (await s.execute(select(func.max(AuditEventRow.seq)))).scalar() or 0
            row = await s.get(AuditKeyRow, 1)
            if row is None:
                row = AuditKeyRow(id=1, created_at=utcnow(), chain_from=head + 1)
                row.sealed = self._envelope.seal(_secrets.token_bytes(32), context("audit-hmac-key"))
                s.add(row)
            elif row.chain_from is None:
                # Migration 0008 sets it on every existing deployment: missing means it was
                # removed, and then every event must be keyed (plain links then fail).
                row.chain_from = 1
            self._key = self._envelope.open(row.sealed, context("audit-hmac-key"))
            self._chain_key = derive_chain_key(self._key)
            self.chain_from = row.chain_from
            await self._upgrade_checkpoints(s, AuditCheckpointRow, AuditEventRow)
            self._high = head
        for sink in self.sinks:  # a sink file knows of events a truncated store may have lost
            if isinstance(sink, FileSink):
                recorded = self._max_authentic_seq(sink.tail())
                if recorded > head:
                    self._high = max(self._high, recorded)
                    self._truncation(head, f"{sink.name} (read at start)")
        self._checkpointed = head

    async def _upgrade_checkpoints(self, s: Any, cp_model: Any, ev_model: Any) -> None:
        """Once, after migration 0008: checkpoints signed with the signing key get a MAC
        (if their signature still verifies), and the last plain-SHA event is checkpointed,
        so the part of the chain from before the switch verifies without signing keys."""
        from gateway.store.models import utcnow

        assert self._chain_key is not None
        for cp in (await s.execute(select(cp_model).where(cp_model.mac.is_(None)))).scalars():
            claims: dict[str, Any] = {}
            if cp.signature:
                try:
                    claims = (await self._signing.verify(cp.signature)).claims
                except Exception:  # noqa: BLE001 - not ours, or a retired key: stays unauthenticated
                    claims = {}
            if claims.get("seq") == cp.seq and claims.get("hash") == cp.hash:
                cp.chain_from = self.chain_from
                cp.mac = checkpoint_mac(self._chain_key, cp.seq, cp.hash, cp.time, self.chain_from)
        last_plain = self.chain_from - 1
        if last_plain < 1:
            return
        covered = (await s.execute(select(func.max(cp_model.seq)).where(cp_model.mac.is_not(None)))).scalar()
        if covered is not None and covered >= last_plain:
            return
        event = await s.get(ev_model, last_plain)
        if event is not None and await s.get(cp_model, last_plain) is None:
            now = utcnow()
            s.add(cp_model(seq=last_plain, hash=event.hash, time=now, chain_from=self.chain_from,
                           mac=checkpoint_mac(self._chain_key, last_plain, event.hash, now, self.chain_from)))

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_seconds)
            if self._high > self._checkpointed and not self.truncated:
                try:
                    await self.checkpoint()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the next tick tries again
                    log.error("audit checkpoint failed (%s)", type(exc).__name__)

    # --- retention ----------------------------------------------------------------

    def keep(self, days: float, archive_dir: Path, *, every_seconds: float, leading: Callable[[], bool]) -> None:
        """The retention policy: every ``every_seconds``, on the replica for which ``leading()``
        (the reaper's leader: one replica prunes), archive the events older than ``days`` into
        a new file under ``archive_dir`` and prune them (:meth:`prune`: verified first, the
        archive fsync'd before anything is deleted, the prune itself audited fail-closed, an
        anchor checkpoint at the cut). A pass that fails is logged and tried again next time."""
        archive_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._retention_task = asyncio.create_task(
            self._retention_loop(timedelta(days=days), archive_dir, every_seconds, leading), name="credgate-audit-retention")

    async def retention_pass(self, keep: timedelta, archive_dir: Path) -> dict[str, Any]:
        """One pass of the retention policy: prune what is older than ``keep``."""
        from gateway.store.models import utcnow

        before = utcnow() - keep
        archive = archive_dir / f"audit-before-{before:%Y%m%dT%H%M%S.%fZ}.jsonl"
        out = await self.prune(before, archive, by="audit retention")
        if out["pruned"]:
            log.info("audit retention: archived and pruned %d events (through seq %d) into %s",
                     out["pruned"], out["pruned_through"], archive.name)
        return out

    async def _retention_loop(self, keep: timedelta, archive_dir: Path, every: float,
                              leading: Callable[[], bool]) -> None:
        while True:
            await asyncio.sleep(every)
            if not leading():
                continue
            try:
                await self.retention_pass(keep, archive_dir)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged by class; the next pass tries again
                log.error("audit retention pass failed (%s); the events are kept", type(exc).__name__)

    async def aclose(self) -> None:
        """Write the pending refusal aggregates, stop the timers, let queued events land, and
        checkpoint the head (at shutdown)."""
        await cancel_and_wait(self._retention_task)
        self._retention_task = None
        await cancel_and_wait(self._refusal_timer)
        self._refusal_timer = None
        if self._chain_key is not None and self._refusals:
            entries = list(self._refusals.values())
            self._refusals.clear()
            await self._write_aggregates(entries)
        await cancel_and_wait(self._timer)
        self._timer = None
        if self._flusher is not None and not self._flusher.done():
            try:
                await self._flusher
            except Exception:  # noqa: BLE001
                pass
        if self._chain_key is not None and self._high > self._checkpointed:
            try:
                await self.checkpoint()
            except Exception as exc:  # noqa: BLE001
                log.error("audit checkpoint at shutdown failed (%s)", type(exc).__name__)

    def hmac(self, value: str) -> str:
        assert self._key is not None
        return keyed_hash(self._key, value)

    @property
    def healthy(self) -> bool:
        return all(h.ok for name, h in self.health.items() if name == "store" or self._required(name))

    def _required(self, name: str) -> bool:
        return any(s.name == name and s.required for s in self.sinks)

    # --- refusals ----------------------------------------------------------------

    async def refusal(self, event: dict[str, Any], *, kind: str, window: float,
                      cap: int = REFUSAL_TABLE_CAP, first: int = 1) -> None:
        """Record a refusal that changed nothing (a 401, 403 or 429 of an unauthenticated
        or denied request), folding repeats into one event per window.

        The first ``first`` refusals of a kind (client address, outcome, ``kind`` -- the
        method and route template --, issuer, subject, action, rule) in a window are
        written as any event; the rest of that window are only counted, and written as ONE aggregate
        event (``details.aggregate``: count, first_time, last_time, the window) when the
        window has passed, when the table of kinds (at most ``cap``, least recently seen
        out first) needs the room, or at shutdown. A refusal of another kind is never
        folded into it. ``window`` 0: every refusal is its own event."""
        from gateway.store.models import utcnow

        bound_event(event)
        if window <= 0:
            await self.record(event, fail_closed=False)
            return
        key = (event.get("client_addr"), event.get("outcome"), kind, event.get("issuer"), event.get("subject"),
               event.get("action"), event.get("decision"), event.get("rule"))
        now_m = _time.monotonic()
        entry = self._refusals.get(key)
        if entry is not None and now_m - entry["start"] < entry["window"] and entry["written"] < first:
            entry["written"] += 1
            self._refusals.move_to_end(key)
            await self.record(event, fail_closed=False)
            return
        if entry is not None and now_m - entry["start"] < entry["window"]:
            now = utcnow()
            entry["count"] += 1
            entry["first"] = entry["first"] or now
            entry["last"] = now
            self._refusals.move_to_end(key)
            return
        due = [self._refusals.pop(key)] if entry is not None else []
        self._refusals[key] = {
            "start": now_m, "window": window, "written": 1, "count": 0, "first": None, "last": None, "kind": kind,
            "event": {f: event.get(f) for f in ("issuer", "subject", "action", "decision", "rule", "outcome",
                                                  "client_addr")},
        }
        while len(self._refusals) > max(1, cap):
            due.append(self._refusals.popitem(last=False)[1])
        if self._refusal_timer is None or self._refusal_timer.done():
            self._refusal_timer = asyncio.create_task(self._refusal_loop(), name="credgate-audit-refusals")
        await self.record_many([event] + [self._aggregate(e) for e in due if e["count"]], fail_closed=False)

    @property
    def refusal_kinds(self) -> int:
        """How many kinds of refusal are being counted now (bounded by the cap)."""
        return len(self._refusals)

    @staticmethod
    def _aggregate(entry: Mapping[str, Any]) -> dict[str, Any]:
        event = dict(entry["event"])
        event.update(request_id=None, lease_id=None, target=entry["kind"], details={"aggregate": {
            "count": entry["count"], "first_time": _utc_text(entry["first"]), "last_time": _utc_text(entry["last"]),
            "window_seconds": entry["window"], "kind": entry["kind"],
            "note": "refusals of this kind after the first in the window, counted, not written one by one"}})
        return event

    async def _write_aggregates(self, entries: list[dict[str, Any]]) -> None:
        events = [self._aggregate(e) for e in entries if e["count"]]
        if events:
            await self.record_many(events, fail_closed=False)

    async def _refusal_loop(self) -> None:
        while self._refusals:
            tick = min(e["window"] for e in self._refusals.values())
            await asyncio.sleep(min(max(tick / 2, 0.05), 5.0))
            now_m = _time.monotonic()
            due = [k for k, e in self._refusals.items() if now_m - e["start"] >= e["window"]]
            entries = [self._refusals.pop(k) for k in due]
            try:
                await self._write_aggregates(entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged; the counts are in the log line
                log.error("audit refusal aggregates not recorded (%s): %s", type(exc).__name__,
                          sum(e["count"] for e in entries))

    # --- writing -----------------------------------------------------------------

    async def record(self, event: dict[str, Any], *, fail_closed: bool, wait_seconds: float | None = None) -> None:
        """Persist one event. A required sink that stays unwritable for ``wait_seconds``
        raises AuditUnavailable when ``fail_closed``; otherwise the failure is logged."""
        await self.record_many([event], fail_closed=fail_closed, wait_seconds=wait_seconds)

    async def record_many(self, events: list[dict[str, Any]], *, fail_closed: bool,
                          wait_seconds: float | None = None) -> None:
        """Persist several events: one group commit, one write per sink."""
        if not events:
            return
        for event in events:
            bound_event(event)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.wait_seconds if wait_seconds is None else wait_seconds)
        delay = 0.05
        while True:
            try:
                await self._write_all(events)
                return
            except AuditUnavailable:
                if loop.time() + delay > deadline:
                    if fail_closed:
                        raise
                    _unrecorded_log.emit("unrecorded", "audit event not fully recorded (a required sink is down)")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _write_all(self, events: list[dict[str, Any]]) -> None:
        todo = [e for e in events if "seq" not in e]
        if todo:
            results = await asyncio.gather(*(self._store_append(e) for e in todo), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        failed = False
        for sink in self.sinks:
            lines = b"".join(_line(e) for e in events if not e.get("_written", {}).get(sink.name))
            if not lines:
                continue
            try:
                await sink.write(lines)
                self.health[sink.name] = SinkHealth()
                for e in events:
                    e.setdefault("_written", {})[sink.name] = True
            except Exception as exc:  # noqa: BLE001
                self.health[sink.name] = SinkHealth(False, type(exc).__name__)
                failed = failed or sink.required
        if failed:
            raise AuditUnavailable("sink")

    async def _store_append(self, event: dict[str, Any]) -> None:
        """Join the next group commit; return once the event is durable in the store.

        Events arriving while one transaction commits are written together in the
        next one: one fsync serves many requests, and each still waits for its own.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._timer is None and self.checkpoint_seconds > 0:  # started by the first event
            self._timer = asyncio.create_task(self._checkpoint_loop(), name="credgate-audit-checkpoints")
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="credgate-audit-flush")
        await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._append_batch([event for event, _ in batch])
            except Exception as exc:  # noqa: BLE001 - any store failure: the batch is not recorded
                self.health["store"] = SinkHealth(False, type(exc).__name__)
                for event, future in batch:
                    for key in ("seq", "prev_hash", "hash"):
                        event.pop(key, None)
                    if not future.done():
                        future.set_exception(AuditUnavailable("store"))
                        future.exception()  # retrieved here: a cancelled waiter must not warn
                continue
            self.health["store"] = SinkHealth()
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _append_batch(self, events: list[dict[str, Any]]) -> None:
        from gateway.store.models import AuditEventRow, utcnow

        key = self._chain_key
        assert key is not None, "AuditLog.start() was not awaited"
        staged: list[tuple[dict[str, Any], dict[str, Any]]] = []
        found: list[int] = []

        def append(s: Any) -> None:
            staged.clear()  # a retried group starts over
            found.clear()
            if self._store.dialect == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
            head = (s.execute(
                select(AuditEventRow.seq, AuditEventRow.hash).order_by(AuditEventRow.seq.desc()).limit(1))).first()
            seq, prev = (head[0], head[1]) if head else (0, GENESIS)
            found.append(seq)
            for event in events:
                seq += 1
                event.setdefault("time", utcnow())
                full = {f: event.get(f) for f in FIELDS}
                full.update(seq=seq, prev_hash=prev)
                full["hash"] = prev = chain_hash(prev, full, key if seq >= self.chain_from else None)
                staged.append((event, full))
            # One Core executemany: no ORM unit of work for an append-only table.
            s.execute(insert(AuditEventRow), [full for _, full in staged])

        # Shares its commit with whatever else is being written (issued leases): one fsync for both.
        high = self._high  # committed before this transaction reads the head (see checkpoint)
        await self._store.grouped(append)
        if found and found[0] < high:
            self._truncation(found[0], high=high)
        for event, full in staged:
            event.update(seq=full["seq"], prev_hash=full["prev_hash"], hash=full["hash"])
        first, last = staged[0][1]["seq"], staged[-1][1]["seq"]
        self._high = max(self._high, last)
        if last // self.checkpoint_every > (first - 1) // self.checkpoint_every:
            await self.checkpoint()

    async def checkpoint(self) -> dict[str, Any] | None:
        """MAC the chain's head, store it, and write it as a line into every sink.

        Refused (None, and logged) when the head is below what this process has
        written or seen certified: the tail was deleted, and certifying the shorter
        chain would hide it."""
        from gateway.store.database import insert_if_absent
        from gateway.store.models import AuditCheckpointRow, AuditEventRow, utcnow

        assert self._chain_key is not None
        # What this process knew was committed *before* the head is read: an append that
        # commits while the read is in flight raises ``_high`` past a head read from an
        # older snapshot, which is not a truncation.
        high = self._high
        async with self._store.write() as s:
            head = (await s.execute(select(AuditEventRow.seq, AuditEventRow.hash).order_by(AuditEventRow.seq.desc()).limit(1))).first()
            head_seq = head[0] if head else 0
            if head_seq < high:
                self._truncation(head_seq, high=high)
            if self.truncated or head is None:
                return None
            now = utcnow()
            cp = {"type": CHECKPOINT_TYPE, "seq": head[0], "hash": head[1], "time": now, "chain_from": self.chain_from,
                  "mac": checkpoint_mac(self._chain_key, head[0], head[1], now, self.chain_from)}
            await s.execute(insert_if_absent(
                self._store.dialect, AuditCheckpointRow,
                {"seq": cp["seq"], "hash": cp["hash"], "time": now, "chain_from": cp["chain_from"], "mac": cp["mac"]},
                ["seq"]))
        self._high = max(self._high, head[0])
        self._checkpointed = max(self._checkpointed, head[0])
        await self._publish(cp)
        return {"seq": head[0], "hash": head[1]}

    def _truncation(self, head: int, by: str = "this gateway", *, high: int | None = None) -> None:
        """The store's head is below what this process wrote (or its sink file recorded): its
        tail was deleted. Remembered (verification names it from now on), and this process
        writes no checkpoint again: none may certify the shorter chain."""
        high = self._high if high is None else high
        if any(found == head and seen == high for found, seen, _ in self.truncated):
            return
        self.truncated.append((head, high, by))
        log.critical("audit store ends at event %d but %s recorded events up to %d: its tail was "
                     "deleted; no checkpoint will certify the shorter chain", head, by, high)

    async def _publish(self, cp: dict[str, Any]) -> None:
        line = _line(cp)
        for sink in self.sinks:
            try:
                await sink.write(line)
                self.health[sink.name] = SinkHealth()
            except Exception as exc:  # noqa: BLE001 - the next checkpoint is published again
                self.health[sink.name] = SinkHealth(False, type(exc).__name__)

    # --- retention ---------------------------------------------------------------

    async def prune(self, before: datetime, archive: Path, *, by: str = "credgate audit prune") -> dict[str, Any]:
        """Archive the events recorded before ``before`` and delete them from the store.

        The chain is verified first (a broken chain is not pruned: that would launder the
        tampering). The archive is written in the sink/export line format (every event
        with its chain fields, and the checkpoints that cover them) and fsync'd; then the
        prune itself is recorded, fail-closed, as an event of the keyed chain naming the
        cut (``pruned_through``) and the hash it ends on; then an anchor checkpoint is
        written at the cut and the events up to it (and older checkpoints) are deleted.
        ``verify`` proves the chain from the cut on (the anchor and the prune event);
        ``verify(against=archive lines)`` proves the archived part ends where the anchor
        says. Refused (AuditUnavailable) if the prune can't be recorded."""
        from gateway.store.database import insert_if_absent
        from gateway.store.models import AuditCheckpointRow, AuditEventRow, utcnow

        assert self._chain_key is not None
        if before.tzinfo is None:
            before = before.replace(tzinfo=timezone.utc)
        report = await self.verify(full=True)  # nothing is pruned on the strength of an earlier walk
        if not report["ok"]:
            raise ValueError(f"the audit chain does not verify ({report['problem']}); not pruned")
        async with self._store.read() as s:
            cut = (await s.execute(select(func.max(AuditEventRow.seq)).where(AuditEventRow.time < before))).scalar()
            first = (await s.execute(select(func.min(AuditEventRow.seq)))).scalar()
            if not cut or first is None or cut < first:
                return {"pruned": 0, "pruned_through": (first or 1) - 1, "archive": None}
            cps = list((await s.execute(select(AuditCheckpointRow).where(AuditCheckpointRow.seq <= cut)
                                        .order_by(AuditCheckpointRow.seq))).scalars())
        # Streamed: the events are read, written and hashed VERIFY_BATCH at a time (memory stays
        # flat however many are pruned); the archive counts only once fsync'd and renamed.
        columns = AuditEventRow.__table__.columns
        sha = hashlib.sha256()
        tmp = archive.with_name(archive.name + ".partial")
        fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        pruned, last, anchor_hash = 0, first - 1, GENESIS
        try:
            while last < cut:
                async with self._store.read() as s:
                    batch = [dict(r._mapping) for r in (await s.execute(
                        select(*columns).where(AuditEventRow.seq > last, AuditEventRow.seq <= cut)
                        .order_by(AuditEventRow.seq).limit(VERIFY_BATCH)))]
                if not batch:
                    break
                chunk = b"".join(_line(e) for e in batch)
                sha.update(chunk)
                await asyncio.to_thread(os.write, fd, chunk)
                pruned += len(batch)
                last, anchor_hash = batch[-1]["seq"], batch[-1]["hash"]
            now = utcnow()
            anchor = {"type": CHECKPOINT_TYPE, "seq": cut, "hash": anchor_hash, "time": now,
                      "chain_from": self.chain_from,
                      "mac": checkpoint_mac(self._chain_key, cut, anchor_hash, now, self.chain_from)}
            tail = b"".join([_line({"type": CHECKPOINT_TYPE, "seq": c.seq, "hash": c.hash, "time": c.time,
                                    "chain_from": c.chain_from, "mac": c.mac}) for c in cps if c.mac and c.seq != cut]
                            + [_line(anchor)])
            sha.update(tail)

            def finish() -> None:
                os.write(fd, tail)
                os.fsync(fd)

            await asyncio.to_thread(finish)
        finally:
            os.close(fd)
        await asyncio.to_thread(os.replace, tmp, archive)
        digest = sha.hexdigest()
        details = {"before": _utc_text(before), "pruned_through": cut, "anchor_hash": anchor_hash,
                   "events": pruned, "archive": archive.name[:200], "archive_sha256": digest}
        await self.record(gateway_event(PRUNE_ACTION, subject=by, outcome="request", details=details),
                          fail_closed=True)
        async with self._store.write() as s:
            if self._store.dialect == "postgresql":
                await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
            await s.execute(insert_if_absent(
                self._store.dialect, AuditCheckpointRow,
                {"seq": cut, "hash": anchor_hash, "time": now, "chain_from": self.chain_from, "mac": anchor["mac"]},
                ["seq"]))
            await s.execute(delete(AuditEventRow).where(AuditEventRow.seq <= cut))
            await s.execute(delete(AuditCheckpointRow).where(AuditCheckpointRow.seq < cut))
        await self.record(gateway_event(PRUNE_ACTION, subject=by, outcome=f"pruned {pruned} events",
                                        details=details), fail_closed=False)
        await self.checkpoint()
        return {"pruned": pruned, "pruned_through": cut, "archive": str(archive), "archive_sha256": digest}

    # --- verifying ---------------------------------------------------------------

    def _authentic_checkpoint(self, cp: Mapping[str, Any]) -> bool:
        assert self._chain_key is not None
        try:
            want = checkpoint_mac(self._chain_key, int(cp["seq"]), str(cp["hash"]), cp["time"], int(cp["chain_from"]))
        except (KeyError, TypeError, ValueError):
            return False
        return isinstance(cp.get("mac"), str) and hmac.compare_digest(cp["mac"], want)

    def _authentic_event(self, event: Mapping[str, Any]) -> bool:
        try:
            seq = int(event["seq"])
            key = self._chain_key if seq >= self.chain_from else None
            return hmac.compare_digest(str(event["hash"]), chain_hash(str(event["prev_hash"]), event, key))
        except (KeyError, TypeError, ValueError):
            return False

    def _max_authentic_seq(self, lines: list[dict[str, Any]]) -> int:
        checkpoints, events = split_lines(lines)
        seqs = [int(c["seq"]) for c in checkpoints if self._authentic_checkpoint(c)]
        seqs += [int(e["seq"]) for e in events if self._authentic_event(e)]
        return max(seqs, default=0)

    async def search(self, where: Filter, limit: int = 100) -> Page:
        """The stored events matching ``where``, oldest first (:func:`gateway.audit.search.search`)."""
        return await search(self._store, where, limit)

    async def verify(self, against: list[Mapping[str, Any]] | None = None, against_name: str = "FILE", *,
                     full: bool = False) -> dict[str, Any]:
        """Walk the chain and the checkpoints; name every problem, the first one first.

        The head is checkpointed first (what the timer would do within seconds;
        refused if the tail was deleted). ``against``: checkpoint and event lines of a
        sink file; each must be authentic and match the store. The gateway's own file
        sinks are always compared too.

        Incremental unless ``full`` (or ``against`` is given): the walk starts after the
        newest checkpoint carrying a verification mark (``verified``, left by an earlier
        verification that found the chain clean up to it) whose MAC under the chain key
        verifies, whose checkpoint is authentic, whose event still holds the checkpoint's
        hash, and whose count of stored events from the floor up to it is still the
        count it was marked with; events before it are trusted as verified (a full walk
        re-checks them). A mark that fails any of these is reported and the whole chain
        is walked. A clean walk marks the newest covered checkpoint. The events are read
        ``VERIFY_BATCH`` at a time: memory stays flat at any length of trail."""
        from gateway.store.models import AuditCheckpointRow, AuditEventRow

        assert self._chain_key is not None
        try:
            await self.checkpoint()
        except Exception as exc:  # noqa: BLE001 - verify what is there
            log.error("audit checkpoint before verification failed (%s)", type(exc).__name__)
        high = self._high  # committed before the events are read (see checkpoint)
        columns = AuditEventRow.__table__.columns
        as_dict = lambda r: {c.name: getattr(r, c.name) for c in columns}  # noqa: E731
        async with self._store.read() as s:
            first = (await s.execute(select(AuditEventRow.seq, AuditEventRow.prev_hash)
                                     .order_by(AuditEventRow.seq).limit(1))).first()
            head = (await s.execute(select(func.max(AuditEventRow.seq)))).scalar()
            stored = (await s.execute(select(func.count()).select_from(AuditEventRow))).scalar() or 0
            prunes = [as_dict(r) for r in (await s.execute(select(AuditEventRow).where(
                AuditEventRow.action == PRUNE_ACTION, AuditEventRow.issuer == "credgate",
                AuditEventRow.outcome == "request"))).scalars()]
            checkpoints = list((await s.execute(select(AuditCheckpointRow).order_by(AuditCheckpointRow.seq))).scalars())
        floor, start_hash, floor_problem = self._pruned_floor(first, prunes, checkpoints)
        head = head if head is not None else floor
        problems: list[tuple[int, str]] = []
        if floor_problem:
            problems.append(floor_problem)

        sources: list[tuple[str, list[Mapping[str, Any]]]] = []
        if against is not None:
            sources.append((against_name, list(against)))
        for sink in self.sinks:
            if isinstance(sink, FileSink):
                sources.append((sink.name, sink.tail()))
        split = [(name, *split_lines(lines)) for name, lines in sources]
        wanted: set[int] = set()  # the seqs whose stored hash is compared: sink lines, checkpoints
        for _, cps, evs in split:
            wanted.update(x["seq"] for x in cps + evs if isinstance(x.get("seq"), int) and not isinstance(x["seq"], bool))

        mark = None
        if not full and against is None and floor_problem is None:
            mark, mark_problems = await self._verified_mark(checkpoints, floor)
            problems += mark_problems
            if mark_problems:
                mark = None  # a mark that fails is evidence of tampering: walk everything
        start_seq, walk_hash = (mark.seq + 1, mark.hash) if mark is not None else (floor + 1, start_hash)
        if mark is not None:  # the checkpoints up to the mark were checked by the walk that left it
            checked = [cp for cp in checkpoints if cp.seq > mark.seq]
        else:
            checked = checkpoints
        wanted.update(cp.seq for cp in checked)

        walk = ChainWalk(start_seq=start_seq, start_hash=walk_hash, key=self._chain_key, chain_from=self.chain_from)
        hashes: dict[int, str] = {}
        last = start_seq - 1
        while True:
            async with self._store.read() as s:  # Core rows: no ORM identity map for a read-only walk
                batch = [dict(r._mapping) for r in (await s.execute(
                    select(*columns).where(AuditEventRow.seq > last).order_by(AuditEventRow.seq)
                    .limit(VERIFY_BATCH)))]
            for e in batch:
                walk.feed(e)
                if e["seq"] in wanted:
                    hashes[e["seq"]] = e["hash"]
            if len(batch) < VERIFY_BATCH:
                break
            last = batch[-1]["seq"]
        earlier = sorted(x for x in wanted if floor < x < start_seq)
        for i in range(0, len(earlier), 1000):  # what the sink lines and checkpoints name before the walk
            async with self._store.read() as s:
                hashes.update((seq, h) for seq, h in (await s.execute(
                    select(AuditEventRow.seq, AuditEventRow.hash).where(AuditEventRow.seq.in_(earlier[i:i + 1000])))))
        report = walk.report()
        problems += report.problems

        covered = mark.seq if mark is not None else 0
        uncovered: tuple[int, str] | None = None
        for cp in checked:
            if floor and cp.seq <= floor:
                if cp.seq == floor and self._authentic_checkpoint(
                        {"seq": cp.seq, "hash": cp.hash, "time": cp.time, "chain_from": cp.chain_from, "mac": cp.mac}):
                    covered = max(covered, floor)  # the anchor (checked in _pruned_floor)
                continue
            if cp.mac is None or cp.chain_from is None:
                problems.append((cp.seq, f"checkpoint {cp.seq} is not authenticated (no MAC under the chain key)"))
            elif not self._authentic_checkpoint({"seq": cp.seq, "hash": cp.hash, "time": cp.time,
                                                 "chain_from": cp.chain_from, "mac": cp.mac}):
                problems.append((cp.seq, f"checkpoint {cp.seq} is forged or was altered"))
            elif cp.chain_from != self.chain_from:
                problems.append((min(cp.chain_from, self.chain_from),
                                 f"the keyed chain starts at event {cp.chain_from} by checkpoint {cp.seq}, "
                                 f"not at {self.chain_from} as the store now says"))
            elif cp.seq > head:
                problems.append((head + 1, f"{_were(head + 1, cp.seq)} deleted: checkpoint {cp.seq} vouches for them"))
            elif hashes.get(cp.seq) != cp.hash:
                problems.append((cp.seq, f"event {cp.seq} differs from its checkpoint"))
            else:
                covered = max(covered, cp.seq)
        if head > covered:
            uncovered = (covered + 1, f"{_are(covered + 1, head)} after the last checkpoint: not covered")
            problems.append(uncovered)
        if high > head:
            self._truncation(head, high=high)
        for found, high, by in self.truncated:
            problems.append((found + 1, f"{_were(found + 1, high)} recorded by {by} "
                                        f"but deleted from the store (its tail was truncated)"))

        compared = {"checkpoints": 0, "events": 0}
        for i, (name, cps, evs) in enumerate(split):
            compared["checkpoints"] += len(cps)
            compared["events"] += len(evs)
            # The lines given (an archive of a prune) must chain up to the anchor; the gateway's own
            # sink files may miss events a failed write skipped, so theirs are checked one by one.
            problems += self._compare(name, cps, evs, hashes, head, floor=floor, anchor=start_hash,
                                      archive=against is not None and i == 0)

        problems = sorted(set(problems), key=lambda p: (p[0], p[1]))
        if not problems and covered > floor:
            await self._mark_verified(next(cp for cp in checkpoints if cp.seq == covered), floor)
        # The headline: the first tampering found; an uncovered tail only when nothing else is wrong.
        first_problem = next((p for p in problems if p != uncovered), problems[0]) if problems else None
        out: dict[str, Any] = {
            "ok": not problems, "events": stored, "first_bad_seq": first_problem[0] if first_problem else None,
            "problem": first_problem[1] if first_problem else None, "checkpoints": len(checkpoints),
            "covered_to": covered, "chain_from": self.chain_from, "compared": compared,
            "problems": [{"seq": seq, "problem": why} for seq, why in problems],
            "incremental": mark is not None, "from_seq": start_seq, "walked": report.events,
        }
        return out

    async def _verified_mark(self, checkpoints: list[Any], floor: int) -> tuple[Any, list[tuple[int, str]]]:
        """The newest checkpoint an earlier verification marked clean and that still holds
        (see :meth:`verify`), and the problems of the marks that don't."""
        from gateway.store.models import AuditEventRow

        assert self._chain_key is not None
        problems: list[tuple[int, str]] = []
        for cp in reversed(checkpoints):
            if not cp.verified or cp.seq <= floor:
                continue
            parsed = _parse_mark(cp.verified)
            authentic = parsed is not None and cp.mac is not None and cp.chain_from is not None \
                and self._authentic_checkpoint({"seq": cp.seq, "hash": cp.hash, "time": cp.time,
                                               "chain_from": cp.chain_from, "mac": cp.mac}) \
                and hmac.compare_digest(parsed[2], verified_mac(self._chain_key, cp.seq, cp.hash, cp.chain_from,
                                                                parsed[0], parsed[1]))
            if not authentic or parsed is None:
                problems.append((cp.seq, f"checkpoint {cp.seq} carries a forged verification mark"))
                continue
            marked_floor, marked_events, _ = parsed
            if marked_floor != floor or cp.chain_from != self.chain_from:
                continue  # marked before a prune moved the floor: an older mark, or the full walk
            async with self._store.read() as s:
                count = (await s.execute(select(func.count()).select_from(AuditEventRow).where(
                    AuditEventRow.seq > floor, AuditEventRow.seq <= cp.seq))).scalar()
                event = (await s.execute(select(AuditEventRow).where(AuditEventRow.seq == cp.seq))).scalar()
            if count != marked_events:
                problems.append((floor + 1, f"{count} events are stored up to checkpoint {cp.seq}, which a "
                                            f"verification found clean with {marked_events}: events were deleted or added"))
            elif event is None or event.hash != cp.hash or not self._authentic_event(
                    {c.name: getattr(event, c.name) for c in AuditEventRow.__table__.columns}):
                problems.append((cp.seq, f"event {cp.seq} differs from its checkpoint"))
            else:
                return cp, problems
            break
        return None, problems

    async def _mark_verified(self, cp: Any, floor: int) -> None:
        """Leave the verification mark on checkpoint ``cp`` (the newest one a clean walk covered)."""
        from gateway.store.models import AuditCheckpointRow, AuditEventRow

        assert self._chain_key is not None
        try:
            async with self._store.write() as s:
                count = (await s.execute(select(func.count()).select_from(AuditEventRow).where(
                    AuditEventRow.seq > floor, AuditEventRow.seq <= cp.seq))).scalar() or 0
                mark = f"v1:{floor}:{count}:" + verified_mac(self._chain_key, cp.seq, cp.hash, cp.chain_from, floor, count)
                await s.execute(update(AuditCheckpointRow).where(
                    AuditCheckpointRow.seq == cp.seq, AuditCheckpointRow.hash == cp.hash).values(verified=mark))
        except Exception as exc:  # noqa: BLE001 - the next verification walks further, nothing else
            log.error("audit verification mark not written (%s)", type(exc).__name__)

    def _pruned_floor(self, first: Any, prunes: list[dict[str, Any]],
                      checkpoints: list[Any]) -> tuple[int, str, tuple[int, str] | None]:
        """Where the stored chain starts after a prune: (the last pruned event, its hash, a
        problem). A stored chain may start past event 1 only where an authentic prune event
        of the chain says it was cut (``pruned_through``) and an authentic checkpoint there
        (the anchor) holds the hash the first stored event links to. ``first``: the first
        stored event's (seq, prev_hash); ``prunes``: the stored prune events."""
        if first is None or first[0] <= 1:
            return 0, GENESIS, None
        floor, link = first[0] - 1, first[1]
        cuts = set()
        for e in prunes:
            try:
                if self._authentic_event(e):
                    cuts.add(int((e.get("details") or {}).get("pruned_through", -1)))
            except (TypeError, ValueError):
                continue
        anchored = any(cp.seq == floor and cp.hash == link and cp.mac and self._authentic_checkpoint(
            {"seq": cp.seq, "hash": cp.hash, "time": cp.time, "chain_from": cp.chain_from, "mac": cp.mac})
            for cp in checkpoints)
        if floor in cuts and anchored:
            return floor, link, None
        return 0, GENESIS, None if floor not in cuts and not anchored else (
            1, f"{_were(1, floor)} deleted: " + ("no recorded prune cut the chain there" if floor not in cuts
                                                  else "the prune's anchor checkpoint is missing or altered"))

    def _compare(self, name: str, cps: list[dict[str, Any]], evs: list[dict[str, Any]],
                 hashes: Mapping[int, str], head: int, *, floor: int = 0,
                 anchor: str = GENESIS, archive: bool = True) -> list[tuple[int, str]]:
        problems: list[tuple[int, str]] = []
        last = 0
        archived = [ev for ev in evs if isinstance(ev.get("seq"), int) and not isinstance(ev.get("seq"), bool)
                    and ev["seq"] <= floor]
        if archived and not archive:
            problems += [(ev["seq"], f"event {ev['seq']} in {name} is not authentic")
                         for ev in archived if not self._authentic_event(ev)]
        elif archived:  # an archive of a prune: its events must chain up to the anchor
            archived.sort(key=lambda e: e["seq"])
            try:
                rep = verify_chain(archived, start_seq=archived[0]["seq"], start_hash=str(archived[0]["prev_hash"]),
                                   key=self._chain_key, chain_from=self.chain_from)
                problems += [(seq, f"{why} in {name}") for seq, why in rep.problems]
            except (KeyError, TypeError, ValueError):
                problems.append((archived[0]["seq"], f"the archived events in {name} are malformed"))
            if archived[-1]["seq"] != floor or archived[-1].get("hash") != anchor:
                problems.append((floor, f"the archived events in {name} do not end at the prune's anchor "
                                        f"(event {floor})"))
        if archived:
            evs = [ev for ev in evs if not (isinstance(ev.get("seq"), int) and ev["seq"] <= floor)]
        for cp in cps:
            seq = cp.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                continue
            if not self._authentic_checkpoint(cp):
                problems.append((seq, f"checkpoint {seq} in {name} is not authentic"))
            elif seq < floor:
                continue  # certifies an archived event; the events' chain is checked above
            elif seq == floor and cp["hash"] != anchor:
                problems.append((seq, f"checkpoint {seq} in {name} differs from the prune's anchor"))
            elif seq == floor:
                continue
            elif seq > head:
                last = max(last, seq)
            elif hashes.get(seq) != cp["hash"]:
                problems.append((seq, f"event {seq} in the store differs from checkpoint {seq} in {name}"))
        for ev in evs:
            seq = ev.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                continue
            if not self._authentic_event(ev):
                problems.append((seq, f"event {seq} in {name} is not authentic"))
            elif seq > head:
                last = max(last, seq)
            elif hashes.get(seq) != ev["hash"]:
                problems.append((seq, f"event {seq} in the store differs from event {seq} in {name}"))
        if last:
            problems.append((head + 1, f"the store ends at event {head} but {name} records events up to {last}: "
                                       f"{_were(head + 1, last)} deleted (the tail was truncated)"))
        return problems


def _are(a: int, b: int) -> str:
    return f"event {a} is" if a == b else f"events {a}-{b} are"


def _were(a: int, b: int) -> str:
    return f"event {a} was" if a == b else f"events {a}-{b} were"
