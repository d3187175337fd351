"""The audit trail: one event per decision, chained by hashes, checkpointed with signatures.

Each event holds who (issuer and subject), what (action and target), the
decision and the rule that made it, the outcome, the lease, the request id
and the client address. Never a secret value, password or token: sensitive
identifiers (a wrap token, a client secret) are recorded as HMAC-SHA256 under
a per-deployment key, so an investigator holding a value can find it
(``POST /v1/audit/hash``) while the log itself reveals nothing.

Tamper evidence: event *n* stores ``hash_n = SHA-256(prev_hash || canonical
JSON of event n)``. Changing an event breaks its own hash; deleting,
reordering or inserting one breaks the sequence or the link to its
predecessor. :func:`verify_chain` walks the events and names the first bad
position. Checkpoints (the head's sequence and hash) are signed with the
gateway's signing key, so rewriting the whole tail after a checkpoint is
detected too.
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
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, text

GENESIS = "0" * 64
FIELDS = (
    "seq", "time", "request_id", "issuer", "subject", "action", "target", "decision", "rule", "outcome",
    "lease_id", "client_addr", "details",
)


def canonical(event: Mapping[str, Any]) -> bytes:
    body = {k: (event[k].isoformat() if isinstance(event.get(k), datetime) else event.get(k)) for k in FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(prev_hash: str, event: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(event)).hexdigest()


def keyed_hash(key: bytes, value: str) -> str:
    """HMAC-SHA256 of a sensitive identifier, for the log and for searching it."""
    return "hmac-sha256:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str | None = None
    problems: tuple[tuple[int, str], ...] = ()  # every break found, in order


def verify_chain(events: Iterable[Mapping[str, Any]], *, start_seq: int = 1, start_hash: str = GENESIS) -> ChainReport:
    """Walk events in storage order and report every break, the first one first.

    After a break the walk re-synchronises on the event that broke it, so a
    modified event *and* a later deleted one are both named. ``events`` are
    mappings with every field of :data:`FIELDS` plus ``prev_hash`` and ``hash``.
    """
    expected_seq, prev, n = start_seq, start_hash, 0
    problems: list[tuple[int, str]] = []
    for event in events:
        n += 1
        seq = event["seq"]
        if seq != expected_seq:
            if seq > expected_seq:
                gap = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}-{seq - 1}"
                problems.append((expected_seq, f"event {gap} is missing (deleted)"))
            else:
                problems.append((seq, f"event {seq} is out of order or duplicated"))
        elif event["prev_hash"] != prev:
            problems.append((seq, f"event {seq} does not link to the event before it"))
        if not hmac.compare_digest(event["hash"], chain_hash(event["prev_hash"], event)):
            problems.append((seq, f"event {seq} was modified"))
        prev, expected_seq = event["hash"], max(expected_seq, seq + 1)
    if not problems:
        return ChainReport(True, n)
    first = problems[0]
    return ChainReport(False, n, first[0], first[1], tuple(problems))


# --- recording -----------------------------------------------------------------

log = logging.getLogger("credgate.audit")
_current: ContextVar[dict[str, Any] | None] = ContextVar("credgate_audit", default=None)
_PG_AUDIT_LOCK = 0x6175646974  # "audit"


def begin() -> tuple[dict[str, Any], Any]:
    """Start collecting facts about the current request (called by the middleware)."""
    ctx: dict[str, Any] = {}
    return ctx, _current.set(ctx)


def end(token: Any) -> None:
    _current.reset(token)


def note(**fields: Any) -> None:
    """Add facts to the current request's audit event (no-op outside a request)."""
    ctx = _current.get()
    if ctx is not None:
        details = fields.pop("details", None)
        ctx.update({k: v for k, v in fields.items() if v is not None})
        if details:
            ctx.setdefault("details", {}).update(details)


def noted() -> dict[str, Any]:
    return _current.get() or {}


class AuditUnavailable(Exception):
    pass


@dataclass
class SinkHealth:
    ok: bool = True
    error: str | None = None


class FileSink:
    """JSON lines appended to a file; each line flushed and fsync'd before it counts."""

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


class AuditLog:
    """Writes events to the store (the chain) and to the configured sinks."""

    def __init__(self, store: Any, envelope: Any, signing: Any, sinks: list[Any], *,
                 wait_seconds: float = 2.0, checkpoint_every: int = 100) -> None:
        self._store = store
        self._envelope = envelope
        self._signing = signing
        self.sinks = sinks
        self.wait_seconds = wait_seconds
        self.checkpoint_every = checkpoint_every
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._key: bytes | None = None
        self.health: dict[str, SinkHealth] = {"store": SinkHealth(), **{s.name: SinkHealth() for s in sinks}}

    async def start(self) -> None:
        from gateway.envelope import context
        from gateway.store.models import AuditKeyRow, utcnow

        async with self._store.write() as s:
            row = await s.get(AuditKeyRow, 1)
            if row is None:
                row = AuditKeyRow(id=1, created_at=utcnow())
                row.sealed = self._envelope.seal(_secrets.token_bytes(32), context("audit-hmac-key"))
                s.add(row)
        self._key = self._envelope.open(row.sealed, context("audit-hmac-key"))

    def hmac(self, value: str) -> str:
        assert self._key is not None
        return keyed_hash(self._key, value)

    @property
    def healthy(self) -> bool:
        return all(h.ok for name, h in self.health.items() if name == "store" or self._required(name))

    def _required(self, name: str) -> bool:
        return any(s.name == name and s.required for s in self.sinks)

    async def record(self, event: dict[str, Any], *, fail_closed: bool) -> None:
        """Persist one event. A required sink that stays unwritable for ``wait_seconds``
        raises AuditUnavailable when ``fail_closed``; otherwise the failure is logged."""
        deadline = asyncio.get_running_loop().time() + self.wait_seconds
        delay = 0.05
        while True:
            try:
                await self._write_all(event)
                return
            except AuditUnavailable:
                if asyncio.get_running_loop().time() + delay > deadline:
                    if fail_closed:
                        raise
                    log.error("audit event not fully recorded (a required sink is down)")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _write_all(self, event: dict[str, Any]) -> None:
        if "seq" not in event:
            await self._store_append(event)
        line = b""
        failed = False
        for sink in self.sinks:
            if event.get("_written", {}).get(sink.name):
                continue
            if not line:
                line = (json.dumps({k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in event.items()
                                    if not k.startswith("_")}, sort_keys=True) + "\n").encode()
            try:
                await sink.write(line)
                self.health[sink.name] = SinkHealth()
                event.setdefault("_written", {})[sink.name] = True
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

        staged: list[tuple[dict[str, Any], dict[str, Any]]] = []

        def append(s: Any) -> None:
            staged.clear()  # a retried group starts over
            if self._store.dialect == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
            head = (s.execute(
                select(AuditEventRow.seq, AuditEventRow.hash).order_by(AuditEventRow.seq.desc()).limit(1))).first()
            seq, prev = (head[0], head[1]) if head else (0, GENESIS)
            for event in events:
                seq += 1
                event.setdefault("time", utcnow())
                full = {f: event.get(f) for f in FIELDS}
                full.update(seq=seq, prev_hash=prev)
                full["hash"] = prev = chain_hash(prev, full)
                staged.append((event, full))
            # One Core executemany: no ORM unit of work for an append-only table.
            s.execute(insert(AuditEventRow), [full for _, full in staged])

        # Shares its commit with whatever else is being written (issued leases): one fsync for both.
        await self._store.grouped(append)
        for event, full in staged:
            event.update(seq=full["seq"], prev_hash=full["prev_hash"], hash=full["hash"])
        first, last = staged[0][1]["seq"], staged[-1][1]["seq"]
        if last // self.checkpoint_every > (first - 1) // self.checkpoint_every:
            await self.checkpoint()

    async def checkpoint(self) -> dict[str, Any] | None:
        from gateway.store.models import AuditCheckpointRow, AuditEventRow, utcnow

        async with self._store.write() as s:
            head = (await s.execute(select(AuditEventRow.seq, AuditEventRow.hash).order_by(AuditEventRow.seq.desc()).limit(1))).first()
            if head is None:
                return None
            now = utcnow()
            signature = self._signing.sign({"seq": head[0], "hash": head[1], "time": now.isoformat(), "typ": "audit-checkpoint"},
                                           typ="cg-audit+jwt")
            if await s.get(AuditCheckpointRow, head[0]) is None:
                s.add(AuditCheckpointRow(seq=head[0], hash=head[1], time=now, signature=signature))
        return {"seq": head[0], "hash": head[1]}

    async def verify(self) -> dict[str, Any]:
        from gateway.store.models import AuditCheckpointRow, AuditEventRow

        async with self._store.read() as s:
            rows = (await s.execute(select(AuditEventRow).order_by(AuditEventRow.seq))).scalars()
            report = verify_chain({c.name: getattr(r, c.name) for c in AuditEventRow.__table__.columns} for r in rows)
            checkpoints = list((await s.execute(select(AuditCheckpointRow).order_by(AuditCheckpointRow.seq))).scalars())
            by_seq = {r.seq: r.hash for r in (await s.execute(
                select(AuditEventRow).where(AuditEventRow.seq.in_([c.seq for c in checkpoints])))).scalars()}
            last = (await s.execute(select(func.max(AuditEventRow.seq)))).scalar()
        out = {"ok": report.ok, "events": report.events, "first_bad_seq": report.first_bad_seq,
               "problem": report.problem, "checkpoints": len(checkpoints),
               "problems": [{"seq": seq, "problem": why} for seq, why in report.problems]}
        for cp in checkpoints:
            try:
                claims = (await self._signing.verify(cp.signature)).claims
            except Exception:  # noqa: BLE001
                claims = {}
            if claims.get("seq") != cp.seq or claims.get("hash") != cp.hash:
                return {**out, "ok": False, "first_bad_seq": cp.seq, "problem": f"checkpoint {cp.seq} is not signed by this gateway"}
            if by_seq.get(cp.seq) != cp.hash:
                problem = (f"events up to checkpoint {cp.seq} were deleted" if (last or 0) < cp.seq
                           else f"event {cp.seq} differs from its signed checkpoint")
                if out["ok"] or (out["first_bad_seq"] or 0) > cp.seq:
                    return {**out, "ok": False, "first_bad_seq": min(cp.seq, (last or 0) + 1), "problem": problem}
        return out
